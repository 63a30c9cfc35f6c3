#!/usr/bin/env bash
# The GPU speed check of issue 7, prepared for a session that is lent a GPU machine (docs/speed.md).
#
#   scripts/gpu_check.sh prepare   # HERE, once: fetch the wheels the device machine lacks into .whl/
#   scripts/gpu_check.sh run       # ON THE DEVICE (device tool `run`, carry [".whl"]), one call
#   scripts/gpu_check.sh collect DIR   # HERE, after: the JSON results from DIR (the tool's files_at)
#                                      # into bench/results/ under the names the runs recorded
#
# What `run` does, inside a time budget (GPU_CHECK_BUDGET_S, default 540 s, under the tool's 600 s):
#   1. bench edit --config sd15 (SD-1.5 shapes, random weights, 512 px, 20 steps, K=4): the plain
#      diffusers call vs ours, compiled with an empty inductor cache (pays the compile);
#   2. bench train --config sd15 (256 px, batch 32, bf16 autocast): diffusers' step vs ours;
#   3. bench edit again in a fresh process: the first call now finds the compiled kernels in the
#      cache on disk (what an app restart pays);
#   4. if time is left: bench edit with CUDA graphs (compile mode reduce-overhead).
# Each result is one JSON file in $OUT (and bench/results/ there); the last lines are a table.
# The device machine has torch, accelerate and transformers but no diffusers (see
# /work/.library/device/KINDS.md); the wheels travel in .whl/ (/work/.library/device/README.md).
# Dry run on a CPU (checks the script, not the GPU): GPU_CHECK_CONFIG=sd15-tiny GPU_CHECK_NO_WHEELS=1 \
#   GPU_CHECK_PYTHON=.venv/bin/python OUT=/tmp/gc scripts/gpu_check.sh run
set -uo pipefail
cd "$(dirname "$0")/.."

DIFFUSERS=diffusers==0.42.1
TRANSFORMERS=transformers==5.23.0   # fallback only: the machine's own transformers is tried first

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$DIFFUSERS" "$TRANSFORMERS"
    ls -la .whl
    echo "now call the device tool: run(command='scripts/gpu_check.sh run', carry=['.whl'], timeout_s=590)"
}

wheels() {  # wheels PYTHON LOG: the carried wheels into /tmp/site (callers put it on PYTHONPATH):
    # diffusers always; transformers only if the machine's own does not import with it
    local py=$1 log=$2
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/diffusers-*.whl || { echo "no diffusers wheel: run 'scripts/gpu_check.sh prepare' here first"; return 3; }
    if ! PYTHONPATH=/tmp/site:$PWD "$py" -c "from diffusers import StableDiffusionInstructPix2PixPipeline" >> "$log" 2>&1
    then
        echo "the machine's transformers does not work with this diffusers; installing the carried one"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/transformers-*.whl || return 3
    fi
}

run() {
    local budget=${GPU_CHECK_BUDGET_S:-540}
    local start=$SECONDS
    local out=${OUT:-/tmp/gpu_check_out}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
    export HIVE_COMPILE_CACHE=/tmp/hive-compile-cache   # shared by the runs below, empty at first
    left() { echo $(( budget - (SECONDS - start) )); }
    local py=${GPU_CHECK_PYTHON:-python3}
    local config=${GPU_CHECK_CONFIG:-sd15}
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        "$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
    } > "$out/machine.txt" 2>&1
    cat "$out/machine.txt"

    export PYTHONPATH=$PWD
    if [[ -z "${GPU_CHECK_NO_WHEELS:-}" ]]; then
        wheels "$py" "$out/machine.txt" || exit 3
        export PYTHONPATH=/tmp/site:$PWD
    fi
    "$py" -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
        | tee -a "$out/machine.txt"

    step() {  # step NAME SECONDS ARGS...: one bench run with a time limit, its JSON line into $OUT/NAME.json
        local name=$1 limit=$2; shift 2
        local avail; avail=$(left)
        if (( avail < 60 )); then echo "skip $name: ${avail}s left"; return; fi
        (( limit > avail )) && limit=$avail
        echo "== $name (limit ${limit}s): python -m hive $*"
        timeout --kill-after=10 "$limit" "$py" -m hive "$@" --json > "$out/$name.log" 2>&1
        local rc=$?
        tail -n 1 "$out/$name.log" | "$py" -c "import json,sys; json.loads(sys.stdin.read())" 2>/dev/null \
            && tail -n 1 "$out/$name.log" > "$out/$name.json"
        echo "   rc=$rc, $(( SECONDS - start ))s used"
        [[ $rc -ne 0 ]] && tail -n 20 "$out/$name.log"
    }
    step edit_cold 210 bench edit --config "$config" --repeats 5
    step train 210 bench train --config "$config" --repeats 5
    step edit_warm 100 bench edit --config "$config" --repeats 3
    step edit_cudagraphs 150 bench edit --config "$config" --repeats 5 --compile-mode reduce-overhead --no-record
    # bench/results/ of the device machine does not come back: `collect` files the step JSONs here.
    # Keep $OUT within the tool's limit of 8 files: the logs of successful runs are not needed.
    for f in "$out"/*.log; do n=${f%.log}; [[ -f "$n.json" ]] && rm -f "$f"; done
    "$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
print(f"{'run':<16}{'reference_s':>12}{'ours_s':>9}{'speedup':>9}{'first_s':>9}{'agree':>7}{'ours TFLOP/s':>14}{'share':>7}")
for name in ("edit_cold", "edit_warm", "edit_cudagraphs", "train"):
    p = Path(sys.argv[1]) / f"{name}.json"
    if not p.exists():
        print(f"{name:<16} (no result)")
        continue
    r = json.loads(p.read_text())
    first = r.get("ours_first_call_s", r.get("ours_first_step_s"))
    agree = r.get("outputs_agree", r.get("losses_agree"))
    tflops = r.get("ours_unet_tflops", r.get("ours_tflops"))
    print(f"{name:<16}{r['reference_s']:>12.3f}{r['ours_s']:>9.3f}{r['speedup']:>9.2f}{first:>9.1f}{str(agree):>7}"
          f"{tflops:>14.1f}{r['ours_share_of_peak']:>7.2f}")
EOF
}

collect() {  # collect DIR: each DIR/<step>.json into bench/results/<the name its run recorded>
    local dir=${1:?usage: $0 collect DIR}
    python3 - "$dir" <<'PY'
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    if "recorded" not in r:
        print(f"{p.name}: not recorded (--no-record), left out")
        continue
    dest = Path("bench/results") / Path(r["recorded"]).name
    dest.write_text(json.dumps(r, indent=2))
    print(f"{p.name} -> {dest}")
PY
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    wheels) wheels "${2:-python3}" "${3:-/dev/null}" ;;
    collect) collect "${2:-}" ;;
    *) echo "usage: $0 prepare|run|collect DIR|wheels PYTHON LOG"; exit 2 ;;
esac
