"""CLIP attention pool (VLFD's linguistic term, teacher side every step): the folded single-query form in
``c2vkd.models.clip_pool.AttentionPool2d`` vs the single query over projected tokens (the form before, e9ca7ce)
vs CLIP's literal full multi-head attention, in one process.

    python benchmarks/bench_clip_pool.py                       # RN101-shaped pool on a 512-channel teacher tap
    python benchmarks/bench_clip_pool.py --channels 2048 --sizes 7 14   # CLIP RN101's own width

Prints the median forward time (no grad, as the teacher side runs) of each for each h x w, the ratios, and
the largest difference between the outputs. They are timed alternately, so a busy machine slows all alike.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def naive_pool(pool, x: torch.Tensor) -> torch.Tensor:
    """CLIP's formulation: every token through q/k/v, full self-attention, the mean token's output."""
    b, c, h, w = x.shape
    tokens = x.flatten(2).permute(2, 0, 1)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0) + pool.pos_embed(h, w)[:, None, :]
    out, _ = F.multi_head_attention_forward(
        query=tokens, key=tokens, value=tokens, embed_dim_to_check=c, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


def projected_pool(pool, x: torch.Tensor) -> torch.Tensor:
    """One query (the mean token), but keys and values projected for every token (c2vkd before the fold)."""
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.pos_embed(h, w)
    nh, hd = pool.num_heads, c // pool.num_heads
    q = pool.q_proj(tokens[:, :1]).reshape(b, 1, nh, hd).transpose(1, 2)
    k = pool.k_proj(tokens).reshape(b, h * w + 1, nh, hd).transpose(1, 2)
    v = pool.v_proj(tokens).reshape(b, h * w + 1, nh, hd).transpose(1, 2)
    return pool.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c))


def main(argv: list[str] | None = None) -> int:
    from c2vkd.models.clip_pool import ARCH_SPECS, AttentionPool2d

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=512, help="teacher tap channels C (pool embed_dim)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32], help="square h = w of the tap")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = dict(ARCH_SPECS["RN101"])
    spec.update(embed_dim=args.channels, num_heads=math.gcd(args.channels, spec["num_heads"]))
    torch.manual_seed(0)
    pool = AttentionPool2d(**spec).eval().requires_grad_(False)
    print(f"pool: C={args.channels}, heads={spec['num_heads']}, output {spec['output_dim']}, batch {args.batch}, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| h x w | tokens | full attention (ms) | one query, projected tokens (ms) | folded (ms) | folded vs "
          "projected | folded vs full | max abs diff |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for s in args.sizes:
            x = torch.randn(args.batch, args.channels, s, s)
            fns = {"naive": lambda: naive_pool(pool, x), "projected": lambda: projected_pool(pool, x),
                   "folded": lambda: pool(x)}
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()
            for _ in range(args.repeat):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            n, p, f = (statistics.median(times[k]) * 1e3 for k in fns)
            ref = naive_pool(pool, x)
            diff = max((ref - pool(x)).abs().max().item(), (ref - projected_pool(pool, x)).abs().max().item())
            print(f"| {s}x{s} | {s * s + 1} | {n:.2f} | {p:.2f} | {f:.2f} | {p / f:.1f}x | {n / f:.1f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
