#!/usr/bin/env bash
# Train the toy editor further on a GPU lent for minutes, prepared for a session that has one.
#
#   scripts/gpu_check.sh prepare        # HERE, once: the diffusers wheel into .whl/ (the GPU machine lacks it)
#   scripts/gpu_train_zoo.sh run        # ON THE DEVICE (device tool `run`, carry [".whl"], timeout_s 590)
#
# What `run` does inside GPU_TRAIN_BUDGET_S (default 520 s): two runs side by side on the one GPU,
# each continuing the SFT training of the shipped editor (models/toy-editor: its VAE, text encoder,
# scheduler and UNet) on fresh toy edits, batch 256, bf16, with its own DataLoader workers and data
# seed. GPU_TRAIN_PLAN picks the two runs:
#   attention (default; session 23): resizes drawn 3x as often, on the UNet with attention added at
#     its 16x16 level (`hive train add-attention`; the new blocks start as a no-op): A in the first
#     down block (self- and cross-attention), B in the last up block (cross-attention only);
#   resize (session 22): the UNet as it is; A with every kind drawn evenly, B with resizes 3x;
#   decoder (session 24): no UNet training. The shipped editor samples its final latents for fresh
#     toy edits (GPU_DECODER_SAMPLE_MIN minutes, default 2.5), then two `hive train decoder` runs,
#     one after the other, fine-tune its VAE decoder on them (GPU_DECODER_A / GPU_DECODER_B: options),
#     each returned as $OUT/NAME-decoder.tar (model/: the AutoencoderKL folder with metrics.json and
#     loss.jsonl); validate the editor with it (models/toy-editor with vae/ replaced) with `evaluate`,
#     then ship with `python -m hive train ship --editor models/toy-editor --clip models/toy-clip --vae DIR`.
# Each spends 70% of its minutes at a
# constant rate, then a linear cooldown (--decay-steps) sized by the rate it measured (the trainer's
# --max-minutes checkpoints and writes the pipeline), and packs its pipeline, fp16 as shipped, into
# $OUT/a.tar or $OUT/b.tar (one file each: the tool returns at most 8). A run that fails before its
# first checkpoint is tried once more without workers and in fp32. Judging is left to the CPU here.
# The working tree travels with the wheels only if it stays under 64 MiB: move models/toy-paper
# (35 MB, not needed there) out of the checkout for the call and back after it.
# Back here: `tar -xf a.tar -C /tmp/a`, validate with `python -m hive evaluate --model /tmp/a/toy-editor
#   --n 200 --seed 800000000`, ship the better with `python -m hive train ship --editor ... --clip
#   models/toy-clip`, then `python -m hive evaluate --n 300` and commit models/.
# Dry run on a CPU (checks the script, not the speed):
#   GPU_TRAIN_NO_WHEELS=1 GPU_TRAIN_PYTHON=.venv/bin/python GPU_TRAIN_BUDGET_S=220 \
#   OUT=/tmp/gt scripts/gpu_train_zoo.sh run
set -uo pipefail
cd "$(dirname "$0")/.."

pack() {  # pack PIPELINE NAME: the pipeline, fp16 as shipped, into $out/NAME.tar (the fp32 UNet alone
    # is over the tool's 16 MB a file)
    local dest="$work/packed-$2"
    rm -rf "$dest" && mkdir -p "$dest"
    "$py" -m hive train ship --editor "$1" --clip models/toy-clip --models "$dest" > /dev/null \
        && tar -cf "$out/$2.tar" -C "$dest" toy-editor
}

newest_step() {  # newest_step DIR: the step of DIR's newest checkpoint, or nothing if it has none
    "$py" -c "from pathlib import Path; from hive.training import checkpoint_dirs; \
d = checkpoint_dirs(Path('$1')); print(d[-1].name.split('-')[1] if d else '')"
}

