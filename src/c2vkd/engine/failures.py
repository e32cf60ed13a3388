"""How a training run fails or stops, with messages that say what to do: out of memory (which config knobs
reduce memory), a non-finite loss (which term, which images; ``train.nan_policy``), a stop signal."""
from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path
from typing import Any

import torch

from c2vkd.utils import dist

log = logging.getLogger("c2vkd")


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm is NaN/inf under ``train.nan_policy=stop``."""


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """Out of (GPU) memory in a training step; the message lists the config knobs that reduce memory."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT stopped training after a checkpoint was written; ``--resume auto`` continues."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        where = f"checkpoint saved to {checkpoint}; " if checkpoint else ""
        super().__init__(f"stopped by {name} at iteration {iteration}: {where}continue with --resume auto")


def oom_message(err: BaseException, cfg: dict[str, Any], device: torch.device, iteration: int, per_rank: int,
                accum: int) -> str:
    """The message of :class:`TrainingOutOfMemoryError` for step ``iteration + 1``: the knobs that fit it."""
    d, tr = cfg["data"], cfg["train"]
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hints = [f"lower data.batch_size (now {d['batch_size']} in total, {per_rank} per process) and raise "
             f"train.accum_steps (now {accum}) to keep the effective batch",
             f"train on smaller crops: data.train_transform.crop_size (now {list(d['train_transform']['crop_size'])})"]
    if tr["amp"] == "off":
        hints.append("use mixed precision: train.amp=bf16 (fp16 on GPUs without bf16)")
    for i, e in enumerate(cfg["losses"]):
        if e["name"] == "vlfd" and e.get("graph_mode") == "naive":
            hints.append(f"losses.{i}.graph_mode=gram (the VLFD patch graph in C x C memory instead of N x N)")
        if e["name"] == "cirkd":
            hints.append(f"lower losses.{i}.max_elements (CIRKD relation chunk size) or losses.{i}.memory_size")
    hints.append("a smaller teacher / student, or more GPUs (torchrun --nproc-per-node N)")
    mem = ""
    if device.type == "cuda" and torch.cuda.is_available():
        mem = f"; peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return (f"out of memory in training step {iteration + 1} on {device} ({first}{mem}). "
            "To fit, " + "; ".join(hints))


def handle_non_finite(terms: dict[str, torch.Tensor], sample: dict[str, Any], *, iteration: int, policy: str,
                      dump_dir: Path | None) -> bool:
    """A non-finite loss in step ``iteration + 1``: with ``policy == "skip"`` log it and return True (skip the
    step); else write ``nan_debug.json`` to ``dump_dir`` (main process) and raise :class:`NonFiniteLossError`."""
    bad = {k: float(v) for k, v in terms.items() if not k.endswith("/w")}
    offenders = [k for k, v in bad.items() if not math.isfinite(v)]
    msg = (f"non-finite loss at iteration {iteration + 1}: offending term(s) {offenders or list(bad)}; "
           f"all terms {bad}; images {list(sample.get('name', []))}")
    if policy == "skip":
        log.warning("%s -> step skipped (train.nan_policy=skip)", msg)
        return True
    if dump_dir is not None:
        dump = Path(dump_dir) / "nan_debug.json"
        dump.write_text(json.dumps({"iteration": iteration + 1, "terms": {k: repr(v) for k, v in bad.items()},
                                    "images": list(sample.get("name", []))}, indent=1))
        msg += f"; debug dump {dump}"
    raise NonFiniteLossError(msg + ". Lower optim.lr, enable train.grad_clip, use amp bf16 instead of fp16, "
                             "or set train.nan_policy=skip")


class StopSignals:
    """SIGTERM / SIGINT while training: ``install()`` records the signal instead of dying (the previous
    handlers come back with ``restore()``), the loop asks :meth:`agreed` after each step and stops with a
    checkpoint (:class:`TrainingInterrupted`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.signum = signum
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not in the main thread
                pass

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def agreed(self, *, world: int, device: torch.device) -> int:
        """Signal number if any rank received SIGTERM/SIGINT (all ranks agree, so they stop together), else 0."""
        sig = int(self.signum or 0)
        if world > 1:
            t = torch.tensor([sig], dtype=torch.int64, device=device)
            sig = int(dist.all_reduce_(t, "max").item())
        return sig
