#!/usr/bin/env bash
# sdtune's GPU speed check: ONE device call on nvidia-h200 of at most 8 minutes. In order of priority:
#   0. tiny:sd1 smoke: every method eager vs captured CUDA graph (fast failure signal, tight loss check)
#   1. random:sd15 bs1 512 px, LoRA / Textual Inversion / hypernetwork, eager (off) vs default (auto):
#      steady steps/s, peak memory, FLOPs, MFU; the two modes' losses must agree
#   2. DreamBooth bs1 512 px (auto)          3. MFU point: LoRA bs16 512 px (auto)
#   4. 1,000-step LoRA time to artifact through `sdtune train`, cold then warm; LoRA bs16 channels-last
#   5. if time is left: LoRA bs1 with torch.compile mode=reduce-overhead (compile seconds + steady rate, to
#      calibrate speed.COMPILE_SECONDS / COMPILE_SAVES_SECONDS_PER_STEP)
# Results in $OUT: results.jsonl (a JSON line per step), log.txt, summary.md (also printed last).
#
# Run it with the device tool: kind "nvidia-h200", carry [".device"] (the diffusers wheel), timeout_s 500,
#   command "bash scripts/gpu_bench.sh"
# Check its logic on a CPU first (tiny model, few steps, the same flow and files):
#   . .venv/bin/activate && GPU_BENCH_DRY_RUN=1 OUT=/tmp/gpu-bench bash scripts/gpu_bench.sh
set -u -o pipefail
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
START=$(date +%s)
END_BY=${GPU_BENCH_SECONDS:-470}  # no step runs past this many seconds after the start
LOG=$OUT/log.txt
RESULTS=$OUT/results.jsonl
TOOL="python3 scripts/gpu_bench_tool.py"
export PYTHONPATH=src PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
: > "$RESULTS"

if [ "${GPU_BENCH_DRY_RUN:-0}" = 1 ]; then
    MODEL=tiny:sd1 PX=64 BIG_BS=4 STEPS=3 WARMUP=1 TTA_STEPS=12 DEVICE=cpu PRECISION=no LONG_MODE=off
    SMOKE_MODES=off
else
    MODEL=random:sd15 PX=512 BIG_BS=16 STEPS=40 WARMUP=5 TTA_STEPS=1000 DEVICE=cuda PRECISION=bf16
    LONG_MODE=reduce-overhead SMOKE_MODES=off,cuda-graphs
    # `pip` alone installs into another Python on that machine; the image has torch, transformers, peft, not diffusers.
    python3 -m pip install -q --no-deps .device/diffusers-0.42.1-py3-none-any.whl >> "$LOG" 2>&1 \
        || { echo "diffusers wheel install failed; see log.txt" | tee -a "$LOG"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv >> "$LOG" 2>&1
fi
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$LOG"

left() { echo $(( END_BY - ($(date +%s) - START) )); }

# bench STEP NEEDS_SECONDS MAX_SECONDS ARGS...: one `sdtune bench --json` run, skipped when fewer than
# NEEDS_SECONDS are left, stopped after MAX_SECONDS or at the end of the budget.
bench() {
    local step=$1 needs=$2 most=$3; shift 3
    local budget; budget=$(left)
    if [ "$budget" -lt "$needs" ]; then echo "== $step skipped: ${budget}s left" | tee -a "$LOG"; return; fi
    [ "$most" -gt "$budget" ] && most=$budget
    echo "== $step (${most}s at most; ${budget}s left)" | tee -a "$LOG"
    timeout "$most" python3 -m sdtune.cli bench --json --device "$DEVICE" --mixed-precision "$PRECISION" "$@" \
        > "$OUT/step.json" 2>> "$LOG"
    local rc=$?
    $TOOL record "$step" "$rc" "$OUT/step.json" >> "$RESULTS"
    rm -f "$OUT/step.json"
    echo "   rc $rc" | tee -a "$LOG"
}

# tta PHASE NEEDS MAX: `sdtune train lora` for TTA_STEPS steps, timed from the command's start to its exit.
tta() {
    local phase=$1 needs=$2 most=$3 budget; budget=$(left)
    if [ "$budget" -lt "$needs" ]; then echo "== tta-$phase skipped: ${budget}s left" | tee -a "$LOG"; return; fi
    [ "$most" -gt "$budget" ] && most=$budget
    echo "== tta-$phase (${most}s at most)" | tee -a "$LOG"
    local out=/tmp/sdtune-tta-$phase t0 t1 rc
    rm -rf "$out"
    t0=$(date +%s.%N)
    timeout "$most" python3 -m sdtune.cli train lora --model "$MODEL" --images "$IMAGES" --token sks --class-word dog \
        --steps "$TTA_STEPS" --resolution "$PX" --mixed-precision "$PRECISION" --device "$DEVICE" --output "$out" \
        --quiet --log-dir none >> "$LOG" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    $TOOL tta "$phase" "$rc" "$t0" "$t1" "$out" >> "$RESULTS"
    echo "   rc $rc" | tee -a "$LOG"
}

IMAGES=$($TOOL images /tmp/sdtune-bench-images "$PX")
bench smoke 30 60 --model tiny:sd1 --method all --compile "$SMOKE_MODES" --steps 3 --warmup 2
bench bs1 60 150 --model "$MODEL" --resolution "$PX" --method lora,textual-inversion,hypernetwork \
    --compile off,auto --steps "$STEPS" --warmup "$WARMUP"
bench dreambooth 45 120 --model "$MODEL" --resolution "$PX" --method dreambooth --steps "$STEPS" --warmup "$WARMUP"
bench bs"$BIG_BS" 30 90 --model "$MODEL" --resolution "$PX" --method lora --batch-size "$BIG_BS" --steps 20 --warmup 5
tta cold 40 150
tta warm 40 120
bench channels-last 30 70 --model "$MODEL" --resolution "$PX" --method lora --batch-size "$BIG_BS" --channels-last \
    --steps 20 --warmup 5
bench compiled 150 240 --model "$MODEL" --resolution "$PX" --method lora --compile "$LONG_MODE" --steps 100 --warmup 10

$TOOL summary "$RESULTS" > "$OUT/summary.md"
echo "total $(( $(date +%s) - START ))s" | tee -a "$LOG" >> "$OUT/summary.md"
cat "$OUT/summary.md"
