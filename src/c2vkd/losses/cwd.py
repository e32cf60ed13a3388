"""Channel-wise distillation (CWD).

Reference: C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen, "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021 (arXiv:2011.13256). Segmentation reference code: winycg/CIRKD ``losses/cwd.py``
``CriterionCWD.forward`` (``norm_type="channel"``, ``divergence="kl"``, T = 4), driven by
``scripts/train_kd/train_cwd.sh`` with ``--lambda-cwd-logit 3 --lambda-cwd-fea 50`` (both terms, plus pixel
KD 1 and the adversarial term: see ``methods/cwd.yaml``).

Each channel's map is turned into a distribution over its h*w positions with a temperature softmax; the
loss is ``T^2 / (B * C_div) * sum_{b,c} KL(phi(y_T[b,c]) || phi(y_S[b,c]))``.

``reduction``: ``"reference"`` (default) divides by B x (the student's channel count *before* the 1x1
projection), as ``CriterionCWD`` reads ``n, c, h, w = preds_S.shape`` before applying its conv;
``"mean"`` divides by B x (the compared channel count), the per-channel mean. On logits both are B x K.

``on: logits`` (term ``cwd``): ``at: "stride"`` reads the ``logits`` taps (the reference's ``outputs[0]``,
before the final upsample; see :func:`~c2vkd.losses._common.logits_pair`), ``at: "input"`` the upsampled
outputs (module default, unchanged behaviour; the preset uses the stride). ``on: features`` (term
``cwd_feat``, so the preset can hold both terms): a feature tap pair; ``adapter: "auto"`` (default) adds a
1x1 conv (C_S -> C_T, no bias, sized from the loss context) only when the channel counts differ, as
``CriterionCWD`` does; the projected student map is then resized bilinearly to the teacher's h x w (the
reference compares maps of one size; our CNN teacher and ViT student may differ in stride).
CWD does not use labels: every position counts (as in the reference code).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from c2vkd.losses._common import (check_logits_at, check_same_shape, feature_taps, logits_pair, logits_taps,
                                  no_autocast, tap_shapes)
from c2vkd.losses.adapters import make_adapter
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs

REDUCTIONS = ("reference", "mean")


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
             channels: int | None = None) -> torch.Tensor:
    """Channel-wise distillation between maps of the same shape [B, C, h, w] (logits or features).

    Per (b, c): softmax over the h*w positions of y / T; KL(teacher || student) summed over positions;
    summed over (b, c), divided by B * ``channels`` (default C), times T^2. Float32, teacher detached."""
    check_same_shape(student, teacher, "cwd_loss")
    with no_autocast(student):
        b, c = student.shape[:2]
        s = student.float().reshape(b * c, -1) / temperature
        t = teacher.detach().float().reshape(b * c, -1) / temperature
        log_ps = F.log_softmax(s, dim=1)
        log_pt = F.log_softmax(t, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        return kl * (temperature ** 2) / (b * (c if channels is None else int(channels)))


@LOSSES.register("cwd")
class CWDLoss(DistillLoss):
    """CWD. Args: ``weight`` (1.0; reference 3 on logits, 50 on features), ``temperature`` (4.0),
    ``on`` ("logits" | "features"), ``at`` ("input" | "stride", logits), ``reduction`` ("reference" |
    "mean"), and for features ``student_tap`` / ``teacher_tap`` ("feat") and ``adapter`` ("auto": 1x1 conv
    only when channels differ; or a kind of :mod:`c2vkd.losses.adapters`)."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, temperature: float = 4.0, on: str = "logits",
                 student_tap: str = "feat", teacher_tap: str = "feat", adapter: str = "auto",
                 at: str = "input", reduction: str = "reference") -> None:
        super().__init__(ctx, weight)
        if on not in ("logits", "features"):
            raise ValueError(f"loss cwd: 'on' must be 'logits' or 'features', got {on!r}")
        if temperature <= 0:
            raise ValueError(f"loss cwd: temperature must be > 0, got {temperature}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss cwd: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.temperature = float(temperature)
        self.on = on
        self.at = check_logits_at(at, "cwd")
        self.reduction = reduction
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.adapter = None
        self.student_channels: int | None = None
        if on == "features":
            self.weights = {"cwd_feat": float(weight)}
            s_shape, t_shape = tap_shapes(ctx, student_tap, teacher_tap, "cwd")
            self.student_channels = int(s_shape[1])
            kind = adapter
            if adapter == "auto":
                kind = "none" if s_shape[1] == t_shape[1] else "conv1x1"
            if kind == "none" and s_shape[1] != t_shape[1]:
                raise ValueError(f"loss cwd: on 'features' compares channels; student {s_shape[1]} and teacher "
                                 f"{t_shape[1]} channels differ, so it needs a channel adapter (not 'none')")
            self.adapter = make_adapter(s_shape, t_shape, kind)

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        if args.get("on", "logits") == "features":
            return feature_taps(args)
        return logits_taps(str(args.get("at", "input")))

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        if self.adapter is None:
            s, t, _ = logits_pair(inputs, self.at)
            return {"cwd": cwd_loss(s, t, temperature=self.temperature)}
        t = inputs.teacher_feats[self.teacher_tap]
        s = self.adapter(inputs.student_feats[self.student_tap], t.shape[-2:])
        channels = self.student_channels if self.reduction == "reference" else None
        return {"cwd_feat": cwd_loss(s, t, temperature=self.temperature, channels=channels)}
