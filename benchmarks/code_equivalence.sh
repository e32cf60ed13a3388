#!/bin/bash
# Do two code states compute the same numbers? (benchmarks/protocol.md, "Later code states".) Usage:
#
#   benchmarks/code_equivalence.sh CODE_A CODE_B [METHODS] [RECIPE] [CACHE]
#
# Runs ITERS (40) iterations of each method (default: cwd c2vkd-balanced) with the protocol recipe (default camvid-p3)
# from both worktrees (one thread, seed 0, no evaluation) and compares every logged metrics line (losses, terms, lr,
# gradient norms; less img_per_s and run_id) exactly. Prints "<method>: identical" or the first differing lines;
# exits 1 when any method differs. Worktrees need the runs/ link to this repository's runs/ (for the cache).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
A=$(realpath "$1"); B=$(realpath "$2")
METHODS=${3:-cwd c2vkd-balanced}
RECIPE=${4:-src/c2vkd/configs/recipes/camvid_p3.yaml}
CACHE=${5:-runs/p2_cache}
ITERS=${ITERS:-40}
DATA=${DATA:-$REPO/../shared/data/camvid}
OUT=$REPO/runs/equiv
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
lines() {  # the metrics lines of a run, without the wall-clock fields
  grep '"loss"' "$1" | "$REPO/.venv/bin/python" -c "import sys, json
for l in sys.stdin: print({k: v for k, v in json.loads(l).items() if k not in ('img_per_s', 'run_id')})"
}
rc=0
for m in $METHODS; do
  for c in "$A" "$B"; do
    rm -rf "$OUT/$(basename "$c")/$m"
    (cd "$c" && PYTHONPATH="$c/src" "$REPO/.venv/bin/python" -m c2vkd compare "$RECIPE" --set "data.root=$DATA" \
      --set "teacher.cache=$CACHE" --set train.progress=false --set schedule.iters=$ITERS --set train.log_interval=10 \
      --set eval.split=null --set eval.final_split=null --out "$OUT/$(basename "$c")" --seeds 0, --methods "$m" \
      --no-teacher-eval > "$OUT-$m-$(basename "$c").log" 2>&1) || { echo "$m: run failed at $c (log $OUT-$m-$(basename "$c").log)"; rc=1; continue 2; }
  done
  d=$(diff <(lines "$OUT/$(basename "$A")/$m/seed0/metrics.jsonl") <(lines "$OUT/$(basename "$B")/$m/seed0/metrics.jsonl"))
  if [ -z "$d" ] && [ -s "$OUT/$(basename "$A")/$m/seed0/metrics.jsonl" ]; then
    echo "$m: identical"
  else
    echo "$m: DIFFERENT"; echo "$d" | head -6; rc=1
  fi
done
exit $rc
