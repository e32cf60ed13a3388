"""Supervised cross-entropy: the only term of plain (teacher-free) training.

Supervised training is distillation with no teacher and no KD terms, so it uses this same plug-in."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs


def ce_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255,
            class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise cross-entropy, mean over valid pixels; 0 (not NaN) when every pixel is ignored.

    logits: [B, K, H, W] (any float dtype; computed in float32). target: [B, H, W] long."""
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weights,
                                ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if class_weights is None:
        return per_pixel.sum() / valid.sum().clamp_min(1)
    # weighted mean as F.cross_entropy defines it: divide by the summed weights of valid pixels
    w = class_weights[target.clamp(0, class_weights.numel() - 1)] * valid
    return per_pixel.sum() / w.sum().clamp_min(1e-12)


@LOSSES.register("ce")
class CELoss(DistillLoss):
    """Cross-entropy against the labels. Args: ``weight`` and optional ``class_weights`` (list of K)."""

    requires_teacher = False

    def __init__(self, ctx: LossContext, weight: float = 1.0, class_weights: list[float] | None = None) -> None:
        super().__init__(ctx, weight)
        if class_weights is not None and len(class_weights) != ctx.num_classes:
            raise ValueError(f"loss ce: class_weights has {len(class_weights)} entries, "
                             f"but the dataset has {ctx.num_classes} classes")
        cw = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", cw, persistent=False)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        return {"ce": ce_loss(inputs.student_logits, inputs.target, ignore_index=self.ignore_index,
                              class_weights=self.class_weights)}
