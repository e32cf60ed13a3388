"""Shared test setup: offline hubs, deterministic torch, small thread count (2-core CI machine)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with another job, spinning
# threads stall each other and torch ops get 10-100x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# per-user caches (the pre-flight's label scan, data/preflight.py) go to a temporary folder, never ~/.cache
os.environ["C2VKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="c2vkd-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small forwards (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): with 2 threads, OpenMP's spin-wait made them
    10-100x slower whenever the other core of the shared 2-core machine was busy (measured: 1.7 s vs 0.02 s
    for a pvtv2_b0 forward at 96x128)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy dataset (``_toy.write_toy_data``), one per module; a module that needs other data defines its own
    ``data_root``, which overrides this one."""
    import _toy

    return _toy.write_toy_data(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved toy_cnn teacher checkpoint (``_toy.write_toy_teacher``), one per module."""
    import _toy

    return _toy.write_toy_teacher(tmp_path_factory.mktemp("teacher"))
