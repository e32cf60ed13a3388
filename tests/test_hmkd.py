"""HMKD* (losses/hmkd.py): GLA and HFA against a float64 transcription of the reference's arithmetic
(xumingzhu989/HMKD-ICMR models/GLA_model.py, models/HFA_model.py), the layout fix (Q1), the warp's identity at zero
offset, the teacher self-attention, every option reaching the computation, no gradient into the teacher, real
SegFormer / PVTv2 / CNN students at non-square inputs, the anchoring against collapse (Q3), ``c2vkd report`` showing
both terms, and the heads as trainable alignment heads that resume exactly."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _heads
import _toy  # noqa: F401  (registers toy_cnn / toy_vit)
from c2vkd.engine.distiller import Distiller
from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses.hmkd import (GLAHead, HFAHead, auto_patch, gla_loss, hfa_loss, scrambled_map, teacher_self_attention,
                               tokens_to_map, warp)

# float() of a loss term that carries a graph is intended here (values compared, graphs unused)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")]

S = {"stage1": (2, 8, 12, 10), "stage3": (2, 8, 6, 5)}
T = {"layer1": (2, 6, 12, 10), "layer3": (2, 10, 6, 5)}


def _ctx(s=S, t=T) -> LossContext:
    return LossContext(num_classes=3, student_shapes=dict(s), teacher_shapes=dict(t), input_size=(48, 40))


def _inputs(seed: int = 0, s=S, t=T, grad: bool = True) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    sf = {k: torch.randn(*v, generator=g).requires_grad_(grad) for k, v in s.items()}
    tf = {k: torch.randn(*v, generator=g).requires_grad_(grad) for k, v in t.items()}
    return LossInputs(student_logits=torch.zeros(2, 3, 8, 8), target=torch.zeros(2, 8, 8, dtype=torch.long),
                      student_feats=sf, teacher_feats=tf)


def _module(**kw):
    torch.manual_seed(0)
    return LOSSES.get("hmkd")(_ctx(), **kw)


# ------------------------------------------------------------------------ float64 reference transcriptions
def naive_patch_tokens(x, conv, ln) -> torch.Tensor:
    """GLA's PatchEmbed: a k x k stride-k conv, written as one dot product per patch, then LayerNorm."""
    k = conv.kernel_size[0]
    b, c, h, w = x.shape
    toks = []
    for i in range(h // k):
        for j in range(w // k):
            patch = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k]
            toks.append(torch.einsum("ocyx,bcyx->bo", conv.weight, patch) + conv.bias)
    p = torch.stack(toks, 1)
    mu, var = p.mean(-1, keepdim=True), p.var(-1, unbiased=False, keepdim=True)
    return (p - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def naive_attention(p, qk) -> torch.Tensor:
    """SelfAttention.forward's attention_weights, one row at a time (exp / sum)."""
    q = p @ qk.query.weight.T + qk.query.bias
    k = p @ qk.key.weight.T + qk.key.bias
    b, n, d = q.shape
    out = torch.empty(b, n, n, dtype=p.dtype)
    for bi in range(b):
        for i in range(n):
            s = torch.stack([q[bi, i] @ k[bi, j] for j in range(n)]) / d ** 0.5
            e = torch.exp(s - s.max())
            out[bi, i] = e / e.sum()
    return out


def naive_gla(head: GLAHead, s, t, reduction="sum") -> float:
    """GLA_model.forward (the *_04 modules): conv_c1010 on the teacher, patch embed + SA per side, sum of (Mt-Ms)^2;
    the student map read with the correct layout (the reference's reshape is the Q1 scramble)."""
    xt = torch.einsum("oc,bchw->bohw", head.t_proj.weight[:, :, 0, 0], t) + head.t_proj.bias[:, None, None]
    ms = naive_attention(naive_patch_tokens(s, head.s_embed.proj, head.s_embed.norm), head.s_attn)
    mt = naive_attention(naive_patch_tokens(xt, head.t_embed.proj, head.t_embed.norm), head.t_attn)
    d2 = (mt - ms) ** 2
    return float(d2.detach().sum() if reduction == "sum" else d2.detach().mean())


def naive_bn(x, bn) -> torch.Tensor:
    mu = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (x - mu) / torch.sqrt(var + bn.eps)
    return y * bn.weight[:, None, None] + bn.bias[:, None, None] if bn.affine else y


def naive_rrb(x, rrb) -> torch.Tensor:
    u = F.conv2d(x, rrb.unify.weight)
    r = F.conv2d(naive_bn(F.conv2d(u, rrb.residual[0].weight, padding=1), rrb.residual[1]),
                 rrb.residual[2].weight, padding=1)
    return naive_bn(u + r, rrb.norm)


def reference_grid_sample(inp, size, delta) -> torch.Tensor:
    """HFA_model.bilinear_interpolate_torch_gridsample, as written (grid_sample's default align_corners=False),
    except that the linspace grid is built in the input's dtype (the reference's is float32)."""
    out_h, out_w = size
    n, c, h, w = inp.shape
    norm = torch.tensor([[[[w / 1.0, h / 1.0]]]]).type_as(inp)
    w_list = torch.linspace(-1.0, 1.0, out_h, dtype=inp.dtype).view(-1, 1).repeat(1, out_w)
    h_list = torch.linspace(-1.0, 1.0, out_w, dtype=inp.dtype).repeat(out_h, 1)
    grid = torch.cat((h_list.unsqueeze(2), w_list.unsqueeze(2)), 2).repeat(n, 1, 1, 1).type_as(inp)
    grid = grid + delta.permute(0, 2, 3, 1) / norm
    return F.grid_sample(inp, grid, align_corners=False)


@torch.no_grad()
def naive_hfa(head: HFAHead, s, t) -> float:
    """HFA_model.forward: compute_weighted_attention_map (loops), interpolate (align_corners=True), conv_c1010,
    RRB_t / RRB_s, h = Ys * Yt, CBR x 2, delta_gen, warp of the teacher branch, MSELoss (mean)."""
    b, c, hh, ww = t.shape
    flat = t.reshape(b, c, hh * ww)
    sa = torch.empty_like(flat)
    for bi in range(b):
        for i in range(hh * ww):
            logits = torch.stack([flat[bi, :, i] @ flat[bi, :, j] for j in range(hh * ww)])  # no 1/sqrt(d)
            a = torch.exp(logits - logits.max())
            sa[bi, :, i] = (flat[bi] * (a / a.sum())).sum(1)
    yt0 = F.interpolate(sa.reshape(b, c, hh, ww), size=s.shape[-2:], mode="bilinear", align_corners=True)
    yt = naive_rrb(F.conv2d(yt0, head.t_proj.weight, head.t_proj.bias), head.rrb_t)
    ys = naive_rrb(s, head.rrb_s)
    h = ys * yt

    def cbr(x, m):
        return torch.relu(naive_bn(F.conv2d(x, m[0].weight, m[0].bias, padding=1), m[1]))

    g = head.delta_gen
    d = F.conv2d(naive_bn(F.conv2d(torch.cat((cbr(h, head.cbr_t), cbr(h, head.cbr_s)), 1), g[0].weight), g[1]),
                 g[2].weight, padding=1)
    return float(((reference_grid_sample(yt, s.shape[-2:], d) - ys) ** 2).mean())


def _double_terms(mod, inputs):
    """The module's heads in float64 on float64 copies of the inputs (pure functions + heads, no float32 cast)."""
    mod = mod.double()
    (s1n, t1n), (s3n, t3n) = mod.gla_taps, mod.hfa_taps
    f = {k: v.detach().double() for k, v in {**inputs.student_feats, **inputs.teacher_feats}.items()}
    with torch.no_grad():
        ms, mt = mod.gla(f[s1n], f[t1n])
        yt, ys, delta = mod.hfa(f[s3n], f[t3n])
        return f, gla_loss(ms, mt, mod.reduction), hfa_loss(yt, ys, delta, mod.warp_align_corners, mod.warp_padding)


# --------------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gla_matches_the_reference_arithmetic(reduction):
    mod = _module(anchor="none", patch=3, reduction=reduction)
    inp = _inputs()
    f, gla, _ = _double_terms(mod, inp)
    assert gla.dtype == torch.float64
    assert float(gla) == pytest.approx(naive_gla(mod.gla, f["stage1"], f["layer1"], reduction), rel=1e-10)
    # 12 x 10 grid, 3 x 3 patches: 4 x 3 = 12 tokens (floor division, as the reference's stride-k conv)
    assert mod.gla(f["stage1"], f["layer1"])[0].shape == (2, 12, 12)
    # the module (float32) gives the same value
    mod32 = _module(anchor="none", patch=3, reduction=reduction)
    assert float(mod32(_inputs())["hmkd_gla"].detach()) == pytest.approx(float(gla), rel=1e-5)


def test_hfa_matches_the_reference_arithmetic_with_its_warp():
    """anchor none + warp_align_corners false + warp_padding zeros = the reference's HFA; non-zero offsets (the
    last offset conv re-initialised) so the learned warp is exercised."""
    mod = _module(anchor="none", warp_align_corners=False, warp_padding="zeros")
    torch.nn.init.normal_(mod.hfa.delta_gen[2].weight, std=0.5)
    inp = _inputs(1)
    f, _, hfa = _double_terms(mod, inp)
    assert float(hfa) == pytest.approx(naive_hfa(mod.hfa, f["stage3"], f["layer3"]), rel=1e-10)
    assert mod.hfa(f["stage3"], f["layer3"])[2].abs().max() > 0.1  # the offsets are not zero


def test_warp_at_zero_offset_is_the_identity_and_hfa_is_the_plain_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    zero = torch.zeros(2, 2, 5, 7, dtype=torch.float64)
    for padding in ("zeros", "border"):
        assert torch.allclose(warp(x, zero, True, padding), x, atol=1e-12, rtol=0)
    # the reference's align_corners=False is a half-pixel resampling, not the identity (its border pixels fade)
    assert not torch.allclose(warp(x, zero, False), x, atol=1e-3)
    assert torch.allclose(warp(x, zero, False), reference_grid_sample(x, (5, 7), zero), atol=1e-12, rtol=0)
    # offsets are in units of 1/W (the reference's delta / [W, H]): one column is 2/(W-1) in [-1, 1] coordinates,
    # i.e. delta_x = 2 W / (W - 1); it samples column j + 1 exactly
    shift = torch.zeros_like(zero)
    shift[:, 0] = 2.0 * 7 / (7 - 1)
    assert torch.allclose(warp(x, shift, True)[..., :-1], x[..., 1:], atol=1e-12)
    # HFA at initialisation (zero-initialised offset conv): the plain MSE of the two RRB outputs
    for kw in ({}, {"anchor": "none"}):
        mod = _module(**kw)
        with torch.no_grad():
            out = mod.terms(_inputs(2))
        assert float(out["delta"].abs().max()) == 0.0
        assert float(out["hmkd_hfa"]) == pytest.approx(float((out["yt"] - out["ys"]).pow(2).mean()), rel=1e-6)


def test_teacher_self_attention_and_its_near_identity_at_large_norms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    got = teacher_self_attention(f)
    flat = f.reshape(2, 3, 6)
    for b in range(2):
        for i in range(6):
            a = torch.softmax(torch.stack([flat[b, :, i] @ flat[b, :, j] for j in range(6)]), 0)  # unscaled
            assert torch.allclose(got.reshape(2, 3, 6)[b, :, i], (flat[b] * a).sum(1), atol=1e-12)
    # Q6: raw dot products of wide features make A ~ I, so the output is ~ the input
    wide = torch.randn(2, 256, 4, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(teacher_self_attention(wide), wide, atol=1e-6)


def test_the_layout_fix_and_the_reference_scramble():
    """Q1: the reference reshaped [B, N, C] tokens straight to [B, C, H, W]; our taps are maps, the correct layout
    (tokens_to_map), and ``layout: scrambled`` reproduces the reference's reshape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 10, generator=g)
    tokens = x.flatten(2).transpose(1, 2)  # a ViT block's [B, N, C] tokens
    assert torch.equal(tokens_to_map(tokens, 12, 10), x)
    assert torch.equal(scrambled_map(x), tokens.reshape(2, 8, 12, 10)) and not torch.equal(scrambled_map(x), x)
    with pytest.raises(ValueError, match="do not fill"):
        tokens_to_map(tokens, 11, 10)
    fixed, scr = _module(), _module(layout="scrambled")
    inp = _inputs()
    a, b = fixed.terms(inp), scr.terms(inp)
    assert torch.equal(a["m_t"], b["m_t"]) and not torch.allclose(a["m_s"], b["m_s"])
    ref_layout = inp.student_feats["stage1"].flatten(2).transpose(1, 2).reshape(2, 8, 12, 10)
    assert torch.allclose(b["m_s"], fixed.gla.s_attn(fixed.gla.s_embed(ref_layout)))


def test_auto_patch_keeps_the_reference_token_count():
    assert auto_patch(90, 120) == 8  # the reference: 11 x 15 = 165 tokens
    assert auto_patch(32, 32) == 3  # 128 x 128 crops: 10 x 10 = 100 tokens (k = 8 would leave 16)
    assert auto_patch(40, 40) == 3 and auto_patch(16, 16) == 1 and auto_patch(4, 4) == 1
    assert _module().patch == auto_patch(12, 10) == 1
    assert _module(patch=4).patch == 4


# ---------------------------------------------------------------------------------- the module contract
def test_every_option_reaches_the_computation_and_the_teacher_gets_no_gradient():
    inp = _inputs()
    mod = _module()
    out = mod(inp)
    assert set(out) == {"hmkd_gla", "hmkd_hfa"} == set(mod.weights) and mod.weights == {"hmkd_gla": 1.0,
                                                                                          "hmkd_hfa": 1.0}
    (out["hmkd_gla"] + out["hmkd_hfa"]).backward()
    assert all(v.grad is None for v in inp.teacher_feats.values())  # detached teacher features
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in inp.student_feats.values())
    trainable = [n for n, p in mod.named_parameters() if p.requires_grad]
    assert all(mod.get_parameter(n).grad is not None for n in trainable)
    base = {k: float(v) for k, v in out.items()}
    changes = {"patch": ({"patch": 2}, "hmkd_gla"), "reduction": ({"reduction": "mean"}, "hmkd_gla"),
               "layout": ({"layout": "scrambled"}, "hmkd_gla"), "anchor": ({"anchor": "none"}, "hmkd_gla"),
               "teacher_attention": ({"teacher_attention": False}, "hmkd_hfa"),
               "warp_align_corners": ({"warp_align_corners": False}, "hmkd_hfa"),
               "hfa_teacher_tap": ({"hfa_teacher_tap": "layer1"}, "hmkd_hfa"),
               "gla_teacher_tap": ({"gla_teacher_tap": "layer3"}, "hmkd_gla")}
    for name, (kw, term) in changes.items():
        o = _module(**kw)(_inputs())
        assert float(o[term]) != pytest.approx(base[term], rel=1e-6), name
    # warp padding matters once the offsets sample off the grid
    g = torch.Generator().manual_seed(0)
    x, far = torch.randn(1, 2, 4, 4, generator=g), torch.full((1, 2, 4, 4), 3.0)
    assert not torch.allclose(warp(x, far, True, "zeros"), warp(x, far, True, "border"))
    assert _module(warp_padding="zeros").warp_padding == "zeros"
    m = _module(weight=2.0, gla_weight=0.5, hfa_weight=3.0)
    assert m.weights == {"hmkd_gla": 1.0, "hmkd_hfa": 6.0}
    # anchor frozen: the teacher-side heads are fixed (q / k at the identity) and the student RRB has no affine BN
    fz, ref = _module(), _module(anchor="none")
    frozen = {n for n, p in fz.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("gla.t_", "hfa.t_proj", "hfa.rrb_t")) for n in frozen)
    assert torch.equal(fz.gla.t_attn.query.weight, torch.eye(8)) and not fz.hfa.rrb_s.norm.affine
    assert all(p.requires_grad for p in ref.parameters()) and ref.hfa.rrb_s.norm.affine
    # taps
    assert LOSSES.get("hmkd").taps({}) == (["stage1", "stage3"], ["layer1", "layer3"])
    assert LOSSES.get("hmkd").taps({"gla_student_tap": "layer1", "hfa_student_tap": "layer3"}) == (
        ["layer1", "layer3"], ["layer1", "layer3"])


def test_bad_options_are_clear_errors():
    for kw, match in (({"anchor": "x"}, "anchor"), ({"layout": "x"}, "layout"), ({"reduction": "x"}, "reduction"),
                      ({"warp_padding": "x"}, "warp_padding"), ({"patch": 0}, "patch"), ({"patch": 11}, "larger"),
                      ({"patch": "8"}, "patch")):
        with pytest.raises(ValueError, match=match):
            _module(**kw)
    with pytest.raises(KeyError, match="layer2"):
        _module(hfa_teacher_tap="layer2")


def test_anchoring_prevents_collapse_that_the_reference_allows():
    """Q3: train only the heads (Adam, 150 steps) on fixed, unrelated teacher and student features. The reference
    (every head trainable) drives both terms to ~0 without the student learning anything; the anchored default
    cannot: the teacher-side targets are fixed, so the terms only fall as far as the student side can fit them."""
    s = {"stage1": (2, 8, 24, 24), "stage3": (2, 8, 12, 12)}
    t = {"layer1": (2, 6, 24, 24), "layer3": (2, 10, 12, 12)}
    inp = _inputs(1, s, t, grad=False)
    ratios = {}
    for anchor in ("frozen", "none"):
        torch.manual_seed(0)
        m = LOSSES.get("hmkd")(_ctx(s, t), anchor=anchor)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        first = None
        for _ in range(150):
            out = m(inp)
            first = first or {k: float(v) for k, v in out.items()}
            opt.zero_grad()
            (out["hmkd_gla"] + out["hmkd_hfa"]).backward()
            opt.step()
        ratios[anchor] = {k: float(v) / first[k] for k, v in m(inp).items()}
    assert all(r < 0.02 for r in ratios["none"].values()), ratios  # collapse
    assert all(r > 0.1 for r in ratios["frozen"].values()), ratios  # no collapse


# ---------------------------------------------------------------------------------------- real students
@pytest.mark.parametrize("student,taps", [
    ("segformer_b0", {}),
    ("pvtv2_b0", {}),
    ("deeplabv3plus_r18", {"gla_student_tap": "layer1", "hfa_student_tap": "layer3"}),
])
def test_real_students_at_non_square_inputs(student, taps):
    """A DeepLabV3+-R18 teacher (layer1 / layer3 taps); the grids come from the input: probed at 64 x 96, run at
    64 x 96 and at 96 x 64 (heads sized by channels only)."""
    from c2vkd.models import build_model

    torch.manual_seed(0)
    d = Distiller(build_model(student, 3), [{"name": "ce"}, {"name": "hmkd", **taps}], num_classes=3,
                  ignore_index=255, teacher=build_model("deeplabv3plus_r18", 3), probe_hw=(64, 96))
    hm = d.losses[1]
    for hw in ((64, 96), (96, 64)):
        hm.zero_grad(set_to_none=True)
        total, terms, _ = d(torch.randn(2, 3, *hw), torch.randint(0, 3, (2, *hw)))
        assert {"hmkd_gla", "hmkd_hfa"} <= set(terms) and all(math.isfinite(float(terms[k]))
                                                              for k in ("hmkd_gla", "hmkd_hfa"))
        total.backward()
        assert all(p.grad is not None for p in hm.parameters() if p.requires_grad)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


# ---------------------------------------------------------------------- report, optimizer + checkpoints
LOSSES_TOY = ("[{name: ce}, {name: hmkd, gla_student_tap: feat, gla_teacher_tap: layer1, hfa_student_tap: feat, "
              "hfa_teacher_tap: feat}]")


def test_report_shows_both_terms(data_root: Path, tmp_path: Path):
    terms = _heads.report_terms(data_root, tmp_path, LOSSES_TOY)
    assert list(terms) == ["ce", "hmkd_gla", "hmkd_hfa"]
    assert sum(r["grad_share"] for r in terms.values()) == pytest.approx(1.0)


def test_heads_are_in_the_align_group_and_resume_exactly(data_root: Path, tmp_path: Path):
    from c2vkd.config import load_config

    cfg = load_config(None, _heads.toy_overrides(data_root, tmp_path, LOSSES_TOY))
    last = _heads.check_heads_train_and_resume_exactly(cfg, tmp_path, "1.hfa.rrb_s.")
    assert {"hmkd_gla", "hmkd_hfa"} <= set(last)


def test_the_preset_builds_on_segformer_b0():
    """methods/hmkd.yaml: CE 1 + hmkd (GLA 1, HFA 1, sum reduction, anchored) on the reference's taps."""
    from c2vkd.config import PACKAGE_CONFIGS, load_config
    from c2vkd.models import build_model

    losses = load_config(PACKAGE_CONFIGS / "methods/hmkd.yaml")["losses"]
    assert [e["name"] for e in losses] == ["ce", "hmkd"]
    torch.manual_seed(0)
    d = Distiller(build_model("segformer_b0", 3), losses, num_classes=3, ignore_index=255,
                  teacher=build_model("deeplabv3plus_r18", 3), probe_hw=(128, 128))
    hm = d.losses[1]
    assert d.term_weights() == {"ce": 1.0, "hmkd_gla": 1.0, "hmkd_hfa": 1.0}
    assert (hm.patch, hm.reduction, hm.anchor, hm.layout, hm.teacher_attention) == (3, "sum", "frozen", "map", True)
    assert hm.gla_taps == ("stage1", "layer1") and hm.hfa_taps == ("stage3", "layer3")
    defaults = LOSSES.get("hmkd")(LossContext(num_classes=3, student_shapes={"stage1": (2, 32, 32, 32),
                                                                             "stage3": (2, 160, 8, 8)},
                                              teacher_shapes={"layer1": (2, 64, 32, 32), "layer3": (2, 256, 16, 16)}))
    assert defaults.extra_repr() == hm.extra_repr()
