"""Shared helpers for feature-based baseline losses: student-side adapters, resizing, float32 regions.

Every feature loss (FitNets, AT, CWD-on-features, SKD, IFVD, CIRKD) builds its alignment head with
:func:`make_adapter` and resizes with :func:`resize_to`, so there is one adapter implementation.

An adapter maps a student tap ``[B, Cs, hs, ws]`` to ``[B, Ct, ht, wt]``: a channel projection at the
student's resolution (cheaper than projecting after upsampling), then a bilinear resize to the size
passed at run time (the teacher tensor's actual ``h x w``; the teacher shape from the
:class:`~c2vkd.losses.base.LossContext` is only the fallback). Channel counts come from the context's
dummy-forward shapes, never from hard-coded numbers.

Logits position (``at``, KD / CWD / DIST / the adversarial term): ``"input"`` reads the models' outputs
(logits bilinearly upsampled to the input size, ``LossInputs.student_logits``); ``"stride"`` reads the
``logits`` tap of each model (its classifier's output at the model's output stride, before the final
upsample; every registered model declares that alias, see docs/models.md), which is where the reference
code bases (CIRKD, DIST_KD, structure_knowledge_distillation) compute these losses. See :func:`logits_pair`.

Kinds:
  * ``"conv1x1"``: ``Conv2d(Cs, Ct, 1, bias=False)`` (FitNets regressor / C2VKD visual head style).
  * ``"conv3x3"``: ``Conv2d(Cs, Ct, 3, pad 1, bias=False) -> BN -> ReLU -> Conv2d(Ct, Ct, 1, bias=False)``
    (the "conv-BN-ReLU-conv" head).
  * ``"mlp"``: ``Conv1x1(Cs, Ct) -> BN -> ReLU -> Conv1x1(Ct, Ct)`` (per-pixel MLP; this is CIRKD's
    student projection head).
  * ``"none"``: no parameters, spatial resize only; the output keeps ``Cs`` channels. Only for losses
    that never compare channels across networks (SKD pair-wise similarity, AT).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from c2vkd.losses.base import DistillLoss

ADAPTER_KINDS = ("conv1x1", "conv3x3", "mlp", "none")
LOGITS_AT = ("stride", "input")
LOGITS_TAP = "logits"


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize ``x`` [B, C, h, w] to ``size`` = (H, W) (align_corners=False); no-op if equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``x``'s device so a loss really computes in float32."""
    if x.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class FeatureAdapter(nn.Module):
    """Student-side alignment head: channel projection then bilinear resize to the teacher's h x w.

    forward(x [B, Cs, hs, ws], size=(ht, wt) or None) -> [B, Ct, ht, wt] (``Cs`` channels for kind
    "none"). ``size`` should be the teacher tensor's spatial size at run time; when omitted the
    teacher tap's size from the loss context is used."""

    def __init__(self, in_channels: int, out_channels: int, default_size: tuple[int, int],
                 kind: str = "conv1x1") -> None:
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
        self.kind = kind
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels) if kind != "none" else int(in_channels)
        self.default_size = (int(default_size[0]), int(default_size[1]))
        cin, cout = self.in_channels, self.out_channels
        if kind == "conv1x1":
            self.proj: nn.Module = nn.Conv2d(cin, cout, 1, bias=False)
        elif kind == "conv3x3":
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                      nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1, bias=False))
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                      nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1, bias=False))
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"adapter expects a [B, {self.in_channels}, h, w] student feature, "
                             f"got {tuple(x.shape)}; the loss context's student shape is out of date")
        params = list(self.proj.parameters())
        if params and x.dtype != params[0].dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(params[0].dtype)  # e.g. a bf16 student tap without autocast
        y = self.proj(x)
        return resize_to(y, size if size is not None else self.default_size)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, {self.in_channels} -> {self.out_channels}, default_size={self.default_size}"


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int],
                 kind: str = "conv1x1") -> FeatureAdapter:
    """Adapter from a student tap of shape [B, Cs, hs, ws] to a teacher tap of shape [B, Ct, ht, wt].

    Only the channel counts (and the fallback output size) are read from the shapes; the output size
    is normally the teacher tensor's size passed to ``forward`` at run time."""
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(f"adapter needs [B, C, h, w] tap shapes, got student {tuple(student_shape)} "
                         f"and teacher {tuple(teacher_shape)}")
    return FeatureAdapter(int(student_shape[1]), int(teacher_shape[1]),
                          (int(teacher_shape[2]), int(teacher_shape[3])), kind=kind)


