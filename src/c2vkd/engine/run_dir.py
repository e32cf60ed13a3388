"""Run directories that never mix two runs.

* A run directory belongs to one run, named by a run id (``run.json``, also stored in every checkpoint and
  every ``metrics.jsonl`` line). Starting a run in a directory that already holds files is refused unless
  the run is resumed (``--resume``); the message names the directory and the ways forward.
* Resuming (``--resume auto``) and ``c2vkd export`` only use checkpoints carrying the directory's run id.
* A resume from iteration N drops the ``metrics.jsonl`` records past N (they are logged again), and
  TensorBoard purges its events past N, so curves never count a step twice.
"""
from __future__ import annotations

import fcntl
import json
import os
import logging
import secrets
import shlex
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
        _refuse_used(Path(run_dir), main=dist.rank() == 0)
    except RunDirectoryError as e:
        err = e
    if world > 1:
        flag = torch.tensor([int(err is not None)], dtype=torch.int64, device=device)
        if int(dist.all_reduce_(flag, "max").item()) and err is None:
            raise RunDirectoryError(f"another process found run directory {run_dir} in use (see its error)")
    if err is not None:
        raise err


#: What a run leaves before its first checkpoint (engine/trainer.py ``fit`` and engine/run_log.py). A folder
#: holding only these (plus earlier failed runs' folders) has nothing a resume could use.
EARLY_FILES = frozenset({RUN_FILE, "config.yaml", "train.log", "metrics.jsonl", "tb", "checkpoints"})
FAILED_DIR = "failed"


def failed_before_checkpoint(run_dir: Path, *, strict: bool = True) -> bool:
    """True when ``run_dir`` holds only what a run leaves before its first checkpoint (logs, no checkpoint, no
    exported student, no result): it failed early and a new run may take the folder. ``strict``: a
    ``config.yaml`` counts only next to the run's ``run.json`` (a folder holding a user's own config is never
    taken for a failed run)."""
    entries = {p.name for p in run_dir.iterdir()}
    if not entries <= EARLY_FILES | {FAILED_DIR}:
        return False
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return False
    return not strict or "config.yaml" not in entries or RUN_FILE in entries


_HELD: dict[str, list[int]] = {}  # this process's run-directory locks: real path -> [fd, holders]


def lock_run_dir(run_dir: Path) -> str:
    """Take an exclusive lock on ``run_dir`` for this process (``flock`` on the directory itself, so no file is
    added; the OS drops it when the process ends, however it ends) and return its key for
    :func:`unlock_run_dir`. Re-entrant within a process. Raises :class:`RunDirectoryError` when another process
    holds it: a live run is never mistaken for a failed one, and two processes never train in one folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirectoryError(f"run directory {run_dir} is in use by another running c2vkd process; wait for it "
                                f"or use another directory (--out / --set experiment.name=NEW)") from None
    _HELD[key] = [fd, 1]
    return key


def unlock_run_dir(key: str | None) -> None:
    """Release one hold of :func:`lock_run_dir`'s lock; the last one closes it."""
    held = _HELD.get(key) if key else None
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])


def set_aside_failed_run(run_dir: Path) -> Path:
    """Move an early-failed run's files into ``run_dir/failed/<run id>/`` (nothing is deleted) and return it."""
    rid = read_run_id(run_dir) or new_run_id()
    dest = run_dir / FAILED_DIR / rid
    dest.mkdir(parents=True, exist_ok=True)
    for p in list(run_dir.iterdir()):
        if p.name != FAILED_DIR:
            p.rename(dest / p.name)
    return dest


def _refuse_used(run_dir: Path, *, main: bool = True) -> None:
    if not run_dir.is_dir():
        if run_dir.exists():
            raise RunDirectoryError(f"run directory {run_dir} exists and is not a directory")
        return
    if not main:  # rank 0 alone moves an early-failed run aside (and refuses for everyone, see refuse_used)
        if failed_before_checkpoint(run_dir, strict=False):
            return
    elif failed_before_checkpoint(run_dir):
        # a run that died before its first checkpoint (bad data, a typo found at iteration 1) must not block
        # rerunning the same command; its logs are kept for the post-mortem. A live run holds the lock.
        unlock_run_dir(lock_run_dir(run_dir))
        dest = set_aside_failed_run(run_dir)
        log.warning("run directory %s held a run that failed before its first checkpoint: its files moved to "
                    "%s, starting a new run there", run_dir, dest)
        return
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != FAILED_DIR)
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RunDirectoryError(
            f"run directory {run_dir} already holds a run ({shown}); refusing to mix two runs in it. Either "
            f"continue that run with --resume auto, or start a new one elsewhere: another experiment.name "
            f"(--set experiment.name=NEW) or another directory (--run-dir / --out)")


REPEAT_SUFFIX = "-repeat"


def repeat_command(cfg: dict[str, Any] | list[dict[str, Any]], run_dir: Path) -> str:
    """The shell command that repeats a run from its saved ``config.yaml``, quoted for the shell. Run as printed
    it never touches the original run: :func:`repeat_run_dir` sends it to a new folder. ``cfg``: the run's config
    or its ``losses`` list (which decides ``train`` vs ``distill``)."""
    from c2vkd.engine.loss_config import needs_teacher

    kind = "distill" if needs_teacher(cfg) else "train"
    return f"c2vkd {kind} {shlex.quote(str(Path(run_dir) / 'config.yaml'))}"


def repeat_run_dir(config_path: Path) -> Path | None:
    """Where a run started from ``config_path`` goes when that file is a run folder's own ``config.yaml``
    (``c2vkd distill RUN/config.yaml``, the printed repeat command): the first free ``RUN-repeat<N>`` beside it,
    so the original run is never touched (whatever the saved ``experiment.name``: a run made with ``--out`` has
    its folder elsewhere). None when the config is not a run's own: the run goes where its config says."""
    run_dir = Path(config_path).resolve().parent
    if Path(config_path).name != "config.yaml" or not (run_dir / RUN_FILE).is_file():
        return None  # a hand-written config, not a run's
    n = 1
    while True:
        cand = run_dir.with_name(f"{run_dir.name}{REPEAT_SUFFIX}{n}")
        if not cand.exists() or (cand.is_dir() and not any(cand.iterdir())):
            return cand
        n += 1


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


def read_metrics(path: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` as the run's history holds them (without the ``run_id`` each line
    carries); lines cut by an interruption are skipped. [] without the file. With ``run_id``, only that run's
    records (and lines without an id): a folder resumed with an explicit checkpoint may hold another run's lines."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "iter" in rec:
            if run_id is not None and rec.pop("run_id", run_id) != run_id:
                continue
            rec.pop("run_id", None)
            out.append(rec)
    return out


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
