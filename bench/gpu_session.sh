#!/bin/bash
# Every GPU-machine figure BENCHMARKS.md records, as one prepared run (a lent GPU machine's
# time is short: one call, each part under its own time limit, logs kept whatever fails).
#   OUT=/some/folder bash bench/gpu_session.sh        # from the repository root
# Parts: the machine; bench/gpu.py (plait's trainer, Llama-3.2-1B shape) at seq 4096 and 8192 with packed
# documents and with one document per row, and at micro-batch 4;
# the quantization tests, whose CUDA cases only run there; bench/bubble.py at p = 2 and 4 on
# the machine's many idle CPU cores (gloo), where the pipeline bubble can be measured cleanly.
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "cpus $(nproc)"; } 2>&1 | tee "$OUT/machine.txt"
unset OMP_NUM_THREADS  # the GPU runs use the default threads
timeout 180 $PY bench/gpu.py --json "$OUT/gpu_mbs1.json" 2>&1 | tail -25 | tee "$OUT/gpu_mbs1.log"
timeout 150 $PY bench/gpu.py --no-doc-mask --json "$OUT/gpu_mbs1_onedoc.json" 2>&1 | tail -25 | tee "$OUT/gpu_mbs1_onedoc.log"
timeout 150 $PY bench/gpu.py --seq-len 8192 --steps 20 --json "$OUT/gpu_s8192.json" 2>&1 | tail -25 | tee "$OUT/gpu_s8192.log"
timeout 150 $PY bench/gpu.py --seq-len 8192 --steps 20 --no-doc-mask --json "$OUT/gpu_s8192_onedoc.json" 2>&1 | tail -25 | tee "$OUT/gpu_s8192_onedoc.log"
timeout 120 $PY bench/gpu.py --micro-batch 4 --steps 20 --json "$OUT/gpu_mbs4.json" 2>&1 | tail -25 | tee "$OUT/gpu_mbs4.log"
timeout 45 $PY -m pytest -q -p no:cacheprovider tests/unit/test_lowbw_quantize.py 2>&1 | tail -5 | tee "$OUT/quantize_tests.log"
export OMP_NUM_THREADS=1
timeout 100 $PY bench/bubble.py --p 2 4 --out /tmp/bench_bubble 2>&1 | tail -25 | tee "$OUT/bubble.log"
