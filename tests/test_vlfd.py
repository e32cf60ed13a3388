"""VLFD terms against explicit references, gram == naive graph loss, and the VLFDLoss module's wiring."""
from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses.clip_pool import ARCH_SPECS, AttentionPool2d
from c2vkd.losses.vlfd import VLFDLoss, linguistic_loss, patch_graph_loss, vlfd_global_loss


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def ref_global(s, t, direction="forward") -> float:
    """Per pixel: softmax over channels, KL, summed; divided by B*h*w*C (the released code's reduction)."""
    B, C, H, W = s.shape
    total = 0.0
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        ps = torch.softmax(s[b, :, i, j].double(), 0).tolist()
        pt = torch.softmax(t[b, :, i, j].double(), 0).tolist()
        total += _kl(pt, ps) if direction == "forward" else _kl(ps, pt)
    return total / (B * C * H * W)


def ref_linguistic(es, et, direction="forward") -> float:
    total = 0.0
    for b in range(es.shape[0]):
        ps, pt = torch.softmax(es[b].double(), 0).tolist(), torch.softmax(et[b].double(), 0).tolist()
        total += _kl(pt, ps) if direction == "forward" else _kl(ps, pt)
    return total / es.numel()


def ref_graph(s, t, eps=1e-8) -> float:
    """Explicit N x N affinity matrices over all pixels of the batch, float64, python loops."""
    def rows(f):
        B, C, H, W = f.shape
        out = []
        for b, i, j in itertools.product(range(B), range(H), range(W)):
            x = f[b, :, i, j].double()
            x = x / max(float(x.norm()), eps)
            out.append(x - x.mean())
        return out

    a, b = rows(t), rows(s)
    c, n = s.shape[1], len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += (float(a[i] @ a[j]) / (c - 1) - float(b[i] @ b[j]) / (c - 1)) ** 2
    return total / (n * n)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_global_matches_reference(direction):
    s, t = torch.randn(2, 6, 3, 4) * 3, torch.randn(2, 6, 3, 4) * 3
    got = vlfd_global_loss(s, t, direction=direction)
    assert got.item() == pytest.approx(ref_global(s, t, direction), rel=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_linguistic_matches_reference(direction):
    es, et = torch.randn(3, 16) * 4, torch.randn(3, 16) * 4
    got = linguistic_loss(es, et, direction=direction)
    assert got.item() == pytest.approx(ref_linguistic(es, et, direction), rel=1e-5)


def test_kl_terms_extreme_and_low_precision():
    s, t = torch.randn(2, 6, 3, 4) * 1e4, torch.randn(2, 6, 3, 4) * 1e4
    for d in ("forward", "reverse"):
        got = vlfd_global_loss(s, t, direction=d)
        assert got.item() == pytest.approx(vlfd_global_loss(s.double(), t.double(), direction=d).item(), rel=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        sl = (torch.randn(2, 6, 3, 4) * 20).to(dtype).requires_grad_(True)
        tl = (torch.randn(2, 6, 3, 4) * 20).to(dtype)
        for loss in (vlfd_global_loss(sl, tl), patch_graph_loss(sl, tl), linguistic_loss(sl[:, :, 0, 0], tl[:, :, 0, 0])):
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            (g,) = torch.autograd.grad(loss, sl)
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("mode", ["gram", "naive"])
def test_graph_matches_reference(mode):
    s, t = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4).relu()
    t[0, :, 0, 0] = 0.0  # an all-zero row: the eps clamp keeps it finite
    got = patch_graph_loss(s, t, exact_mode=mode)
    assert got.item() == pytest.approx(ref_graph(s, t), rel=1e-5)


@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3])
def test_graph_gram_equals_naive_in_float32(noise):
    """Including near-identical student/teacher, where a three-term expansion would cancel badly."""
    t = torch.randn(2, 256, 16, 16).relu()
    s = t + noise * torch.randn_like(t)
    ref = patch_graph_loss(s.double(), t.double(), exact_mode="naive").item()
    gram = patch_graph_loss(s, t, exact_mode="gram").item()
    naive = patch_graph_loss(s, t, exact_mode="naive").item()
    assert gram == pytest.approx(ref, rel=1e-5) and naive == pytest.approx(ref, rel=1e-5)


def test_graph_identical_is_zero():
    t = torch.randn(2, 8, 3, 3)
    assert patch_graph_loss(t.clone(), t).item() == 0.0


@pytest.mark.parametrize("mode", ["gram", "naive"])
def test_gradchecks(mode):
    s = torch.randn(2, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: patch_graph_loss(x, t, exact_mode=mode), (s,))
    for d in ("forward", "reverse"):
        assert torch.autograd.gradcheck(lambda x: vlfd_global_loss(x, t, direction=d), (s,))
        assert torch.autograd.gradcheck(lambda x: linguistic_loss(x[:, :, 0, 0], t[:, :, 0, 0], direction=d), (s,))


