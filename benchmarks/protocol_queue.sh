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
# A job being run is listed in QUEUE.running; a worker that starts puts back at the head of QUEUE the jobs of
# workers that are gone (a restarted machine): restart the workers with the same environment and they resume.
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
# Every popped job is written to QUEUE.running as "WORKER_PID:START_TICKS<TAB>JOB" until it ends. A job whose worker
# is gone (the machine was restarted, the worker was killed) goes back to the head of the queue when any worker of
# this queue starts, so a restart resumes it from its checkpoint instead of losing it. The start time (field 22 of
# /proc/PID/stat) tells a worker from a later process that got the same PID after a restart.
exec 9>>"$QUEUE.lock"
RUNNING="$QUEUE.running"
touch "$RUNNING"
start_ticks() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }
ME="$$:$(start_ticks $$)"
worker_alive() { local pid=${1%%:*} ticks=${1#*:}
  [ "$pid" != "$$" ] && [ -n "$ticks" ] && [ "$(start_ticks "$pid")" = "$ticks" ]; }
flock 9
if [ -s "$RUNNING" ]; then
  back=$(mktemp) && keep=$(mktemp)
  while IFS=$'\t' read -r pid job; do
    [ -n "$job" ] || continue
    if worker_alive "$pid"; then
      printf '%s\t%s\n' "$pid" "$job" >> "$keep"
    else
      printf '%s\n' "$job" >> "$back"
      echo "$(date -u +%FT%TZ) requeued (its worker $pid is gone): $job"
    fi
  done < "$RUNNING"
  cat "$back" "$QUEUE" > "$QUEUE.tmp" && mv "$QUEUE.tmp" "$QUEUE" && mv "$keep" "$RUNNING"
  rm -f "$back" "$keep"
fi
flock -u 9
while true; do
  flock 9
  job=$(head -n 1 "$QUEUE")
  sed -i 1d "$QUEUE"
  [ -n "$job" ] && printf '%s\t%s\n' "$ME" "$job" >> "$RUNNING"
  flock -u 9
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
  # The compare above (a pinned worktree's code) rewrote the summary; rebuild it with this tree's code, whose
  # summary withholds the screen variants' test numbers (a pinned commit before e621b7a shows them).
  [ "${job:0:1}" = "!" ] || (cd "$REPO" && OMP_NUM_THREADS=1 PYTHONPATH="$REPO/src" "$PY" -m c2vkd compare \
    --summarize "$RESULTS" > /dev/null 2>&1)
  flock 9
  grep -vxF "$(printf '%s\t%s' "$ME" "$job")" "$RUNNING" > "$RUNNING.tmp"
  mv "$RUNNING.tmp" "$RUNNING"
  flock -u 9
done
