"""Attention transfer (activation-based spatial attention).

Reference: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance
of Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928); reference code
szagoruyko/attention-transfer (``at``, ``at_loss``).

Spatial attention Q = mean over channels of |F|^p (p = 2), per image; the student's map is resized
bilinearly to the teacher's h x w (before normalising), both maps are flattened and L2-normalised,
and the loss is ``beta / 2 * mean over B*h*w of (Q_S/||Q_S|| - Q_T/||Q_T||)^2``.
This is the reference code's form (``(at(x) - at(y)).pow(2).mean()`` with beta = 1000 and the
beta/2 factor); the paper writes beta/2 * || . ||_p with p = 2 and notes beta = 10^3 "divided by the
number of elements in the attention map and batch size", which is what the element mean does.
No channel agreement is needed, so there is no learnable adapter. Defaults: p = 2, beta = 1000,
weight 1.0.
Segmentation reference the preset follows: winycg/CIRKD ``losses/at.py`` ``CriterionAT.forward``:
``(F.normalize(s.pow(2).mean(1).view(B, -1)) - F.normalize(...t...)).pow(2).mean()`` on ``outputs[-1]`` (the
head feature before the classifier; our ``decoder`` taps), ``scripts/train_kd/train_at.sh``:
``--lambda-at 10000`` plus pixel KD 1. The preset writes that as ``weight: 10000, beta: 2`` (beta / 2 = 1, so
the raw term is CIRKD's criterion). The student's map is resized only when the strides differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2vkd.losses._common import feature_taps, no_autocast, resize_to, tap_shapes
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs


def attention_map(feat: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, C, h, w] -> [B, H*W] L2-normalised spatial attention (mean_c |F|^p, resized to ``size`` first)."""
    q = feat.float().abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None:
        q = resize_to(q, size)
    return F.normalize(q.flatten(1), dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, p: float = 2.0,
            beta: float = 1000.0) -> torch.Tensor:
    """Attention transfer between student [B, Cs, hs, ws] and teacher [B, Ct, ht, wt] maps (channels and
    sizes may differ; the student attention map is resized to ht x wt). Float32, teacher detached."""
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"at_loss: batch sizes differ ({student_feat.shape[0]} vs {teacher_feat.shape[0]})")
    with no_autocast(student_feat):
        qs = attention_map(student_feat, p, tuple(teacher_feat.shape[-2:]))
        qt = attention_map(teacher_feat.detach(), p)
        return beta / 2.0 * (qs - qt).pow(2).mean()


@LOSSES.register("at")
class ATLoss(DistillLoss):
    """Attention transfer. Args: ``weight`` (1.0), ``p`` (2), ``beta`` (1000),
    ``student_tap`` / ``teacher_tap`` ("feat")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, p: float = 2.0, beta: float = 1000.0,
                 student_tap: str = "feat", teacher_tap: str = "feat") -> None:
        super().__init__(ctx, weight)
        if p <= 0:
            raise ValueError(f"loss at: p must be > 0, got {p}")
        self.p, self.beta = float(p), float(beta)
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        tap_shapes(ctx, student_tap, teacher_tap, "at")  # fail early on a missing tap

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return feature_taps(args)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        return {"at": at_loss(inputs.student_feats[self.student_tap], inputs.teacher_feats[self.teacher_tap],
                              p=self.p, beta=self.beta)}
