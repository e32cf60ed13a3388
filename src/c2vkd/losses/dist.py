"""DIST: knowledge distillation from a stronger teacher via correlation (relation) matching.

Reference: T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger
Teacher", NeurIPS 2022 (arXiv:2205.10536); reference code hunto/DIST_KD, segmentation part:
``segmentation/losses/dist_kd.py`` (``DIST.forward``, ``pearson_correlation``) called from
``segmentation/train_kd.py`` as ``lambda_kd * DIST()(s_outputs[0], t_outputs[0])`` with lambda_kd = 1,
beta = gamma = 1 and no temperature (tau = 1), on ``outputs[0]``: the logits at the output stride before the
final upsample, over all pixels (no label masking).

With Y = softmax(z / tau) over classes, every pixel is one "sample" (the reference code reshapes
[B, K, H, W] logits to [B*H*W, K] for dense prediction):
  * inter-class relation: for each pixel, Pearson correlation between the teacher's and the student's
    K class probabilities; L_inter = 1 - mean over pixels;
  * intra-class relation: for each class, Pearson correlation between the teacher's and the student's
    probabilities across all pixels of the batch; L_intra = 1 - mean over classes;
  * DIST = tau^2 * (beta * L_inter + gamma * L_intra).
Pearson(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + 1e-8), as in the reference
code. Our addition: pixels labelled ``ignore_index`` are excluded from both relations (the intra-class
means and sums run over valid pixels only); with no valid pixel the loss is 0 with a gradient path.
Defaults: beta = gamma = tau = 1 (the segmentation reference's values), weight 1.0. ``at``: ``"stride"``
(the reference's resolution, ``logits`` taps, see :func:`~c2vkd.losses._common.logits_pair`) or
``"input"`` (module default, unchanged behaviour; the preset uses the stride and ``mask_ignore: false``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2vkd.losses._common import check_logits_at, check_same_shape, logits_pair, logits_taps, no_autocast
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs, masked_mean

_EPS = 1e-8


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None, *,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_inter, L_intra) scalars, not multiplied by tau^2.

    Logits [B, K, H, W] (same shape; float32 inside, teacher detached); valid [B, H, W] bool or None."""
    with no_autocast(student_logits):
        ys = F.softmax(student_logits.float() / temperature, dim=1)
        yt = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
        if valid is None:
            valid = torch.ones_like(ys[:, 0], dtype=torch.bool)
        # inter-class: Pearson across the class dim at every pixel
        cs = ys - ys.mean(dim=1, keepdim=True)
        ct = yt - yt.mean(dim=1, keepdim=True)
        r_inter = (cs * ct).sum(1) / (cs.norm(dim=1) * ct.norm(dim=1) + _EPS)        # [B, H, W]
        any_valid = valid.any()
        inter = (1.0 - masked_mean(r_inter, valid)) * any_valid
        # intra-class: Pearson across valid pixels for every class
        k = ys.shape[1]
        w = valid.to(ys.dtype).unsqueeze(1)                                          # [B, 1, H, W]
        n = w.sum().clamp_min(1.0)
        ms = (ys * w).sum(dim=(0, 2, 3), keepdim=True) / n
        mt = (yt * w).sum(dim=(0, 2, 3), keepdim=True) / n
        ds = ((ys - ms) * w).transpose(0, 1).reshape(k, -1)
        dt = ((yt - mt) * w).transpose(0, 1).reshape(k, -1)
        r_intra = (ds * dt).sum(1) / (ds.norm(dim=1) * dt.norm(dim=1) + _EPS)      # [K]
        intra = (1.0 - r_intra.mean()) * any_valid
        return inter, intra


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None, *,
              beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, ignore_index: int = 255) -> torch.Tensor:
    """DIST for dense logits: ``tau^2 * (beta * L_inter + gamma * L_intra)`` over valid pixels.

    student_logits, teacher_logits: [B, K, H, W]; target [B, H, W] long or None (all pixels). Scalar."""
    check_same_shape(student_logits, teacher_logits, "dist_loss")
    valid = None if target is None else target != ignore_index
    inter, intra = dist_terms(student_logits, teacher_logits, valid, temperature=temperature)
    return (temperature ** 2) * (beta * inter + gamma * intra)


@LOSSES.register("dist")
class DISTLoss(DistillLoss):
    """DIST on logits. Args: ``weight`` (1.0), ``beta`` (1.0), ``gamma`` (1.0), ``temperature`` (1.0),
    ``mask_ignore`` (True), ``at`` ("input" | "stride")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 temperature: float = 1.0, mask_ignore: bool = True, at: str = "input") -> None:
        super().__init__(ctx, weight)
        if temperature <= 0:
            raise ValueError(f"loss dist: temperature must be > 0, got {temperature}")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)
        self.mask_ignore = bool(mask_ignore)
        self.at = check_logits_at(at, "dist")

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return logits_taps(str(args.get("at", "input")))

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t, target = logits_pair(inputs, self.at)
        target = target if self.mask_ignore else None
        return {"dist": dist_loss(s, t, target, beta=self.beta,
                                  gamma=self.gamma, temperature=self.temperature, ignore_index=self.ignore_index)}