def test_teacher_feature_gets_no_gradient():
    s = torch.randn(2, 5, 2, 3, requires_grad=True)
    t = torch.randn(2, 5, 2, 3, requires_grad=True)
    for mode in ("gram", "naive"):
        (patch_graph_loss(s, t, exact_mode=mode) + vlfd_global_loss(s, t, direction="reverse")
         + linguistic_loss(s[:, :, 0, 0], t[:, :, 0, 0])).backward()
    assert t.grad is None and s.grad is not None


# ------------------------------------------------------------------------------------------- module
def _ctx() -> LossContext:
    return LossContext(num_classes=19, student_shapes={"feat": (2, 256, 4, 5)},
                       teacher_shapes={"feat": (2, 2048, 8, 10)})


def _inputs(ctx: LossContext) -> LossInputs:
    s4 = torch.randn(*ctx.student_shapes["feat"], requires_grad=True)
    ft = torch.randn(*ctx.teacher_shapes["feat"]).relu().requires_grad_(True)
    return LossInputs(student_logits=torch.zeros(2, 19, 8, 8), target=torch.zeros(2, 8, 8, dtype=torch.long),
                      student_feats={"feat": s4}, teacher_feats={"feat": ft})


def test_module_odd_shapes_trains_only_heads(caplog):
    assert LOSSES.get("vlfd") is VLFDLoss
    assert VLFDLoss.taps({}) == (["feat"], ["feat"])
    assert VLFDLoss.taps({"student_tap": "s4", "teacher_tap": "backbone.layer4"}) == (["s4"], ["backbone.layer4"])
    ctx = _ctx()
    with caplog.at_level(logging.WARNING, logger="c2vkd"):
        m = VLFDLoss(ctx)
    assert any("NOT CLIP-grounded" in r.getMessage() for r in caplog.records) and not m.clip_grounded
    assert m.weights == pytest.approx({"vlfd_global": 0.1, "vlfd_patch": 0.1, "vlfd_linguistic": 0.5})
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"visual_head.weight", "linguistic_head.2.weight", "linguistic_head.2.bias"}
    assert m.visual_head.weight.shape == (2048, 256, 1, 1) and m.linguistic_head[2].weight.shape == (512, 256)
    m.train()
    assert m.training and not m.pool.training
    inputs = _inputs(ctx)
    out = m(inputs)
    assert set(out) == {"vlfd_global", "vlfd_patch", "vlfd_linguistic"}
    total = sum(m.weights[k] * v for k, v in out.items())
    assert torch.isfinite(total)
    total.backward()
    assert inputs.teacher_feats["feat"].grad is None
    assert inputs.student_feats["feat"].grad is not None
    assert all(p.grad is None for p in m.pool.parameters())
    assert all(m.get_parameter(n).grad is not None for n in trainable)


def test_module_student_through_pool_and_options():
    ctx = _ctx()
    m = VLFDLoss(ctx, weight=2.0, student_through_pool=True, graph_mode="naive", global_direction="reverse",
                 linguistic_direction="reverse", clip_arch="RN50")
    assert m.linguistic_head is None and m.pool.output_dim == 1024
    assert m.weights["vlfd_linguistic"] == pytest.approx(1.0)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"visual_head.weight"}
    inputs = _inputs(ctx)
    out = m(inputs)
    out["vlfd_linguistic"].backward()  # reaches the visual head through the frozen pool
    assert m.visual_head.weight.grad is not None and m.pool.q_proj.weight.grad is None
    # the random stand-in pool is seeded: identical in every run
    again = VLFDLoss(ctx, student_through_pool=True, clip_arch="RN50")
    assert all(torch.equal(a, b) for a, b in zip(m.pool.state_dict().values(), again.pool.state_dict().values()))


def test_module_with_checkpoint(tmp_path, caplog):
    ref = AttentionPool2d(**ARCH_SPECS["RN101"])
    path = tmp_path / "clip_rn101.pt"
    torch.save({f"visual.attnpool.{k}": v for k, v in ref.state_dict().items()}, path)
    with caplog.at_level(logging.WARNING, logger="c2vkd"):
        m = VLFDLoss(_ctx(), clip_checkpoint=str(path))
    assert m.clip_grounded and not any("NOT CLIP-grounded" in r.getMessage() for r in caplog.records)
    assert torch.equal(m.pool.c_proj.weight, ref.c_proj.weight) and not m.pool.c_proj.weight.requires_grad
    small = LossContext(num_classes=19, student_shapes={"feat": (2, 256, 4, 5)}, teacher_shapes={"feat": (2, 512, 8, 8)})
    with pytest.raises(ValueError, match="512 channels"):
        VLFDLoss(small, clip_checkpoint=str(path))


def test_module_missing_tap_suggests():
    with pytest.raises(KeyError, match="Did you mean: feat"):
        VLFDLoss(_ctx(), teacher_tap="fet")
