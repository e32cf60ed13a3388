"""Training checkpoints of a run directory: what one holds, atomic save, retention, resume.

Layout: ``<run>/checkpoints/iter_<7-digit iteration>.pt`` (+ ``.sha256`` sidecar), written atomically by
:func:`c2vkd.utils.io.atomic_save` and loaded with ``weights_only=True`` (:func:`c2vkd.utils.io.safe_load`).
A checkpoint is a dict tagged ``format: c2vkd-train-v1`` holding the student, the loss heads, optimizer,
scheduler, scaler and RNG states, the iteration and best validation mIoU, and ``meta`` (model name, class
count, kwargs, class names, resolved config) so it can also be used as a pretrained / teacher checkpoint,
and ``run_id``: the run that wrote it (``engine/run_dir.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from c2vkd.utils.io import CheckpointError, atomic_save, safe_load, unreadable_message, verify

log = logging.getLogger("c2vkd")

FORMAT = "c2vkd-train-v1"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(state: dict[str, Any], ckpt_dir: Path, name: str) -> Path:
    """Write ``<ckpt_dir>/<name>.pt`` atomically with its checksum sidecar."""
    return atomic_save(state, Path(ckpt_dir) / f"{name}.pt")


def retain(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``iter_*.pt`` checkpoints (and their sidecars); ``keep <= 0`` keeps all."""
    ckpts = sorted(Path(ckpt_dir).glob("iter_*.pt"))
    for old in ckpts[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)


def latest_valid(ckpt_dir: Path, run_id: str | None = None) -> Path | None:
    """Newest ``iter_*.pt`` whose checksum verifies (corrupt or truncated ones are skipped with a warning)
    and, when ``run_id`` is given, that was written by that run (another run's checkpoints are skipped with a
    warning naming them)."""
    for c in sorted(Path(ckpt_dir).glob("iter_*.pt"), reverse=True):
        if not verify(c):
            log.warning("checkpoint %s fails its checksum (truncated or corrupt); trying the previous one", c)
            continue
        if run_id is not None:
            other = run_id_of(c)
            if other != run_id:
                log.warning("checkpoint %s belongs to run %s, not to this directory's run %s: skipped", c, other,
                            run_id)
                continue
        return c
    return None


def run_id_of(path: Path) -> str | None:
    """The run id stored in a training checkpoint (None for checkpoints made before run ids). Memory-maps the
    file, so only the small entries are read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - reported with our own message, never torch's unsafe-load hint
        raise CheckpointError(unreadable_message(Path(path), e)) from None
    return state.get("run_id") if isinstance(state, dict) else None


def load_training_checkpoint(path: Path, *, model: str, num_classes: int) -> dict[str, Any]:
    """Load a training checkpoint for ``--resume`` and check it was made for this student and class count."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a c2vkd training checkpoint (no format tag); use it as "
                              "student.pretrained or teacher.checkpoint instead of --resume")
    meta = state["meta"]
    if meta["model"] != model or meta["num_classes"] != num_classes:
        raise CheckpointError(f"{path} holds {meta['model']} with {meta['num_classes']} classes, but this run "
                              f"trains {model} with {num_classes} classes")
    return state


def resume_path(spec: str, ckpt_dir: Path, run_id: str | None) -> Path | None:
    """The checkpoint ``--resume SPEC`` names: ``auto`` = the newest valid one written by this directory's run
    (``run_id``; a directory without one, from before run ids, accepts any), None when there is none (start from
    scratch); anything else is a path."""
    if spec != "auto":
        return Path(spec)
    path = latest_valid(ckpt_dir, run_id=run_id)
    if path is None:
        log.info("--resume auto: no valid checkpoint in %s, starting from scratch", ckpt_dir)
    return path


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping the live optimizer's kernel choice (fused / foreach).

    torch restores those flags from the saved groups and places each state tensor by them (a fused step
    counter lives on the parameter's device); a run resumed with another ``optim.impl`` than it was saved
    with must get the configured kernel and state placed for it, so the flags are set before loading."""
    live = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    saved_groups = state.get("param_groups", [])
    if len(saved_groups) == len(live):
        state = {**state, "param_groups": [{**g, **flags} for g, flags in zip(saved_groups, live)]}
    optimizer.load_state_dict(state)


def restore_training_state(state: dict[str, Any], *, student: nn.Module, loss_heads: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> None:
    """Load a training checkpoint's student, loss heads (alignment heads, memory banks), optimizer, scheduler
    and scaler states into the live objects (RNG: :func:`c2vkd.engine.runtime.restore_rng`)."""
    student.load_state_dict(state["student"])
    loss_heads.load_state_dict(state["loss_heads"])
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
