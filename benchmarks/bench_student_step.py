"""The student's share of a camvid-p2 step in several arithmetic forms, timed round-robin in one process (issue 29):
forward + backward of SegFormer-B0 on a [8, 3, 128, 128] batch with CE (the training step's student part), and
the validation forward ([B, 3, 180, 240], inference mode) at batch 1 and at a larger eval batch.

    OMP_NUM_THREADS=1 python benchmarks/bench_student_step.py --rounds 7
    OMP_NUM_THREADS=1 python benchmarks/bench_student_step.py --forms eager,bf16 --ops 12   # where bf16 goes

Forms: ``eager`` (fp32, the reference), ``channels_last`` (the student and its input in channels-last memory
format), ``bf16`` (CPU autocast to bfloat16), ``compile`` (torch.compile, inductor; compiled before timing),
``compile_bf16``, ``channels_last_bf16``, ``bf16_math`` (bf16 with PyTorch's math attention instead of the CPU flash
kernel), ``bf16_sdpa`` (bf16 with transformers' plain ``sdpa`` attention, i.e. the flash kernel in bf16: what our
SegFormer ran before its attention went to fp32 under CPU bf16, models/segformer.py ``sdpa_fp32_on_cpu_bf16``). Each round times every form back to back; a form's round time over
eager's in the same round is its paired ratio (median [min, max] over rounds). ``--ops N`` prints the N most
expensive operators of two training steps per form (torch.profiler, self CPU time).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn import functional as F


def _with_math(ctx):
    from contextlib import ExitStack

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def both():
        stack = ExitStack()
        stack.enter_context(ctx())
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack
    return both


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forms", default="eager,channels_last,bf16,compile")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--eval-hw", default="180,240")
    ap.add_argument("--eval-batches", default="1,4", help="eval batch sizes timed (images per forward)")
    ap.add_argument("--eval-images", type=int, default=8, help="images per eval timing")
    ap.add_argument("--iters", type=int, default=5, help="training steps per form and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from c2vkd.models import build_model

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    eh, ew = (int(v) for v in args.eval_hw.split(","))
    ebs = [int(v) for v in args.eval_batches.split(",") if v.strip()]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.crop, args.crop)
    y = torch.randint(0, 11, (args.batch, args.crop, args.crop))
    xe = torch.randn(args.eval_images, 3, eh, ew)

    built = {}
    for f in forms:
        torch.manual_seed(0)
        m = build_model("segformer_b0", 11)
        xin, xev = x, xe
        if f.startswith("channels_last"):
            m = m.to(memory_format=torch.channels_last)
            xin, xev = x.contiguous(memory_format=torch.channels_last), xe.contiguous(memory_format=torch.channels_last)
        call = torch.compile(m, dynamic=False) if f.startswith("compile") else m  # as train.compile
        amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in f else nullcontext
        if f.endswith("_sdpa"):  # transformers' own sdpa: bf16 flash attention on CPU
            m.config._attn_implementation = "sdpa"
        if f.endswith("_math"):  # the attention through the math backend (matmul + softmax) instead of flash
            amp = _with_math(amp)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        built[f] = (m, call, amp, opt, xin, xev)

    def train_step(f: str) -> None:
        m, call, amp, opt, xin, _ = built[f]
        m.train()
        with amp():
            out = call(xin)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_pass(f: str, bs: int) -> None:
        m, call, amp, _, _, xev = built[f]
        m.eval()
        with torch.inference_mode(), amp():
            for i in range(0, xev.shape[0], bs):
                call(xev[i:i + bs]).float().argmax(1)

    t_compile = {}
    for f in forms:  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(2):
            train_step(f)
        for bs in ebs:
            eval_pass(f, bs)
        t_compile[f] = time.perf_counter() - t0
        print(f"{f}: warm-up (and compilation) {t_compile[f]:.1f} s", flush=True)
    times: dict[str, list[float]] = {f"{f} train": [] for f in forms}
    times.update({f"{f} eval b{bs}": [] for f in forms for bs in ebs})
    for _ in range(args.rounds):
        for f in forms:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                train_step(f)
            times[f"{f} train"].append((time.perf_counter() - t0) / args.iters)
            for bs in ebs:
                t0 = time.perf_counter()
                eval_pass(f, bs)
                times[f"{f} eval b{bs}"].append((time.perf_counter() - t0) / args.eval_images)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; train: [{args.batch}, 3, {args.crop}, {args.crop}] forward + "
          f"backward + AdamW; eval: [{eh}x{ew}] images, inference mode; {args.rounds} rounds")
    print("\n| form | what | s (median round) | time / eager's, paired by round: median [min, max] | warm-up s |"
          "\n|---|---|---:|---|---:|")
    for key, v in times.items():
        f, what = key.split(" ", 1)
        ref = times[f"eager {what}" if what == "train" else f"eager eval b{ebs[0]}"]
        paired = [a / b for a, b in zip(v, ref)]
        print(f"| {f} | {what} | {statistics.median(v):.4f} | {statistics.median(paired):.3f}x "
              f"[{min(paired):.3f}, {max(paired):.3f}] | {t_compile[f]:.1f} |")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        for f in forms:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    train_step(f)
            print(f"\n{f}: top {args.ops} operators of 2 training steps (self CPU)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops,
                                            max_name_column_width=40))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
