"""Training throughput (images/s) of the engine: student only vs C2VKD with a live teacher vs C2VKD with the
teacher cache vs C2VKD with the live teacher in bf16 and channels-last (``teacher.amp=bf16``,
``teacher.channels_last=true``) vs the student alone with torch's multi-tensor AdamW (``optim.impl=foreach``, the
kernel before fused became the default), each with bf16 autocast off and on - same data, batch, crop, student and
teacher, one process. On request (``--variants``): (f) the student alone and (g) / (h) C2VKD from the cache with
``train.compile=student`` / ``all`` (torch.compile; the warm-up iterations include the compilation).

    python benchmarks/bench_throughput.py                                 # the record: 3 warm-up + 20 timed its
    python benchmarks/bench_throughput.py --warmup 1 --iters 5 --amp off  # quick check that it runs

Defaults: the CamVid sample bundled with the package (48 frames), 128x128 crops, batch 4, SegFormer-B0 student,
DeepLabV3+-R18 teacher (random weights unless --teacher-checkpoint: the speed does not depend on them), the
recommended C2VKD preset (methods/c2vkd.yaml: PDD + VLFD + CE; without a CLIP checkpoint VLFD's seeded random
pool stands in, same cost), data.augment_pool=2 for every variant (the cache needs a pool; the others get the
identical data stream).

Each variant is a real ``Trainer`` (the engine's Distiller, optimizer, AMP, clipping and data loader); one
timed iteration is ``Trainer._train_step`` (load a batch, forward, backward, optimizer step) + the lr step,
wall clock (CUDA synchronised). Variants are timed round-robin ``--rounds`` times (the median round counts), so
a slow phase of a busy machine does not fall on one variant only; each variant's round time over (a)'s in the same
round gives the paired ratio (median, min, max over rounds), which cancels the machine's slow drift
(``--variants a,c`` times only what a comparison needs). Variant (c) reads a cache built first with
``c2vkd cache-teacher`` defaults (top-5 logits at 1/4 resolution, fp16, the taps the losses read; teacher run
in fp32); its build time is reported separately with the break-even point (iterations after which building
the cache has paid for itself). Ratios are img/s relative to (a) without autocast. On CPU, bf16 autocast is
often *slower* than fp32 (no bf16 matrix units on many CPUs): the numbers say what this machine does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=None, help="dataset root (default: the bundled CamVid sample)")
    ap.add_argument("--data-config", default="datasets/camvid_sample.yaml",
                    help="dataset config (packaged name or path)")
    ap.add_argument("--student", default="segformer_b0")
    ap.add_argument("--teacher", default="deeplabv3plus_r18")
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--method", default="methods/c2vkd.yaml", help="distillation preset for (b) and (c)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant (first round only)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per variant and round")
    ap.add_argument("--rounds", type=int, default=1, help="round-robin repetitions (median round reported)")
    ap.add_argument("--amp", default="off,bf16", help="comma-separated autocast modes to time (off, bf16, fp16)")
    ap.add_argument("--variants", default="a,b,c,d,e",  # f, g, h (train.compile) on request
                    help="comma-separated variants to time (a is always timed: every ratio is to it)")
    ap.add_argument("--pool", type=int, default=2, help="data.augment_pool (views per image)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: loading is on the clock)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--downsample", type=int, default=4)
    ap.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--workdir", default=None, help="where run dirs and the cache go (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def base_overrides(args: argparse.Namespace, root: str, out: Path) -> list[str]:
    return [f"data.root={root}", f"data.train_transform.crop_size=[{args.crop},{args.crop}]",
            f"data.batch_size={args.batch}", f"data.num_workers={args.num_workers}", f"data.augment_pool={args.pool}",
            f"student.name={args.student}", "student.pretrained=null", f"train.device={args.device}",
            "train.progress=false", "eval.split=null", "eval.final_split=null", f"experiment.output_dir={out}",
            f"schedule.iters={10 ** 6}", "schedule.warmup_iters=0"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {"a"} | {v.strip() for v in args.variants.split(",") if v.strip()}
    unknown = wanted - set("abcdefgh")
    if unknown:
        raise SystemExit(f"--variants: unknown variant(s) {sorted(unknown)}; choose from a, b, c, d, e, f, g, h")
    if args.threads:
        torch.set_num_threads(args.threads)
    from c2vkd.config import load_config
    from c2vkd.data import sample_root
    from c2vkd.runners.cache_teacher import build_teacher_cache
    from c2vkd.engine.trainer import Trainer
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    logging.getLogger("c2vkd").setLevel(logging.WARNING)
    root = args.data_root or str(sample_root())
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    amps = [a.strip() for a in args.amp.split(",") if a.strip()]
    base = base_overrides(args, root, work)
    teacher = [f"teacher.name={args.teacher}", f"teacher.checkpoint={args.teacher_checkpoint or 'null'}",
               "teacher.allow_random_init=true"]  # throughput does not depend on the teacher's weights
    cache_dir = work / "teacher_cache"

    def cfg(*extra: str, method: bool = False) -> dict:
        layers = [args.method] if method else []
        return load_config(args.data_config, [*base, *extra], layers=layers)

    student_only = ("teacher.name=null", "losses=[{name: ce, weight: 1.0}]")
    # variant -> (overrides, layered with the --method preset); the amp mode is added per timed mode
    recipes = {"a": (student_only, False), "b": (tuple(teacher), True),
               "c": ((*teacher, f"teacher.cache={cache_dir}"), True),
               "d": ((*teacher, "teacher.amp=bf16", "teacher.channels_last=true"), True),
               "e": ((*student_only, "optim.impl=foreach"), False),
               # train.compile (issue 29): the first (warm-up) iterations include the compilation
               "f": ((*student_only, "train.compile=student"), False),
               "g": ((*teacher, f"teacher.cache={cache_dir}", "train.compile=student"), True),
               "h": ((*teacher, f"teacher.cache={cache_dir}", "train.compile=all"), True)}

    try:
        index, build_s = None, None
        if wanted & set("cgh"):  # the cache first: built with the cache-teacher defaults (teacher in fp32)
            t0 = time.perf_counter()
            index = build_teacher_cache(cfg(*teacher, "train.amp=off", method=True), cache_dir, topk=args.topk,
                                        downsample=args.downsample, dtype=args.cache_dtype, progress=False)
            build_s = time.perf_counter() - t0
        variants = [(name, amp, cfg(*recipes[name][0], f"train.amp={amp}", method=recipes[name][1]))
                    for amp in amps for name in "abcdefgh" if name in wanted]
        method = Path(args.method).stem.upper()  # the preset timed in (b), (c), (d)
        labels = {"a": "student only (ce)", "b": f"{method}, live teacher", "c": f"{method}, teacher cache",
                  "d": f"{method}, live teacher in bf16 + channels-last", "e": "student only, foreach AdamW",
                  "f": "student only, compiled student", "g": f"{method}, teacher cache, compiled student",
                  "h": f"{method}, teacher cache, compiled student + losses"}
        runs = []
        for name, amp, c in variants:
            tr = Trainer(c, run_dir=work / f"{name}_{amp}")
            tr.model.train()
            runs.append({"name": name, "amp": amp, "trainer": tr, "it": iter(tr.train_loader(args.batch, 1)),
                         "rounds": []})
        logging.getLogger("c2vkd").setLevel(logging.WARNING)  # each Trainer re-enabled INFO
        sync = (lambda: torch.cuda.synchronize()) if runs[0]["trainer"].device.type == "cuda" else (lambda: None)

        def step(r: dict) -> None:
            tr = r["trainer"]
            tr._train_step(r["it"], 1)
            tr.scheduler.step()

        for rnd in range(args.rounds):
            for r in runs:
                if rnd == 0:
                    for _ in range(args.warmup):
                        step(r)
                sync()
                t = time.perf_counter()
                for _ in range(args.iters):
                    step(r)
                sync()
                r["rounds"].append(time.perf_counter() - t)

        ref = next((r for r in runs if r["name"] == "a" and r["amp"] == "off"), runs[0])
        ref_ips = args.batch * args.iters / statistics.median(ref["rounds"])
        dev = runs[0]["trainer"].device
        print(f"\nthroughput on {dev} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads): {args.student} student, {args.teacher} teacher, "
              f"{args.crop}x{args.crop} crops, batch {args.batch}, {args.warmup} warm-up + {args.iters} timed "
              f"iterations x {args.rounds} round(s), pool {args.pool}, {args.num_workers} workers")
        if index is not None:
            print(f"teacher cache: {index['views']} views, top-{index['topk']} of {index['num_classes']} logits at "
                  f"{index['logits_hw'][0]}x{index['logits_hw'][1]}, taps {sorted(index['taps'])}, "
                  f"{index['dtype']}, {index['bytes_per_view'] / 2**10:.1f} KiB/view, built in {build_s:.1f} s")
        print("\n| variant | amp | img/s | s/iter | vs (a) amp off | time / (a)'s, paired by round: median [min, max] |"
              "\n|---|---|---|---|---|---|")
        results = []
        for r in runs:
            sec = statistics.median(r["rounds"]) / args.iters
            ips = args.batch / sec
            # each round times every variant back to back, so a round's time over (a)'s in the same round
            # cancels the machine's slow drift; the median of these is the robust ratio
            paired = [x / y for x, y in zip(r["rounds"], ref["rounds"])]
            results.append({"variant": r["name"], "label": labels[r["name"]], "amp": r["amp"], "img_per_s": ips,
                            "s_per_iter": sec, "ratio_to_a_off": ips / ref_ips, "rounds_s": r["rounds"],
                            "paired_time_ratio": paired, "paired_time_ratio_median": statistics.median(paired)})
            print(f"| ({r['name']}) {labels[r['name']]} | {r['amp']} | {ips:.2f} | {sec:.3f} | {ips / ref_ips:.2f}x | "
                  f"{statistics.median(paired):.3f}x [{min(paired):.3f}, {max(paired):.3f}] |")
        for amp in amps:
            b = next((x for x in results if x["variant"] == "b" and x["amp"] == amp), None)
            c = next((x for x in results if x["variant"] == "c" and x["amp"] == amp), None)
            if b is None or c is None:
                continue
            saved = b["s_per_iter"] - c["s_per_iter"]
            even = f"{build_s / saved:.0f} iterations" if saved > 0 else "never (the cache is not faster here)"
            print(f"amp {amp}: cache vs live teacher {c['img_per_s'] / b['img_per_s']:.2f}x; the cache build "
                  f"({build_s:.1f} s) pays for itself after {even}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(dev), "torch": torch.__version__,
                                                   "threads": torch.get_num_threads(), "cache_build_s": build_s,
                                                   "cache": index and {k: index[k] for k in (
                                                       "views", "topk", "downsample", "dtype", "bytes_per_view")},
                                                   "results": results}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
