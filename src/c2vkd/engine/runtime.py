"""Process runtime for a run: device, autocast, seeding and the RNG state a checkpoint carries.

``pick_device`` and ``autocast_ctx`` live in :mod:`c2vkd.utils.device` (evaluation and inference need them
too, below the engine) and are re-exported here so the engine has one place for its runtime helpers."""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from c2vkd.utils.device import autocast_ctx, pick_device

log = logging.getLogger("c2vkd")

__all__ = ["COMPILE_MODES", "autocast_ctx", "check_compile_mode", "compile_fallback_reason", "compiled",
           "pick_device", "restore_rng", "rng_state", "seed_everything", "set_rng_state", "sync_batchnorm"]

# train.compile: off (eager) | student (the student's forward and backward) | all (the student and every loss module)
COMPILE_MODES = ("off", "student", "all")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states as tensors / plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(state: dict[str, Any], *, rank: int, world: int, seed: int) -> None:
    """The RNG states of a training checkpoint: this rank's own when it was saved at the same world size
    (``rng_ranks``), else rank 0's saved stream, and on the other ranks a distinct, deterministic stream."""
    rank_rngs = state.get("rng_ranks")
    if rank_rngs is not None and len(rank_rngs) == world:
        set_rng_state(rank_rngs[rank])
    else:
        set_rng_state(state["rng"])
        if rank:  # saved with another world size: distinct, deterministic per-rank streams
            torch.manual_seed(seed + rank + 1000003 * int(state["iteration"]))


def _to_tuple(x: Any) -> Any:
    # weights_only loading turns the tuples of random.getstate() into lists
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def sync_batchnorm(student: nn.Module, *, world: int, device: torch.device) -> nn.Module:
    """student.sync_bn: BatchNorm statistics over the total batch of all processes (before taps are
    attached, so hooks land on the converted modules; parameters are reused, not copied)."""
    if world == 1:
        log.info("student.sync_bn: single process, BatchNorm already sees the whole batch (no conversion)")
        return student
    if device.type != "cuda":
        raise ValueError("student.sync_bn=true needs CUDA devices: PyTorch's SyncBatchNorm has no CPU/gloo "
                         "implementation (set student.sync_bn=false for CPU multi-process runs)")
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    log.info("student.sync_bn: converting %d BatchNorm layers to SyncBatchNorm", n)
    return nn.SyncBatchNorm.convert_sync_batchnorm(student)


def check_compile_mode(mode: Any) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def compile_fallback_reason(device: torch.device) -> str | None:
    """None when ``torch.compile`` (inductor: a C++ compiler on CPU, Triton on CUDA) works on ``device``; else
    why not, in one line. Compiles and runs a two-op function once (a few seconds the first time on a machine;
    inductor's on-disk cache makes later calls cheap)."""
    try:
        import torch._dynamo

        fn = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="inductor", fullgraph=True, dynamic=False)
        out = fn(torch.arange(-2.0, 6.0, device=device))
        if out.tolist() != [1.0, 1.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0]:
            return "a test function compiled to wrong values"
    except Exception as e:  # noqa: BLE001 - any failure (no compiler, no Python headers, no Triton) -> eager
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}"[:300]
    finally:
        try:
            torch._dynamo.reset()  # the probe's graph is not kept
        except Exception:  # noqa: BLE001
            pass
    return None


def compiled(modules: dict[str, nn.Module], mode: str, device: torch.device) -> dict[str, Any]:
    """``train.compile``: ``torch.compile`` callables of the named modules (the modules themselves stay eager and
    unwrapped: their state dicts, hooks, exports and DDP see the plain module; the callable shares its
    parameters). ``off``, or no working compiler (logged loudly, one line): {} and the run continues eager."""
    if check_compile_mode(mode) == "off" or not modules:
        return {}
    reason = compile_fallback_reason(device)
    if reason is not None:
        log.warning("train.compile=%s: torch.compile is not usable here (%s); CONTINUING IN EAGER MODE "
                    "(eager arithmetic, no compilation; set train.compile=off to silence this)", mode, reason)
        return {}
    log.info("train.compile=%s: compiling %s with torch.compile (inductor); the first steps include the "
             "compilation", mode, ", ".join(modules))
    # Dynamo shares compiled code between instances of one class and by default does not guard on module hooks:
    # a compiled student without feature taps (compare's `none`, trained first in the same process) would hand
    # its graph, without the tap hooks, to the next run's student. Guard on hooks (tests/test_compile.py).
    import torch._dynamo.config

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # static shapes: a training step's shapes never change, and inductor's dynamic-shape path fails on some of them
    return {name: torch.compile(m, dynamic=False) for name, m in modules.items()}
