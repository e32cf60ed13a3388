"""PDD against independent per-pixel references (plain-Python probabilities, and plain-Python log space for 1e4
logits: no torch in the references), and the registered module's wiring with non-default settings."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from _ref import kl_list, softmax_list
from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses import pdd as pdd_mod
from c2vkd.losses.pdd import PDDLoss, pdd_loss

IGN = 255


def _pixels(s, t, y, ignore):
    """(student logits, teacher logits, target) of every non-ignored pixel, as plain Python lists."""
    B, K, H, W = s.shape
    sl, tl, yl = s.double().tolist(), t.double().tolist(), y.tolist()
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        tgt = int(yl[b][i][j])
        if tgt == ignore:
            continue
        yield [sl[b][k][i][j] for k in range(K)], [tl[b][k][i][j] for k in range(K)], tgt


def ref_pdd(s, t, y, *, alpha=0.5, beta=0.5, T=1.0, w=0.5, direction="forward", nckd=True, ignore=IGN) -> float:
    """The spec read literally, per pixel in plain Python: probabilities, explicit sums over k != t."""
    total, n = 0.0, 0
    for zs, zt, tgt in _pixels(s, t, y, ignore):
        n += 1
        ps = softmax_list([v / T for v in zs])
        pt = softmax_list([v / T for v in zt])
        others = [k for k in range(len(zs)) if k != tgt]
        bs = [ps[tgt], sum(ps[k] for k in others)]
        bt = [pt[tgt], sum(pt[k] for k in others)]
        q = [(1 - w) * bt[0] + w, (1 - w) * bt[1]]
        q = [v / sum(q) for v in q]
        tc = kl_list(q, bs) if direction == "forward" else kl_list(bs, q)
        nc = kl_list(softmax_list([zt[k] / T for k in others]), softmax_list([zs[k] / T for k in others]))
        total += alpha * tc + (beta * nc if nckd else 0.0)
    return T * T * total / max(n, 1)


def _lse(v: list[float]) -> float:
    m = max(v)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(a - m) for a in v))


def _log_softmax(v: list[float]) -> list[float]:
    z = _lse(v)
    return [a - z for a in v]


def _kl_log(lp: list[float], lr: list[float]) -> float:
    return sum(math.exp(a) * (a - c) for a, c in zip(lp, lr) if a > -math.inf and math.exp(a) > 0)


def ref_pdd_logspace(s, t, y, *, alpha=0.5, beta=0.5, T=1.0, w=0.5, direction="forward", nckd=True) -> float:
    """Same definition in plain-Python log space (needed when logits are 1e4: probabilities underflow to 0)."""
    total, n = 0.0, 0
    for zs, zt, tgt in _pixels(s, t, y, IGN):
        n += 1
        zs, zt = [v / T for v in zs], [v / T for v in zt]
        others = [k for k in range(len(zs)) if k != tgt]
        ls, lt = _log_softmax(zs), _log_softmax(zt)
        lbs = [ls[tgt], _lse([ls[k] for k in others])]
        lbt = [lt[tgt], _lse([lt[k] for k in others])]
        l1w = math.log(1 - w) if w < 1 else -math.inf
        lw = math.log(w) if w > 0 else -math.inf
        lq = [_lse([lbt[0] + l1w, lw]), lbt[1] + l1w]
        lq = _log_softmax(lq)
        tc = _kl_log(lq, lbs) if direction == "forward" else _kl_log(lbs, lq)
        nc = _kl_log(_log_softmax([zt[k] for k in others]), _log_softmax([zs[k] for k in others]))
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
    ref = ref_pdd_logspace(s.detach().float(), t.float(), y, T=2.0)  # the same (rounded) values, exactly
    assert got.item() == pytest.approx(ref, rel=1e-5)
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
    paper_nc = PDDLoss(ctx, preset="paper", use_nckd=True)  # explicit args override the preset ...
    assert paper_nc.use_nckd and (paper_nc.alpha, paper_nc.beta, paper_nc.temperature, paper_nc.gt_mix) == \
        (0.5, 0.5, 1.0, 0.5)  # ... and the rest stays the paper's
    s, t, y = _inputs()
    out = paper(LossInputs(student_logits=s, target=y, teacher_logits=t))
    assert set(out) == {"pdd"}
    assert out["pdd"].item() == pytest.approx(ref_pdd(s, t, y, direction="reverse", nckd=False), rel=1e-5)
    with pytest.raises(ValueError, match="teacher logits"):
        m(LossInputs(student_logits=s, target=y))
    with pytest.raises(ValueError, match="preset"):
        PDDLoss(ctx, preset="nope")


# Module wiring: every constructor argument must reach pdd_loss. The settings are all non-default and chosen so
# that any dropped argument (default used instead) or swapped pair (alpha <-> beta) changes the value by far more
# than the tolerance; each case is checked against the plain-Python reference and against the pure function.
WIRING = [
    dict(alpha=0.8, beta=0.15, temperature=2.5, gt_mix=0.3, direction="forward", use_nckd=True),
    dict(alpha=0.2, beta=0.9, temperature=0.7, gt_mix=0.8, direction="reverse", use_nckd=True),
    dict(alpha=1.3, beta=0.4, temperature=3.0, gt_mix=0.0, direction="reverse", use_nckd=False),
]


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("opts", WIRING, ids=["fwd", "rev", "rev-nonc"])
def test_module_non_default_settings_reach_the_loss(opts, memory_efficient):
    ign = 4  # a non-default ignore value from the LossContext: with the default 255 the label 4 would be rejected
    s, t, y = _inputs(K=4, n_ignore=0, seed=7)
    y.view(-1)[::5] = ign
    ctx = LossContext(num_classes=4, ignore_index=ign)
    m = LOSSES.get("pdd")(ctx, weight=3.0, memory_efficient=memory_efficient, **opts)
    assert m.weights == {"pdd": 3.0}
    got = m(LossInputs(student_logits=s, target=y, teacher_logits=t))["pdd"]
    ref = ref_pdd(s, t, y, alpha=opts["alpha"], beta=opts["beta"], T=opts["temperature"], w=opts["gt_mix"],
                  direction=opts["direction"], nckd=opts["use_nckd"], ignore=ign)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    pure = pdd_loss(s, t, y, ignore_index=ign, memory_efficient=memory_efficient, **opts)
    assert torch.equal(got, pure)
    # the settings are distinguishable: each single change moves the reference by more than 1e-3 relative
    base = dict(alpha=opts["alpha"], beta=opts["beta"], T=opts["temperature"], w=opts["gt_mix"],
                direction=opts["direction"], nckd=opts["use_nckd"], ignore=ign)
    variants = [dict(base, alpha=base["beta"], beta=base["alpha"]), dict(base, alpha=0.5), dict(base, T=1.0),
                dict(base, w=0.5), dict(base, direction="forward" if base["direction"] == "reverse" else "reverse")]
    if base["nckd"]:
        variants += [dict(base, beta=0.5), dict(base, nckd=False)]
    for v in variants:
        assert abs(ref_pdd(s, t, y, **v) - ref) > 1e-3 * abs(ref), v


def test_default_preset_values():
    """method.md's defaults: alpha = beta = 0.5, T = 1, gt_mix = 0.5, forward TC, NC on (pinned by value)."""
    m = PDDLoss(LossContext(num_classes=5))
    assert (m.alpha, m.beta, m.temperature, m.gt_mix, m.direction, m.use_nckd) == (0.5, 0.5, 1.0, 0.5, "forward", True)
    s, t, y = _inputs()
    got = m(LossInputs(student_logits=s, target=y, teacher_logits=t))["pdd"]
    assert got.item() == pytest.approx(ref_pdd(s, t, y, alpha=0.5, beta=0.5, T=1.0, w=0.5), rel=1e-5)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_two_classes(memory_efficient):
    """Binary segmentation: the non-target distribution has one class, so NC is 0 and PDD is alpha * TC."""
    s, t, y = _inputs(K=2, n_ignore=2, seed=4)
    got = pdd_loss(s, t, y, alpha=0.7, beta=0.9, temperature=2.0, gt_mix=0.3, memory_efficient=memory_efficient)
    ref = ref_pdd(s, t, y, alpha=0.7, beta=0.9, T=2.0, w=0.3)
    assert ref > 0 and got.item() == pytest.approx(ref, rel=1e-5)
    assert got.item() == pytest.approx(ref_pdd(s, t, y, alpha=0.7, beta=0.0, T=2.0, w=0.3), rel=1e-5)


