"""Which device to run on and the autocast context for ``train.amp``: shared by training, evaluation,
prediction and the teacher cache (one implementation, one set of error messages)."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from c2vkd.utils import dist


def pick_device(spec: str) -> torch.device:
    """``train.device``: ``auto`` (this process's CUDA device under torchrun, else CPU), ``cpu``, ``cuda[:N]``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec!r} but CUDA is not available on this machine")
    return dev


def autocast_ctx(device: torch.device, amp: str) -> AbstractContextManager:
    """``train.amp``: ``off`` (no autocast), ``bf16`` (CUDA or CPU) or ``fp16`` (CUDA only)."""
    if amp == "off":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"train.amp must be off, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def teacher_autocast(device: torch.device, amp: str | None) -> Callable[[], AbstractContextManager] | None:
    """``teacher.amp``: a factory of the autocast context the frozen teacher's forward runs in, whatever the
    student's; validated now (a bad value fails when the run is built, not at the first step). ``None`` (the
    default): no override, the teacher runs under ``train.amp`` like the student. ``off`` runs it in fp32 even
    when the student uses autocast; ``bf16`` / ``fp16`` run only the teacher in reduced precision (a cheaper
    live teacher; the Distiller casts its outputs back to the student's dtype before the losses)."""
    if amp is None:
        return None
    if amp == "off":
        return lambda: torch.autocast(device.type, enabled=False)
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"teacher.amp must be null, off, bf16 or fp16, got {amp!r}")
    autocast_ctx(device, amp)  # fp16 on CPU: the same error as train.amp
    return lambda: autocast_ctx(device, amp)
