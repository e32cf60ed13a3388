"""Bounded memory of the relation losses (SKD, CIRKD): no op ever produces an N x N tensor.

A TorchDispatchMode records the element count of every tensor any aten op returns (forward AND
backward, including checkpoint recomputation), which is exact and cheap. The big CIRKD case
(64x64 features at batch 8 -> N = 32768 pixels, N^2 = 1.07e9) runs on the "meta" device: shapes and
the op sequence are identical to a real run, but nothing is computed or allocated."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from c2vkd.losses.cirkd import cirkd_pixel_loss, cirkd_region_loss, rows_per_chunk
from c2vkd.losses.skd import capped_grid, skd_loss


class MaxNumel(TorchDispatchMode):
    """Records the largest output numel (and the op that produced it) of every dispatched aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel, self.max_op, self.ops = 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.max_op = t.numel(), str(func)
        return out


class SavedNumel:
    """Elements autograd saves for backward outside checkpointed regions (forward pass), counting each
    tensor object once (checkpoint saves the same full-feature inputs for every chunk by reference)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: dict[int, torch.Tensor] = {}

    def __enter__(self):
        def pack(t):
            if id(t) not in self._seen:
                self._seen[id(t)] = t
                self.total += t.numel()
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


B, C, H, W = 8, 16, 64, 64
N = B * H * W  # 32768


@pytest.mark.parametrize("scope", ["pair", "batch"])
def test_cirkd_p2p_never_materialises_n_by_n(scope):
    budget = 2 ** 23                       # 8M elements; N^2 is 1.07e9
    rows = rows_per_chunk(N, budget)
    assert rows == 256 and rows * N <= budget
    fs = torch.empty(B, C, H, W, device="meta", requires_grad=True)
    ft = torch.empty(B, 32, H, W, device="meta")
    with MaxNumel() as rec, SavedNumel() as saved:
        loss = cirkd_pixel_loss(fs, ft, scope=scope, pool_size=1, max_elements=budget)
    fwd_ops = rec.ops
    with rec:
        loss.backward()
    assert rec.ops > fwd_ops                               # backward (with recomputation) was recorded
    assert rec.max_numel <= budget, (rec.max_numel, rec.max_op)
    assert fs.grad is not None and fs.grad.shape == fs.shape
    # closed-form backward: what autograd keeps between forward and backward is O(N * C), not O(N^2)
    assert saved.total <= 16 * N * C, saved.total


def test_cirkd_p2p_pair_blocks_stay_per_image_pair():
    """Pair scope with A^2 <= max_elements: the symmetric block form (one A x A block per unordered image pair);
    nothing larger than A x A is ever built and autograd keeps O(N C + B^2 A), forward and backward."""
    a = H * W
    fs = torch.empty(B, C, H, W, device="meta", requires_grad=True)
    ft = torch.empty(B, 32, H, W, device="meta")
    with MaxNumel() as rec, SavedNumel() as saved:
        loss = cirkd_pixel_loss(fs, ft, scope="pair", pool_size=1, max_elements=a * a)
        loss.backward()
    assert rec.max_numel <= a * a, (rec.max_numel, rec.max_op)
    assert saved.total <= 16 * N * C + 2 * B * B * a, saved.total
    assert fs.grad is not None and fs.grad.shape == fs.shape


def test_cirkd_recorder_sees_n_by_n_without_chunking():
    """Negative control: one chunk of all N rows is an N x N tensor, and the recorder catches it;
    without checkpointing the saved activations are the sum over all chunks (>= N^2)."""
    fs = torch.empty(B, C, H, W, device="meta", requires_grad=True)
    ft = torch.empty(B, C, H, W, device="meta")
    with MaxNumel() as rec:
        cirkd_pixel_loss(fs, ft, scope="batch", pool_size=1, max_elements=N * N)
    assert rec.max_numel >= N * N
    with SavedNumel() as saved:
        cirkd_pixel_loss(fs, ft, pool_size=1, max_elements=2 ** 23, closed_form=False)
    assert saved.total >= N * N


def test_cirkd_p2r_bounded_real_run():
    k, budget = 6, 2 ** 18                  # rows x (B*K = 48 regions) per chunk -> 6 chunks
    fs = torch.randn(B, 4, H, W, requires_grad=True)
    ft = torch.randn(B, 4, H, W)
    tgt = torch.randint(0, k, (B, H, W))
    with MaxNumel() as rec:
        loss = cirkd_region_loss(fs, ft, tgt, num_classes=k, max_elements=budget)
        loss.backward()
    assert rec.max_numel <= max(budget, fs.numel() * k), (rec.max_numel, rec.max_op)
    assert torch.isfinite(loss)


def test_skd_respects_max_pairs_real_run():
    budget = 2 ** 20                        # unpooled would be B * 4096^2 = 1.3e8 similarity entries
    fs = torch.randn(B, 4, H, W, requires_grad=True)
    ft = torch.randn(B, 6, H, W)
    gh, gw = capped_grid(B, H, W, budget)
    assert B * (gh * gw) ** 2 <= budget and gh * gw > 300
    with MaxNumel() as rec:
        loss = skd_loss(fs, ft, pool_scale=None, max_pairs=budget)
        loss.backward()
    assert rec.max_numel <= budget, (rec.max_numel, rec.max_op)
    assert torch.isfinite(loss) and fs.grad is not None


def test_skd_recorder_sees_full_matrix_without_cap():
    fs = torch.empty(B, 4, H, W, device="meta")
    with MaxNumel() as rec:
        skd_loss(fs, fs, pool_scale=None, max_pairs=2 ** 40)
    assert rec.max_numel == B * (H * W) ** 2
