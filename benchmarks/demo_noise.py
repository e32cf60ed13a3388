"""How large a difference is noise at the demo's size: the demo's two students (no KD, C2VKD) over several seeds.

    python benchmarks/demo_noise.py                  # seeds 0..4 (about 12 CPU-minutes on 2 idle cores)
    python benchmarks/demo_noise.py --seeds 0,1,2 --run-dir runs/demo_noise

Trains the demo's teacher once (stage 1 of `c2vkd demo`), then `c2vkd compare` of `none` and the demo's method on
demo.yaml for every seed, and writes src/c2vkd/assets/demo_noise.json: the per-seed test mIoUs, the paired
differences (method - none, same seed), their mean and sample standard deviation, and the noise band
1.96 x sd that `c2vkd demo` prints next to its table (a single-seed difference inside it is noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from c2vkd.runners.compare import code_revision, run_compare
    from c2vkd.data import sample_root
    from c2vkd.runners.demo import DEMO_METHOD, NOISE_FILE, run_demo
    from c2vkd.utils.logging import setup_logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--run-dir", default="runs/demo_noise")
    ap.add_argument("--out", default=str(NOISE_FILE))
    args = ap.parse_args(argv)
    setup_logging()
    run = Path(args.run_dir)
    t0 = time.time()
    run_demo(run, ["train.progress=false"], latency_runs=1)  # teacher + seed 0 pair, exactly as the demo
    teacher = run / "teacher" / "student.safetensors"
    summary = run_compare("demo.yaml", ["none", DEMO_METHOD], args.seeds, eval_teacher=False,
                          overrides=[f"data.root={sample_root()}", f"teacher.checkpoint={teacher}",
                                     "train.progress=false"], out_dir=run / "students")
    per = {m: {int(s): v for s, v in summary["methods"][m]["miou_per_seed"].items()} for m in ("none", DEMO_METHOD)}
    seeds = sorted(per["none"])
    diffs = [per[DEMO_METHOD][s] - per["none"][s] for s in seeds]
    sd = statistics.stdev(diffs)
    rec = {"method": DEMO_METHOD, "seeds": seeds, "none": [per["none"][s] for s in seeds],
           DEMO_METHOD: [per[DEMO_METHOD][s] for s in seeds], "paired_diff": diffs,
           "paired_mean": statistics.fmean(diffs), "paired_sd": sd, "noise_band": 1.96 * sd,
           "none_std": statistics.stdev(per["none"].values()), "split": summary.get("split"),
           "command": "python benchmarks/demo_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "code": code_revision(), "wall_s": time.time() - t0,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
