"""Logging: one 'c2vkd' logger, console on rank 0, a file in the run directory."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger("c2vkd")


def setup_logging(run_dir: Path | None = None, *, main_process: bool = True, level: int = logging.INFO) -> logging.Logger:
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    for h in list(LOGGER.handlers):
        if getattr(h, "_c2vkd", False):
            LOGGER.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if main_process:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._c2vkd = True  # type: ignore[attr-defined]
        LOGGER.addHandler(sh)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(run_dir / "train.log")
            fh.setFormatter(fmt)
            fh._c2vkd = True  # type: ignore[attr-defined]
            LOGGER.addHandler(fh)
    else:
        LOGGER.addHandler(logging.NullHandler())
    return LOGGER
