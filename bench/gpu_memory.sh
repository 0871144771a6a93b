#!/bin/bash
# Issue 21's GPU check, as one prepared run on a lent GPU machine (about 10 minutes):
# the largest micro-batch train.micro_batch = auto finds for the Llama-3.2-1B shape at seq 4096
# with and without activation offload (every block), then the step time at the micro-batch that
# fits without offload, with and without offload (prefetched one block ahead on a side stream).
# Blocks are not compiled: activation offload runs on the eager blocks.
#   OUT=/some/folder bash bench/gpu_memory.sh        # from the repository root
set -u
OUT=${OUT:-runs/gpu_memory}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
COMMON="--no-compile --seq-len 4096 --warmup 2 --steps 8"
timeout 150 $PY bench/gpu.py $COMMON --micro-batch auto --global-batch 32 --json "$OUT/auto.json" 2>&1 | tail -16 | tee "$OUT/auto.log"
timeout 150 $PY bench/gpu.py $COMMON --micro-batch auto --global-batch 32 --activation-offload -1 \
    --json "$OUT/auto_offload.json" 2>&1 | tail -16 | tee "$OUT/auto_offload.log"
K=$($PY -c "import json; print(json.load(open('$OUT/auto.json'))['micro_batch'])" 2>/dev/null || echo 2)
timeout 120 $PY bench/gpu.py $COMMON --micro-batch "$K" --json "$OUT/fixed.json" 2>&1 | tail -16 | tee "$OUT/fixed.log"
timeout 120 $PY bench/gpu.py $COMMON --micro-batch "$K" --activation-offload -1 --json "$OUT/fixed_offload.json" \
    2>&1 | tail -16 | tee "$OUT/fixed_offload.log"
$PY - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
read = lambda name: json.load(open(os.path.join(out, name))) if os.path.exists(os.path.join(out, name)) else None
auto, auto_off, fixed, fixed_off = (read(n) for n in ("auto.json", "auto_offload.json", "fixed.json", "fixed_offload.json"))
if auto and auto_off:
    print(f"largest micro-batch: {auto['micro_batch']} kept, {auto_off['micro_batch']} with activation offload")
if fixed and fixed_off:
    cost = fixed_off["step_s_mean"] / fixed["step_s_mean"] - 1
    print(f"offload with prefetch at micro-batch {fixed['micro_batch']}: step {fixed_off['step_s_mean']:.3f} s "
          f"vs {fixed['step_s_mean']:.3f} s, {cost * 100:+.1f}% (target < 15%)")
PY
