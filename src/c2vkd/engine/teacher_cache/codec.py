"""Compact teacher logits: per pixel the top-k classes, their logits relative to the maximum, the maximum and
the log-sum-exp of the rest (what is exact and what is approximated: see the package docstring)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F

DTYPES = {"float16": torch.float16, "float32": torch.float32}


class TeacherCacheError(RuntimeError):
    """A teacher cache is missing, incomplete, stale (made for other settings) or lacks a requested view."""


def stored_hw(crop_hw: Sequence[int], downsample: int) -> tuple[int, int]:
    """Resolution the logits are stored at for a crop of ``crop_hw``."""
    return max(1, round(int(crop_hw[0]) / downsample)), max(1, round(int(crop_hw[1]) / downsample))


def encode_logits(logits: torch.Tensor, *, topk: int, downsample: int = 1,
                  dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """[B, K, H, W] logits -> compact dict (see the module docstring). ``topk`` <= 0 or >= K keeps all classes."""
    if logits.ndim != 4:
        raise ValueError(f"encode_logits expects [B, K, H, W] logits, got shape {tuple(logits.shape)}")
    z = logits.detach().float()
    num_classes = z.shape[1]
    if downsample > 1:
        z = F.interpolate(z, size=stored_hw(z.shape[-2:], downsample), mode="bilinear", align_corners=False)
    k = num_classes if topk <= 0 else min(int(topk), num_classes)
    vals, idx = z.topk(k, dim=1)  # sorted, largest first
    top = vals[:, :1]
    out = {"top_idx": idx.to(torch.uint8 if num_classes <= 256 else torch.int16),
           "top_val": (vals - top).to(dtype), "max": top[:, 0].contiguous()}
    if k < num_classes:
        rest = z.scatter(1, idx, float("-inf")).logsumexp(dim=1)
        out["rest_lse"] = (rest - top[:, 0]).to(dtype)
    return out


def decode_logits(c: dict[str, torch.Tensor], num_classes: int, out_hw: Sequence[int] | None = None) -> torch.Tensor:
    """Compact dict (batched, as :func:`encode_logits` returns) -> float32 [B, K, H, W] logits, upsampled
    bilinearly to ``out_hw`` when given."""
    idx = c["top_idx"].long()
    val = c["top_val"].float()
    b, k, h, w = idx.shape
    if k < num_classes:
        fill = c["rest_lse"].float() - math.log(num_classes - k)
        z = fill[:, None].expand(b, num_classes, h, w).clone()
    elif k == num_classes:
        z = val.new_empty(b, num_classes, h, w)
    else:
        raise TeacherCacheError(f"the cache stores {k} logits per pixel but the dataset has {num_classes} classes")
    z.scatter_(1, idx, val)
    z = z + c["max"].float()[:, None]
    if out_hw is not None and tuple(z.shape[-2:]) != tuple(out_hw):
        z = F.interpolate(z, size=tuple(int(s) for s in out_hw), mode="bilinear", align_corners=False)
    return z
