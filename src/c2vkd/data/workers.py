"""Loader worker processes that never outlive a failed run.

The workers of every training / evaluation loader ignore SIGTERM (``sampler.init_worker``: a scheduler's group
kill must reach only the trainer's checkpoint-and-stop). That has one cost: ``multiprocessing`` stops leftover
daemonic children at interpreter exit with ``terminate()`` (SIGTERM) and then joins them, so a process that
exits on an exception while a loader iterator is still alive (an error raised in a worker, a failed step)
waited forever on workers that ignore the signal. A job that hangs after its error is the worst failure an
unattended run can have.

:class:`TrackedDataLoader` records every multi-process iterator it creates; :func:`shutdown_loader_workers`
shuts them down through torch's own orderly path (done event, then join) and SIGKILLs any worker still alive
after it. It runs from an ``atexit`` hook registered here, after ``torch`` and ``multiprocessing`` registered
theirs, so it runs before them (``atexit`` is last-in, first-out) while torch's shutdown code is still active.
The trainer also calls it when its loop ends by an exception, so the workers are gone before the error is
reported.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import weakref
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger("c2vkd")

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


class TrackedDataLoader(DataLoader):
    """A ``DataLoader`` whose multi-process iterators can all be shut down by :func:`shutdown_loader_workers`."""

    def _get_iterator(self):  # type: ignore[override]
        it = super()._get_iterator()
        if self.num_workers > 0:
            _LIVE.add(it)
        return it


def _worker_processes(it: Any) -> list[Any]:
    return list(getattr(it, "_workers", []) or [])


def shutdown_iterator(it: Any) -> None:
    """Stop one loader iterator's workers: torch's orderly shutdown, then SIGKILL for any still alive (they
    ignore SIGTERM, so ``terminate()`` cannot stop them)."""
    workers = _worker_processes(it)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception as e:  # noqa: BLE001 - the kill below still runs; say why it was needed
            log.warning("data-loader shutdown failed (%s): stopping its workers with SIGKILL", e)
    for w in workers:
        if w.is_alive() and w.pid is not None:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            w.join(timeout=5)
    _LIVE.discard(it)


def shutdown_loader_workers() -> int:
    """Shut down every live multi-process iterator of a :class:`TrackedDataLoader`; returns how many."""
    live = list(_LIVE)
    for it in live:
        shutdown_iterator(it)
    return len(live)


atexit.register(shutdown_loader_workers)
