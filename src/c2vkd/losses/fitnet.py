"""FitNets hint loss.

Reference: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for
Thin Deep Nets", ICLR 2015 (arXiv:1412.6550).

A student-side regressor maps the student tap (the "guided layer") to the teacher tap's channels
(the "hint"), is resized bilinearly to the teacher's h x w at run time, and the loss is the mean
squared error over all B*C_T*h*w elements. The paper writes (1/2)||u_h - r||^2 per example; we use
the element mean (as the segmentation KD code bases do), so scale with ``weight``.
Regressor (``adapter``): "conv1x1" (default), "conv3x3" (conv3x3-BN-ReLU-conv1x1) or "mlp"
(conv1x1-BN-ReLU-conv1x1); the paper's regressor is a convolution. Default weight 1.0.
Segmentation reference the preset follows: winycg/CIRKD ``losses/fitnet.py`` ``CriterionFitNet.forward``
(a 1x1 conv without bias on the student's ``outputs[-1]``, the head feature before the classifier, then
``((s - t)^2).mean()``), ``scripts/train_kd/train_fitnet.sh``: ``--lambda-fitnet 10`` plus pixel KD 1. The
preset reads our ``decoder`` taps; the bilinear resize after the projection is only active when the two
networks' strides differ (the reference's share one).
"""
from __future__ import annotations

import torch

from c2vkd.losses._common import check_same_shape, no_autocast
from c2vkd.losses.adapters import AdaptedFeatureLoss
from c2vkd.losses.base import LOSSES, LossContext, LossInputs


def fitnet_loss(student_hint: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between the (already adapted) student map and the teacher map, both [B, C, h, w].

    Mean over all elements, float32, teacher detached. Returns a scalar."""
    check_same_shape(student_hint, teacher_feat, "fitnet_loss")
    with no_autocast(student_hint):
        return (student_hint.float() - teacher_feat.detach().float()).pow(2).mean()


@LOSSES.register("fitnet")
class FitNetLoss(AdaptedFeatureLoss):
    """FitNets hint. Args: ``weight`` (1.0), ``adapter`` ("conv1x1" | "conv3x3" | "mlp"),
    ``student_tap`` / ``teacher_tap`` ("feat")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, adapter: str = "conv1x1",
                 student_tap: str = "feat", teacher_tap: str = "feat") -> None:
        super().__init__(ctx, weight)
        if adapter == "none":
            raise ValueError("loss fitnet: the hint regressor must map channels; adapter 'none' is not allowed")
        self._init_taps(ctx, student_tap, teacher_tap, adapter, "fitnet")

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t = self.aligned(inputs)
        return {"fitnet": fitnet_loss(s, t)}
