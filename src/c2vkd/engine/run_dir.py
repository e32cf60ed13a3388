"""Run directories that never mix two runs.

* A run directory belongs to one run, named by a run id (``run.json``, also stored in every checkpoint and
  every ``metrics.jsonl`` line). Starting a run in a directory that already holds files is refused unless
  the run is resumed (``--resume``); the message names the directory and the ways forward.
* Resuming (``--resume auto``) and ``c2vkd export`` only use checkpoints carrying the directory's run id.
* A resume from iteration N drops the ``metrics.jsonl`` records past N (they are logged again), and
  TensorBoard purges its events past N, so curves never count a step twice.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from c2vkd.utils import dist
from c2vkd.utils.io import atomic_write_text

log = logging.getLogger("c2vkd")

RUN_FILE = "run.json"


class RunDirectoryError(ValueError):
    """Starting a run in a directory that holds another run's files."""


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>``: sortable, and distinct for two runs started in the same second (the
    random part comes from the OS, so no seeded RNG stream is touched)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def refuse_used(run_dir: Path, *, world: int = 1, device: torch.device | None = None) -> None:
    """Raise :class:`RunDirectoryError` if ``run_dir`` exists and is not empty. Under DDP (``world > 1``)
    every rank calls it and they agree, so no rank is left waiting in a collective."""
    err = None
    try:
        _refuse_used(Path(run_dir))
    except RunDirectoryError as e:
        err = e
    if world > 1:
        flag = torch.tensor([int(err is not None)], dtype=torch.int64, device=device)
        if int(dist.all_reduce_(flag, "max").item()) and err is None:
            raise RunDirectoryError(f"another process found run directory {run_dir} in use (see its error)")
    if err is not None:
        raise err


def _refuse_used(run_dir: Path) -> None:
    if not run_dir.is_dir():
        if run_dir.exists():
            raise RunDirectoryError(f"run directory {run_dir} exists and is not a directory")
        return
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RunDirectoryError(
            f"run directory {run_dir} already holds a run ({shown}); refusing to mix two runs in it. Either "
            f"continue that run with --resume auto, or start a new one elsewhere: another experiment.name "
            f"(--set experiment.name=NEW) or another directory (--run-dir / --out)")


def read_run_id(run_dir: Path) -> str | None:
    """The run id recorded in ``run_dir/run.json``; None when there is none (runs made before run ids)."""
    f = Path(run_dir) / RUN_FILE
    if not f.is_file():
        return None
    try:
        rid = json.loads(f.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError) as e:
        raise RunDirectoryError(f"cannot read {f}: {e}") from e
    return str(rid) if rid else None


def write_run_id(run_dir: Path, run_id: str) -> None:
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")


def truncate_metrics(path: Path, iteration: int, *, final_iter: int) -> int:
    """Keep the ``metrics.jsonl`` records a resume from ``iteration`` does not log again; returns how many
    were dropped. Dropped: records past ``iteration``, and when resuming at the end (``iteration ==
    final_iter``) the end-of-run validation / evaluation records, which the resumed run writes again. Lines
    cut by an interruption are dropped too."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep: list[str] = []
    dropped = 0
    for line in path.read_text().splitlines():
        try:
            rec: dict[str, Any] = json.loads(line)
            it = int(rec["iter"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if it > iteration or (it == iteration == final_iter and ("val_split" in rec or "eval_split" in rec)):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{ln}\n" for ln in keep))
        log.info("metrics.jsonl: dropped %d record(s) past iteration %d (they are logged again)", dropped, iteration)
    return dropped