def tap_shapes(ctx, student_tap: str, teacher_tap: str, loss: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student shape, teacher shape) of the named taps from a LossContext, with a clear error."""
    for side, shapes, name in (("student", ctx.student_shapes, student_tap),
                               ("teacher", ctx.teacher_shapes, teacher_tap)):
        if name not in shapes:
            raise KeyError(f"loss {loss}: the {side} tap {name!r} has no measured shape in the loss "
                           f"context (available: {', '.join(sorted(shapes)) or 'none'})")
    return tuple(ctx.student_shapes[student_tap]), tuple(ctx.teacher_shapes[teacher_tap])


def feature_taps(args: dict) -> tuple[list[str], list[str]]:
    """The ``taps`` answer of a feature loss: (``[student_tap]``, ``[teacher_tap]``), both default "feat"."""
    return [str(args.get("student_tap", "feat"))], [str(args.get("teacher_tap", "feat"))]


def valid_mask(target: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
    """Boolean [B, H, W] mask of pixels whose label is not ``ignore_index`` (None if no target)."""
    return None if target is None else target != ignore_index


def labels_to(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsample of labels [B, H, W] (long) to ``size`` (h, w) -> [B, h, w] long."""
    size = (int(size[0]), int(size[1]))
    if tuple(target.shape[-2:]) == size:
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} must have the same shape")


class AdaptedFeatureLoss(DistillLoss):
    """Base of the feature losses that compare one student tap with one teacher tap through an adapter
    (FitNets, SKD, IFVD, CIRKD): reads ``student_tap`` / ``teacher_tap`` (default "feat"), sizes the adapter
    from the context's dummy-forward shapes, and :meth:`aligned` returns the adapted pair."""

    def _init_taps(self, ctx, student_tap: str, teacher_tap: str, adapter: str, loss: str) -> tuple:
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        s_shape, t_shape = tap_shapes(ctx, student_tap, teacher_tap, loss)
        self.adapter = make_adapter(s_shape, t_shape, adapter)
        return s_shape, t_shape

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return feature_taps(args)

    def aligned(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapted student feature [B, Ct, ht, wt], teacher feature [B, Ct, ht, wt])."""
        t = inputs.teacher_feats[self.teacher_tap]
        return self.adapter(inputs.student_feats[self.student_tap], t.shape[-2:]), t


def check_logits_at(at: str, loss: str) -> str:
    """Validate an ``at`` option (``"stride"`` or ``"input"``) with an error naming the loss."""
    if at not in LOGITS_AT:
        raise ValueError(f"loss {loss}: 'at' must be one of {', '.join(LOGITS_AT)}, got {at!r}")
    return at


def logits_taps(at: str) -> tuple[list[str], list[str]]:
    """The ``taps`` answer of a logits loss: the ``logits`` alias on both sides with ``at="stride"``."""
    return ([LOGITS_TAP], [LOGITS_TAP]) if at == "stride" else ([], [])


def logits_pair(inputs, at: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(student logits, teacher logits, labels at their size) for a logits loss, both [B, K, h, w].

    ``at="input"``: the models' outputs at the input size and the labels as given. ``at="stride"``: the
    ``logits`` taps (classifier outputs before the final upsample). When the two strides differ (e.g. a
    DeepLabV3 teacher at 1/16 and a SegFormer student at 1/4) the student's logits are resized bilinearly
    (align_corners=False) to the teacher's h x w, as the feature adapters do: the teacher tensor (live or
    cached) is never interpolated, and the student's gradient flows through the resize. Labels are
    nearest-downsampled to h x w (:func:`labels_to`, as CIRKD / IFVD downsample labels)."""
    target = inputs.target
    if at == "input":
        s, t = inputs.student_logits, inputs.teacher_logits
    else:
        for side, feats in (("student", inputs.student_feats), ("teacher", inputs.teacher_feats)):
            if LOGITS_TAP not in feats:
                raise KeyError(f"at: stride reads the {side}'s {LOGITS_TAP!r} tap, which this step did not "
                               f"collect (the model needs a 'logits' alias in default_taps)")
        s, t = inputs.student_feats[LOGITS_TAP], inputs.teacher_feats[LOGITS_TAP]
    if t is None:
        raise ValueError("a logits loss needs teacher logits (no teacher output in this step)")
    if s.shape[0] != t.shape[0] or s.shape[1] != t.shape[1]:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in batch "
                         "or class count")
    s = resize_to(s, t.shape[-2:])
    if target is not None:
        target = labels_to(target, t.shape[-2:])
    return s, t, target
