"""torch.distributed helpers. The same code path runs with world size 1 (no process group) and under torchrun."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device_type: str) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return is_dist()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``min`` or ``max``) over all ranks; a no-op without a process group."""
    if is_dist():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
    return t


def all_gather_object(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` (every rank must call it); ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n_r, D] tensor from every rank (n_r may differ), in rank order; no autograd.

    Used by queues (CIRKD's memory bank) so every rank enqueues the same rows and holds the same bank."""
    if not is_dist():
        return rows
    n = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    m = max(counts)
    padded = rows.new_zeros((m, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    out = [torch.zeros_like(padded) for _ in counts]
    torch.distributed.all_gather(out, padded.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts)])


def mean_over_ranks(values: dict[str, float], *, device: torch.device | str = "cpu") -> dict[str, float]:
    """Average named scalars over ranks (float64, one all-reduce), keeping the dict's order; unchanged with a
    single process."""
    world = world_size()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_(t, "sum")
    vals = (t / world).tolist()
    return {k: vals[keys.index(k)] for k in values}
