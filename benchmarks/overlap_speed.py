"""The speed ratio of two training runs that ran at the same time, from their train.log lines alone.

Two runs started side by side on a shared machine do not see the same load over their whole lives (one ends first,
other jobs come and go), so their wall times are not a paired measurement. While both run, they do: this takes
the window in which both logged training iterations, keeps in each run the logging intervals that lie wholly
inside it and hold no validation, and compares the mean seconds per training iteration. Those iterations have the
same mix of probe and plain steps in both runs when the method is the same (the balancer probes every 10th step
after its warm-up in both).

    python benchmarks/overlap_speed.py runs/p2fp32/c2vkd-balanced/seed0 runs/p3/c2vkd-balanced/seed0

Prints the overlap, the number of intervals of each run in it, each run's seconds per iteration (mean, median)
and the ratio A / B (> 1: B is faster). Log lines: ``HH:MM:SS INFO iter I/N ...``; times are seconds-resolution,
so intervals of 20 iterations (the protocol's log interval) keep the rounding below 5 %.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) INFO iter (\d+)/(\d+) ")


def read_iters(log: Path) -> list[tuple[int, int]]:
    """(seconds since midnight, made monotonic across a midnight, iteration) of each logged training iteration."""
    rows, day = [], 0
    for line in log.read_text().splitlines():
        m = LINE.match(line)
        if m:
            t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + day
            if rows and t < rows[-1][0]:
                day += 86400
                t += 86400
            rows.append((t, int(m[4])))
    return rows


def seconds_per_iter(rows: list[tuple[int, int]], start: int, end: int, val_interval: int) -> list[float]:
    """Per-interval seconds per iteration of the logging intervals inside [start, end] with no validation in them.
    A validation (and a checkpoint) runs right after the log line of iteration k * val_interval, so the interval
    (i0, i1] holds one when some multiple m of val_interval has i0 <= m < i1."""
    out = []
    for (t0, i0), (t1, i1) in zip(rows, rows[1:]):
        if t0 >= start and t1 <= end and i1 > i0 and (i0 - 1) // val_interval == (i1 - 1) // val_interval:
            out.append((t1 - t0) / (i1 - i0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="run folder (or its train.log) of run A")
    ap.add_argument("b", type=Path, help="run folder (or its train.log) of run B")
    ap.add_argument("--val-interval", type=int, default=250)
    args = ap.parse_args(argv)
    logs = [p / "train.log" if p.is_dir() else p for p in (args.a, args.b)]
    runs = [read_iters(p) for p in logs]
    for p, r in zip(logs, runs):
        if len(r) < 2:
            print(f"{p}: fewer than two training log lines", file=sys.stderr)
            return 2
    start, end = max(r[0][0] for r in runs), min(r[-1][0] for r in runs)
    if end <= start:
        print("the two runs never logged training at the same time", file=sys.stderr)
        return 2
    per = [seconds_per_iter(r, start, end, args.val_interval) for r in runs]
    print(f"overlap: {(end - start) / 60:.1f} min")
    for name, p, s in zip("AB", logs, per):
        print(f"{name} {p}: {len(s)} intervals, s/iter mean {statistics.fmean(s):.3f}, "
              f"median {statistics.median(s):.3f}")
    ratio = statistics.fmean(per[0]) / statistics.fmean(per[1])
    print(f"A / B seconds per iteration: {ratio:.3f} (mean), "
          f"{statistics.median(per[0]) / statistics.median(per[1]):.3f} (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
