"""Cost of measuring per-term gradients (`c2vkd report`, `train.grad_share_interval`, `balance`), in one run.

    python benchmarks/bench_grad_share.py                       # 3 rounds x 10 timed steps per variant
    python benchmarks/bench_grad_share.py --rounds 1 --iters 2  # quick check that it runs

Variants (each a real Trainer on the CamVid sample bundled with the package: SegFormer-B0 student, DeepLabV3+-R18
teacher with random weights, 128x128 crops, batch 4):

  (a) c2vkd-paper, no measurement                  - the reference step
  (b) c2vkd-paper, measured at every step          - what one `c2vkd report` step costs (one extra backward
                                                     per non-zero-weight term: 4 here)
  (c) c2vkd-balanced after its warm-up             - balancing re-measures every `balance.interval` (10) steps
  (d) c2vkd-paper, train.grad_share_interval=10    - grad-share logging in a normal run

Variants are timed round-robin (the median round counts), so a busy phase of a shared machine does not fall on
one variant only; the printed ratios are step times relative to (a) measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "c2vkd" / "assets" / "camvid_sample"


def _trainer(preset: str, extra: list[str], tmp: Path):
    from c2vkd.config import load_config
    from c2vkd.engine.trainer import Trainer

    cfg_file = tmp / f"{preset}.yaml"
    cfg_file.write_text(f"_base_: [demo.yaml, methods/{preset}.yaml]\n")
    over = [f"data.root={SAMPLE}", "data.batch_size=4", "data.num_workers=0", "data.train_transform.crop_size=[128,128]",
            "teacher.allow_random_init=true", "train.progress=false", "train.device=cpu", "schedule.iters=100000",
            *extra]
    t = Trainer(load_config(cfg_file, over), run_dir=tmp / f"run{len(list(tmp.glob('run*')))}-{preset}")
    t.model.train()
    return t, iter(t.train_loader(4, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        variants = {
            "(a) c2vkd-paper": _trainer("c2vkd-paper", [], tmp),
            "(b) measured every step": _trainer("c2vkd-paper", ["train.grad_share_interval=1"], tmp),
            "(c) c2vkd-balanced": _trainer("c2vkd-balanced", [], tmp),
            "(d) grad_share_interval=10": _trainer("c2vkd-paper", ["train.grad_share_interval=10"], tmp),
        }
        for trainer, it in variants.values():  # warm-up, and (c) past its balancing warm-up of 20 steps
            for _ in range(21 if trainer.balancer is not None else 2):
                trainer._train_step(it, 1)
                trainer.iteration += 1
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, (trainer, it) in variants.items():
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    trainer._train_step(it, 1)
                    trainer.iteration += 1
                times[name].append((time.perf_counter() - t0) / args.iters)
    ref = statistics.median(times["(a) c2vkd-paper"])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x {args.iters} steps; "
          "median s/step (min-max) and ratio to (a)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<28} {med:7.3f} s ({min(ts):.3f}-{max(ts):.3f})  {med / ref:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
