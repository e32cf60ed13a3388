"""FSKD* (losses/fskd.py, a reconstruction after bapedragon/iBKD_Seg@d585015's FSKD spec): the soft rank against a
naive float64 transcription of torchsort's l2 soft_rank (sort, pool-adjacent-violators by repeated merging) and its
limits (hard ranks at small strength, the linear regime at large strength), the Spearman term against 1 - rho of
the hard ranks, the global / patch / attention terms against float64 per-element transcriptions, every option
reaching the computation, no gradient into the teacher, the fixed-grid check of the spatial Linear, real SegFormer /
PVTv2 / CNN students, ``c2vkd report`` showing each term, exact resume with the heads, and the ``fskd*`` label."""
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
from c2vkd.losses.fskd import GlobalAlign, cosine_gram, patch_loss, soft_rank, spatial_energy, spearman_loss

# float() of a loss term that carries a graph is intended here (values compared, graphs unused)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")]

S = {"stage3": (2, 6, 4, 6), "stage4": (2, 8, 2, 3)}
T = {"layer3": (2, 5, 4, 6), "feat": (2, 7, 4, 6)}
TERMS = ("fskd_global", "fskd_patch", "fskd_attn")


def _ctx(s=S, t=T) -> LossContext:
    return LossContext(num_classes=3, student_shapes=dict(s), teacher_shapes=dict(t), input_size=(64, 96))


def _inputs(seed: int = 0, s=S, t=T, grad: bool = True) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    sf = {k: torch.randn(*v, generator=g).requires_grad_(grad) for k, v in s.items()}
    tf = {k: (torch.randn(*v, generator=g) * 2).requires_grad_(grad) for k, v in t.items()}
    return LossInputs(student_logits=torch.zeros(2, 3, 8, 8), target=torch.zeros(2, 8, 8, dtype=torch.long),
                      student_feats=sf, teacher_feats=tf)


def _module(**kw):
    torch.manual_seed(0)
    return LOSSES.get("fskd")(_ctx(), **kw)


# ------------------------------------------------------------------------ float64 reference transcriptions
def naive_soft_rank(x: list[float], strength: float) -> list[float]:
    """torchsort's soft_rank(l2): project x / strength onto the permutahedron of (1..n): sort descending, isotonic
    (non-increasing) regression of s - (n, ..., 1) by merging the first adjacent violating pair until none is
    left, rank = s - fit."""
    n = len(x)
    z = [v / strength for v in x]
    order = sorted(range(n), key=lambda i: -z[i])
    s = [z[i] for i in order]
    blocks = [[s[k] - (n - k)] for k in range(n)]
    mean = lambda b: sum(b) / len(b)  # noqa: E731
    merged = True
    while merged:
        merged = False
        for i in range(len(blocks) - 1):
            if mean(blocks[i]) < mean(blocks[i + 1]):
                blocks[i] = blocks[i] + blocks.pop(i + 1)
                merged = True
                break
    fit = [mean(b) for b in blocks for _ in b]
    r = [0.0] * n
    for k, i in enumerate(order):
        r[i] = s[k] - fit[k]
    return r


def naive_energy(x: torch.Tensor) -> list[list[float]]:
    """softmax over positions of mean_c x^2, one image and position at a time."""
    b, c, h, w = x.shape
    out = []
    for bi in range(b):
        e = [sum(float(x[bi, ci, i, j]) ** 2 for ci in range(c)) / c for i in range(h) for j in range(w)]
        m = max(e)
        ex = [math.exp(v - m) for v in e]
        out.append([v / sum(ex) for v in ex])
    return out


def naive_spearman(imp_s, imp_t, strength: float) -> float:
    n = len(imp_s[0])
    tot = 0.0
    for a, b in zip(imp_s, imp_t):
        ra, rb = naive_soft_rank(a, strength), naive_soft_rank(b, strength)
        tot += 6 * sum((u - v) ** 2 for u, v in zip(ra, rb)) / (n * (n * n - 1))
    return tot / len(imp_s)


