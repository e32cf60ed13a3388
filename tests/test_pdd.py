"""PDD against independent per-pixel references (plain probabilities, and float64 log-space for 1e4 logits)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses import pdd as pdd_mod
from c2vkd.losses.pdd import PDDLoss, pdd_loss

IGN = 255


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) for probability vectors, 0 * log 0 = 0."""
    return sum(float(pi * (math.log(pi) - math.log(qi))) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0)


def ref_pdd(s, t, y, *, alpha=0.5, beta=0.5, T=1.0, w=0.5, direction="forward", nckd=True, ignore=IGN) -> float:
    """The spec read literally: per pixel, probabilities in float64, explicit sums over k != t."""
    total, n = 0.0, 0
    B, K, H, W = s.shape
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        tgt = int(y[b, i, j])
        if tgt == ignore:
            continue
        n += 1
        ps = torch.softmax(s[b, :, i, j].double() / T, 0)
        pt = torch.softmax(t[b, :, i, j].double() / T, 0)
        others = [k for k in range(K) if k != tgt]
        bs = torch.stack([ps[tgt], ps[others].sum()])
        bt = torch.stack([pt[tgt], pt[others].sum()])
        q = (1 - w) * bt + w * torch.tensor([1.0, 0.0], dtype=torch.float64)
        q = q / q.sum()
        tc = _kl(q, bs) if direction == "forward" else _kl(bs, q)
        nc = _kl(torch.softmax(t[b, others, i, j].double() / T, 0), torch.softmax(s[b, others, i, j].double() / T, 0))
        total += alpha * tc + (beta * nc if nckd else 0.0)
    return T * T * total / max(n, 1)


def ref_pdd_logspace(s, t, y, *, alpha=0.5, beta=0.5, T=1.0, w=0.5, direction="forward", nckd=True) -> float:
    """Same definition in float64 log space (needed when logits are 1e4: probabilities underflow to 0)."""
    total, n = 0.0, 0
    B, K, H, W = s.shape
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        tgt = int(y[b, i, j])
        if tgt == IGN:
            continue
        n += 1
        others = [k for k in range(K) if k != tgt]
        zs, zt = s[b, :, i, j].double() / T, t[b, :, i, j].double() / T
        ls, lt = torch.log_softmax(zs, 0), torch.log_softmax(zt, 0)
        lbs = torch.stack([ls[tgt], torch.logsumexp(ls[others], 0)])
        lbt = torch.stack([lt[tgt], torch.logsumexp(lt[others], 0)])
        l1w = math.log(1 - w) if w < 1 else -math.inf
        lq = torch.stack([torch.logaddexp(lbt[0] + l1w, torch.tensor(math.log(w) if w > 0 else -math.inf,
                                                                       dtype=torch.float64)), lbt[1] + l1w])
        lq = lq - torch.logsumexp(lq, 0)

        def kl_log(lp, lr):
            return float(sum(math.exp(a) * (a - c) for a, c in zip(lp.tolist(), lr.tolist()) if math.exp(a) > 0))

        tc = kl_log(lq, lbs) if direction == "forward" else kl_log(lbs, lq)
        nc = kl_log(torch.log_softmax(zt[others], 0), torch.log_softmax(zs[others], 0))
        total += alpha * tc + (beta * nc if nckd else 0.0)
    return T * T * total / max(n, 1)


def _inputs(B=2, K=5, H=3, W=4, scale=2.0, n_ignore=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, K, H, W, generator=g) * scale).to(dtype)
    t = (torch.randn(B, K, H, W, generator=g) * scale).to(dtype)
    y = torch.randint(0, K, (B, H, W), generator=g)
    y.view(-1)[torch.randperm(B * H * W, generator=g)[:n_ignore]] = IGN
    return s, t, y


CASES = [(T, w, d, nc) for T in (1.0, 2.0, 4.0) for w in (0.0, 0.5, 1.0) for d in ("forward", "reverse")
         for nc in (True, False) if not (d == "reverse" and w == 1.0)]


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_matches_reference(memory_efficient):
    s, t, y = _inputs()
    for T, w, d, nc in CASES:
        kw = dict(alpha=0.7, beta=0.3, T=T, w=w, direction=d, nckd=nc)
        got = pdd_loss(s, t, y, alpha=0.7, beta=0.3, temperature=T, gt_mix=w, direction=d, use_nckd=nc,
                       memory_efficient=memory_efficient)
        assert got.dtype == torch.float32
        ref = ref_pdd(s, t, y, **kw)
        assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-7), (T, w, d, nc)
        assert ref == pytest.approx(ref_pdd_logspace(s, t, y, **kw), rel=1e-9)  # the two references agree


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_extreme_logits_vs_float64(memory_efficient, direction):
    s, t, y = _inputs(scale=1e4, seed=3)
    s.requires_grad_(True)
    for T, w, nc in [(1.0, 0.5, True), (4.0, 0.0, True), (1.0, 0.9, False)]:
        got = pdd_loss(s, t, y, temperature=T, gt_mix=w, direction=direction, use_nckd=nc,
                       memory_efficient=memory_efficient)
        ref = ref_pdd_logspace(s.detach(), t, y, T=T, w=w, direction=direction, nckd=nc)
        assert math.isfinite(got.item()) and ref > 100  # genuinely large, not inf
        assert got.item() == pytest.approx(ref, rel=1e-5)
        (grad,) = torch.autograd.grad(got, s)
        assert torch.isfinite(grad).all()


