"""Repair the val curve of a compare record written after a resume by code before 7177fc0.

Before 7177fc0 a resumed run's history held only the records logged after its resume, so the record `c2vkd
compare --results` wrote for it had a val curve starting after the checkpoint it resumed from (its final val, test
mIoU and last-quarter gain were right whenever the last-quarter start lay after the resume). The run folder's
metrics.jsonl still holds every validation: this puts them back into the record.

    python benchmarks/repair_val_curve.py benchmarks/results/camvid-p3/<method>/seed0.json runs/p3/<method>/seed0

Checks before writing: the record says ``resumed: true``; the run's metrics.jsonl has one run id (the record's
run); the record's curve equals the tail of the file's curve point for point. Writes the full curve, the best val
mIoU over it, and a ``val_curve_repaired`` note; the test numbers are not touched. Prints what it did.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from c2vkd.utils.io import atomic_write_text


def file_curve(metrics: Path) -> tuple[list[list[float]], set[str]]:
    """([[iteration, val mIoU], ...] sorted, the last record per iteration; the run ids seen) of a metrics.jsonl."""
    vals: dict[int, float] = {}
    run_ids: set[str] = set()
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "val_split" in rec:
            vals[int(rec["iter"])] = rec["miou"]
            if rec.get("run_id"):
                run_ids.add(rec["run_id"])
    return [[i, vals[i]] for i in sorted(vals)], run_ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--fixed-in", default="7177fc0")
    args = ap.parse_args(argv)
    rec = json.loads(args.record.read_text())
    if not rec.get("resumed"):
        print(f"{args.record}: not a resumed run; nothing to repair", file=sys.stderr)
        return 2
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"{metrics}: no such file (is {args.run_dir} the run folder of {args.record}?)", file=sys.stderr)
        return 2
    curve, run_ids = file_curve(metrics)
    if len(run_ids) > 1:
        print(f"{args.run_dir}/metrics.jsonl holds several runs {sorted(run_ids)}: refusing", file=sys.stderr)
        return 2
    old = rec.get("val_curve") or []
    if not old or curve[-len(old):] != old:
        print(f"{args.record}: its val curve is not the tail of {args.run_dir}/metrics.jsonl's: refusing",
              file=sys.stderr)
        return 2
    if len(curve) == len(old):
        print(f"{args.record}: the curve is already whole ({len(old)} points)")
        return 0
    rec["val_curve"] = curve
    rec["best_val_miou"] = max(v for _, v in curve)
    rec["val_curve_repaired"] = (f"written after a resume, the record held only the {len(old)} val points after it "
                                 f"(trainer bug fixed in {args.fixed_in}); the whole curve ({len(curve)} points) "
                                 f"read back from the run's metrics.jsonl by benchmarks/repair_val_curve.py")
    atomic_write_text(args.record, json.dumps(rec, indent=1))  # a record is committed: never half-written
    print(f"{args.record}: val curve {len(old)} -> {len(curve)} points (first iteration {curve[0][0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