train_one() {  # train_one NAME WORKERS BASE EXTRA...: one SFT run continuing the pipeline BASE, constant
    # rate then a cooldown, packed into $out/NAME.tar; its log in $out/NAME.log, its loss curve in
    # $out/NAME-loss.jsonl
    local name=$1 workers=$2 base=$3; shift 3
    local dir="$work/$name" log="$out/$name.log" t0=$SECONDS mp=$precision
    local common=(--base "$base" --out "$dir" --batch-size $batch --lr 1e-3 --change-weight 4
                  --min-snr-gamma 0 --high-noise-bias 1 --checkpoint-every 200 "$@")
    local attempt hot reached=""
    : > "$log"
    for attempt in fast plain; do
        if [[ $attempt == plain ]]; then  # the fast path failed before a checkpoint (workers, bf16)
            echo "   $name wrote no checkpoint: $(tail -n 3 "$log" | tr '\n' ' ')"
            echo "   $name: again without workers and in fp32"
            workers=0 mp=no
        fi
        hot=$("$py" -c "print(max(0.3, 0.7 * $(minutes_left 0.5)))")
        echo "== $name: $hot min at a constant rate (batch $batch, $workers workers, $mp): $*"
        "$py" -m hive train editor "${common[@]}" --workers "$workers" --mixed-precision "$mp" --steps 1000000 \
            --max-minutes "$hot" >> "$log" 2>&1
        echo "   $name constant phase rc=$?, $(( SECONDS - start ))s used"
        # the step the cooldown resumes from: the newest checkpoint (the time budget stops at one)
        reached=$(newest_step "$dir")
        [[ -n $reached ]] && break
    done
    [[ -z $reached ]] && { echo "   $name: no checkpoint"; return 1; }
    local left end
    left=$(minutes_left 0.3)
    end=$("$py" -c "print(int($reached + 0.85 * $reached / max(1, $SECONDS - $t0) * $left * 60))")
    echo "== $name cooldown: steps $reached -> $end in $left min"
    "$py" -m hive train editor "${common[@]}" --workers "$workers" --mixed-precision "$mp" --steps "$end" \
        --decay-steps $(( end - reached )) --max-minutes "$left" >> "$log" 2>&1
    echo "   $name cooldown rc=$?, $(( SECONDS - start ))s used"
    cp "$dir/loss.jsonl" "$out/$name-loss.jsonl" 2>/dev/null
    pack "$dir/pipeline" "$name"
    echo "   $name packed: $(ls -la "$out/$name.tar" 2>&1)"
}

decoder_one() {  # decoder_one NAME EDITS SHARE OPTIONS...: one decoder fine-tune on the shared latents in
    # SHARE of the minutes left, packed into $out/NAME-decoder.tar
    local name=$1 edits=$2 share=$3; shift 3
    local dir="$work/dec-$name" minutes
    minutes=$("$py" -c "print(max(0.5, $(minutes_left 0.5) * $share))")
    mkdir -p "$dir" && ln -sfn "$work/latents" "$dir/latents"
    echo "== decoder $name: $edits edits, $minutes min, $*"
    "$py" -m hive train decoder --editor models/toy-editor --out "$dir" --edits "$edits" --max-minutes "$minutes" \
        "$@" > "$out/$name.log" 2>&1
    echo "   decoder $name rc=$?, $(( SECONDS - start ))s used"
    # one tar per run: the tool returns at most 8 files (session 24 lost run b's four loose files)
    cp "$dir/metrics.json" "$dir/loss.jsonl" "$dir/model/" 2>/dev/null
    tar -cf "$out/$name-decoder.tar" -C "$dir" model
}

