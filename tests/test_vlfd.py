"""VLFD terms against explicit references, gram == naive graph loss, and the VLFDLoss module's wiring."""
from __future__ import annotations

import inspect
import itertools
import logging
import math

import pytest
import torch

from _ref import kl_list, softmax_list
from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.models.clip_pool import ARCH_SPECS, AttentionPool2d
from c2vkd.losses.vlfd import VLFDLoss, linguistic_loss, patch_graph_loss, vlfd_global_loss


def _pixel_lists(f):
    """[B, C, H, W] tensor -> list of per-pixel channel vectors (plain Python floats, float64)."""
    B, C, H, W = f.shape
    v = f.detach().double().tolist()
    return [[v[b][c][i][j] for c in range(C)] for b, i, j in itertools.product(range(B), range(H), range(W))]


def ref_global(s, t, direction="forward") -> float:
    """Per pixel: softmax over channels, KL, summed; divided by B*h*w*C (the released code's reduction)."""
    total = 0.0
    for zs, zt in zip(_pixel_lists(s), _pixel_lists(t)):
        ps, pt = softmax_list(zs), softmax_list(zt)
        total += kl_list(pt, ps) if direction == "forward" else kl_list(ps, pt)
    return total / s.numel()


def ref_linguistic(es, et, direction="forward") -> float:
    total = 0.0
    for zs, zt in zip(es.detach().double().tolist(), et.detach().double().tolist()):
        ps, pt = softmax_list(zs), softmax_list(zt)
        total += kl_list(pt, ps) if direction == "forward" else kl_list(ps, pt)
    return total / es.numel()


def ref_graph(s, t, eps=1e-8) -> float:
    """Explicit N x N affinity matrices over all pixels of the batch, plain Python."""
    def rows(f):
        out = []
        for x in _pixel_lists(f):
            norm = max(math.sqrt(sum(a * a for a in x)), eps)
            x = [a / norm for a in x]
            mean = sum(x) / len(x)
            out.append([a - mean for a in x])
        return out

    a, b = rows(t), rows(s)
    c, n = s.shape[1], len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            ga = sum(p * q for p, q in zip(a[i], a[j])) / (c - 1)
            gb = sum(p * q for p, q in zip(b[i], b[j])) / (c - 1)
            total += (ga - gb) ** 2
    return total / (n * n)


def graph_f64(s, t, eps=1e-8) -> float:
    """The same definition vectorised in float64 (for inputs too large for Python loops): N x N matrices."""
    def rows(f):
        x = f.detach().double().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        x = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
        return x - x.mean(dim=1, keepdim=True)

    a, b = rows(t), rows(s)
    c = s.shape[1]
    return float((((a @ a.T) - (b @ b.T)) / (c - 1)).pow(2).mean())


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


# gram mode evaluates the C x C products when N^2 > 3 C^2 and the N x N product M = P D^T otherwise
GRAPH_SHAPES = {"column space (N=512, C=256)": (2, 256, 16, 16), "row space (N=128, C=512)": (2, 512, 8, 8)}


@pytest.mark.parametrize("shape", list(GRAPH_SHAPES))
@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3])
def test_graph_gram_equals_naive_in_float32(noise, shape):
    """Including near-identical student/teacher, where a three-term expansion would cancel badly."""
    t = torch.randn(*GRAPH_SHAPES[shape]).relu()
    s = t + noise * torch.randn_like(t)
    ref = graph_f64(s, t)
    assert ref > 0
    gram = patch_graph_loss(s, t, exact_mode="gram").item()
    naive = patch_graph_loss(s, t, exact_mode="naive").item()
    # abs=0: at noise 1e-3 the loss is ~1e-13, below pytest.approx's default absolute tolerance (1e-12)
    # naive subtracts two N x N matrices of O(1) entries whose difference is O(noise): it keeps fewer digits
    assert gram == pytest.approx(ref, rel=1e-5, abs=0) and naive == pytest.approx(ref, rel=1e-4, abs=0)


def test_graph_two_channels_is_allowed_and_exact():
    """C = 2 is the smallest graph (G divides by C - 1 = 1); one channel is refused."""
    s, t = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4).relu() + 0.1
    assert patch_graph_loss(s, t).item() == pytest.approx(ref_graph(s, t), rel=1e-5)
    with pytest.raises(ValueError, match="C >= 2"):
        patch_graph_loss(s[:, :1], t[:, :1])


def test_module_needs_the_teacher():
    from c2vkd.engine.loss_config import needs_teacher

    assert VLFDLoss.requires_teacher is True and needs_teacher([{"name": "vlfd", "weight": 1.0}])


def test_graph_identical_is_zero():
    t = torch.randn(2, 8, 3, 3)
    assert patch_graph_loss(t.clone(), t).item() == 0.0


@pytest.mark.parametrize("mode", ["gram", "naive"])
def test_gradchecks(mode):
    s = torch.randn(2, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: patch_graph_loss(x, t, exact_mode=mode), (s,))
    wide_s = torch.randn(1, 9, 2, 2, dtype=torch.float64, requires_grad=True)   # N = 4 rows, C = 9: row space
    wide_t = torch.randn(1, 9, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: patch_graph_loss(x, wide_t, exact_mode=mode), (wide_s,))
    assert patch_graph_loss(wide_s, wide_t, exact_mode=mode).item() == pytest.approx(
        patch_graph_loss(wide_s, wide_t, exact_mode="naive").item(), rel=1e-12)
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