def naive_gram_mse(s: torch.Tensor, t: torch.Tensor, eps: float) -> float:
    """mean over b, p, q of (cos_s(p, q) - cos_t(p, q))^2, the teacher already on the student's grid."""
    b, _, h, w = s.shape
    n = h * w

    def vecs(x, bi):
        v = [x[bi, :, p // w, p % w] for p in range(n)]
        return [u / max(float(torch.sqrt((u * u).sum())), eps) for u in v]

    tot = 0.0
    for bi in range(b):
        vs, vt = vecs(s, bi), vecs(t, bi)
        for p in range(n):
            for q in range(n):
                tot += (float((vs[p] * vs[q]).sum()) - float((vt[p] * vt[q]).sum())) ** 2
    return tot / (b * n * n)


def naive_align(head: GlobalAlign, x: torch.Tensor) -> torch.Tensor:
    """GELU(Linear over the token axis), reshape, GELU(conv3x3 written as nine shifted channel matmuls)."""
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    b, c, _, _ = x.shape
    ht, wt = head.t_grid
    tok = torch.einsum("mn,bcn->bcm", head.spatial.weight, x.reshape(b, c, -1)) + head.spatial.bias
    y = gelu(tok).reshape(b, c, ht, wt)
    pad = F.pad(y, (1, 1, 1, 1))
    out = head.channel.bias[None, :, None, None].expand(b, -1, ht, wt).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + torch.einsum("oc,bchw->bohw", head.channel.weight[:, :, dy, dx],
                                     pad[:, :, dy:dy + ht, dx:dx + wt])
    return gelu(out)


def naive_terms(mod, inputs) -> dict[str, float]:
    mod = mod.double()
    f = {k: v.detach().double() for k, v in {**inputs.student_feats, **inputs.teacher_feats}.items()}
    g = p = 0.0
    with torch.no_grad():
        for (sn, tn), head in zip(mod.pairs, mod.align):
            s, t = f[sn], f[tn]
            div = s.shape[0] if mod.global_divisor == "batch" else mod.global_divisor
            g += float(((naive_align(head, s) - t) ** 2).mean()) / div
            tr = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
            p += naive_gram_mse(s, tr, mod.eps)
        sa, ta = f[mod.attn_taps[0]], f[mod.attn_taps[1]]
        ta = F.interpolate(ta, size=sa.shape[-2:], mode="bilinear", align_corners=False)
        a = naive_spearman(naive_energy(sa), naive_energy(ta), mod.rank_strength)
    return {"fskd_global": g, "fskd_patch": p, "fskd_attn": a}


# ------------------------------------------------------------------------------------------ soft rank
@pytest.mark.parametrize("strength", [0.05, 0.5, 3.0])
def test_soft_rank_matches_the_naive_transcription(strength):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64)
    x[1, 3] = x[1, 5]  # a tie
    got = soft_rank(x, strength)
    assert got.dtype == torch.float64
    for row, r in zip(x.tolist(), got):
        assert torch.allclose(r, torch.tensor(naive_soft_rank(row, strength), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.sum(1), torch.full((4,), 9 * 10 / 2, dtype=torch.float64), atol=1e-10)
    # float32 agrees
    assert torch.allclose(soft_rank(x.float(), strength).double(), got, atol=1e-4)


def test_soft_rank_limits_and_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64)
    hard = (x.argsort(1).argsort(1) + 1).double()  # ascending: the smallest value has rank 1
    assert torch.allclose(soft_rank(x, 1e-4), hard, atol=1e-9)
    # strength much larger than the spread: the fully pooled (linear) regime (n + 1)/2 + (x - mean) / strength
    big = 1e3
    assert torch.allclose(soft_rank(x, big), 6.5 + (x - x.mean(1, keepdim=True)) / big, atol=1e-12)
    # in between it is neither, and monotone in x
    mid = soft_rank(x, 0.3)
    assert not torch.allclose(mid, hard, atol=1e-2)
    assert torch.equal(mid.argsort(1), x.argsort(1))
    xg = x[:, :6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: soft_rank(a, 0.4), (xg,))
    with pytest.raises(ValueError, match="R, n"):
        soft_rank(x[0])
    with pytest.raises(ValueError, match="strength"):
        soft_rank(x, 0.0)


def test_spearman_loss_is_one_minus_rho_of_the_hard_ranks_in_the_limit():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(3, 10, generator=g, dtype=torch.float64)
    ra, rb = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    assert float(spearman_loss(a, b, 1e-5)) == pytest.approx(float((1 - rho).mean()), abs=1e-9)
    assert float(spearman_loss(a, a, 1e-5)) == pytest.approx(0.0, abs=1e-12)
    assert float(spearman_loss(a, -a, 1e-5)) == pytest.approx(2.0, abs=1e-9)
    # the teacher side gets no gradient, the student side does
    s, t = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    spearman_loss(s, t, 0.5).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        spearman_loss(a[:, :1], b[:, :1])


def test_at_the_specs_strength_the_attention_term_is_a_scaled_mse_of_the_importances():
    """Softmax importances are probabilities (every gap < 1), so the l2 soft rank at strength 1 is fully pooled:
    r = (n + 1)/2 + p - 1/n, and the term is exactly 6 ||p_s - p_t||^2 / (n (n^2 - 1))."""
    g = torch.Generator().manual_seed(4)
    ps = spatial_energy(torch.randn(3, 16, 8, 8, generator=g, dtype=torch.float64) * 3)
    pt = spatial_energy(torch.randn(3, 32, 8, 8, generator=g, dtype=torch.float64) * 3)
    n = 64
    assert torch.allclose(soft_rank(ps, 1.0), (n + 1) / 2 + ps - 1 / n, atol=1e-13)
    expected = (6 * (ps - pt).pow(2).sum(1) / (n * (n * n - 1))).mean()
    assert float(spearman_loss(ps, pt, 1.0)) == pytest.approx(float(expected), rel=1e-10)


# --------------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("kw", [{}, {"global_divisor": 16, "rank_strength": 1e-3, "eps": 0.5}])
def test_terms_match_the_float64_transcription(kw):
    mod = _module(**kw)
    inp = _inputs()
    ref = naive_terms(_module(**kw), inp)
    got32 = mod(inp)
    with torch.no_grad():
        got64 = _module(**kw).double().terms(LossInputs(
            student_logits=inp.student_logits, target=inp.target,
            student_feats={k: v.detach().double() for k, v in inp.student_feats.items()},
            teacher_feats={k: v.detach().double() for k, v in inp.teacher_feats.items()}))
    for term in TERMS:
        assert got64[term].dtype == torch.float64
        assert float(got64[term]) == pytest.approx(ref[term], rel=1e-9), term
        assert float(got32[term]) == pytest.approx(ref[term], rel=1e-4), term
    assert got64["aligned"][0].shape == (2, 5, 4, 6) and got64["aligned"][1].shape == (2, 7, 4, 6)


def test_the_pieces():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    gram = cosine_gram(x)
    assert gram.shape == (2, 15, 15) and torch.allclose(gram.diagonal(dim1=1, dim2=2), torch.ones(2, 15,
                                                                                                   dtype=torch.float64))
    e = spatial_energy(x)
    assert torch.allclose(e, torch.tensor(naive_energy(x), dtype=torch.float64), atol=1e-14)
    # patch: the teacher is resized to the student's grid; identical maps (any channel count) give 0
    assert float(patch_loss(x, torch.cat([x, x], 1))) == pytest.approx(0.0, abs=1e-12)
    big = F.interpolate(x, size=(6, 10), mode="bilinear", align_corners=False)
    assert float(patch_loss(x, big)) == pytest.approx(
        naive_gram_mse(x, F.interpolate(big, size=(3, 5), mode="bilinear", align_corners=False), 1e-8), rel=1e-10)
    # the heads' init: trunc-normal std 0.02 Linear (truncated at +-2 absolute, timm's default) with zero bias,
    # Kaiming fan_out conv
    torch.manual_seed(0)
    head = GlobalAlign((2, 64, 16, 16), (2, 32, 16, 16))
    assert float(head.spatial.bias.abs().max()) == 0.0
    assert float(head.spatial.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert float(head.channel.weight.std()) == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)


# ---------------------------------------------------------------------------------- the module contract
def test_every_option_reaches_the_computation_and_the_teacher_gets_no_gradient():
    inp = _inputs()
    mod = _module()
    out = mod(inp)
    assert set(out) == set(TERMS) == set(mod.weights)
    assert mod.weights == {"fskd_global": 1.0, "fskd_patch": 1.0, "fskd_attn": 40000.0}
    for term in TERMS:  # each term alone reaches the student
        grads = torch.autograd.grad(out[term], list(inp.student_feats.values()), retain_graph=True,
                                    allow_unused=True)
        assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), term
    sum(out.values()).backward()
    assert all(v.grad is None for v in inp.teacher_feats.values())  # detached teacher features
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
    base = {k: float(v) for k, v in out.items()}
    changes = {"pairs": ({"pairs": [["stage3", "layer3"]]}, ("fskd_global", "fskd_patch")),
               "attn_student_tap": ({"attn_student_tap": "stage3"}, ("fskd_attn",)),
               "attn_teacher_tap": ({"attn_teacher_tap": "layer3"}, ("fskd_attn",)),
               "rank_strength": ({"rank_strength": 1e-3}, ("fskd_attn",)),
               "global_divisor": ({"global_divisor": 16}, ("fskd_global",)),
               "eps": ({"eps": 3.0}, ("fskd_patch",))}
    for name, (kw, terms) in changes.items():
        o = _module(**kw)(_inputs())
        for term in terms:
            assert float(o[term]) != pytest.approx(base[term], rel=1e-6), name
        for term in set(TERMS) - set(terms):
            assert float(o[term]) == pytest.approx(base[term], rel=1e-6), (name, term)
    assert _module(global_divisor=4)(_inputs())["fskd_global"].item() == pytest.approx(base["fskd_global"] * 2 / 4)
    m = _module(weight=2.0, global_weight=0.5, patch_weight=3.0, attn_weight=10.0)
    assert m.weights == {"fskd_global": 1.0, "fskd_patch": 6.0, "fskd_attn": 20.0}
    # taps
    assert LOSSES.get("fskd").taps({}) == (["stage3", "stage4"], ["layer3", "feat"])
    assert LOSSES.get("fskd").taps({"pairs": [["layer3", "layer3"], ["layer4", "feat"]],
                                    "attn_student_tap": "layer4"}) == (["layer3", "layer4"], ["layer3", "feat"])


