"""What every export is checked against: :class:`ExportError` and the max |logit difference|."""
from __future__ import annotations

from typing import Any

import torch

from c2vkd.utils.io import CheckpointError


class ExportError(CheckpointError):
    """A run cannot be exported, or an exported file does not reproduce the student's logits."""


def max_diff(got: Any, ref: torch.Tensor) -> float:
    got_t = torch.as_tensor(got)
    if tuple(got_t.shape) != tuple(ref.shape):
        return float("inf")
    return float((got_t.float() - ref.float()).abs().max())
