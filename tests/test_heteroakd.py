"""HeteroAKD* (losses/heteroakd.py, a reconstruction): both third-party readings against a float64 per-pixel,
per-class transcription of their arithmetic (KMM / KEM, then (b) FM2Edge's class-softmax weighted soft CE or (a)
Juicer's spatial-softmax Bernoulli KL), the invariants (w_t in [0, 1], no gradient into the teacher, the hybrid
target or the importance, ignore pixels), every option reaching the computation, the projectors on real students
and through the teacher cache, exact resume, `c2vkd report`'s gradient shares, and the reconstruction label
(`c2vkd methods`, compare tables)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _toy
from _heads import check_heads_train_and_resume_exactly, logit_maps, toy_overrides
from c2vkd.engine.distiller import Distiller
from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses.heteroakd import bernoulli_kl, heteroakd_loss, kmm_kem, projector_bce
from c2vkd.losses.kd import kd_loss

IGN = 255
pytestmark = pytest.mark.usefixtures("one_thread")


def _maps(seed: int, dtype=torch.float64, empty_image: bool = False):
    s, t, y = logit_maps(seed, k=4, h=5, w=6, dtype=dtype, ignore_index=IGN)
    if empty_image:
        y[1] = IGN
    return s, t, y


# ------------------------------------------------------------------------ the naive transcription
def _bce(z: float, y: float) -> float:
    return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def naive_kmm_kem(zs: list[float], zt: list[float], label: int) -> tuple[list[float], list[float], list[float]]:
    """One pixel's (w_t, Z_hyb, I) per class: H = BCE(sigmoid(z), y_k), w_t = H_s / (H_t + H_s), Z_hyb = w_t Z_t +
    (1 - w_t) Z_s, I = H_s + max(0, H_s - H_hyb)."""
    wt, hyb, imp = [], [], []
    for k, (a, b) in enumerate(zip(zs, zt)):
        yk = 1.0 if k == label else 0.0
        hs, ht = _bce(a, yk), _bce(b, yk)
        w = hs / (ht + hs)
        z = w * b + (1 - w) * a
        wt.append(w)
        hyb.append(z)
        imp.append(hs + max(0.0, hs - _bce(z, yk)))
    return wt, hyb, imp


def _pixels(s, t, y):
    b, k, h, w = s.shape
    for i in range(b):
        for r in range(h):
            for c in range(w):
                yield i, r, c, [float(v) for v in s[i, :, r, c]], [float(v) for v in t[i, :, r, c]], int(y[i, r, c])


def naive_fm2edge(s, t, y, temperature: float) -> float:
    """(b): per valid pixel -sum_k softmax_k(I)_k softmax(Z_hyb / T)_k log softmax(Z_s / T)_k, mean over them."""
    total, n = 0.0, 0
    for _, _, _, zs, zt, label in _pixels(s, t, y):
        if label == IGN:
            continue
        _, hyb, imp = naive_kmm_kem(zs, zt, label)
        e_imp = [math.exp(v) for v in imp]
        e_hyb = [math.exp(v / temperature) for v in hyb]
        e_s = [math.exp(v / temperature) for v in zs]
        total += -sum(e_imp[k] / sum(e_imp) * e_hyb[k] / sum(e_hyb) * math.log(e_s[k] / sum(e_s))
                      for k in range(len(zs)))
        n += 1
    return total / n


def naive_juicer(s, t, y, temperature: float) -> float:
    """(a): per image and class, W = exp(I) / sum over the image's valid pixels (0 without one); T^2 * mean over
    (b, k) of sum over pixels of W * KL(Bern(sigmoid(Z_hyb / T)) || Bern(sigmoid(Z_s / T)))."""
    b, k = s.shape[:2]
    imp, div = {}, {}
    for i, r, c, zs, zt, label in _pixels(s, t, y):
        if label == IGN:
            continue
        _, hyb, im = naive_kmm_kem(zs, zt, label)
        for kk in range(k):
            p, q = _sig(hyb[kk] / temperature), _sig(zs[kk] / temperature)
            imp[i, kk, r, c] = im[kk]
            div[i, kk, r, c] = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    total = 0.0
    for i in range(b):
        for kk in range(k):
            keys = [key for key in imp if key[:2] == (i, kk)]
            z = sum(math.exp(imp[key]) for key in keys)
            total += sum(math.exp(imp[key]) / z * div[key] for key in keys)
    return temperature ** 2 * total / (b * k)


NAIVE = {"fm2edge": naive_fm2edge, "juicer": naive_juicer}


@pytest.mark.parametrize("variant", ["fm2edge", "juicer"])
@pytest.mark.parametrize("temperature,empty", [(4.0, False), (1.0, False), (2.5, True)])
def test_heteroakd_loss_matches_the_transcription(variant, temperature, empty):
    s, t, y = _maps(0, empty_image=empty)
    got = heteroakd_loss(s, t, y, temperature=temperature, variant=variant, ignore_index=IGN)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(NAIVE[variant](s, t, y, temperature), rel=1e-10)
    # float32 inputs compute in float32 (same value); only the student side gets a gradient
    s32, t32 = s.float().requires_grad_(True), t.float().requires_grad_(True)
    v = heteroakd_loss(s32, t32, y, temperature=temperature, variant=variant, ignore_index=IGN)
    v.backward()
    assert v.dtype == torch.float32 and float(v.detach()) == pytest.approx(float(got), rel=1e-4)
    assert t32.grad is None and s32.grad.abs().sum() > 0
    assert (s32.grad.permute(0, 2, 3, 1)[y == IGN] == 0).all()  # ignore pixels carry no gradient
    # everything ignored: zero, finite, with a graph
    z = heteroakd_loss(s32, t32, torch.full_like(y, IGN), temperature=temperature, variant=variant, ignore_index=IGN)
    assert float(z.detach()) == 0.0 and z.requires_grad
    z.backward()
    assert torch.isfinite(s32.grad).all()


def test_kmm_kem_matches_the_transcription_and_carries_no_gradient():
    s, t, y = _maps(1)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    onehot = F.one_hot(torch.where(y == IGN, 0, y), 4).permute(0, 3, 1, 2).double()
    w_t, hyb, imp = kmm_kem(s, t, onehot)
    assert not (w_t.requires_grad or hyb.requires_grad or imp.requires_grad)
    assert ((w_t >= 0) & (w_t <= 1)).all()
    for i, r, c, zs, zt, label in _pixels(s.detach(), t.detach(), torch.where(y == IGN, 0, y)):
        nw, nh, ni = naive_kmm_kem(zs, zt, label)
        for name, got, ref in (("w_t", w_t, nw), ("hyb", hyb, nh), ("imp", imp, ni)):
            assert got[i, :, r, c].tolist() == pytest.approx(ref, rel=1e-10, abs=1e-12), (name, i, r, c)
    # the importance is at least H_s: where the hybrid is worse than the student, I = H_s
    h_s = F.binary_cross_entropy_with_logits(s.detach(), onehot, reduction="none")
    assert (imp >= h_s - 1e-12).all()
    # w_t is 0.5 where both BCEs underflow to 0 (two perfectly right maps), the hybrid is then that map
    sure = 1000 * (2 * onehot - 1)
    w0, h0, _ = kmm_kem(sure, sure, onehot)
    assert (w0 == 0.5).all() and torch.equal(h0, sure)
    # the teacher wins the mix where it is more reliable: a perfect teacher gets w_t -> 1
    w1, _, _ = kmm_kem(s.detach(), 30 * (2 * onehot - 1), onehot)
    assert (w1 > 0.999).all()


@pytest.mark.parametrize("variant", ["fm2edge", "juicer"])
def test_the_gradient_treats_target_and_weights_as_constants(variant):
    """Autograd through heteroakd_loss = the gradient of the same formula with W and Z_hyb frozen."""
    s, t, y = _maps(2)
    s = s.requires_grad_(True)
    T = 3.0
    heteroakd_loss(s, t, y, temperature=T, variant=variant, ignore_index=IGN).backward()
    valid = y != IGN
    onehot = F.one_hot(torch.where(valid, y, 0), 4).permute(0, 3, 1, 2).double()
    _, hyb, imp = kmm_kem(s.detach(), t, onehot)
    s2 = s.detach().clone().requires_grad_(True)
    if variant == "fm2edge":
        per = -(imp.softmax(1) * (hyb / T).softmax(1) * F.log_softmax(s2 / T, 1)).sum(1)
        (per * valid).sum().div(valid.sum()).backward()
    else:
        w = imp.masked_fill(~valid[:, None], float("-inf")).flatten(2).softmax(2).view_as(imp)
        (T ** 2 * (w * bernoulli_kl(hyb / T, s2 / T)).sum((2, 3)).mean()).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-14)


def test_bernoulli_kl_and_projector_bce():
    a, b = torch.randn(50, dtype=torch.float64) * 3, torch.randn(50, dtype=torch.float64) * 3
    p, q = torch.sigmoid(a), torch.sigmoid(b)
    ref = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(bernoulli_kl(a, b), ref)
    assert (bernoulli_kl(a, b) >= -1e-12).all() and float(bernoulli_kl(a, a).abs().max()) < 1e-12
    assert torch.isfinite(bernoulli_kl(torch.tensor([80.0, -80.0]), torch.tensor([-80.0, 80.0]))).all()
    s, _, y = _maps(3)
    valid = y != IGN
    naive = [sum(_bce(zs[k], 1.0 if k == lab else 0.0) for k in range(4)) / 4
             for _, _, _, zs, _, lab in _pixels(s, s, y) if lab != IGN]
    assert float(projector_bce(s, y, IGN)) == pytest.approx(sum(naive) / len(naive), rel=1e-10)
    assert len(naive) == int(valid.sum())


def test_the_loss_computes_in_float32_under_autocast():
    s, t, y = _maps(4, dtype=torch.float32)
    sb, tb = s.bfloat16(), t.bfloat16()
    ref = heteroakd_loss(sb.float(), tb.float(), y, variant="fm2edge", ignore_index=IGN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heteroakd_loss(sb, tb, y, variant="fm2edge", ignore_index=IGN)
        proj = projector_bce(sb, y, IGN)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(ref), rel=1e-6)
    assert proj.dtype == torch.float32 and float(proj) == pytest.approx(float(projector_bce(sb.float(), y, IGN)))


# ------------------------------------------------------------------------------------------- the module
CTX = dict(num_classes=5, ignore_index=IGN, input_size=(32, 32),
           student_shapes={"feat": (2, 16, 2, 2), "stage3": (2, 12, 4, 4), "logits": (2, 5, 8, 8)},
           teacher_shapes={"feat": (2, 10, 4, 4), "decoder": (2, 6, 8, 8), "logits": (2, 5, 4, 4)})


def _inputs(seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    s_feats = {k: torch.randn(*v, generator=g).requires_grad_(True) for k, v in CTX["student_shapes"].items()}
    t_feats = {k: torch.randn(*v, generator=g).requires_grad_(True) for k, v in CTX["teacher_shapes"].items()}
    target = torch.randint(0, 5, (2, 32, 32), generator=g)
    target[0, :8] = IGN
    return LossInputs(student_logits=torch.randn(2, 5, 32, 32, generator=g).requires_grad_(True), target=target,
                      teacher_logits=torch.randn(2, 5, 32, 32, generator=g) * 2, student_feats=s_feats,
                      teacher_feats=t_feats)


def _run(inputs: LossInputs | None = None, **kw):
    """(module, raw terms, weighted total); the terms keep their graph only when ``inputs`` are given."""
    torch.manual_seed(0)
    mod = LOSSES.get("heteroakd")(LossContext(**CTX), **kw)
    mod.train()
    out = mod(inputs or _inputs())
    out = out if inputs is not None else {k: v.detach() for k, v in out.items()}
    return mod, out, float(sum(mod.weights[k] * v.detach() for k, v in out.items()))


TERMS = {"heteroakd", "heteroakd_kd", "heteroakd_proj_s", "heteroakd_proj_t"}


def test_every_option_reaches_the_computation():
    mod, out, base = _run()
    assert set(out) == TERMS == set(mod.weights)
    assert mod.weights == {"heteroakd": 1.0, "heteroakd_kd": 0.1, "heteroakd_proj_s": 1.0, "heteroakd_proj_t": 1.0}
    assert (mod.variant, mod.temperature, mod.kd_temperature, mod.projector) == ("fm2edge", 4.0, 4.0, "conv_bn")
    # the terms are the pure functions on the projectors' maps at the teacher's logits grid (4 x 4)
    inp = _inputs()
    with torch.no_grad():
        z_s = mod.student_proj(inp.student_feats["feat"], (4, 4))
        z_t = mod.teacher_proj(inp.teacher_feats["feat"], (4, 4))
        s = F.interpolate(inp.student_feats["logits"], size=(4, 4), mode="bilinear", align_corners=False)
    y = F.interpolate(inp.target[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    assert z_s.shape == z_t.shape == (2, 5, 4, 4)
    assert float(out["heteroakd"]) == pytest.approx(float(heteroakd_loss(z_s, z_t, y, temperature=4.0)), rel=1e-6)
    assert float(out["heteroakd_kd"]) == pytest.approx(
        float(kd_loss(s, inp.teacher_feats["logits"], y, temperature=4.0)), rel=1e-6)
    assert float(out["heteroakd_proj_s"]) == pytest.approx(float(projector_bce(z_s, y)), rel=1e-6)
    assert float(out["heteroakd_proj_t"]) == pytest.approx(float(projector_bce(z_t, y)), rel=1e-6)
    # each option changes the value
    for kw in ({"variant": "juicer"}, {"temperature": 2.0}, {"kd_temperature": 1.0}, {"projector": "conv_bn_relu"},
               {"projector": "conv"}, {"at": "input"}, {"student_tap": "stage3"}, {"teacher_tap": "decoder"},
               {"kd_weight": 1.0}, {"proj_weight": 0.5}, {"weight": 3.0}):
        assert _run(**kw)[2] != pytest.approx(base, rel=1e-6), kw
    # the variant and T reach the KMM/KEM term itself; kd_temperature only the KD term
    _, o, _ = _run(variant="juicer")
    assert float(o["heteroakd"]) != pytest.approx(float(out["heteroakd"]), rel=1e-3)
    assert all(float(o[k]) == pytest.approx(float(out[k]), rel=1e-6) for k in TERMS - {"heteroakd"})
    _, o, _ = _run(temperature=1.0)
    assert float(o["heteroakd"]) != pytest.approx(float(out["heteroakd"]), rel=1e-3)
    assert float(o["heteroakd_kd"]) != pytest.approx(float(out["heteroakd_kd"]), rel=1e-3)
    _, o, _ = _run(kd_temperature=1.0)
    assert float(o["heteroakd"]) == pytest.approx(float(out["heteroakd"]), rel=1e-6)
    # the projector kinds
    assert [type(m).__name__ for m in _run(projector="conv_bn_relu")[0].student_proj.proj] == \
        ["Conv2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in mod.teacher_proj.proj] == ["Conv2d", "BatchNorm2d"]
    assert _run(projector="conv")[0].student_proj.kind == "conv1x1"
    # at: input puts the projections on the input grid
    assert _run(at="input")[0].student_proj.default_size == (32, 32) and mod.student_proj.default_size == (4, 4)
    # the weights: weight multiplies every term
    m, _, _ = _run(weight=2.0, kd_weight=0.5, proj_weight=3.0)
    assert m.weights == {"heteroakd": 2.0, "heteroakd_kd": 1.0, "heteroakd_proj_s": 6.0, "heteroakd_proj_t": 6.0}
    # taps: logits + the feature tap on each side
    cls = LOSSES.get("heteroakd")
    assert cls.taps({}) == (["logits", "feat"], ["logits", "feat"])
    assert cls.taps({"at": "input", "student_tap": "stage3", "teacher_tap": "decoder"}) == (["stage3"], ["decoder"])


def test_gradients_reach_the_student_and_the_projectors_never_the_teacher():
    inp = _inputs()
    mod, out, _ = _run(inp)
    out["heteroakd"].backward(retain_graph=True)
    # the KMM/KEM term trains the student projector and the student tap, never the teacher projector
    assert inp.student_feats["feat"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.student_proj.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in mod.teacher_proj.parameters())
    sum(out.values()).backward()
    # the teacher projector learns from its own GT supervision; no teacher tensor gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.teacher_proj.parameters())
    assert all(v.grad is None for v in inp.teacher_feats.values())


def test_bad_options_are_clear_errors():
    ctx, cls = LossContext(**CTX), LOSSES.get("heteroakd")
    with pytest.raises(ValueError, match="variant"):
        cls(ctx, variant="paper")
    with pytest.raises(ValueError, match="projector"):
        cls(ctx, projector="mlp")
    with pytest.raises(ValueError, match="temperature"):
        cls(ctx, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        cls(ctx, kd_temperature=-1.0)
    with pytest.raises(KeyError, match="teacher tap 'layer4'"):
        cls(ctx, teacher_tap="layer4")
    with pytest.raises(ValueError, match="'at'"):
        cls(ctx, at="decoder")
    with pytest.raises(ValueError, match="variant"):
        heteroakd_loss(*_maps(0), variant="a")


# --------------------------------------------------------------------------------- real students
@pytest.mark.parametrize("student", ["segformer_b0", "pvtv2_b0", "deeplabv3plus_r18"])
def test_projectors_on_real_students_through_the_distiller(student):
    from c2vkd.models import build_model

    torch.manual_seed(0)
    d = Distiller(build_model(student, 5), [{"name": "ce"}, {"name": "heteroakd"}], num_classes=5, ignore_index=IGN,
                  teacher=_toy.ToyCNN(5), probe_hw=(64, 64))
    h = d.losses[1]
    feat_width = {"segformer_b0": 256, "pvtv2_b0": 256, "deeplabv3plus_r18": 512}[student]
    assert (h.student_proj.in_channels, h.teacher_proj.in_channels) == (feat_width, 16)  # toy teacher feat: 16
    assert h.student_proj.default_size == h.teacher_proj.default_size == (16, 16)  # toy teacher logits: 1/4
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    y[0, :10] = IGN
    total, terms, _ = d(x, y)
    assert TERMS <= set(terms) and all(math.isfinite(float(terms[t])) for t in TERMS)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())


def test_the_preset_builds_and_reads_only_cached_teacher_taps():
    """methods/heteroakd.yaml: CE 1 + heteroakd (fm2edge, T 4, KD 0.1, projectors 1, feat taps, at: stride); the
    teacher taps it reads are among the protocols' cached ones (`c2vkd cache-teacher --taps logits,decoder,feat`)."""
    from c2vkd.config import PACKAGE_CONFIGS, load_config
    from c2vkd.models import build_model

    losses = load_config(PACKAGE_CONFIGS / "methods/heteroakd.yaml")["losses"]
    assert [e["name"] for e in losses] == ["ce", "heteroakd"]
    args = {k: v for k, v in losses[1].items() if k != "name"}
    assert set(LOSSES.get("heteroakd").taps(args)[1]) <= {"logits", "decoder", "feat"}
    torch.manual_seed(0)
    d = Distiller(build_model("segformer_b0", 5), losses, num_classes=5, ignore_index=IGN, teacher=_toy.ToyCNN(5),
                  probe_hw=(64, 64))
    h = d.losses[1]
    assert (h.variant, h.temperature, h.kd_temperature, h.projector, h.at) == ("fm2edge", 4.0, 4.0, "conv_bn", "stride")
    assert d.term_weights() == {"ce": 1.0, "heteroakd": 1.0, "heteroakd_kd": 0.1, "heteroakd_proj_s": 1.0,
                                "heteroakd_proj_t": 1.0}
    defaults = LOSSES.get("heteroakd")(LossContext(**CTX))  # the module's defaults are the preset's
    assert (defaults.variant, defaults.temperature, defaults.projector, defaults.weights) == \
        (h.variant, h.temperature, h.projector, h.weights)


