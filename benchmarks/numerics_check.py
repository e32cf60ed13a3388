"""Does a cheaper arithmetic keep the val curve within seed noise? (issue 29, deliverable 3)

Reads committed protocol records (``<results>/<method>/seed<k>.json``) of the same runs in two arithmetics (e.g.
camvid-p2's recipe in fp32 and camvid-p3's bf16, paired: same seed, same code otherwise) and the reference
protocol's records over several seeds (the seed noise), and prints, per method:

* both val curves point by point and their difference;
* the seed noise at each point: the range (max - min) and standard deviation of the reference protocol's val
  curves over its seeds (one arithmetic, seeds differ);
* the final val and test mIoU of both, and where each sits in the reference's seed range.

A difference counts as "within seed noise" when it is no larger than the seed-to-seed range at the same point
(the same-seed pair shares the initialisation and data order, so its difference is usually smaller than the seed
range; a larger one says the arithmetic changed the run more than a new seed does). ``--plot`` draws both
curves over the reference's seed band.

    python benchmarks/numerics_check.py --a benchmarks/results/camvid-p2-fp32-check --b benchmarks/results/camvid-p3 \\
        --noise benchmarks/results/camvid-p2 --methods none,c2vkd-balanced --seed 0 --plot docs/img/p3_numerics.png
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path, method: str, seed: int) -> dict | None:
    f = folder / method / f"seed{seed}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def curve(rec: dict) -> dict[int, float]:
    return {int(it): 100.0 * float(v) for it, v in rec["val_curve"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=Path, help="records of the reference arithmetic (e.g. fp32)")
    ap.add_argument("--b", required=True, type=Path, help="records of the candidate arithmetic (e.g. bf16)")
    ap.add_argument("--noise", required=True, type=Path, help="records over several seeds (the seed noise)")
    ap.add_argument("--methods", default="none,c2vkd-balanced")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    panels = []
    verdict_ok = True
    for m in methods:
        ra, rb = load(args.a, m, args.seed), load(args.b, m, args.seed)
        if ra is None or rb is None:
            print(f"{m}: missing record ({args.a if ra is None else args.b}/{m}/seed{args.seed}.json)")
            verdict_ok = False
            continue
        ca, cb = curve(ra), curve(rb)
        noise_recs = [r for k in range(10) if (r := load(args.noise, m, k)) is not None]
        noise = [curve(r) for r in noise_recs]
        print(f"\n## {m}, seed {args.seed}: {args.a.name} ({ra['code']['commit'][:7]}) vs {args.b.name} "
              f"({rb['code']['commit'][:7]}); seed noise from {len(noise)} seeds of {args.noise.name}")
        print("| iteration | a | b | b - a | seed range | seed sd | within range |\n|---:|---:|---:|---:|---:|---:|:-:|")
        n_out = 0
        for it in sorted(set(ca) & set(cb)):
            vals = [c[it] for c in noise if it in c]
            rng = max(vals) - min(vals) if len(vals) > 1 else float("nan")
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            d = cb[it] - ca[it]
            ok = abs(d) <= rng
            n_out += not ok
            print(f"| {it} | {ca[it]:.2f} | {cb[it]:.2f} | {d:+.2f} | {rng:.2f} | {sd:.2f} | {'yes' if ok else 'NO'} |")
        finals = [c[max(c)] for c in noise]
        tests = [100 * r["miou"] for r in noise_recs if r.get("split") == "test"]
        print(f"final val: a {ca[max(ca)]:.2f}, b {cb[max(cb)]:.2f} (seed range {min(finals):.2f} .. {max(finals):.2f}); "
              f"test: a {100 * ra['miou']:.2f}, b {100 * rb['miou']:.2f}"
              + (f" (seed range {min(tests):.2f} .. {max(tests):.2f})" if tests else "")
              + f"; wall: a {ra['wall_s']:.0f} s, b {rb['wall_s']:.0f} s ({rb['wall_s'] / ra['wall_s']:.2f}x)")
        print(f"points outside the seed range: {n_out} of {len(set(ca) & set(cb))}")
        panels.append((m, ca, cb, noise))
    if args.plot and panels:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (m, ca, cb, noise) in zip(axes[0], panels):
            its = sorted(set().union(*noise)) if noise else sorted(ca)
            lo = [min(c[i] for c in noise if i in c) for i in its]
            hi = [max(c[i] for c in noise if i in c) for i in its]
            ax.fill_between(its, lo, hi, alpha=0.2, color="grey", label=f"{args.noise.name}: {len(noise)} seeds")
            ax.plot(sorted(ca), [ca[i] for i in sorted(ca)], "o-", label=f"{args.a.name} seed {args.seed}")
            ax.plot(sorted(cb), [cb[i] for i in sorted(cb)], "s--", label=f"{args.b.name} seed {args.seed}")
            ax.set_title(m)
            ax.set_xlabel("iteration")
            ax.set_ylabel("val mIoU (%)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")
    return 0 if verdict_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
