"""The contract between the engine and every loss (supervised CE, C2VKD, baselines).

A method is one file in this package holding
  * a pure function  ``xxx_loss(tensors..., *, options) -> Tensor``  (shape docstring, no state), and
  * a thin ``nn.Module`` subclass of :class:`DistillLoss`, registered with ``@LOSSES.register("name")``.

The engine builds each configured loss as ``cls(ctx, **args)`` where ``ctx`` is a :class:`LossContext`
(class count, ignore value, and the shapes of every feature tap measured by a dummy forward), so
alignment heads are sized at run time, never from hard-coded channel counts.  Each step the engine
calls ``module(inputs)`` with a :class:`LossInputs` and gets back a dict of *raw* terms; it multiplies
them by ``module.weights[term]`` (from the config), sums, and logs raw and weighted values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from c2vkd import IGNORE_INDEX
from c2vkd.registry import Registry

#: registering a loss class sets its ``registry_name`` (the name its term is logged under, :meth:`term_name`)
LOSSES: Registry[type["DistillLoss"]] = Registry("loss", name_attr="registry_name")


@dataclass
class LossContext:
    """What a loss may use to size its parameters. Shapes are [B, C, h, w] from a dummy forward."""

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    student_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    teacher_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_size: tuple[int, int] = (512, 512)


@dataclass
class LossInputs:
    """One step's tensors. Logits are at label resolution [B, K, H, W]; target is [B, H, W] (long)."""

    student_logits: torch.Tensor
    target: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_feats: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class for a registered loss.

    Subclasses set ``requires_teacher`` and implement :meth:`taps` (which feature taps they read) and
    :meth:`forward` (raw terms). ``self.weights`` maps each returned term name to its weight.
    Trainable alignment heads live in the subclass as submodules: the engine puts them in the optimizer
    and in training checkpoints, but never in the exported student.
    """

    requires_teacher: ClassVar[bool] = True

    def __init__(self, ctx: LossContext, weight: float = 1.0) -> None:
        super().__init__()
        self.ctx = ctx
        self.ignore_index = ctx.ignore_index
        self.weights: dict[str, float] = {self.term_name(): float(weight)}

    @classmethod
    def term_name(cls) -> str:
        """The name of the single term: the registry name (set by ``@LOSSES.register("name")``), or the
        lower-case class name for a class used without registering it."""
        return getattr(cls, "registry_name", cls.__name__.lower())

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        """(student tap names, teacher tap names) this loss reads, given its config args.

        Names are aliases declared by the model (e.g. ``"feat"``) or module paths
        (e.g. ``"backbone.layer4"``). Default: logits only."""
        return [], []

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``valid`` positions; 0 (with a gradient path) when nothing is valid.

    values, valid: same shape; valid is bool. Never NaN: an all-ignored batch contributes zero loss."""
    valid_f = valid.to(values.dtype)
    total = (values * valid_f).sum()
    return total / valid_f.sum().clamp_min(1.0)
