"""VLFD patch graph across processes (gloo, 2 CPU processes): equals the graph of the concatenated batch (a
naive N x N reference written here), and local gradients are world_size x the exact ones (DDP's averaging makes them exact)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from c2vkd.losses.vlfd import patch_graph_loss


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, s: torch.Tensor, t: torch.Tensor, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        per = s.shape[0] // world
        xs = s[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        xt = t[rank * per:(rank + 1) * per]
        loss = patch_graph_loss(xs, xt, across_ranks=True)
        loss.backward()
        local = patch_graph_loss(xs.detach(), xt)  # without the flag: this rank's own graph only
        out[rank] = (loss.item(), local.item(), xs.grad.clone())
    finally:
        dist.destroy_process_group()


def naive_graph(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Reference written in the test: explicit N x N affinities over every pixel of the whole batch, float64."""
    def rows(f: torch.Tensor) -> torch.Tensor:
        x = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        x = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
        return x - x.mean(dim=1, keepdim=True)

    a, b = rows(t), rows(s)
    return (((a @ a.T) - (b @ b.T)) / (s.shape[1] - 1)).pow(2).mean()


@pytest.mark.slow  # two spawned gloo processes
def test_patch_graph_across_ranks_equals_concatenated_batch() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 3, 5, dtype=torch.float64), torch.randn(4, 6, 3, 5, dtype=torch.float64)
    full_s = s.clone().requires_grad_(True)
    full = naive_graph(full_s, t)
    full.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _port(), s, t, out), nprocs=2, join=True)
        got = dict(out)
    for rank in (0, 1):
        loss, local, grad = got[rank]
        assert abs(loss - full.item()) < 1e-12 * max(1.0, full.item())
        assert abs(local - full.item()) > 1e-6  # the flag matters: per-rank graphs miss cross-process pairs
        assert torch.allclose(grad / 2, full_s.grad[rank * 2:(rank + 1) * 2], rtol=1e-9, atol=1e-12)