# ------------------------------------------------------------------------- teacher cache, resume, report
def test_the_teacher_cache_serves_it_exactly(data_root: Path, tmp_path: Path):
    """A lossless cache of the teacher's `logits` and `feat` taps gives the live run's terms."""
    from c2vkd.config import load_config
    from c2vkd.engine.trainer import Trainer
    from c2vkd.runners.cache_teacher import build_teacher_cache

    teacher = _toy.write_toy_teacher(tmp_path)
    losses = "[{name: ce}, {name: heteroakd, variant: juicer}]"
    cfg = lambda *x: load_config(None, [*toy_overrides(data_root, tmp_path, losses),  # noqa: E731
                                        f"teacher.checkpoint={teacher}", "data.augment_pool=1", "schedule.iters=2", *x])
    index = build_teacher_cache(cfg(), tmp_path / "cache", topk=0, downsample=1, dtype="float32",
                                taps=["logits", "feat"], progress=False)
    assert set(index["taps"]) == {"logits", "feat"}
    runs = {}
    for name, extra in (("live", ()), ("cached", (f"teacher.cache={tmp_path / 'cache'}",))):
        Trainer(cfg(*extra), run_dir=tmp_path / name).fit()
        runs[name] = [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
    assert len(runs["live"]) == len(runs["cached"]) == 2
    for a, b in zip(runs["live"], runs["cached"]):
        for term in (*TERMS, "loss"):
            assert math.isclose(a[term], b[term], rel_tol=1e-5, abs_tol=1e-6), (term, a[term], b[term])


def test_projectors_are_in_the_align_group_and_resume_exactly(data_root: Path, tmp_path: Path):
    from c2vkd.config import load_config

    cfg = load_config(None, toy_overrides(data_root, tmp_path, "[{name: ce}, {name: heteroakd}]"))
    assert TERMS <= set(check_heads_train_and_resume_exactly(cfg, tmp_path, "1.teacher_proj."))


def test_report_shows_each_terms_gradient_share(data_root: Path, tmp_path: Path):
    from c2vkd.config import dump_config, load_config
    from c2vkd.runners.report import run_report

    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(dump_config(load_config(None, toy_overrides(data_root, tmp_path,
                                                                    "[{name: ce}, {name: heteroakd}]"))))
    terms = run_report(cfg_path, iters=1)["compact"]["terms"]
    assert list(terms) == ["ce", "heteroakd", "heteroakd_kd", "heteroakd_proj_s", "heteroakd_proj_t"]
    assert sum(r["grad_share"] for r in terms.values()) == pytest.approx(1.0)
    assert all(terms[t]["grad_share"] > 0 for t in ("ce", "heteroakd", "heteroakd_kd", "heteroakd_proj_s"))
    # the teacher projector's supervision trains only that projector: no share of the student's gradient
    assert terms["heteroakd_proj_t"]["grad_share"] == 0.0


# --------------------------------------------------------------------------------- reconstruction label
def test_methods_and_compare_tables_label_it_a_reconstruction(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    from c2vkd.cli import main
    from c2vkd.runners.compare_summary import format_markdown, summarize
    from c2vkd.runners.results import display_label, is_reconstruction, record_path

    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln for ln in out[:-1]}
    assert "heteroakd*" in rows and "heteroakd" not in rows and "ofa" in rows and "ofa*" not in rows
    assert "NAME* = a reconstruction" in out[-1]
    assert is_reconstruction("heteroakd") and not is_reconstruction("kd") and not is_reconstruction("nosuch")
    assert display_label("heteroakd") == "heteroakd*" and display_label("ofa") == "ofa"
    assert record_path(tmp_path, "heteroakd", 0) == tmp_path / "heteroakd/seed0.json"  # records keep the name
    # the opt-in is one header line; a later YAML comment does not count
    marked, late = tmp_path / "mine.yaml", tmp_path / "late.yaml"
    marked.write_text("# My method.\n# Reconstruction: no code.\nlosses: []\n")
    late.write_text("# My method.\nlosses: []\n# Reconstruction: no code.\n")
    assert display_label(str(marked)) == "mine*" and display_label(str(late)) == "late"

    def rec(miou: float) -> dict:
        return {"miou": miou, "iou": [miou, miou], "val_curve": [[1, miou]], "wall_s": 1.0}

    results = {"none": {0: rec(0.40), 1: rec(0.41)}, "kd": {0: rec(0.42), 1: rec(0.42)},
               "heteroakd": {0: rec(0.45), 1: rec(0.44)}, "c2vkd": {0: rec(0.47), 1: rec(0.48)}}
    summary = summarize(results, ["a", "b"])
    assert summary["best_prior"] == "heteroakd" and summary["reconstructions"] == ["heteroakd"]  # keys stay plain
    md = format_markdown(summary, title="t")
    assert "| heteroakd* | 44.50 |" in md and "| kd | 42.00 |" in md
    assert "Best prior KD method: **heteroakd***" in md and "c2vkd - heteroakd*:" in md
    assert "| class | none | kd | heteroakd* | c2vkd |" in md and "marks a reconstruction" in md
    assert "marks a reconstruction" not in format_markdown(summarize({k: results[k] for k in ("none", "kd")},
                                                                     ["a", "b"]), title="t")
