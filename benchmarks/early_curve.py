"""The first N iterations of a camvid-p2 variant (recipe + method preset, as `c2vkd compare` builds it, on the
recipe's full schedule, so the learning rate is the protocol's), with validation every ``train.val_interval``:
a quick look at whether an arithmetic option (``--set train.amp=bf16``) moves the early val curve more than the
run-to-run variation does. Prints one JSON line: the val mIoU curve, the loss every 100 iterations, the wall time.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/early_curve.py --method none --steps 500 \\
        --set data.root=../shared/data/camvid --set teacher.cache=runs/p2_cache --set data.eval_batch_size=4 \\
        --set train.amp=bf16 --out runs/early/none-bf16
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="src/c2vkd/configs/recipes/camvid_p2.yaml")
    ap.add_argument("--method", default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--out", required=True, help="run directory (must be new)")
    args = ap.parse_args(argv)
    from c2vkd.engine.trainer import Trainer
    from c2vkd.runners.compare import variant_config

    cfg = variant_config(args.config, args.method, args.seed, [*args.overrides, "train.progress=false"])
    t0 = time.perf_counter()
    tr = Trainer(cfg, run_dir=args.out)
    tr.fit(max_steps=args.steps, finalize=False)
    print(json.dumps({"method": args.method, "amp": cfg["train"]["amp"], "compile": cfg["train"]["compile"],
                      "val": [(h["iter"], round(100 * h["miou"], 2)) for h in tr.history if "val_split" in h],
                      "loss": [(h["iter"], round(h["loss"], 4)) for h in tr.history
                               if "loss" in h and h["iter"] % 100 == 0],
                      "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