def test_the_spatial_linear_is_sized_at_the_crop_and_another_grid_is_an_error():
    mod = _module()
    assert [(h.spatial.in_features, h.spatial.out_features) for h in mod.align] == [(24, 24), (6, 24)]
    assert [(h.channel.in_channels, h.channel.out_channels) for h in mod.align] == [(6, 5), (8, 7)]
    other = {"stage3": (2, 6, 6, 4), "stage4": (2, 8, 3, 2)}
    with pytest.raises(ValueError, match="fixed crop"):
        mod(_inputs(s=other))
    with pytest.raises(ValueError, match="fixed crop"):
        mod(_inputs(t={"layer3": (2, 5, 4, 6), "feat": (2, 7, 6, 4)}))


def test_bad_options_are_clear_errors():
    for kw, match in (({"pairs": []}, "at least one"), ({"pairs": ["stage3"]}, "pairs"),
                      ({"pairs": [["stage3", "layer3", "x"]]}, "pairs"), ({"rank_strength": 0}, "rank_strength"),
                      ({"global_divisor": "mean"}, "global_divisor"), ({"global_divisor": 0}, "global_divisor"),
                      ({"eps": 0}, "eps")):
        with pytest.raises(ValueError, match=match):
            _module(**kw)
    with pytest.raises(KeyError, match="layer2"):
        _module(pairs=[["stage3", "layer2"]])
    with pytest.raises(KeyError, match="stage1"):
        _module(attn_student_tap="stage1")


