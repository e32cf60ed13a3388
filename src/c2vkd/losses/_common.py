"""Helpers every loss module shares (package-private: import them from here inside ``c2vkd.losses``).

Resizing (:func:`resize_to`, :func:`labels_to`), float32 regions (:func:`no_autocast`), shape checks, the
``taps`` answers of feature and logits losses, and the logits position (``at``, KD / CWD / DIST / the
adversarial term): ``"input"`` reads the models' outputs (logits bilinearly upsampled to the input size,
``LossInputs.student_logits``); ``"stride"`` reads the ``logits`` tap of each model (its classifier's output at
the model's output stride, before the final upsample; every registered model declares that alias, see
docs/models.md), which is where the reference code bases (CIRKD, DIST_KD, structure_knowledge_distillation)
compute these losses. See :func:`logits_pair`. The alignment heads are in ``adapters.py``.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

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


def _measured_shape(shapes: dict, tap: str, side: str, loss: str) -> tuple[int, ...]:
    if tap not in shapes:
        raise KeyError(f"loss {loss}: the {side} tap {tap!r} has no measured shape in the loss context "
                       f"(available: {', '.join(sorted(shapes)) or 'none'})")
    return tuple(int(v) for v in shapes[tap])


def tap_shapes(ctx, student_tap: str, teacher_tap: str, loss: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student shape, teacher shape) of the named taps from a LossContext, with a clear error."""
    return (_measured_shape(ctx.student_shapes, student_tap, "student", loss),
            _measured_shape(ctx.teacher_shapes, teacher_tap, "teacher", loss))


def map_shape(shapes: dict, tap: str, side: str, loss: str) -> tuple[int, ...]:
    """The measured [B, C, h, w] shape of one tap (``ctx.student_shapes`` / ``ctx.teacher_shapes``), with a clear
    error when the tap is missing or is not a spatial map."""
    shape = _measured_shape(shapes, tap, side, loss)
    if len(shape) != 4:
        raise ValueError(f"loss {loss}: the {side} tap {tap!r} is not a [B, C, h, w] map: {shape}")
    return shape


def logits_grid(ctx, at: str, loss: str) -> tuple[int, int]:
    """The (h, w) a logits loss with ``at`` works at: the input size (``input``) or the teacher's ``logits`` tap
    (``stride``); what heads that predict class logits (OFA's branches, HeteroAKD's projectors) are sized for."""
    if at == "input":
        return (int(ctx.input_size[0]), int(ctx.input_size[1]))
    if LOGITS_TAP not in ctx.teacher_shapes:
        raise KeyError(f"loss {loss}: at: stride needs the teacher's 'logits' tap shape in the loss context")
    t = ctx.teacher_shapes[LOGITS_TAP]
    return (int(t[2]), int(t[3]))


def feature_taps(args: dict) -> tuple[list[str], list[str]]:
    """The ``taps`` answer of a feature loss: (``[student_tap]``, ``[teacher_tap]``), both default "feat"."""
    return [str(args.get("student_tap", "feat"))], [str(args.get("teacher_tap", "feat"))]


def labels_to(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsample of labels [B, H, W] (long) to ``size`` (h, w) -> [B, h, w] long."""
    size = (int(size[0]), int(size[1]))
    if tuple(target.shape[-2:]) == size:
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} must have the same shape")


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
