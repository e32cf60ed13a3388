"""Learning-rate schedule: linear warm-up, then polynomial decay to min_lr (the SegFormer / C2VKD recipe)."""
from __future__ import annotations


def lr_factor(step: int, *, iters: int, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
              power: float = 1.0, base_lr: float = 1.0, min_lr: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Warm-up: factor goes linearly from warmup_ratio to 1 over warmup_iters steps.
    Decay: lr = (base_lr - min_lr) * (1 - step/iters)^power + min_lr, as in mmseg's PolyLR, applied after
    warm-up too (the two multiply, as mmseg does), so the curve is continuous."""
    step = min(max(step, 0), iters)
    decay = (1.0 - step / max(iters, 1)) ** power
    lr = (base_lr - min_lr) * decay + min_lr
    if warmup_iters > 0 and step < warmup_iters:
        lr *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    return lr / base_lr if base_lr > 0 else 0.0
