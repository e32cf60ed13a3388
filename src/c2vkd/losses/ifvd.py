"""Intra-class feature variation distillation (IFVD).

Reference: Y. Wang, W. Zhou, T. Jiang, X. Bai, Y. Xu, "Intra-class Feature Variation Distillation for
Semantic Segmentation", ECCV 2020 (arXiv:2010.06727); authors' code YukangWang/IFVD
(``CriterionIFV``). Segmentation benchmark code the preset follows: winycg/CIRKD ``losses/ifvd.py``
``CriterionIFV.forward`` with ``scripts/train_kd/train_ifvd.sh`` (``--lambda-ifv 20``, plus pixel KD 1 and
the adversarial term 0.001 / 0.1; the IFVD repository itself uses 200), on ``outputs[-1]`` (the head's
feature before the classifier: our ``decoder`` taps).

As in the authors' code: the labels are downsampled (nearest) to the feature size; for each image
and each class present in it, the class prototype is the average feature over that class's pixels;
each pixel's intra-class feature variation is the cosine similarity between its feature and its own
class prototype (IFV map [B, h, w]); the loss is the MSE between the teacher's and the student's IFV
maps. Differences from the reference code (our choices):
  * the mean is over valid pixels only. The reference code gives ignore pixels a "prototype" equal to
    their own feature (cosine 1 for both networks, so they contribute 0) but still counts them in the
    MSE denominator; ``mean_over="all"`` reproduces that reduction;
  * labels outside [0, K) other than ``ignore_index`` are also treated as ignored.
No adapter by default (``adapter: none``), as in the reference: the IFV map is computed *inside* each
network (cosine of a pixel to its own network's class prototype), so the two networks' channel counts never
meet and need not agree -- a CNN teacher with 2048 channels and a ViT student with 256 work as they are. A
learnable adapter would even let the student match the teacher's maps by shaping the adapter instead of its
own features. What must agree is the spatial size: the student map is resized bilinearly to the teacher's
h x w (the reference's networks share a stride). ``adapter: conv1x1`` (or another kind) remains available.
Defaults: weight 1.0, ``mean_over: valid``; the preset uses weight 20 and ``mean_over: all`` (the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2vkd.losses._common import labels_to, no_autocast
from c2vkd.losses.adapters import AdaptedFeatureLoss
from c2vkd.losses.base import LOSSES, LossContext, LossInputs, masked_mean


def ifv_map(feat: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine similarity of each pixel's feature to its class prototype (per image).

    feat: [B, C, h, w] float32; onehot: [B, K, h, w] float (0 rows for ignored pixels) -> [B, h, w].
    Ignored pixels get their own feature as prototype (cosine ~1), as in the reference code."""
    f = feat.flatten(2)                                           # [B, C, n]
    m = onehot.flatten(2)                                         # [B, K, n]
    proto = torch.bmm(m, f.transpose(1, 2)) / (m.sum(dim=2, keepdim=True) + eps)   # [B, K, C]
    center = torch.bmm(proto.transpose(1, 2), m)                  # [B, C, n]: own class prototype
    assigned = m.sum(dim=1, keepdim=True)                         # [B, 1, n] 1 valid / 0 ignored
    center = center + (1.0 - assigned) * f
    return F.cosine_similarity(f, center, dim=1, eps=1e-8).reshape(feat.shape[0], *feat.shape[2:])


def ifvd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, target: torch.Tensor, *, num_classes: int,
              ignore_index: int = 255, mean_over: str = "valid") -> torch.Tensor:
    """IFVD: MSE between teacher and student intra-class feature-variation maps.

    student_feat: [B, Cs, h, w]; teacher_feat: [B, Ct, h, w] (same B, h, w); target: [B, H, W] long
    (downsampled nearest to h x w). mean_over: "valid" (default; 0 with a gradient path when nothing is
    valid) or "all" (reference-code reduction). Float32, teacher detached. Returns a scalar."""
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"ifvd_loss: student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} must share batch and spatial size")
    if mean_over not in ("valid", "all"):
        raise ValueError(f"ifvd_loss: mean_over must be 'valid' or 'all', got {mean_over!r}")
    with no_autocast(student_feat):
        lab = labels_to(target, teacher_feat.shape[-2:])
        valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
        onehot = F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), num_classes)
        onehot = (onehot * valid[..., None]).permute(0, 3, 1, 2).float()  # [B, K, h, w]
        ifv_s = ifv_map(student_feat.float(), onehot)
        ifv_t = ifv_map(teacher_feat.detach().float(), onehot)
        err = (ifv_s - ifv_t).pow(2)
        if mean_over == "all":
            return err.mean()
        return masked_mean(err, valid)


@LOSSES.register("ifvd")
class IFVDLoss(AdaptedFeatureLoss):
    """IFVD. Args: ``weight`` (1.0), ``adapter`` ("none": resize only), ``mean_over`` ("valid" | "all"),
    ``student_tap``/``teacher_tap`` ("feat")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, adapter: str = "none", mean_over: str = "valid",
                 student_tap: str = "feat", teacher_tap: str = "feat") -> None:
        super().__init__(ctx, weight)
        if mean_over not in ("valid", "all"):
            raise ValueError(f"loss ifvd: mean_over must be 'valid' or 'all', got {mean_over!r}")
        self.mean_over = mean_over
        self._init_taps(ctx, student_tap, teacher_tap, adapter, "ifvd")

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t = self.aligned(inputs)
        return {"ifvd": ifvd_loss(s, t, inputs.target, num_classes=self.ctx.num_classes,
                                  ignore_index=self.ignore_index, mean_over=self.mean_over)}
