#!/bin/bash
# Commits protocol records (camvid-p2 by default) as the queue workers write them (benchmarks/protocol.md, "Running the queue"). Usage:
#
#   [OUT=runs/p3] nohup benchmarks/protocol_autocommit.sh [RESULTS] > runs/autocommit.out 2>&1 &
#
# Every 60 s: when RESULTS [benchmarks/results/camvid-p2] holds records git does not track yet, it waits 45 s
# (the worker's own compare, running the pinned older code, rewrites the summary right after its record),
# rebuilds the summary with THIS tree's code (`c2vkd compare --summarize`) and commits RESULTS alone
# (`git commit -- RESULTS`: nothing else you have staged or changed goes in). One line per commit in
# runs/autocommit.log. Stop it with `pkill -f protocol_autocommit.sh`.
# With OUT (the workers' run folder, as given to protocol_queue.sh): a new record of a resumed run gets its whole
# val curve back from OUT/<method>/seed<k>/metrics.jsonl first (benchmarks/repair_val_curve.py: records that
# code before 7177fc0 wrote after a resume held only the val points after it; a whole curve is left alone).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
R=${1:-benchmarks/results/camvid-p2}
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p runs
while true; do
  new=$(git status --porcelain -uall -- "$R" | grep 'seed[0-9]*\.json' | awk '{print $2}')
  if [ -n "$new" ]; then
    sleep 45
    new=$(git status --porcelain -uall -- "$R" | grep 'seed[0-9]*\.json' | awk '{print $2}')
    [ -n "$new" ] || continue   # committed meanwhile by someone else: nothing to do (no empty commit)
    if [ -n "${OUT:-}" ]; then
      for f in $new; do
        if grep -q '"resumed": true' "$f"; then
          run="$OUT/$(basename "$(dirname "$f")")/$(basename "$f" .json)"
          "$PY" benchmarks/repair_val_curve.py "$f" "$run" >> runs/autocommit.log 2>&1
        fi
      done
    fi
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" -m c2vkd compare --summarize "$R" > runs/summarize.out 2>&1
    names=$(echo "$new" | sed "s#$R/##; s#/seed#:#; s#\.json##" | tr '\n' ' ')
    code=$(for f in $new; do "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['code']['commit'][:7])" "$f"; done | sort -u | tr '\n' ' ')
    for _ in 1 2 3 4 5; do   # retry: another git command may hold the index lock
      git add -- "$R" && git commit -q -m "$(basename "$R") records ${names}(code ${code% }); summary rebuilt" -- "$R" && break
      sleep 7
    done
    echo "$(date -u +%T) committed $names" >> runs/autocommit.log
  fi
  sleep 60
done
