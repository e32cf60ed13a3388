"""Decoupled knowledge distillation (DKD), applied per pixel.

Reference: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022
(arXiv:2203.08679); reference code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py``.

For each pixel with target class t and p = softmax(z / T) over the K classes:
  * TCKD = KL(b_T || b_S) on the binary distribution b = [p_t, 1 - p_t];
  * NCKD = KL(p^_T || p^_S) on the non-target distribution p^ = softmax over the classes k != t
    (the target logit masked out);
  * DKD  = T^2 * mean over pixels of (alpha * TCKD + beta * NCKD).
mdistiller (``mdistiller/distillers/DKD.py``, ``dkd_loss``) reduces with a sum over samples divided by
the batch size (= a per-sample mean); here the "samples" are pixels, so the mean is over (valid) pixels.

Target class: ``target_source="gt"`` (default, as DKD and mdistiller: ``_get_gt_mask(logits, target)``
marks the ground-truth class) takes the label and excludes pixels labelled ``ignore_index``;
``target_source="teacher"`` (our option, off by default) takes the teacher's argmax per pixel, so every pixel
can be distilled without labels (ignore pixels are still excluded unless ``mask_ignore: false``).

Numerics (exact, not mdistiller's ``-1000 * gt_mask`` trick): log(1 - p_t) and the non-target
log-softmax both use ``logsumexp_{k != t}(z_k / T)``, so nothing is computed as ``log(1 - p)``. (The trick
leaves exp(-1000) ~ 0 mass on the target class; the difference is below float32 resolution.)

Settings: mdistiller's global defaults (``mdistiller/engine/cfg.py``: ``CFG.DKD``) are alpha = 1, beta = 8,
T = 4, CE weight 1, warm-up 20 epochs; its ImageNet configs (``configs/imagenet/r34_r18/dkd.yaml``) keep
alpha = 1 and set beta = 0.5, T = 1, warm-up 1; some CIFAR pairs use beta = 2. The DKD paper has no
segmentation experiments, so no reference segmentation setting exists: our defaults and the preset use the
global defaults (alpha 1, beta 8, T 4) with the ground-truth target. mdistiller also ramps the DKD loss
linearly over the first ``WARMUP`` epochs (``min(epoch / warmup, 1)``); that schedule is not part of this
loss (a known deviation, docs/methods.md).
"""
from __future__ import annotations

import torch

from c2vkd.losses._common import check_same_shape, no_autocast
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs, masked_mean

TARGET_SOURCES = ("gt", "teacher")


def _decoupled_log_probs(z: torch.Tensor, t: torch.Tensor, temperature: float):
    """z [B, K, H, W] float32, t [B, H, W] long in [0, K).

    Returns (log b_t [B,H,W], log b_nt [B,H,W], log p^ [B,K,H,W] (entry t meaningless), target mask)."""
    z = z / temperature
    classes = torch.arange(z.shape[1], device=z.device).view(1, -1, 1, 1)
    tmask = classes == t[:, None]                                          # [B, K, H, W] bool, 1 byte/elt
    lse_all = torch.logsumexp(z, dim=1)                                   # [B, H, W]
    lse_nt = torch.logsumexp(z.masked_fill(tmask, float("-inf")), dim=1)  # [B, H, W]
    z_t = z.gather(1, t[:, None])[:, 0]
    log_bt = z_t - lse_all
    log_bnt = lse_nt - lse_all
    log_phat = z - lse_nt[:, None]
    return log_bt, log_bnt, log_phat, tmask


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_class: torch.Tensor,
              temperature: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (TCKD, NCKD), each [B, H, W], for target classes ``target_class`` [B, H, W] in [0, K).

    Logits [B, K, H, W] (computed in float32, teacher detached); K >= 2. Not multiplied by T^2."""
    with no_autocast(student_logits):
        zs = student_logits.float()
        zt = teacher_logits.detach().float()
        s_bt, s_bnt, s_phat, tmask = _decoupled_log_probs(zs, target_class, temperature)
        t_bt, t_bnt, t_phat, _ = _decoupled_log_probs(zt, target_class, temperature)
        tckd = t_bt.exp() * (t_bt - s_bt) + t_bnt.exp() * (t_bnt - s_bnt)
        nc = t_phat.exp() * (t_phat - s_phat)
        nckd = torch.where(tmask, torch.zeros_like(nc), nc).sum(dim=1)
        return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, target_source: str = "gt",
             ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise DKD: ``T^2 * mean_{valid pixels} (alpha * TCKD + beta * NCKD)``.

    student_logits, teacher_logits: [B, K, H, W], same size, K >= 2. target: [B, H, W] long; may be None
    only with target_source="teacher" (then every pixel counts). Scalar; 0 with a gradient path when
    no pixel is valid."""
    check_same_shape(student_logits, teacher_logits, "dkd_loss")
    if target_source not in TARGET_SOURCES:
        raise ValueError(f"dkd_loss: target_source must be one of {TARGET_SOURCES}, got {target_source!r}")
    if student_logits.shape[1] < 2:
        raise ValueError("dkd_loss needs at least 2 classes")
    if target is None:
        if target_source == "gt":
            raise ValueError("dkd_loss: target_source='gt' needs a target")
        valid = torch.ones(student_logits.shape[:1] + student_logits.shape[2:], dtype=torch.bool,
                           device=student_logits.device)
    else:
        valid = target != ignore_index
    if target_source == "teacher":
        t = teacher_logits.detach().argmax(dim=1)
    else:
        t = torch.where(valid, target, torch.zeros_like(target))  # ignore pixels: any class, masked below
    tckd, nckd = dkd_terms(student_logits, teacher_logits, t, temperature)
    return (temperature ** 2) * masked_mean(alpha * tckd + beta * nckd, valid)


@LOSSES.register("dkd")
class DKDLoss(DistillLoss):
    """Pixel-wise DKD on logits. Args: ``weight`` (1.0), ``alpha`` (1.0), ``beta`` (8.0),
    ``temperature`` (4.0), ``target_source`` ("gt" | "teacher"), ``mask_ignore`` (True; with
    target_source "teacher", False distils every pixel)."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, target_source: str = "gt", mask_ignore: bool = True) -> None:
        super().__init__(ctx, weight)
        if target_source not in TARGET_SOURCES:
            raise ValueError(f"loss dkd: target_source must be one of {TARGET_SOURCES}, got {target_source!r}")
        if target_source == "gt" and not mask_ignore:
            raise ValueError("loss dkd: target_source 'gt' always masks ignore pixels (mask_ignore must be true)")
        if temperature <= 0:
            raise ValueError(f"loss dkd: temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.target_source = target_source
        self.mask_ignore = bool(mask_ignore)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        target = inputs.target if self.mask_ignore else None
        return {"dkd": dkd_loss(inputs.student_logits, inputs.teacher_logits, target, alpha=self.alpha,
                                beta=self.beta, temperature=self.temperature,
                                target_source=self.target_source, ignore_index=self.ignore_index)}