def test_float64_memory_efficient_path_is_float64_exact():
    """float64 inputs stay float64 in the blocked path (statistics buffers included): same value and gradient
    as plain autograd to float64 rounding, far tighter than float32 could give."""
    s, t, y = _inputs(dtype=torch.float64, scale=3.0, seed=5)
    s.requires_grad_(True)
    for d in ("forward", "reverse"):
        a = pdd_loss(s, t, y, temperature=1.7, gt_mix=0.4, direction=d)
        b = pdd_loss(s, t, y, temperature=1.7, gt_mix=0.4, direction=d, memory_efficient=False)
        assert a.dtype == torch.float64 and abs(a.item() - b.item()) <= 1e-13 * abs(b.item())
        ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=-1.0), dict(gt_mix=-0.1),
                                 dict(gt_mix=1.5)])
def test_out_of_range_options_are_rejected(bad):
    s, t, y = _inputs()
    with pytest.raises(ValueError, match=list(bad)[0]):
        pdd_loss(s, t, y, **bad)
    with pytest.raises(ValueError, match=list(bad)[0]):
        PDDLoss(LossContext(num_classes=5), **bad)


def test_at_stride_reads_the_logits_taps_at_the_teachers_grid():
    """``at: stride`` (issue 29): PDD on the ``logits`` taps, the student's resized bilinearly to the teacher's grid
    and the labels nearest-downsampled (logits_pair, as kd / cwd); ``at: input`` (the default) is the models'
    outputs at the crop, untouched. Checked against the plain-Python reference on the tensors each position means."""
    ctx = LossContext(num_classes=5)
    s_full, t_full, y = _inputs(B=2, K=5, H=8, W=12, n_ignore=6, seed=3)
    g = torch.Generator().manual_seed(11)
    s_tap = torch.randn(2, 5, 8, 12, generator=g, dtype=torch.float64)   # student at 1/4 of a 32 x 48 crop
    t_tap = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)    # teacher at 1/8
    y_crop = torch.randint(0, 5, (2, 32, 48), generator=g)
    y_crop[0, :3] = IGN
    inputs = LossInputs(student_logits=F.interpolate(s_full, size=(32, 48), mode="bilinear"), target=y_crop,
                        teacher_logits=F.interpolate(t_full, size=(32, 48), mode="bilinear"),
                        student_feats={"logits": s_tap}, teacher_feats={"logits": t_tap})
    assert PDDLoss.taps({"at": "stride"}) == (["logits"], ["logits"]) and PDDLoss.taps({}) == ([], [])
    got = PDDLoss(ctx, at="stride")(inputs)["pdd"]
    s_grid = F.interpolate(s_tap, size=(4, 6), mode="bilinear", align_corners=False)
    y_grid = F.interpolate(y_crop[:, None].float(), size=(4, 6), mode="nearest")[:, 0].long()
    assert got.item() == pytest.approx(ref_pdd(s_grid, t_tap, y_grid), rel=1e-9)
    default = PDDLoss(ctx)(inputs)["pdd"]
    assert torch.equal(default, pdd_loss(inputs.student_logits, inputs.teacher_logits, y_crop))
    assert abs(default.item() - got.item()) > 1e-3
    with pytest.raises(ValueError, match="'at' must be one of"):
        PDDLoss(ctx, at="crop")