def test_gt_mix_one_forward_is_cross_entropy():
    s, t, y = _inputs()
    got = pdd_loss(s, t, y, alpha=1.0, gt_mix=1.0, use_nckd=False)
    torch.testing.assert_close(got, F.cross_entropy(s, y, ignore_index=IGN))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_identical_student_teacher_no_gt_is_zero(direction, T):
    s, _, y = _inputs()
    for me in (True, False):
        got = pdd_loss(s, s.clone(), y, gt_mix=0.0, direction=direction, temperature=T, memory_efficient=me)
        assert abs(got.item()) < 1e-6


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_all_ignored_is_zero_with_gradient(memory_efficient):
    s, t, _ = _inputs()
    s.requires_grad_(True)
    y = torch.full((2, 3, 4), IGN)
    loss = pdd_loss(s, t, y, memory_efficient=memory_efficient)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_low_precision_inputs(dtype, memory_efficient):
    s, t, y = _inputs(dtype=dtype, scale=30.0)
    s.requires_grad_(True)
    got = pdd_loss(s, t, y, temperature=2.0, memory_efficient=memory_efficient)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    ref = pdd_loss(s.detach().float(), t.float(), y, temperature=2.0)  # same values, upcast: computed in fp32
    torch.testing.assert_close(got, ref)
    got.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("direction,nckd,w,T", [("forward", True, 0.3, 1.0), ("forward", False, 1.0, 2.0),
                                                ("forward", True, 0.0, 2.0), ("reverse", True, 0.3, 2.0),
                                                ("reverse", False, 0.6, 1.0)])
def test_gradcheck(memory_efficient, direction, nckd, w, T):
    s, t, y = _inputs(B=1, K=4, H=2, W=3, n_ignore=1, dtype=torch.float64)
    s.requires_grad_(True)
    fn = lambda x: pdd_loss(x, t, y, temperature=T, gt_mix=w, direction=direction, use_nckd=nckd,  # noqa: E731
                            alpha=0.6, beta=0.4, memory_efficient=memory_efficient)
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("block_elems", [7, 60, 1000])
def test_blocking_does_not_change_value_or_gradient(monkeypatch, block_elems):
    s, t, y = _inputs(dtype=torch.float64)
    s.requires_grad_(True)
    ref = pdd_loss(s, t, y, temperature=2.0, memory_efficient=False)
    (g_ref,) = torch.autograd.grad(ref, s)
    monkeypatch.setattr(pdd_mod, "_BLOCK_ELEMS", block_elems)  # 7: row blocks; 60: one image; 1000: whole batch
    for d in ("forward", "reverse"):
        got = pdd_loss(s, t, y, temperature=2.0, direction=d)
        exp = pdd_loss(s, t, y, temperature=2.0, direction=d, memory_efficient=False)
        torch.testing.assert_close(got, exp)
        torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(exp, s)[0])
    got = pdd_loss(s, t, y, temperature=2.0)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], g_ref)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_teacher_gets_no_gradient(memory_efficient):
    s, t, y = _inputs()
    s.requires_grad_(True)
    t.requires_grad_(True)
    pdd_loss(s, t, y, memory_efficient=memory_efficient).backward()
    assert t.grad is None and s.grad is not None


def test_argument_errors():
    s, t, y = _inputs()
    with pytest.raises(ValueError, match="infinite"):
        pdd_loss(s, t, y, direction="reverse", gt_mix=1.0)
    with pytest.raises(ValueError, match="direction"):
        pdd_loss(s, t, y, direction="backward")
    bad = y.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        pdd_loss(s, t, bad)
    with pytest.raises(ValueError, match="one shape"):
        pdd_loss(s, t[:, :4], y)


def test_module_registered_presets_and_forward():
    assert LOSSES.get("pdd") is PDDLoss
    ctx = LossContext(num_classes=5)
    m = PDDLoss(ctx, weight=2.0)
    assert m.weights == {"pdd": 2.0} and m.direction == "forward" and m.use_nckd
    paper = PDDLoss(ctx, preset="paper")
    assert paper.direction == "reverse" and not paper.use_nckd
    assert PDDLoss(ctx, preset="paper", use_nckd=True).use_nckd  # explicit args override the preset
    s, t, y = _inputs()
    out = paper(LossInputs(student_logits=s, target=y, teacher_logits=t))
    assert set(out) == {"pdd"}
    assert out["pdd"].item() == pytest.approx(ref_pdd(s, t, y, direction="reverse", nckd=False), rel=1e-5)
    with pytest.raises(ValueError, match="teacher logits"):
        m(LossInputs(student_logits=s, target=y))
    with pytest.raises(ValueError, match="preset"):
        PDDLoss(ctx, preset="nope")
