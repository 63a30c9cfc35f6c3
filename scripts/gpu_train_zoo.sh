#!/usr/bin/env bash
# Train the toy editor further on a GPU lent for minutes, prepared for a session that has one.
#
#   scripts/gpu_check.sh prepare        # HERE, once: the diffusers wheel into .whl/ (the GPU machine lacks it)
#   scripts/gpu_train_zoo.sh run        # ON THE DEVICE (device tool `run`, carry [".whl"], timeout_s 590)
#
# What `run` does inside GPU_TRAIN_BUDGET_S (default 520 s):
#   1. continues the SFT training of the shipped editor (models/toy-editor: its VAE, text encoder,
#      scheduler and UNet) on fresh toy edits, batch 256, bf16, DataLoader workers, for the minutes
#      the budget leaves (the trainer's --max-minutes: it checkpoints and writes the pipeline):
#      70% of them at a constant rate, then a linear cooldown (--decay-steps) sized by the rate;
#      the pipeline at the end of the constant phase goes to $OUT/toy-editor-hot.tar, a fallback;
#   2. packs the trained pipeline, fp16, into $OUT/toy-editor.tar (one file: the tool returns at most 8);
#   3. judges 300 fresh edits with it at the default sampling settings (`python -m hive evaluate`).
# Back here: `tar -xf .../toy-editor.tar -C /tmp && python -m hive train ship --editor /tmp/toy-editor
#   --clip models/toy-clip`, then `python -m hive evaluate --n 300` on the CPU and commit models/.
# Dry run on a CPU (checks the script, not the speed):
#   GPU_TRAIN_NO_WHEELS=1 GPU_TRAIN_PYTHON=.venv/bin/python GPU_TRAIN_BUDGET_S=200 GPU_TRAIN_EVAL_N=8 \
#   OUT=/tmp/gt scripts/gpu_train_zoo.sh run
set -uo pipefail
cd "$(dirname "$0")/.."

pack() {  # pack PIPELINE NAME: the pipeline, fp16 as shipped, into $out/NAME.tar (the fp32 UNet alone
    # is over the tool's 16 MB a file)
    rm -rf "$work/$2" && mkdir -p "$work/$2"
    "$py" -m hive train ship --editor "$1" --clip models/toy-clip --models "$work/$2" > /dev/null \
        && tar -cf "$out/$2.tar" -C "$work/$2" toy-editor
}

run() {
    local budget=${GPU_TRAIN_BUDGET_S:-520} start=$SECONDS
    local out=${OUT:-/tmp/gpu_train_out} py=${GPU_TRAIN_PYTHON:-python3} work=/tmp/hive-gpu-train
    mkdir -p "$out" "$work"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
    if [[ -z "${GPU_TRAIN_NO_WHEELS:-}" ]]; then
        scripts/gpu_check.sh wheels "$py" "$out/imports.log" || exit 3
        export PYTHONPATH=/tmp/site:$PWD
    fi
    local device workers
    device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 0 ))
    # what is left after training: evaluation (~1 min on a GPU) and packing
    minutes_left() {  # what the budget leaves after 120 s for evaluating and packing, at least $1 min
        "$py" -c "print(max($1, ($budget - ($SECONDS - $start) - 120) / 60))"
    }
    local minutes
    minutes=$(minutes_left 0.5)
    local batch=256 precision=bf16
    [[ $device == cpu ]] && batch=8 precision=no
    # two phases (docs/toy-zoo-training.md, session 5): 70% of the time at a constant rate with
    # the high-noise bias, then a linear cooldown to 0 over the steps the measured rate leaves
    local hot cool_bias=${GPU_TRAIN_COOL_BIAS:-1}
    hot=$("$py" -c "print(max(0.3, 0.7 * $minutes))")
    local common=(--base models/toy-editor --out "$work/editor" --batch-size $batch --lr 1e-3
                  --mixed-precision $precision --workers "$workers" --change-weight 4 --min-snr-gamma 0
                  --checkpoint-every 200)
    echo "== train editor on $device: $hot min at a constant rate (batch $batch, $workers workers)"
    local t0=$SECONDS
    "$py" -m hive train editor "${common[@]}" --steps 1000000 --high-noise-bias 1 \
        --max-minutes "$hot" > "$out/train.log" 2>&1
    echo "   rc=$?, $(( SECONDS - start ))s used"; tail -c 400 "$out/train.log"; echo
    pack "$work/editor/pipeline" toy-editor-hot  # a fallback, should the lease end during the cooldown
    local reached end left
    # the step the cooldown resumes from: the newest checkpoint (the time budget stops at one)
    reached=$("$py" -c "from pathlib import Path; from hive.training import checkpoint_dirs; \
print(checkpoint_dirs(Path('$work/editor'))[-1].name.split('-')[1])")
    left=$(minutes_left 0.3)
    end=$("$py" -c "print(int($reached + 0.85 * $reached / max(1, $SECONDS - $t0) * $left * 60))")
    echo "== cooldown: steps $reached -> $end in $left min (high-noise bias $cool_bias)"
    "$py" -m hive train editor "${common[@]}" --steps "$end" --decay-steps $(( end - reached )) \
        --high-noise-bias "$cool_bias" --max-minutes "$left" >> "$out/train.log" 2>&1
    echo "   rc=$?, $(( SECONDS - start ))s used"; tail -c 400 "$out/train.log"; echo
    cp "$work/editor/loss.jsonl" "$out/loss.jsonl" 2>/dev/null
    pack "$work/editor/pipeline" toy-editor  # before the evaluation, so it comes back even if that runs late
    echo "== evaluate 300 fresh edits"
    "$py" -m hive evaluate --model "$work/toy-editor/toy-editor" --n "${GPU_TRAIN_EVAL_N:-300}" --json > "$out/evaluate.log" 2>&1
    tail -n 1 "$out/evaluate.log" > "$out/evaluate.json"
    cat "$out/evaluate.json"
    ls -la "$out"; echo "done in $(( SECONDS - start ))s"
}

case "${1:-}" in
    run) run ;;
    *) echo "usage: $0 run   (see the header)"; exit 2 ;;
esac
