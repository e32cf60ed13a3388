"""Pixel-wise Hinton knowledge distillation.

Reference: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
NIPS Deep Learning Workshop 2014 (arXiv:1503.02531). Applied per pixel for segmentation as in the
segmentation-KD literature (e.g. the CIRKD code base's ``CriterionKD``, which uses T = 1 and averages
over all pixels).

Loss: ``T^2 * mean over valid pixels of KL(softmax(z_T / T) || softmax(z_S / T))``.
Defaults: temperature 1.0, weight 1.0 (CIRKD's ``--kd-temperature 1 --lambda-kd 1``).
Reference code: winycg/CIRKD ``losses/kd.py`` ``CriterionKD.forward``: ``F.kl_div(log_softmax(z_S/T),
softmax(z_T/T), reduction="batchmean") * T^2`` over the [B*h*w, K] rows, i.e. the mean over *all* pixels,
on ``outputs[0]``, the logits at the model's output stride (before the final upsample).
``at``: ``"stride"`` (the reference's resolution; the ``logits`` taps, see
:func:`~c2vkd.losses._common.logits_pair` for strides that differ) or ``"input"`` (the module default, the
upsampled outputs, kept so that a bare ``{name: kd}`` means what it meant before; the preset
``methods/kd.yaml`` sets ``at: stride``).
Our addition: pixels labelled ``ignore_index`` are excluded (module option ``mask_ignore``, default
True; at the stride the labels are nearest-downsampled); ``mask_ignore: false`` reproduces the all-pixel
mean of the reference code (the presets use it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2vkd.losses._common import check_logits_at, check_same_shape, logits_pair, logits_taps, no_autocast
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs, masked_mean


def pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-pixel KL(p_T || p_S) with p = softmax(z / T) over the class dim.

    student_logits, teacher_logits: [B, K, H, W] -> [B, H, W] (float32; teacher detached)."""
    with no_autocast(student_logits):
        log_ps = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None, *,
            temperature: float = 1.0, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise Hinton KD: ``T^2 * mean_{valid pixels} KL(p_T || p_S)``.

    student_logits, teacher_logits: [B, K, H, W] (same size; any float dtype, computed in float32).
    target: [B, H, W] long or None (None: every pixel counts). Returns a scalar; 0 (with a gradient
    path, never NaN) when every pixel is ignored."""
    check_same_shape(student_logits, teacher_logits, "kd_loss")
    kl = pixel_kl(student_logits, teacher_logits, temperature)
    valid = torch.ones_like(kl, dtype=torch.bool) if target is None else target != ignore_index
    return (temperature ** 2) * masked_mean(kl, valid)


@LOSSES.register("kd")
class KDLoss(DistillLoss):
    """Pixel-wise KD on logits. Args: ``weight`` (1.0), ``temperature`` (1.0), ``mask_ignore`` (True),
    ``at`` ("input" | "stride")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, temperature: float = 1.0,
                 mask_ignore: bool = True, at: str = "input") -> None:
        super().__init__(ctx, weight)
        if temperature <= 0:
            raise ValueError(f"loss kd: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.mask_ignore = bool(mask_ignore)
        self.at = check_logits_at(at, "kd")

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return logits_taps(str(args.get("at", "input")))

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t, target = logits_pair(inputs, self.at)
        return {"kd": kd_loss(s, t, target if self.mask_ignore else None,
                              temperature=self.temperature, ignore_index=self.ignore_index)}
