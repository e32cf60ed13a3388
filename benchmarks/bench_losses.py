"""Peak memory and time of the C2VKD hot spots: patch_graph_loss (gram vs naive) and pdd_loss (blocked vs autograd).

Each case runs forward + backward (the student input requires grad) in a FRESH subprocess, so one case's
allocator state cannot hide another's peak. What "peak" means:
  * cpu : growth of the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
          over its value right after the inputs were allocated and filled. It therefore counts every
          temporary *and* the gradient buffer(s) the backward returns, plus allocator slack; it excludes the
          inputs and the interpreter/torch baseline. (tracemalloc does not see torch's allocations.)
  * cuda: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` after the inputs (tensor memory
          only, not the caching allocator's reserve or the CUDA context).
Time: the fastest of 1 + --repeat runs of forward + backward (wall clock, cuda synchronised).

Graph cases use teacher-like features [B, C, 32, 32] (B = N / 1024), C = 2048 by default; naive is skipped
when its N x N matrices (N^2 * 4 bytes, ~4 live at once in forward + backward) would exceed --mem-budget-gb.

    python benchmarks/bench_losses.py                          # full set (CPU: several minutes on 2 cores)
    python benchmarks/bench_losses.py --graph-n 1024 4096 --pdd-shape 2 19 512 512    # quicker
    python benchmarks/bench_losses.py --graph-n --threads 1 --repeat 2                 # PDD only, 1 thread
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

GRAPH_COPIES = 4  # G_T, G_S, their difference/square, and the backward's N x N gradient


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _make_step(case: dict, small: bool):
    """Inputs and a forward + backward closure for one case (small=True: a tiny warm-up copy)."""
    from c2vkd.losses.pdd import pdd_loss
    from c2vkd.losses.vlfd import patch_graph_loss

    dev = torch.device(case["device"])
    if case["kind"] == "graph":
        c = 8 if small else case["c"]
        b = 1 if small else max(1, case["n"] // 1024)
        t = torch.randn(b, c, 4 if small else 32, 32, device=dev).relu_()
        s = (t + 0.5 * torch.randn_like(t)).requires_grad_(True)

        def step() -> None:
            patch_graph_loss(s, t, exact_mode=case["mode"]).backward()
            s.grad = None
    else:
        b, k, h, w = (1, 3, 8, 8) if small else case["shape"]
        s = torch.randn(b, k, h, w, device=dev).mul_(3).requires_grad_(True)
        t = torch.randn(b, k, h, w, device=dev).mul_(3)
        y = torch.randint(0, k, (b, h, w), device=dev)
        y[:, :2] = 255  # a few ignored rows

        def step() -> None:
            pdd_loss(s, t, y, temperature=case["T"], memory_efficient=case["mode"] == "blocked").backward()
            s.grad = None
    return step


def _run_case(case: dict) -> dict:
    """Runs inside the child process: warm up, build inputs, measure one case, return the numbers."""
    torch.manual_seed(0)
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    dev = torch.device(case["device"])

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    _make_step(case, small=True)()  # page in the kernels' code first: it would count as RSS growth
    step = _make_step(case, small=False)
    sync()
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
    times = []
    for i in range(1 + case["repeat"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0:  # the peak of the first run (later runs reuse the same memory)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else _rss_mb() - base
    return {"peak_mb": peak, "time_s": min(times)}


def _spawn(case: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_case", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _precision_table() -> list[str]:
    """Relative error vs float64 of three float32 ways to compute the graph loss (why 'gram' is the difference form)."""
    from c2vkd.losses.vlfd import _graph_rows, patch_graph_loss

    def three_term(s: torch.Tensor, t: torch.Tensor) -> float:
        a, b = _graph_rows(t, 1e-8, torch.float32), _graph_rows(s, 1e-8, torch.float32)
        v = (a.T @ a).pow(2).sum() - 2 * (a.T @ b).pow(2).sum() + (b.T @ b).pow(2).sum()
        return (v / (s.shape[1] - 1) ** 2 / a.shape[0] ** 2).item()

    lines = ["precision (N=512, C=256, student = teacher + noise; |rel. error| vs float64 naive):",
             f"  {'noise':>7} {'gram (diff. form)':>18} {'naive fp32':>12} {'3-term fp32':>12}"]
    torch.manual_seed(0)
    for noise in (1.0, 1e-2, 1e-3):
        t = torch.randn(2, 256, 16, 16).relu()
        s = t + noise * torch.randn_like(t)
        ref = patch_graph_loss(s.double(), t.double(), exact_mode="naive").item()
        err = [abs(v - ref) / ref for v in (patch_graph_loss(s, t).item(),
                                            patch_graph_loss(s, t, exact_mode="naive").item(), three_term(s, t))]
        lines.append(f"  {noise:>7g} {err[0]:>18.1e} {err[1]:>12.1e} {err[2]:>12.1e}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--graph-n", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--pdd-shape", type=int, nargs=4, default=[8, 19, 512, 512], metavar=("B", "K", "H", "W"))
    ap.add_argument("--pdd-temperature", type=float, default=1.0)
    ap.add_argument("--mem-budget-gb", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs after the first (time = fastest)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per case (0: torch's default)")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._case:
        print(json.dumps(_run_case(json.loads(args._case))))
        return

    peak_what = "peak RSS growth" if args.device == "cpu" else "peak allocated growth"
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads or torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}; memory = {peak_what} over the inputs (MiB); "
          "time = fwd+bwd seconds")
    if args.graph_n:
        print()
        print(f"patch_graph_loss, C={args.channels}, features [N/1024, C, 32, 32]")
        print(f"  {'N':>6} {'gram MiB':>9} {'gram s':>8} {'naive MiB':>10} {'naive s':>8} {'mem x':>6} {'time x':>7}")
        for n in args.graph_n:
            base = dict(kind="graph", n=n, c=args.channels, device=args.device, repeat=args.repeat, threads=args.threads)
            g = _spawn({**base, "mode": "gram"})
            est_gb = GRAPH_COPIES * n * n * 4 / 1e9
            if est_gb > args.mem_budget_gb:
                nv: dict = {"skip": f"skipped: naive needs ~{est_gb:.1f} GB > --mem-budget-gb {args.mem_budget_gb:g}"}
            else:
                nv = _spawn({**base, "mode": "naive"})
            row = f"  {n:>6} "
            row += f"{g['peak_mb']:>9.0f} {g['time_s']:>8.2f} " if "peak_mb" in g else f"{g['error']} "
            if "peak_mb" in nv and "peak_mb" in g:
                row += (f"{nv['peak_mb']:>10.0f} {nv['time_s']:>8.2f} {nv['peak_mb'] / max(g['peak_mb'], 1):>6.1f} "
                        f"{nv['time_s'] / g['time_s']:>7.1f}")
            else:
                row += nv.get("skip", nv.get("error", ""))
            print(row, flush=True)
    print()
    b, k, h, w = args.pdd_shape
    mb = b * k * h * w * 4 / 2**20
    print(f"pdd_loss, logits [{b}, {k}, {h}, {w}] fp32 ({mb:.0f} MiB each; the returned gradient alone is "
          f"{mb:.0f} MiB), T={args.pdd_temperature:g}")
    res = {}
    for mode in ("blocked", "autograd"):
        res[mode] = _spawn(dict(kind="pdd", shape=[b, k, h, w], T=args.pdd_temperature, mode=mode,
                                device=args.device, repeat=args.repeat, threads=args.threads))
        r = res[mode]
        label = "memory_efficient=True (blocked)" if mode == "blocked" else "memory_efficient=False (autograd)"
        print(f"  {label:<36} " + (f"{r['peak_mb']:>7.0f} MiB {r['time_s']:>7.2f} s" if "peak_mb" in r
                                   else r["error"]), flush=True)
    if all("peak_mb" in r for r in res.values()):
        print(f"  autograd / blocked: memory x{res['autograd']['peak_mb'] / res['blocked']['peak_mb']:.1f}, "
              f"time x{res['autograd']['time_s'] / res['blocked']['time_s']:.2f}")
    print()
    print("\n".join(_precision_table()))


if __name__ == "__main__":
    main()
