"""What every segmentation model in the zoo promises, and the registry that builds them by name.

Contract (checked by tests/test_models.py for every registered name):

* ``forward(x: [B, 3, H, W]) -> logits [B, K, H, W]`` at the *input* resolution (bilinear,
  ``align_corners=False``), so losses and metrics never resize themselves.
* ``default_taps``: alias -> module path for the features distillation reads through forward hooks
  (models.taps.FeatureTaps). ``"feat"`` is mandatory: the teacher's last encoder stage or the student's
  last stage, which is what C2VKD's VLFD aligns.
* ``family`` ("cnn" / "vit") and ``output_stride`` (stride of the ``"feat"`` tap w.r.t. the input).
* ``adapt_state_dict(sd)``: explicit key remapping for the checkpoint formats a model accepts (see
  models.weights); the generic loader does the strict comparison and the reporting.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from c2vkd.registry import Registry

log = logging.getLogger("c2vkd")

#: name -> factory ``f(num_classes, **kwargs) -> SegmentationModel``
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def min_side_for_reductions(convs: list[tuple[int, int, int]], reductions: list[int]) -> int:
    """Smallest input side for which, after each stage's patch-embedding conv ``(kernel, stride, padding)``,
    the stage's sequence/spatial-reduction conv (kernel = stride = its ratio) still has an output position.
    Shared by the hierarchical transformers (SegFormer MiT, PVTv2) for their clear too-small-input errors."""
    for side in range(1, 4096):
        h, ok = side, True
        for (k, s, p), sr in zip(convs, reductions):
            h = (h + 2 * p - k) // s + 1
            ok = ok and h >= sr
        if ok:
            return side
    raise RuntimeError("no valid input size below 4096 px")  # pragma: no cover


@dataclass
class AdaptedStateDict:
    """A checkpoint after format-specific key remapping.

    ``scope``: model keys this checkpoint is meant to cover (None = the whole model). A backbone-only
    ImageNet checkpoint covers the backbone; the head stays at its random init and is *not* reported
    missing. ``dropped``: checkpoint keys discarded on purpose (e.g. the ImageNet ``fc.*`` classifier).
    ``hint``: what to do when the checkpoint does not fit (e.g. which registered model a foreign checkpoint
    is); appended to the load error.
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    scope: set[str] | None = None
    dropped: list[str] = field(default_factory=list)
    hint: str = ""


class SegmentationModel(nn.Module):
    """Base class: shared attributes, the output-size contract and the default (identity) key mapping."""

    family: ClassVar[str] = "cnn"
    #: alias -> module path (relative to this module). Subclasses override; "feat" is mandatory.
    default_taps: ClassVar[dict[str, str]] = {}

    def __init__(self, num_classes: int, output_stride: int) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.output_stride = int(output_stride)
        self.arch: str = type(self).__name__  # set to the registry name by build_model

    @staticmethod
    def _resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> AdaptedStateDict:
        """Default: the checkpoint is this model's own ``state_dict()`` (full-model checkpoint)."""
        return AdaptedStateDict(dict(state_dict), format="full model state dict")


def build_model(name: str, num_classes: int, *, pretrained: str | None = None,
                allow_partial: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model with random init, then optionally load local weights.

    name: registry name (``c2vkd.models.MODELS.names()``); unknown names raise KeyError with suggestions.
    pretrained: local path (file or HF ``save_pretrained`` directory) understood by the model's
        ``adapt_state_dict`` (full checkpoint, ImageNet backbone, HF SegFormer...). Never downloads.
    allow_partial: accept missing / unexpected / shape-mismatched keys (they are logged); by default any
        mismatch raises models.weights.WeightLoadError listing them.
    kwargs: model-specific options (e.g. ``output_stride=8`` for the CNN teachers).
    """
    factory = MODELS.get(name)
    model = factory(num_classes, **kwargs)
    if isinstance(model, SegmentationModel):
        model.arch = name
    if pretrained:
        from c2vkd.models.weights import load_checkpoint_weights  # local import: weights imports base

        report = load_checkpoint_weights(model, pretrained, allow_partial=allow_partial)
        (log.warning if not report.complete else log.info)("%s: %s", name, report.summary())
    return model