run() {
    budget=${GPU_TRAIN_BUDGET_S:-520} start=$SECONDS
    out=${OUT:-/tmp/gpu_train_out} py=${GPU_TRAIN_PYTHON:-python3} work=/tmp/hive-gpu-train
    mkdir -p "$out" "$work"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
    if [[ -z "${GPU_TRAIN_NO_WHEELS:-}" ]]; then
        scripts/gpu_check.sh wheels "$py" "$out/machine.log" || exit 3
        export PYTHONPATH=/tmp/site:$PWD
    fi
    { nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1
      "$py" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; nproc; } >> "$out/machine.log" 2>&1
    cat "$out/machine.log"
    device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    batch=256 precision=bf16
    [[ $device == cpu ]] && batch=8 precision=no
    minutes_left() {  # what the budget leaves after $GPU_TRAIN_RESERVE_S for packing, at least $1 min
        "$py" -c "print(max($1, ($budget - ($SECONDS - $start) - ${GPU_TRAIN_RESERVE_S:-45}) / 60))"
    }
    # Two runs side by side on the one GPU (the 5.6M-parameter UNet leaves most of an H200 idle), each
    # with its own share of the CPU for building batches and its own data seed (the plans: the header).
    local workers=$(( $(nproc) > 4 ? ($(nproc) - 2) / 2 : 0 ))
    [[ $device == cpu ]] && workers=0
    case ${GPU_TRAIN_PLAN:-attention} in
        attention)
            "$py" -m hive train add-attention --base models/toy-editor --out "$work/base-a" --place down \
                >> "$out/machine.log" 2>&1 || exit 4
            "$py" -m hive train add-attention --base models/toy-editor --out "$work/base-b" --place up \
                --cross-only >> "$out/machine.log" 2>&1 || exit 4
            train_one a "$workers" "$work/base-a" --seed 41 --kind-weights resize=3 > "$out/a.out" 2>&1 &
            train_one b "$workers" "$work/base-b" --seed 42 --kind-weights resize=3 > "$out/b.out" 2>&1 & ;;
        resize)
            train_one a "$workers" models/toy-editor --seed 31 > "$out/a.out" 2>&1 &
            train_one b "$workers" models/toy-editor --seed 32 --kind-weights resize=3 > "$out/b.out" 2>&1 & ;;
        decoder)
            "$py" -c "from pathlib import Path; from hive.train_decoder import sample_editor_latents; \
sample_editor_latents('models/toy-editor', Path('$work/latents'), 102400, batch=512, \
max_minutes=${GPU_DECODER_SAMPLE_MIN:-2.5})" > "$out/sample.log" 2>&1
            local rc=$? chunks
            chunks=$(ls "$work"/latents/chunk-*.pt 2>/dev/null | wc -l)
            echo "latents sampled: rc=$rc, $chunks chunks, $(( SECONDS - start ))s used" | tee -a "$out/machine.log"
            local edits=$(( chunks * 512 ))
            (( edits > 0 )) || { tail -n 20 "$out/sample.log"; exit 5; }
            # one after the other: side by side each ran at 10 steps/s, alone at 45 (session 24)
            { decoder_one a "$edits" 0.5 ${GPU_DECODER_A:---crop 0 --object-boost 1 --steps 5000 --batch-size 128} \
                > "$out/a.out" 2>&1
              decoder_one b "$edits" 1 ${GPU_DECODER_B:---crop 0 --object-boost 0.5 --steps 5000 --batch-size 128} \
                > "$out/b.out" 2>&1; } & ;;
        *) echo "GPU_TRAIN_PLAN must be attention, resize or decoder"; exit 2 ;;
    esac
    wait
    cat "$out/a.out" "$out/b.out" >> "$out/machine.log"; rm -f "$out/a.out" "$out/b.out"
    cat "$out/machine.log"
    for name in a b; do  # the logs are long (progress bars): keep the last lines only
        [[ -f "$out/$name.log" ]] && tr '\r' '\n' < "$out/$name.log" | grep -v '^$' | grep -v 'Loading\|Writing' \
            | tail -n 40 > "$out/$name.tail" && mv "$out/$name.tail" "$out/$name.log"
    done
    ls -la "$out"; echo "done in $(( SECONDS - start ))s"
}

case "${1:-}" in
    run) run ;;
    *) echo "usage: $0 run   (see the header)"; exit 2 ;;
esac
