"""OFA-KD per pixel (losses/ofa.py): the loss against a float64 per-pixel transcription of the reference's
arithmetic (Hao840/OFAKD distillers/ofa.py ``ofa_loss``), the eps = 1 identity with CE + KD, every option reaching
the computation, the dense branches on real students through the Distiller, and the branches as trainable
alignment heads (optimizer ``align`` group, checkpoints, exact resume)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _toy
from _heads import check_heads_train_and_resume_exactly, logit_maps, toy_overrides
from c2vkd.engine.distiller import Distiller
from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses.kd import kd_loss
from c2vkd.losses.ofa import OFABranch, ofa_loss

IGN = 255


def naive_ofa(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, eps: float, temperature: float) -> float:
    """The reference's ``ofa_loss`` on each valid pixel's row of logits (``pred = softmax(z / T)``, ``prod =
    (pred_t + one_hot) ** eps``, ``sum(-(prod - one_hot) * log(pred_s))``), then the mean over those pixels."""
    b, k, h, w = s.shape
    total, n = 0.0, 0
    for i in range(b):
        for r in range(h):
            for c in range(w):
                label = int(y[i, r, c])
                if label == IGN:
                    continue
                ps = torch.softmax(s[i, :, r, c].double() / temperature, 0)
                pt = torch.softmax(t[i, :, r, c].double() / temperature, 0)
                pix = 0.0
                for kk in range(k):
                    onehot = 1.0 if kk == label else 0.0
                    pix += -(float(pt[kk] + onehot) ** eps - onehot) * math.log(float(ps[kk]))
                total += pix
                n += 1
    return total / n


@pytest.mark.parametrize("eps,temperature", [(1.0, 1.0), (1.5, 1.0), (0.7, 3.0), (2.5, 0.5)])
def test_ofa_loss_matches_the_reference_arithmetic_per_pixel(eps, temperature):
    s, t, y = logit_maps(0, k=5, h=6, w=7, ignore_index=IGN)
    got = ofa_loss(s, t, y, eps, temperature, IGN)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(naive_ofa(s, t, y, eps, temperature), rel=1e-10)
    # float32 inputs compute in float32, same value; the teacher gets no gradient
    s32, t32 = s.float().requires_grad_(True), t.float().requires_grad_(True)
    v = ofa_loss(s32, t32, y, eps, temperature, IGN)
    v.backward()
    assert float(v) == pytest.approx(float(got), rel=1e-5) and t32.grad is None and s32.grad.abs().sum() > 0
    # ignore pixels carry no gradient and do not count
    assert (s32.grad.permute(0, 2, 3, 1)[y == IGN] == 0).all()
    # all ignored: zero, finite, with a graph
    z = ofa_loss(s32, t32, torch.full_like(y, IGN), eps, temperature, IGN)
    assert float(z) == 0.0 and z.requires_grad


def test_eps_one_is_kd_plus_the_teacher_entropy():
    """eps = 1: the weights (p_t + y) - y are p_t, the labels cancel, and OFA is the soft cross-entropy
    -sum_k p_t,k log p_s,k = KL(p_t || p_s) + H(p_t): our kd_loss / T^2 plus the teacher's entropy (a constant for
    the student), each averaged over the valid pixels; no T^2 factor. eps != 1 brings the labels in."""
    s, t, y = logit_maps(1, k=5, h=6, w=7, ignore_index=IGN)
    for temperature in (1.0, 2.0):
        ofa = float(ofa_loss(s, t, y, 1.0, temperature, IGN))
        kl = float(kd_loss(s, t, y, temperature=temperature, ignore_index=IGN)) / temperature ** 2
        pt = torch.softmax(t / temperature, 1)
        ent = float(-(pt * torch.log(pt)).sum(1)[y != IGN].mean())
        soft_ce = float(-(pt * torch.log_softmax(s / temperature, 1)).sum(1)[y != IGN].mean())
        assert ofa == pytest.approx(soft_ce, rel=1e-10)
        assert ofa == pytest.approx(kl + ent, rel=1e-6)  # kd_loss computes in float32
        # the labels do not matter at eps = 1 (apart from which pixels are ignored) ...
        y2 = torch.where(y == IGN, y, (y + 1) % 5)
        assert float(ofa_loss(s, t, y2, 1.0, temperature, IGN)) == pytest.approx(ofa, rel=1e-12)
        # ... and they do at eps != 1 (the target enhancement): there the loss mixes in CE-like label terms
        assert float(ofa_loss(s, t, y2, 1.5, temperature, IGN)) != pytest.approx(
            float(ofa_loss(s, t, y, 1.5, temperature, IGN)), rel=1e-3)
    # one-hot teacher: at eps = 1 the loss is exactly CE with the teacher's argmax as label
    hard = F.one_hot(t.argmax(1), 5).permute(0, 3, 1, 2).double() * 1e4
    assert float(ofa_loss(s, hard, y, 1.0, 1.0, IGN)) == pytest.approx(
        float(F.cross_entropy(s, torch.where(y == IGN, y, t.argmax(1)), ignore_index=IGN)), rel=1e-8)


# ------------------------------------------------------------------------------------------- the module
CTX = dict(num_classes=5, ignore_index=IGN, input_size=(32, 32),
           student_shapes={"stage1": (2, 8, 8, 8), "stage2": (2, 12, 4, 4), "stage3": (2, 16, 2, 2),
                           "feat": (2, 16, 2, 2), "logits": (2, 5, 8, 8)},
           teacher_shapes={"logits": (2, 5, 4, 4)})


def _inputs(seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(*v, generator=g).requires_grad_(True) for k, v in CTX["student_shapes"].items()}
    target = torch.randint(0, 5, (2, 32, 32), generator=g)
    target[0, :8] = IGN
    return LossInputs(student_logits=torch.randn(2, 5, 32, 32, generator=g).requires_grad_(True), target=target,
                      teacher_logits=torch.randn(2, 5, 32, 32, generator=g) * 2, student_feats=feats,
                      teacher_feats={"logits": torch.randn(2, 5, 4, 4, generator=g) * 2})


def _run(**kw):
    torch.manual_seed(0)
    mod = LOSSES.get("ofa")(LossContext(**CTX), **{"stages": ["stage1", "stage2", "stage3"], **kw})
    mod.train()
    out = mod(_inputs())
    return mod, out, float(sum(mod.weights[k] * v for k, v in out.items()))


def test_every_option_reaches_the_computation():
    mod, out, base = _run()
    assert set(out) == {"ofa_final", "ofa_stage1", "ofa_stage2", "ofa_stage3"} == set(mod.weights)
    assert mod.eps == [1.0] * 4 and mod.temperature == 1.0 and mod.depths == [3, 2, 1]  # reference defaults
    # the final term is ofa_loss on the logits taps at the teacher's grid (student resized, labels nearest)
    inp = _inputs()
    s = F.interpolate(inp.student_feats["logits"], size=(4, 4), mode="bilinear", align_corners=False)
    y = F.interpolate(inp.target[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    assert float(out["ofa_final"]) == pytest.approx(float(ofa_loss(s, inp.teacher_feats["logits"], y)), rel=1e-6)
    # each option changes the value
    for kw in ({"eps": 1.5}, {"temperature": 2.0}, {"head_channels": 8}, {"depths": [1, 1, 1]}, {"at": "input"},
               {"final_weight": 2.0}, {"stage_weight": 0.5}, {"weight": 3.0}):
        assert _run(**kw)[2] != pytest.approx(base, rel=1e-6), kw
    # a per-stage eps list reaches each stage's term and the last value the final logits
    _, o2, _ = _run(eps=[1.0, 2.0, 1.0, 1.0])
    assert float(o2["ofa_stage2"]) != pytest.approx(float(out["ofa_stage2"]), rel=1e-6)
    for k in ("ofa_final", "ofa_stage1", "ofa_stage3"):
        assert float(o2[k]) == pytest.approx(float(out[k]), rel=1e-6), k
    _, o3, _ = _run(eps=[1.0, 1.0, 1.0, 2.0])
    assert float(o3["ofa_final"]) != pytest.approx(float(out["ofa_final"]), rel=1e-6)
    # the weights: weight * final_weight on the final term, weight * stage_weight on every stage term
    m, _, _ = _run(weight=2.0, final_weight=3.0, stage_weight=0.5)
    assert m.weights == {"ofa_final": 6.0, "ofa_stage1": 1.0, "ofa_stage2": 1.0, "ofa_stage3": 1.0}
    # stages choose the terms (one per stage) and the branches; [] = the final term alone
    m, o, _ = _run(stages=["stage3"])
    assert set(o) == {"ofa_final", "ofa_stage3"} and list(m.branches) == ["ofa_stage3"]
    m, o, _ = _run(stages=[])
    assert set(o) == {"ofa_final"} and len(list(m.parameters())) == 0
    # branch geometry: stage1 (8x8) is finer than the 4x4 grid (one stride-2 block), the others are upsampled
    m, _, _ = _run()
    assert [(b.depth, b.down, b.width) for b in m.branches.values()] == [(3, 1, 16), (2, 0, 16), (1, 0, 16)]
    assert m.branches["ofa_stage1"](torch.randn(2, 8, 8, 8), (4, 4)).shape == (2, 5, 4, 4)
    # taps: the logits on both sides, the stages and the width tap
    assert LOSSES.get("ofa").taps({"stages": ["stage2"]}) == (["logits", "stage2", "feat"], ["logits"])
    assert LOSSES.get("ofa").taps({"stages": ["stage2"], "head_channels": 8, "at": "input"}) == (["stage2"], [])


def test_bad_options_are_clear_errors():
    ctx = LossContext(**CTX)
    cls = LOSSES.get("ofa")
    with pytest.raises(ValueError, match="eps needs one value per stage"):
        cls(ctx, stages=["stage1"], eps=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="eps must be > 0"):
        cls(ctx, stages=["stage1"], eps=0.0)
    with pytest.raises(ValueError, match="temperature"):
        cls(ctx, stages=["stage1"], temperature=0.0)
    with pytest.raises(ValueError, match="give the branch depths"):
        cls(ctx, stages=["feat"])
    with pytest.raises(KeyError, match="stage4"):
        cls(ctx, stages=["stage4"])
    with pytest.raises(ValueError, match="depths"):
        cls(ctx, stages=["stage1"], depths=[1, 2])
    assert cls(ctx, stages=["feat"], depths=[0]).depths == [0]


# --------------------------------------------------------------------------------- real students
@pytest.mark.parametrize("student,stages", [
    ("segformer_b0", ["stage1", "stage2", "stage3", "stage4"]),
    ("pvtv2_b0", ["stage1", "stage2", "stage3", "stage4"]),
    ("deeplabv3plus_r18", ["layer1", "layer2", "layer3", "layer4"]),
])
def test_branches_on_real_students_through_the_distiller(student, stages):
    from c2vkd.models import build_model

    torch.manual_seed(0)
    s = build_model(student, 5)
    d = Distiller(s, [{"name": "ce"}, {"name": "ofa", "stages": stages}], num_classes=5, ignore_index=IGN,
                  teacher=_toy.ToyCNN(5), probe_hw=(64, 64))
    ofa = d.losses[1]
    feat_width = {"segformer_b0": 256, "pvtv2_b0": 256, "deeplabv3plus_r18": 512}[student]
    assert all(b.width == feat_width for b in ofa.branches.values())  # the student's `feat` width
    assert [b.depth for b in ofa.branches.values()] == [3, 2, 1, 0]
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    y[0, :10] = IGN
    total, terms, _ = d(x, y)
    assert {"ofa_final", *(f"ofa_{n}" for n in stages)} <= set(terms)
    assert all(math.isfinite(float(terms[f"ofa_{n}"])) for n in stages)
    total.backward()
    # every branch is trained and the stage taps carry the branches' gradient into the student
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ofa.parameters())
    # each branch predicts at the teacher's logits grid (toy teacher: 1/4 of 64)
    for n in stages:
        branch = ofa.branches[f"ofa_{n}"]
        assert branch.default_size == (16, 16)
        assert branch(torch.randn(1, branch.in_channels, 8, 8), (16, 16)).shape == (1, 5, 16, 16)


def test_a_real_teacher_sets_the_branch_grid():
    """DeepLabV3+-R18 teacher: its logits tap is at stride 4; the SegFormer stage1 branch does not stride."""
    from c2vkd.models import build_model

    torch.manual_seed(0)
    d = Distiller(build_model("segformer_b0", 5), [{"name": "ofa", "stages": ["stage1", "stage4"]}], num_classes=5,
                  ignore_index=IGN, teacher=build_model("deeplabv3plus_r18", 5), probe_hw=(64, 64))
    assert [(b.down, b.default_size) for b in d.losses[0].branches.values()] == [(0, (16, 16)), (0, (16, 16))]
    total, terms, _ = d(torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64)))
    assert set(terms) >= {"ofa_final", "ofa_stage1", "ofa_stage4"} and math.isfinite(float(total))


# ------------------------------------------------------------------------- optimizer + checkpoints
def test_branches_are_in_the_align_group_and_resume_exactly(data_root: Path, tmp_path: Path):
    from c2vkd.config import load_config

    cfg = load_config(None, toy_overrides(data_root, tmp_path,
                                          "[{name: ce}, {name: ofa, stages: [feat], depths: [1], eps: 1.5}]"))
    last = check_heads_train_and_resume_exactly(cfg, tmp_path, "1.branches.ofa_feat.")
    assert {"ofa_final", "ofa_feat"} <= set(last)


def test_ofa_branch_keeps_a_bf16_tap_working_without_autocast():
    b = OFABranch(4, 8, 3, depth=1, down=1, default_size=(2, 2))
    assert b(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)).shape == (1, 3, 2, 2)


def test_the_preset_builds_on_segformer_b0():
    """methods/ofa.yaml: CE 1 + ofa at the reference's defaults (eps 1, T 1, weights 1, stages 1-4, at: stride)."""
    from c2vkd.config import PACKAGE_CONFIGS, load_config
    from c2vkd.models import build_model

    losses = load_config(PACKAGE_CONFIGS / "methods/ofa.yaml")["losses"]
    assert [e["name"] for e in losses] == ["ce", "ofa"]
    torch.manual_seed(0)
    d = Distiller(build_model("segformer_b0", 5), losses, num_classes=5, ignore_index=IGN, teacher=_toy.ToyCNN(5),
                  probe_hw=(64, 64))
    ofa = d.losses[1]
    assert ofa.eps == [1.0] * 5 and ofa.temperature == 1.0 and ofa.at == "stride"
    assert d.term_weights() == {"ce": 1.0, "ofa_final": 1.0, "ofa_stage1": 1.0, "ofa_stage2": 1.0,
                                "ofa_stage3": 1.0, "ofa_stage4": 1.0}
    defaults = LOSSES.get("ofa")(LossContext(**{**CTX, "student_shapes": {**CTX["student_shapes"],
                                                                          "stage4": (2, 16, 1, 1)}}))
    assert defaults.stages == ofa.stages and defaults.eps == ofa.eps and defaults.weights.keys() == ofa.weights.keys()
