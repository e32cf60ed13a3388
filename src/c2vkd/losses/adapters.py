"""Student-side alignment heads of the feature losses: :class:`FeatureAdapter`, :func:`make_adapter` and the
base class :class:`AdaptedFeatureLoss`.

Every feature loss (FitNets, AT, CWD-on-features, SKD, IFVD, CIRKD) builds its alignment head with
:func:`make_adapter`, so there is one adapter implementation (the shared resizing, shape and tap helpers are
in ``_common.py``).

An adapter maps a student tap ``[B, Cs, hs, ws]`` to ``[B, Ct, ht, wt]``: a channel projection at the
student's resolution (cheaper than projecting after upsampling), then a bilinear resize to the size
passed at run time (the teacher tensor's actual ``h x w``; the teacher shape from the
:class:`~c2vkd.losses.base.LossContext` is only the fallback). Channel counts come from the context's
dummy-forward shapes, never from hard-coded numbers.

Kinds:
  * ``"conv1x1"``: ``Conv2d(Cs, Ct, 1, bias=False)`` (FitNets regressor / C2VKD visual head style).
  * ``"conv3x3"``: ``Conv2d(Cs, Ct, 3, pad 1, bias=False) -> BN -> ReLU -> Conv2d(Ct, Ct, 1, bias=False)``
    (the "conv-BN-ReLU-conv" head).
  * ``"mlp"``: ``Conv1x1(Cs, Ct) -> BN -> ReLU -> Conv1x1(Ct, Ct)`` (per-pixel MLP; this is CIRKD's
    student projection head).
  * ``"conv1x1_bn"`` / ``"conv1x1_bn_relu"``: ``Conv2d(Cs, Ct, 1, bias=False) -> BN`` (``-> ReLU``), BN before
    the resize (HeteroAKD*'s projectors to class logits).
  * ``"none"``: no parameters, spatial resize only; the output keeps ``Cs`` channels. Only for losses
    that never compare channels across networks (SKD pair-wise similarity, AT).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from c2vkd.losses._common import feature_taps, resize_to, tap_shapes
from c2vkd.losses.base import DistillLoss

ADAPTER_KINDS = ("conv1x1", "conv3x3", "mlp", "conv1x1_bn", "conv1x1_bn_relu", "none")


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
        elif kind in ("conv1x1_bn", "conv1x1_bn_relu"):
            layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.proj = nn.Sequential(*layers, *([nn.ReLU()] if kind == "conv1x1_bn_relu" else []))
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
