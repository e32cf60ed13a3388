"""Model zoo contract: every registered model builds offline, returns input-size logits, exposes its taps."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from c2vkd.models import MODELS, FeatureTaps, PooledBatchNorm2d, build_model, probe_shapes

K = 5
SIZES = [(64, 64), (96, 128), (97, 131)]
EXPECTED_NAMES = {f"{p}_r{d}" for p in ("deeplabv3plus", "deeplabv3", "pspnet") for d in (18, 50, 101)} | {
    "segformer_b0", "segformer_b1", "segformer_b2"}
# feat channels / decoder channels / "feat" stride per model family
FEAT_CHANNELS = {"r18": 512, "r50": 2048, "r101": 2048, "b0": 256, "b1": 512, "b2": 512}
DECODER_CHANNELS = {"deeplabv3plus": 256, "deeplabv3": 256, "pspnet": 512, "segformer_b0": 256,
                    "segformer_b1": 256, "segformer_b2": 768}


@pytest.fixture(scope="module")
def teacher101() -> nn.Module:
    return build_model("deeplabv3plus_r101", K).eval()


@pytest.fixture(scope="module")
def student_b0() -> nn.Module:
    return build_model("segformer_b0", K).eval()


def test_registry_has_all_models_and_suggests() -> None:
    assert EXPECTED_NAMES <= set(MODELS.names())
    with pytest.raises(KeyError, match="segformer_b0"):
        build_model("segformer_bo", K)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_input_size_and_taps(name: str) -> None:
    model = build_model(name, K).eval()
    assert model.family == ("vit" if name.startswith("segformer") else "cnn")
    assert "feat" in model.default_taps
    modules = dict(model.named_modules())
    for alias, path in model.default_taps.items():
        assert path in modules, f"{name}: alias {alias} -> {path} is not a module"
    sizes = SIZES  # every model at every size, odd 97x131 included (512x512: tests/test_models_doc.py)
    with torch.no_grad(), FeatureTaps(model, ["feat", "decoder"]) as taps:
        for h, w in sizes:
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, K, h, w)
            assert torch.isfinite(out).all()
            if (h, w) == (64, 64):
                shapes = {n: tuple(t.shape) for n, t in taps.pop().items()}
    stride = model.output_stride
    assert shapes["feat"] == (1, FEAT_CHANNELS[name.split("_")[-1]], 64 // stride, 64 // stride)
    assert shapes["decoder"][1] == DECODER_CHANNELS.get(name, DECODER_CHANNELS.get(name.split("_")[0]))
    assert stride == (32 if name.startswith("segformer") else 8 if name.startswith("pspnet") else 16)


def test_teacher_r101_default_tap_shapes(teacher101: nn.Module) -> None:
    names = ["feat", "layer1", "layer2", "layer3", "layer4", "aspp", "decoder"]
    shapes = probe_shapes(teacher101, names, (128, 128), batch=2)
    assert shapes == {
        "feat": (2, 2048, 8, 8), "layer1": (2, 256, 32, 32), "layer2": (2, 512, 16, 16),
        "layer3": (2, 1024, 8, 8), "layer4": (2, 2048, 8, 8), "aspp": (2, 256, 8, 8),
        "decoder": (2, 256, 32, 32)}
    assert teacher101.default_taps["feat"] == "backbone.layer4"
    # method.md section 2: teacher layer4 [B, 2048, 32, 32] at 512x512
    assert teacher101.output_stride == 16


def test_student_b0_default_tap_shapes(student_b0: nn.Module) -> None:
    shapes = probe_shapes(student_b0, ["feat", "stage1", "stage2", "stage3", "stage4", "decoder"], (128, 128))
    assert shapes == {
        "feat": (2, 256, 4, 4), "stage1": (2, 32, 32, 32), "stage2": (2, 64, 16, 16),
        "stage3": (2, 160, 8, 8), "stage4": (2, 256, 4, 4), "decoder": (2, 256, 32, 32)}


def test_output_stride_8_vs_16() -> None:
    m16 = build_model("deeplabv3plus_r18", K)
    m8 = build_model("deeplabv3plus_r18", K, output_stride=8)
    s16 = probe_shapes(m16, ["feat", "layer3", "aspp"], (128, 128))
    s8 = probe_shapes(m8, ["feat", "layer3", "aspp"], (128, 128))
    assert s16["feat"][-2:] == (8, 8) and s8["feat"][-2:] == (16, 16)
    assert s16["layer3"][-2:] == (8, 8) and s8["layer3"][-2:] == (16, 16)
    assert m8.output_stride == 8 and m16.output_stride == 16
    # ASPP rates (6, 12, 18) at OS16, doubled at OS8
    assert [m16.aspp.convs[i][0].dilation[0] for i in (1, 2, 3)] == [6, 12, 18]
    assert [m8.aspp.convs[i][0].dilation[0] for i in (1, 2, 3)] == [12, 24, 36]
    # dilated stages: the first conv of the first block keeps the previous dilation (torchvision/timm)
    l4 = m16.backbone.layer4
    assert l4[0].conv1.dilation == (1, 1) and l4[0].conv2.dilation == (2, 2) and l4[1].conv1.dilation == (2, 2)
    assert m8.backbone.layer3[0].conv1.dilation == (1, 1) and m8.backbone.layer4[0].conv1.dilation == (2, 2)
    assert m8.backbone.layer4[1].conv1.dilation == (4, 4)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus_r18", K, output_stride=32)


@pytest.mark.parametrize("name", ["deeplabv3plus_r101", "deeplabv3_r18", "pspnet_r18"])
def test_batch1_train_mode(name: str, teacher101: nn.Module) -> None:
    """The pooled-BN pitfall: ASPP image pooling / PSP 1x1 bin see one value per channel at batch 1."""
    model = teacher101 if name == "deeplabv3plus_r101" else build_model(name, K)
    model.train()
    try:
        if name == "deeplabv3plus_r101":  # forward only: R101 backward on 2 CPU cores costs seconds
            with torch.no_grad():
                out = model(torch.randn(1, 3, 64, 64))
            assert out.shape == (1, K, 64, 64) and torch.isfinite(out).all()
            return
        out = model(torch.randn(1, 3, 64, 64))
        assert out.shape == (1, K, 64, 64)
        out.mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_pooled_batchnorm_fallback() -> None:
    bn = PooledBatchNorm2d(4).train()
    bn.running_mean.fill_(1.0)
    y = bn(torch.full((1, 4, 1, 1), 3.0))  # one value per channel: running stats, no update
    assert torch.allclose(bn.running_mean, torch.ones(4))
    assert torch.allclose(y, (torch.full((1, 4, 1, 1), 3.0) - 1.0) / torch.sqrt(torch.tensor(1.0 + bn.eps)))
    bn(torch.randn(2, 4, 1, 1))  # two values: ordinary BatchNorm, statistics update
    assert not torch.allclose(bn.running_mean, torch.ones(4))


def test_segformer_matches_hf_model_and_runs_encoder_once(student_b0: nn.Module) -> None:
    from transformers import SegformerForSemanticSegmentation

    ref = SegformerForSemanticSegmentation(student_b0.config).eval()
    ref.load_state_dict(student_b0.state_dict())  # identical parameter names
    calls = []
    handle = student_b0.segformer.stages[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        ours = student_b0(x)
        theirs = F.interpolate(ref(pixel_values=x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(ours, theirs)


def test_segformer_input_checks(student_b0: nn.Module) -> None:
    assert student_b0.min_input_size() <= 32
    with torch.no_grad():
        student_b0(torch.randn(1, 3, student_b0.min_input_size(), 40))
        with pytest.raises(ValueError, match="at least"):
            student_b0(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        student_b0(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="unknown SegformerConfig"):
        build_model("segformer_b0", K, drop_path_rat=0.0)
    overridden = build_model("segformer_b0", K, drop_path_rate=0.0)
    assert overridden.config.drop_path_rate == 0.0


def test_segformer_attention_runs_in_fp32_under_cpu_bf16(student_b0: nn.Module, monkeypatch) -> None:
    """models/segformer.py routes SegFormer's attention through ``sdpa_fp32_on_cpu_bf16``: in fp32 it is exactly
    transformers' sdpa (values and gradients bit-identical); under CPU bf16 autocast the attention gets fp32
    inputs, so its output is the exact attention of the bf16 projections rounded once to bf16."""
    import copy

    from c2vkd.models import segformer as sf

    assert student_b0.config._attn_implementation == sf.ATTENTION_IMPL
    ours = copy.deepcopy(student_b0).train()
    plain = copy.deepcopy(student_b0).train()
    plain.config = copy.deepcopy(plain.config)
    for m in plain.modules():  # every HF submodule holds the config object: give them all the copy
        if hasattr(m, "config") and m is not plain:
            m.config = plain.config
    plain.config._attn_implementation = "sdpa"
    x = torch.randn(2, 3, 64, 96)
    grads = []
    for model in (ours, plain):
        torch.manual_seed(0)  # drop path / dropout draw the same masks
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))

    seen = []
    real = sf.sdpa_fp32_on_cpu_bf16

    def spy(module, q, k, v, mask, **kw):
        out, w = real(module, q, k, v, mask, **kw)
        seen.append((q.dtype, out.dtype))
        return out, w
    from transformers import AttentionInterface
    AttentionInterface.register(sf.ATTENTION_IMPL, spy)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ours.eval()(x)
    finally:
        AttentionInterface.register(sf.ATTENTION_IMPL, real)
    assert len(seen) == 8 and all(s == (torch.bfloat16, torch.bfloat16) for s in seen)  # 2 blocks x 4 stages

    q, k, v = (torch.randn(2, 2, 50, 16).to(torch.bfloat16) for _ in range(3))
    attn = ours.segformer.stages[1].blocks[0].attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = real(attn, q, k, v, None, dropout=0.0, scaling=0.25)
    ref = (torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, -1) @ v.double()).transpose(1, 2)
    assert got.dtype == torch.bfloat16
    # one rounding of the fp32 result to bf16 (8 significant bits), nothing more
    assert ((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-6).all()