# ------------------------------------------------------------------------------------- module wiring
def _small_ctx() -> LossContext:
    return LossContext(num_classes=5, student_shapes={"s4": (2, 8, 4, 5)}, teacher_shapes={"t4": (2, 16, 6, 7)})


def _small_inputs() -> LossInputs:
    g = torch.Generator().manual_seed(3)
    s4 = torch.randn(2, 8, 4, 5, generator=g)
    ft = (torch.randn(2, 16, 6, 7, generator=g) * 2).relu()
    return LossInputs(student_logits=torch.zeros(2, 5, 8, 8), target=torch.zeros(2, 8, 8, dtype=torch.long),
                      student_feats={"s4": s4}, teacher_feats={"t4": ft})


_HAS_REDUCTION = "reduction" in inspect.signature(VLFDLoss.__init__).parameters


@pytest.mark.parametrize("gdir,ldir,through_pool,reduction", [
    ("reverse", "forward", False, "element"), ("forward", "reverse", False, "distribution"),
    ("reverse", "reverse", True, "distribution")])
def test_module_non_default_settings_reach_each_term(gdir, ldir, through_pool, reduction, monkeypatch):
    """Every option reaches its term: directions (set differently, so a swap or a dropped one changes a value),
    graph eps, reduction, taps, weights; graph mode / across-ranks (value-invisible) through a spy."""
    from c2vkd.losses import vlfd as vlfd_mod

    if reduction != "element" and not _HAS_REDUCTION:
        pytest.skip("VLFDLoss has no reduction option in this tree")
    seen = []
    real = vlfd_mod.patch_graph_loss

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(vlfd_mod, "patch_graph_loss", spy)
    eps = 2.5  # larger than some row norms of F_S: the clamp changes the graph (checked below)
    extra = {"reduction": reduction} if reduction != "element" else {}
    m = VLFDLoss(_small_ctx(), weight=2.0, global_weight=0.3, patch_weight=0.7, linguistic_weight=0.2,
                 global_direction=gdir, linguistic_direction=ldir, graph_mode="naive", graph_eps=eps,
                 student_tap="s4", teacher_tap="t4", student_through_pool=through_pool, **extra)
    assert m.weights == pytest.approx({"vlfd_global": 0.6, "vlfd_patch": 1.4, "vlfd_linguistic": 0.4})
    with torch.no_grad():  # larger embeddings: peaked distributions, where KL's two directions differ clearly
        m.pool.c_proj.weight.mul_(30.0)
        if m.linguistic_head is not None:
            m.linguistic_head[2].weight.mul_(30.0)
    inputs = _small_inputs()
    out = m(inputs)
    assert len(seen) == 1
    assert {k: seen[0].get(k) for k in ("eps", "exact_mode", "across_ranks")} == \
        dict(eps=eps, exact_mode="naive", across_ranks=False)

    s4, ft = inputs.student_feats["s4"], inputs.teacher_feats["t4"]
    with torch.no_grad():
        fs = torch.nn.functional.interpolate(torch.nn.functional.conv2d(s4, m.visual_head.weight), size=(6, 7),
                                             mode="bilinear", align_corners=False)
        et = m.pool(ft)
        es = m.pool(fs) if through_pool else m.linguistic_head(s4)
    # 'distribution': KL per pixel / per sample instead of per element, graph without G's 1 / (C - 1)
    per = {"vlfd_global": 16, "vlfd_patch": 15 ** 2, "vlfd_linguistic": es.shape[1]} \
        if reduction == "distribution" else {"vlfd_global": 1, "vlfd_patch": 1, "vlfd_linguistic": 1}
    exp = {"vlfd_global": ref_global(fs, ft, gdir), "vlfd_patch": ref_graph(fs, ft, eps),
           "vlfd_linguistic": ref_linguistic(es, et, ldir)}
    for k, v in exp.items():
        assert out[k].item() == pytest.approx(v * per[k], rel=1e-4, abs=0), k
    # the settings are distinguishable: the other direction / the default eps give values further off than 10x
    # the tolerance above (KL is nearly symmetric for close distributions, hence not more)
    flip = {"forward": "reverse", "reverse": "forward"}
    assert abs(ref_global(fs, ft, flip[gdir]) - exp["vlfd_global"]) > 1e-3 * exp["vlfd_global"]
    assert abs(ref_linguistic(es, et, flip[ldir]) - exp["vlfd_linguistic"]) > 1e-3 * exp["vlfd_linguistic"]
    assert abs(ref_graph(fs, ft) - exp["vlfd_patch"]) > 1e-3 * exp["vlfd_patch"]


def test_module_graph_across_ranks_option_reaches_the_graph(monkeypatch):
    from c2vkd.losses import vlfd as vlfd_mod

    seen = []
    real = vlfd_mod.patch_graph_loss
    monkeypatch.setattr(vlfd_mod, "patch_graph_loss", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    m = VLFDLoss(_small_ctx(), student_tap="s4", teacher_tap="t4", graph_across_ranks=True)
    m(_small_inputs())
    assert len(seen) == 1 and {k: seen[0].get(k) for k in ("eps", "exact_mode", "across_ranks")} == \
        dict(eps=1e-8, exact_mode="gram", across_ranks=True)
    with pytest.raises(ValueError, match="graph_across_ranks needs graph_mode 'gram'"):
        VLFDLoss(_small_ctx(), student_tap="s4", teacher_tap="t4", graph_across_ranks=True, graph_mode="naive")