# ---------------------------------------------------------------------------------------- real students
@pytest.mark.parametrize("student,kw", [
    ("segformer_b0", {}),
    ("pvtv2_b0", {}),
    ("deeplabv3plus_r18", {"pairs": [["layer3", "layer3"], ["layer4", "feat"]], "attn_student_tap": "layer4"}),
])
def test_real_students_at_a_non_square_crop(student, kw):
    """A DeepLabV3+-R18 teacher (layer3 / feat = layer4, OS 16); probed and run at 64 x 96, then a 96 x 64 step is
    the fixed-crop error."""
    from c2vkd.models import build_model

    torch.manual_seed(0)
    d = Distiller(build_model(student, 3), [{"name": "ce"}, {"name": "fskd", **kw}], num_classes=3,
                  ignore_index=255, teacher=build_model("deeplabv3plus_r18", 3), probe_hw=(64, 96))
    fs = d.losses[1]
    total, terms, _ = d(torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96)))
    assert set(TERMS) <= set(terms) and all(math.isfinite(float(terms[k])) for k in TERMS)
    total.backward()
    assert all(p.grad is not None for p in fs.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    with pytest.raises(ValueError, match="fixed crop"):
        d(torch.randn(2, 3, 96, 64), torch.randint(0, 3, (2, 96, 64)))


# ---------------------------------------------------------------------- report, optimizer + checkpoints
LOSSES_TOY = ("[{name: ce}, {name: kd, at: input}, {name: fskd, pairs: [[feat, feat]], attn_student_tap: feat, "
              "attn_teacher_tap: feat, rank_strength: 0.001}]")


def test_report_shows_each_term(data_root: Path, tmp_path: Path):
    terms = _heads.report_terms(data_root, tmp_path, LOSSES_TOY)
    assert list(terms) == ["ce", "kd", *TERMS]
    assert sum(r["grad_share"] for r in terms.values()) == pytest.approx(1.0)


def test_heads_are_in_the_align_group_and_resume_exactly(data_root: Path, tmp_path: Path):
    from c2vkd.config import load_config

    cfg = load_config(None, _heads.toy_overrides(data_root, tmp_path, LOSSES_TOY))
    last = _heads.check_heads_train_and_resume_exactly(cfg, tmp_path, "2.align.0.spatial.")
    assert set(TERMS) <= set(last)


# ------------------------------------------------------------------------------ preset and label
def test_the_preset_builds_on_segformer_b0():
    """methods/fskd.yaml: CE 1 + KD 1 (T 1, input resolution, valid pixels) + fskd (1 / 1 / 40000, the spec's
    pairs); the module's defaults are the preset's."""
    from c2vkd.config import PACKAGE_CONFIGS, load_config
    from c2vkd.models import build_model

    losses = load_config(PACKAGE_CONFIGS / "methods/fskd.yaml")["losses"]
    assert [e["name"] for e in losses] == ["ce", "kd", "fskd"]
    assert {k: losses[1][k] for k in ("temperature", "at", "mask_ignore")} == {"temperature": 1.0, "at": "input",
                                                                               "mask_ignore": True}
    torch.manual_seed(0)
    d = Distiller(build_model("segformer_b0", 3), losses, num_classes=3, ignore_index=255,
                  teacher=build_model("deeplabv3plus_r18", 3), probe_hw=(64, 64))
    fs = d.losses[2]
    assert d.term_weights() == {"ce": 1.0, "kd": 1.0, "fskd_global": 1.0, "fskd_patch": 1.0, "fskd_attn": 40000.0}
    assert fs.pairs == (("stage3", "layer3"), ("stage4", "feat")) and fs.attn_taps == ("stage4", "feat")
    defaults = LOSSES.get("fskd")(LossContext(num_classes=3, student_shapes={"stage3": (2, 160, 4, 4),
                                                                             "stage4": (2, 256, 2, 2)},
                                              teacher_shapes={"layer3": (2, 256, 4, 4), "feat": (2, 512, 4, 4)}))
    assert defaults.extra_repr() == fs.extra_repr() and defaults.weights == fs.weights


def test_methods_labels_it_a_reconstruction(capsys: pytest.CaptureFixture[str]):
    from c2vkd.cli import main
    from c2vkd.runners.results import display_label, is_reconstruction

    assert main(["methods"]) == 0
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[:-1]}
    assert "fskd*" in rows and "fskd" not in rows
    assert is_reconstruction("fskd") and display_label("fskd") == "fskd*"
