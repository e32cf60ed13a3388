"""Logit-based baseline KD losses (KD, DKD, CWD, DIST) against independent straightforward references."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from _ref import kl_list, softmax_list
from test_baselines_reference import ref_dist
from c2vkd.losses.base import LOSSES, LossContext, LossInputs
from c2vkd.losses.cwd import CWDLoss, cwd_loss
from c2vkd.losses.dist import DISTLoss, dist_loss
from c2vkd.losses.dkd import DKDLoss, dkd_loss
from c2vkd.losses.kd import KDLoss, kd_loss

IGN = 255


def _logits(b=2, k=5, h=3, w=4, scale=2.0, dtype=torch.float32):
    return (torch.randn(b, k, h, w) * scale).to(dtype)


def _target(b=2, k=5, h=3, w=4, n_ignore=4):
    t = torch.randint(0, k, (b, h, w))
    flat = t.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignore]] = IGN
    return t


def _pixels(b, h, w):
    return [(i, y, x) for i in range(b) for y in range(h) for x in range(w)]


# ----------------------------------------------------------------------------------------------- KD
def _kd_ref(zs, zt, target, T):
    b, k, h, w = zs.shape
    vals = []
    for i, y, x in _pixels(b, h, w):
        if target is not None and int(target[i, y, x]) == IGN:
            continue
        ps = softmax_list([float(zs[i, c, y, x]) / T for c in range(k)])
        pt = softmax_list([float(zt[i, c, y, x]) / T for c in range(k)])
        vals.append(kl_list(pt, ps))
    return T * T * sum(vals) / max(1, len(vals))


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("masked", [True, False])
def test_kd_matches_pixel_loop(T, masked):
    zs, zt, tgt = _logits(), _logits(), _target()
    got = kd_loss(zs, zt, tgt if masked else None, temperature=T)
    assert got.item() == pytest.approx(_kd_ref(zs, zt, tgt if masked else None, T), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------- DKD
def _dkd_ref_loop(zs, zt, target, alpha, beta, T, source):
    b, k, h, w = zs.shape
    vals = []
    for i, y, x in _pixels(b, h, w):
        if target is not None and int(target[i, y, x]) == IGN:
            continue
        s = [float(zs[i, c, y, x]) / T for c in range(k)]
        t = [float(zt[i, c, y, x]) / T for c in range(k)]
        tc = max(range(k), key=lambda c: t[c]) if source == "teacher" else int(target[i, y, x])
        ps, pt = softmax_list(s), softmax_list(t)
        bs, bt = [ps[tc], 1 - ps[tc]], [pt[tc], 1 - pt[tc]]
        others = [c for c in range(k) if c != tc]
        hs, ht = softmax_list([s[c] for c in others]), softmax_list([t[c] for c in others])
        vals.append(alpha * kl_list(bt, bs) + beta * kl_list(ht, hs))
    return T * T * sum(vals) / max(1, len(vals))


def _dkd_ref_mdistiller(zs, zt, tgt_cls, alpha, beta, T):
    """mdistiller's dkd_loss verbatim (pixels as samples, float64), reduction sum / #samples."""
    k = zs.shape[1]
    ls = zs.permute(0, 2, 3, 1).reshape(-1, k).double()
    lt = zt.permute(0, 2, 3, 1).reshape(-1, k).double()
    target = tgt_cls.reshape(-1)
    gt_mask = torch.zeros_like(ls).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(ls).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, m1, m2):
        return torch.cat([(t * m1).sum(1, keepdims=True), (t * m2).sum(1, keepdims=True)], dim=1)

    ps = cat_mask(F.softmax(ls / T, dim=1), gt_mask, other_mask)
    pt = cat_mask(F.softmax(lt / T, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * T ** 2 / target.shape[0]
    pt2 = F.softmax(lt / T - 1000.0 * gt_mask, dim=1)
    lps2 = F.log_softmax(ls / T - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(lps2, pt2, reduction="sum") * T ** 2 / target.shape[0]
    return (alpha * tckd + beta * nckd).item()


@pytest.mark.parametrize("source", ["teacher", "gt"])
@pytest.mark.parametrize("T,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0)])
def test_dkd_matches_pixel_loop(source, T, alpha, beta):
    zs, zt, tgt = _logits(), _logits(), _target()
    got = dkd_loss(zs, zt, tgt, alpha=alpha, beta=beta, temperature=T, target_source=source)
    ref = _dkd_ref_loop(zs, zt, tgt, alpha, beta, T, source)
    assert got.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_dkd_matches_mdistiller_formula():
    zs, zt = _logits(scale=1.0), _logits(scale=1.0)
    t_cls = zt.argmax(1)
    got = dkd_loss(zs, zt, None, alpha=1.0, beta=8.0, temperature=4.0, target_source="teacher")
    assert got.item() == pytest.approx(_dkd_ref_mdistiller(zs, zt, t_cls, 1.0, 8.0, 4.0), rel=1e-4)


def test_dkd_teacher_source_without_target_uses_every_pixel():
    zs, zt = _logits(), _logits()
    got = dkd_loss(zs, zt, None, temperature=2.0, target_source="teacher")
    assert got.item() == pytest.approx(_dkd_ref_loop(zs, zt, None, 1.0, 8.0, 2.0, "teacher"), rel=1e-4)
    with pytest.raises(ValueError):
        dkd_loss(zs, zt, None, target_source="gt")


def test_dkd_extreme_logits_finite():
    zs, zt = _logits(scale=60.0), _logits(scale=60.0)
    zs.requires_grad_(True)
    out = dkd_loss(zs, zt, _target(), target_source="gt", temperature=1.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------------------------------------- CWD
def _cwd_ref(s, t, T):
    b, c = s.shape[:2]
    total = 0.0
    for i in range(b):
        for ch in range(c):
            ps = softmax_list([float(v) / T for v in s[i, ch].flatten()])
            pt = softmax_list([float(v) / T for v in t[i, ch].flatten()])
            total += kl_list(pt, ps)
    return total * T * T / (b * c)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_cwd_matches_channel_loop(T):
    s, t = _logits(), _logits()
    assert cwd_loss(s, t, temperature=T).item() == pytest.approx(_cwd_ref(s, t, T), rel=1e-5)


def test_cwd_matches_mmrazor_formula():
    s, t = _logits(b=3, k=4, h=5, w=6), _logits(b=3, k=4, h=5, w=6)
    tau = 4.0
    n, c, h, w = t.shape
    pT = F.softmax(t.reshape(-1, w * h).double() / tau, dim=1)
    ref = torch.sum(pT * F.log_softmax(t.reshape(-1, w * h).double() / tau, dim=1)
                    - pT * F.log_softmax(s.reshape(-1, w * h).double() / tau, dim=1)) * tau ** 2 / (c * n)
    assert cwd_loss(s, t, temperature=tau).item() == pytest.approx(ref.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- DIST
def _dist_ref(zs, zt, target, beta, gamma, tau):
    """The DIST reference code (test_baselines_reference.ref_dist) on the valid pixels, as a [1, K, n, 1] map."""
    if target is not None:
        k = zs.shape[1]
        keep = (target != IGN).reshape(-1)
        zs, zt = (z.permute(0, 2, 3, 1).reshape(-1, k)[keep].T[None, :, :, None] for z in (zs, zt))
    return ref_dist(zs, zt, beta, gamma, tau)


@pytest.mark.parametrize("tau,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
@pytest.mark.parametrize("masked", [True, False])
def test_dist_matches_reference_code(tau, beta, gamma, masked):
    zs, zt, tgt = _logits(k=6, h=4, w=5), _logits(k=6, h=4, w=5), _target(k=6, h=4, w=5, n_ignore=7)
    got = dist_loss(zs, zt, tgt if masked else None, beta=beta, gamma=gamma, temperature=tau)
    assert got.item() == pytest.approx(_dist_ref(zs, zt, tgt if masked else None, beta, gamma, tau),
                                       rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------------- shared checks
LOGIT_FNS = {
    "kd": lambda s, t, y: kd_loss(s, t, y, temperature=2.0),
    "dkd_teacher": lambda s, t, y: dkd_loss(s, t, y, target_source="teacher"),
    "dkd_gt": lambda s, t, y: dkd_loss(s, t, y, target_source="gt"),
    "cwd": lambda s, t, y: cwd_loss(s, t, temperature=4.0),
    "dist": lambda s, t, y: dist_loss(s, t, y),
}


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_identical_logits_give_zero(name):
    z, tgt = _logits(), _target()
    assert abs(LOGIT_FNS[name](z.clone(), z.clone(), tgt).item()) < 1e-5


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_grad_reaches_student_only_and_low_precision_inputs(name):
    for dtype in (torch.float16, torch.bfloat16):
        zs = _logits(dtype=dtype).requires_grad_(True)
        zt = _logits(dtype=dtype).requires_grad_(True)
        out = LOGIT_FNS[name](zs, zt, _target())
        assert out.dtype == torch.float32 and torch.isfinite(out)
        out.backward()
        assert zt.grad is None
        assert zs.grad is not None and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["kd", "dkd_teacher", "dkd_gt", "dist"])
def test_all_ignored_gives_zero_with_grad_path(name):
    zs = _logits().requires_grad_(True)
    tgt = torch.full((2, 3, 4), IGN)
    out = LOGIT_FNS[name](zs, _logits(), tgt)
    assert out.item() == 0.0
    out.backward()
    assert zs.grad is not None and torch.isfinite(zs.grad).all()


def test_ignored_pixels_do_not_matter():
    zs, zt, tgt = _logits(), _logits(), _target()
    zs2, zt2 = zs.clone(), zt.clone()
    ign = (tgt == IGN)[:, None].expand_as(zs)
    zs2[ign] = 1e3
    zt2[ign] = -7.0
    for name in ("kd", "dkd_teacher", "dkd_gt", "dist"):
        a, b = LOGIT_FNS[name](zs, zt, tgt), LOGIT_FNS[name](zs2, zt2, tgt)
        assert a.item() == pytest.approx(b.item(), rel=1e-5), name


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        kd_loss(_logits(h=3), _logits(h=4))


# ---------------------------------------------------------------------------------------- modules
ODD_CTX = dict(num_classes=5, student_shapes={"feat": (2, 256, 4, 5)}, teacher_shapes={"feat": (2, 2048, 8, 10)})


@pytest.mark.parametrize("name,args", [("kd", {"temperature": 2.0}), ("dkd", {"target_source": "gt"}),
                                       ("dkd", {}), ("dkd", {"target_source": "teacher"}), ("cwd", {}),
                                       ("cwd", {"on": "features"}), ("dist", {})])
def test_modules_from_context(name, args):
    ctx = LossContext(**ODD_CTX)
    cls = LOSSES.get(name)
    mod = cls(ctx, weight=0.5, **args)
    s_taps, t_taps = cls.taps(args)
    if name == "cwd" and args.get("on") == "features":
        assert (s_taps, t_taps) == (["feat"], ["feat"])
    else:
        assert (s_taps, t_taps) == ([], [])
    zs = torch.randn(2, 5, 16, 20, requires_grad=True)
    zt = torch.randn(2, 5, 16, 20, requires_grad=True)
    fs = torch.randn(2, 256, 4, 5, requires_grad=True)
    ft = torch.randn(2, 2048, 8, 10, requires_grad=True)
    inputs = LossInputs(student_logits=zs, target=torch.randint(0, 5, (2, 16, 20)), teacher_logits=zt,
                        student_feats={"feat": fs}, teacher_feats={"feat": ft})
    out = mod(inputs)
    term = "cwd_feat" if args.get("on") == "features" else name   # CWD on features has its own term
    assert set(out) == set(mod.weights) == {term}
    assert mod.weights[term] == 0.5
    total = sum(mod.weights[k] * v for k, v in out.items())
    assert torch.isfinite(total)
    total.backward()
    assert zt.grad is None and ft.grad is None
    if name == "cwd" and args.get("on") == "features":
        assert fs.grad is not None and all(p.grad is not None for p in mod.parameters())
    else:
        assert zs.grad is not None


def test_module_validation():
    ctx = LossContext(**ODD_CTX)
    with pytest.raises(ValueError):
        DKDLoss(ctx, target_source="label")
    with pytest.raises(ValueError):
        KDLoss(ctx, temperature=0)
    with pytest.raises(ValueError):
        CWDLoss(ctx, on="both")
    with pytest.raises(KeyError):
        CWDLoss(ctx, on="features", student_tap="nope")
    with pytest.raises(ValueError):
        DISTLoss(ctx, temperature=-1)


def test_kd_module_mask_ignore_option():
    ctx = LossContext(num_classes=5)
    zs, zt, tgt = _logits(), _logits(), _target()
    inp = LossInputs(student_logits=zs, target=tgt, teacher_logits=zt)
    assert KDLoss(ctx)(inp)["kd"].item() == pytest.approx(kd_loss(zs, zt, tgt).item())
    assert KDLoss(ctx, mask_ignore=False)(inp)["kd"].item() == pytest.approx(kd_loss(zs, zt, None).item())
