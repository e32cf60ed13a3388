"""CIRKD's relation terms, forward + backward, in the forms the code has and the one it replaced (issue 13).

    python benchmarks/bench_cirkd.py                 # camvid-p2's shapes: B 8, C 256, 32 x 32 decoder maps
    python benchmarks/bench_cirkd.py --rounds 1      # quick

Forms, timed round-robin (--rounds, median round reported; ratios are to "checkpointed" in the same run):
  checkpointed  row chunks of the plain formula (losses/cirkd._row_kl) under activation checkpointing: the
                implementation before the closed-form backward (recomputes every chunk's autograd graph);
  rows          row chunks with the closed-form backward (cirkd._RowKL; the pair term forced onto it with
                max_rows_per_chunk = A - 1);
  blocks        pair term only: one A x A block per unordered image pair used along rows and columns
                (cirkd._PairRelationKL, the default for pair scope when A^2 <= max_elements).
Terms: the mini-batch pixel-to-pixel term (pair scope, N x N relations) and the memory pixel term (N x M, M the
sampled contrast set: 4096 // K + 1 per class, K = 11). Values of every form agree (printed).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from c2vkd.losses import cirkd


def checkpointed_row_kl(s_rows, t_rows, s_cols, t_cols, *, temperature, groups=1,
                        max_elements=cirkd.DEFAULT_MAX_ELEMENTS):
    """The replaced form: per-chunk plain formula, each chunk under non-reentrant activation checkpointing."""
    rows = cirkd.rows_per_chunk(s_cols.shape[0], max_elements)
    fn = functools.partial(cirkd._row_kl, temperature=temperature, kd_temperature=1.0, groups=groups)
    out = []
    for a in range(0, s_rows.shape[0], rows):
        args = (s_rows[a:a + rows], t_rows[a:a + rows], s_cols, t_cols, None)
        out.append(checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
                   if s_rows.shape[0] > rows else fn(*args))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=32, help="h = w of the decoder feature map")
    ap.add_argument("--contrast", type=int, default=11 * (4096 // 11 + 1), help="sampled memory rows M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, c, h = args.batch, args.channels, args.size
    a = h * h
    s0 = torch.randn(b, c, h, h)
    ft = F.normalize(torch.randn(b, c, h, h), dim=1).flatten(2).transpose(1, 2).reshape(-1, c)
    bank = F.normalize(torch.randn(args.contrast, c), dim=1)
    tau = 0.1

    def rows_of(x):
        return F.normalize(x, dim=1).flatten(2).transpose(1, 2).reshape(-1, c)

    def p2p(form):
        def run():
            x = s0.clone().requires_grad_(True)
            fs = rows_of(x)
            if form == "checkpointed":
                loss = checkpointed_row_kl(fs, ft, fs, ft, temperature=tau, groups=b).sum() / (b * a * b)
            elif form == "rows":
                loss = cirkd.chunked_row_kl(fs, ft, fs, ft, temperature=tau, groups=b,
                                            max_rows_per_chunk=a - 1).sum() / (b * a * b)
            else:
                loss = cirkd._PairRelationKL.apply(fs.view(b, a, c), ft.view(b, a, c), 1.0 / tau) / (b * a * b)
            loss.backward()
            return loss.item()
        return run

    def memory(form):
        def run():
            x = s0.clone().requires_grad_(True)
            fs = rows_of(x)
            if form == "checkpointed":
                loss = checkpointed_row_kl(fs, ft, bank, bank, temperature=tau).mean()
            else:
                loss = cirkd.chunked_row_kl(fs, ft, bank, bank, temperature=tau).mean()
            loss.backward()
            return loss.item()
        return run

    cases = [("p2p (pair scope)", f, p2p(f)) for f in ("checkpointed", "rows", "blocks")]
    cases += [("memory pixel", f, memory(f)) for f in ("checkpointed", "rows")]
    times = {(t, f): [] for t, f, _ in cases}
    values = {}
    for _ in range(args.rounds):
        for term, form, fn in cases:
            t0 = time.perf_counter()
            values[(term, form)] = fn()
            times[(term, form)].append(time.perf_counter() - t0)
    print(f"CIRKD relation terms, forward + backward: B {b}, C {c}, {h} x {h} maps (N = {b * a}), memory M = "
          f"{args.contrast}, {torch.get_num_threads()} thread(s), {args.rounds} round(s)\n")
    print("| term | form | s (median) | speed-up vs checkpointed | value |\n|---|---|---:|---:|---:|")
    for term, form, _ in cases:
        med = statistics.median(times[(term, form)])
        base = statistics.median(times[(term, "checkpointed")])
        print(f"| {term} | {form} | {med:.3f} | {base / med:.2f}x | {values[(term, form)]:.6f} |")


if __name__ == "__main__":
    main()
