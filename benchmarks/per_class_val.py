"""Per-class IoU on the validation split of finished protocol runs: the per-class view of a screen that is chosen
on val (issue 26), where the records hold only the val mIoU curve and their per-class IoU is the test split's.

Evaluates each run's final student (``<OUT>/<method>/seed<k>/student.safetensors``) on val with the run's own
config (``config.yaml`` beside it: same resize, batch and arithmetic as its validations, so its mIoU equals the
record's last val point), then prints the per-class table, each method's difference from `none` per class, and
writes the numbers as JSON when asked.

    OMP_NUM_THREADS=1 python benchmarks/per_class_val.py runs/p3 --seed 0 \\
        --methods none,cwd,c2vkd-balanced,c2vkd-abl-cwd-feat --json runs/per_class_val_p3.json

A method whose run folder has no final student is named and skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the protocol's run folder (OUT of protocol_queue.sh), e.g. runs/p3")
    ap.add_argument("--methods", required=True, help="comma-separated run names (method labels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="val")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from c2vkd.config import load_config
    from c2vkd.engine.evaluation import evaluate_checkpoint

    torch.set_grad_enabled(False)
    rows: dict[str, dict] = {}
    classes: list[str] = []
    for m in [x.strip() for x in args.methods.split(",") if x.strip()]:
        run = args.out / m / f"seed{args.seed}"
        student = run / "student.safetensors"
        if not student.is_file():
            print(f"{m}: no final student in {run} (not finished?): skipped", file=sys.stderr)
            continue
        cfg = load_config(run / "config.yaml")
        cfg["train"]["progress"] = False
        metrics, classes, _, _ = evaluate_checkpoint(student, cfg, args.split, progress=False)
        rows[m] = {"miou": metrics.miou, "iou": [None if v != v else float(v) for v in metrics.iou]}
        print(f"{m}: {args.split} mIoU {100 * metrics.miou:.2f}", file=sys.stderr)
    if not rows:
        return 2
    names = list(rows)
    base = rows.get("none")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(f"| class | {' | '.join(names)} |" + (" " + " | ".join(f"{m} - none" for m in names if m != "none") + " |"
                                               if base else ""))
    print("|---|" + "---:|" * (len(names) + (len(names) - 1 if base else 0)))
    for i, c in enumerate(classes):
        cells = [pct(rows[m]["iou"][i]) for m in names]
        if base:
            for m in names:
                if m == "none":
                    continue
                a, b = rows[m]["iou"][i], base["iou"][i]
                cells.append("-" if a is None or b is None else f"{100 * (a - b):+.1f}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    miou_cells = [f"**{100 * rows[m]['miou']:.2f}**" for m in names]
    if base:
        miou_cells += [f"**{100 * (rows[m]['miou'] - base['miou']):+.2f}**" for m in names if m != "none"]
    print("| mIoU | " + " | ".join(miou_cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "seed": args.seed, "classes": classes, "runs": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
