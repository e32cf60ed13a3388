#!/bin/bash
# One worker of a protocol run queue, camvid-p2 by default, idd-p1 with RECIPE=... (benchmarks/protocol.md). Usage:
#
#   benchmarks/protocol_queue.sh QUEUE [WAIT_PID]
#
# Pops lines from QUEUE (a text file, shared by every worker, popped under flock) until it is empty:
#   "SEED METHOD [CODE_DIR]"
#                  runs that camvid-p2 variant (`c2vkd compare ... --seeds SEED, --methods METHOD`) and commits
#                  nothing: its record lands in $RESULTS/<method>/seed<k>.json for you to commit; CODE_DIR, when
#                  given, replaces $CODE for this line (e.g. CIRKD's records come from the p2-cirkd worktree);
#   "! COMMAND"    runs COMMAND with bash in the repository root (e.g. the demo-noise measurement).
# WAIT_PID: start only after that process exits (to queue behind a run already going).
#
# Environment (defaults in brackets):
#   CODE     [the repository root]  the source tree the runs import: point it at a git worktree pinned to one
#            commit (git worktree add --detach ../bench HEAD) so every record says the same, clean revision
#            whatever is edited meanwhile;
#   PY       [$REPO/.venv/bin/python]  the interpreter with torch;
#   RECIPE   [src/c2vkd/configs/recipes/camvid_p2.yaml, relative to the code dir]  the protocol's student recipe
#            (idd-p1: RECIPE=src/c2vkd/configs/recipes/idd_p1.yaml DATA=$REPO/../shared/data/idd_lite
#            CACHE=runs/idd_p1_cache RESULTS=$REPO/benchmarks/results/idd-p1 OUT=runs/idd_p1);
#   DATA     [$REPO/../shared/data/camvid], CACHE [runs/p2_cache, relative to CODE], RESULTS
#            [$REPO/benchmarks/results/camvid-p2], OUT [runs/p2, relative to CODE].
#   THREADS  [1]  torch threads of each run.
# One torch thread per worker: on 2 cores run two workers (about 1.4x one two-thread run, measured). A CIRKD run
# (about 3 h at one thread beside another worker) fits a 3-hour session only alone with THREADS=2.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
QUEUE=$(realpath "$1")
CODE=${CODE:-$REPO}
PY=${PY:-$REPO/.venv/bin/python}
RECIPE=${RECIPE:-src/c2vkd/configs/recipes/camvid_p2.yaml}
DATA=${DATA:-$REPO/../shared/data/camvid}
CACHE=${CACHE:-runs/p2_cache}
RESULTS=${RESULTS:-$REPO/benchmarks/results/camvid-p2}
OUT=${OUT:-runs/p2}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${THREADS:-1}
if [ -n "${2:-}" ]; then while kill -0 "$2" 2>/dev/null; do sleep 15; done; fi
while true; do
  job=$(flock "$QUEUE.lock" bash -c "head -n 1 '$QUEUE'; sed -i 1d '$QUEUE'")
  [ -z "$job" ] && break
  echo "$(date -u +%FT%TZ) start: $job"
  if [ "${job:0:1}" = "!" ]; then
    (cd "$REPO" && bash -c "${job:1}")
  else
    read -r seed method code <<< "$job"
    code=${code:-$CODE}
    (cd "$code" && PYTHONPATH="$code/src" "$PY" -m c2vkd compare "$RECIPE" \
      --set "data.root=$DATA" --set "teacher.cache=$CACHE" --set train.progress=false --out "$OUT" \
      --results "$RESULTS" --seeds "$seed," --methods "$method" --no-teacher-eval)
  fi
  rc=$?  # before the echo: its $(date) would replace $? with date's status
  echo "$(date -u +%FT%TZ) end (rc=$rc): $job"
done
