#!/bin/bash
# bench/lowbw.py on a many-core machine: several groups of its runs at once, each group pinned to
# its own cores (taskset; plait gives each rank its share of the cores it may use), so the groups
# neither compete nor change each other's results. Each group's log and results.json land in $OUT.
#   OUT=/some/folder CORES=5 bash bench/lowbw_wide.sh "COMMON ARGS" "GROUP 1 ARGS" "GROUP 2 ARGS" ...
# from the repository root. COMMON ARGS go to every group (model size, batch, steps); a group's
# ARGS usually hold --only/--skip-ddp and may override COMMON ARGS (argparse keeps the last).
set -u
OUT=${OUT:-runs/lowbw_wide}
CORES=${CORES:-5}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/lowbw_wide}
LIMIT=${LIMIT:-0}  # seconds each group may run (0: no limit); what finished in time is kept
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
common=$1
shift
# Build the tokenizer and token caches once, before the groups share them.
$PY bench/lowbw.py $common --steps 1 --eval-every 1 --only ddp --out "$WORK/prepare" > "$OUT/prepare.log" 2>&1 \
  || { tail -20 "$OUT/prepare.log"; exit 1; }
group=0
for args in "$@"; do
  first=$((group * CORES))
  # shellcheck disable=SC2086  # the argument strings are meant to split into words
  timeout "$LIMIT" taskset -c "$first-$((first + CORES - 1))" $PY bench/lowbw.py $common $args --out "$WORK/g$group" \
    > "$OUT/g$group.log" 2>&1 &
  group=$((group + 1))
done
wait
for g in $(seq 0 $((group - 1))); do
  echo "== group $g: ${*:g+1:1}"
  grep -v "^plot:" "$OUT/g$g.log" | tail -12
  cp "$WORK/g$g/results.json" "$OUT/g$g.json" 2>/dev/null
done
