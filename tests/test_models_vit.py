"""timm ViT students (models/vit.py): contract, tap shapes, gradients, odd sizes, local ImageNet weights.

CPU budget: each model runs two no-grad forwards, one list_taps forward and one forward+backward at small
sizes; 512x512 only for pvtv2_b0.
"""
from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

import pytest
import timm
import torch

from c2vkd.models import MODELS, FeatureTaps, build_model, format_taps, list_taps, probe_shapes
from c2vkd.models.weights import WeightLoadError


pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
NEW = ["pvtv2_b0", "pvtv2_b1", "deit_tiny", "deit_small", "swin_t"]
# per model: stage channels, stride of each stage, pad multiple (1 = none; taps use ceil(H/s))
SPEC = {
    "pvtv2_b0": ((32, 64, 160, 256), (4, 8, 16, 32), 1),
    "pvtv2_b1": ((64, 128, 320, 512), (4, 8, 16, 32), 1),
    "deit_tiny": ((192,) * 4, (16,) * 4, 16),
    "deit_small": ((384,) * 4, (16,) * 4, 16),
    "swin_t": ((96, 192, 384, 768), (4, 8, 16, 32), 32),
}
TAPS = ["feat", "stage1", "stage2", "stage3", "stage4", "decoder"]
# narrow decoders keep the 2-core CPU budget (same code paths; the encoders are the real ones)
LIGHT = {"pvtv2_b0": {"fpn_channels": 32, "head_channels": 16}, "pvtv2_b1": {"fpn_channels": 32, "head_channels": 16},
         "swin_t": {"fpn_channels": 32, "head_channels": 16}, "deit_tiny": {"decoder_channels": (32, 16)},
         "deit_small": {"decoder_channels": (32, 16)}}


def expected_taps(name: str, h: int, w: int, batch: int, decoder: int = 16) -> dict[str, tuple[int, ...]]:
    chans, strides, pad = SPEC[name]
    hp, wp = math.ceil(h / pad) * pad, math.ceil(w / pad) * pad
    out = {f"stage{i + 1}": (batch, c, math.ceil(hp / s), math.ceil(wp / s))
           for i, (c, s) in enumerate(zip(chans, strides))}
    out["feat"] = out["stage4"]
    out["decoder"] = (batch, decoder, math.ceil(hp / 4), math.ceil(wp / 4))
    return out


@pytest.mark.parametrize("name", NEW)
def test_contract_sizes_taps_and_gradients(name: str) -> None:
    assert name in MODELS.names()
    model = build_model(name, K, **LIGHT[name])
    sig = inspect.signature(type(model).__init__).parameters
    width = sig["head_channels"].default if "head_channels" in sig else sig["decoder_channels"].default[-1]
    assert width == 128  # the documented decoder width of the registered model
    assert model.family == "vit" and model.arch == name
    assert model.output_stride == SPEC[name][1][-1]
    assert set(TAPS) <= set(model.default_taps) and model.default_taps["feat"] == "stage4"
    assert "Taps" in (type(model).__doc__ or "")  # shapes documented in the class docstring
    # three sizes, one pass each: 97x131 (eval forward), 96x128 (`c2vkd taps`' list_taps), 64x64 (training)
    model.eval()
    with torch.no_grad(), FeatureTaps(model, TAPS) as taps:
        out = model(torch.randn(1, 3, 97, 131))
        assert out.shape == (1, K, 97, 131) and torch.isfinite(out).all()
        got = {n: tuple(t.shape) for n, t in taps.pop().items()}
        assert got == expected_taps(name, 97, 131, 1)
    rows = {t.name: t for t in list_taps(model, (96, 128))}  # every alias shows up with its shape
    exp = expected_taps(name, 96, 128, 1)
    for alias in TAPS:
        assert rows[model.default_taps[alias]].shape == exp[alias]
        assert alias in rows[model.default_taps[alias]].alias.split(",")
    assert "stage4" in format_taps(list(rows.values()), aliased_only=True)
    # training step at 64x64: logits at input size, taps, and every parameter gets a finite gradient
    # (so DDP needs no find_unused_parameters)
    model.train()
    with FeatureTaps(model, TAPS) as taps:
        out = model(torch.randn(1, 3, 64, 64))
        assert {n: tuple(t.shape) for n, t in taps.pop().items()} == expected_taps(name, 64, 64, 1)
    assert out.shape == (1, K, 64, 64)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert {id(p) for p in model.decode_head_parameters()} == {id(p) for p in model.decode_head.parameters()}


def test_pvtv2_b0_512_and_min_size() -> None:
    model = build_model("pvtv2_b0", 19, **LIGHT["pvtv2_b0"]).eval()
    shapes = probe_shapes(model, TAPS, (512, 512), batch=1)
    assert shapes == {"feat": (1, 256, 16, 16), "stage1": (1, 32, 128, 128), "stage2": (1, 64, 64, 64),
                      "stage3": (1, 160, 32, 32), "stage4": (1, 256, 16, 16), "decoder": (1, 16, 128, 128)}
    side = model.min_input_size()
    with torch.no_grad():
        assert model(torch.randn(1, 3, side, side + 3)).shape == (1, 19, side, side + 3)
        with pytest.raises(ValueError, match="too small"):
            model(torch.randn(1, 3, side - 1, 64))


def test_deit_logs_interpolation_once_and_pads(caplog: pytest.LogCaptureFixture) -> None:
    model = build_model("deit_tiny", K, **LIGHT["deit_tiny"]).eval()
    with caplog.at_level(logging.INFO, logger="c2vkd.models.vit"), torch.no_grad():
        model(torch.randn(1, 3, 32, 48))
        model(torch.randn(1, 3, 32, 48))
        model(torch.randn(1, 3, 20, 30))
    msgs = [r.getMessage() for r in caplog.records if r.name == "c2vkd.models.vit"]
    assert sum("positional embedding" in m and "14x14" in m for m in msgs) == 1
    assert sum("zero-padded" in m for m in msgs) == 1
    # pad-and-crop geometry: zero padding at the bottom/right to 32x32, logits cropped back
    x = torch.randn(1, 3, 20, 30)
    xp = torch.nn.functional.pad(x, (0, 2, 0, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(xp)[..., :20, :30])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="c2vkd.models.vit"), torch.no_grad():
        # the trained 14x14 grid: nothing to say
        build_model("deit_tiny", K, **LIGHT["deit_tiny"]).eval()(torch.randn(1, 3, 224, 224))
    assert not [r for r in caplog.records if "positional embedding" in r.getMessage()]


def test_swin_pad_then_shift_masks_the_wrap_around() -> None:
    """timm rolls then pads; on a map that is not a multiple of the window the shifted-window mask then lets
    the image's bottom rows attend to its top rows. Our block pads first (Swin's segmentation code)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    from c2vkd.models.vit import PadThenShiftSwinBlock

    ref = SwinTransformerBlock(8, (14, 14), num_heads=2, window_size=7, shift_size=3, always_partition=True,
                               dynamic_mask=True).eval()
    ours = SwinTransformerBlock(8, (14, 14), num_heads=2, window_size=7, shift_size=3, always_partition=True,
                                dynamic_mask=True).eval()
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = PadThenShiftSwinBlock
    with torch.no_grad():
        x = torch.randn(1, 14, 14, 8)  # whole windows: both orderings agree
        torch.testing.assert_close(ours(x), ref(x))
        x = torch.randn(1, 12, 14, 8)  # 12 rows: padded to 14
        x2 = x.clone()
        x2[:, 11] = torch.randn(14, 8)  # change the bottom image row (not by a constant: norm1 removes that)
        # the top row may only see rows 0..2 (its own shifted window region), never the bottom row
        assert torch.allclose(ours(x)[:, 0], ours(x2)[:, 0])
        assert not torch.allclose(ref(x)[:, 0], ref(x2)[:, 0])  # the timm ordering leaks (why we override)


@pytest.mark.parametrize("name,timm_name,kwargs", [
    ("pvtv2_b0", "pvt_v2_b0", {}),
    ("deit_tiny", "deit_tiny_patch16_224", {}),
])
def test_imagenet_encoder_checkpoint_loads(name: str, timm_name: str, kwargs: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ref = timm.create_model(timm_name, pretrained=False, **kwargs)  # with its 1000-class head, as released
    path = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = build_model(name, K, pretrained=str(path))
    for k, v in ref.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(model.state_dict()[f"encoder.{k}"], v), k
    # an encoder checkpoint of another architecture is refused with the keys listed
    with pytest.raises(WeightLoadError, match="does not fit|no tensor matches"):
        build_model("deit_tiny" if name == "pvtv2_b0" else "pvtv2_b0", K, pretrained=str(path))


def test_swin_original_checkpoint_names(tmp_path: Path) -> None:
    """Original microsoft/Swin-Transformer files put ``downsample`` at the end of a stage; timm's documented
    filter moves it (checked by loading a file written in those names)."""
    model = build_model("swin_t", K)
    enc = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    import re

    orig = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
            for k, v in enc.items()}
    orig["head.weight"] = torch.zeros(1000, 768)
    orig["head.bias"] = torch.zeros(1000)
    torch.save({"model": orig}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    fresh = build_model("swin_t", K, pretrained=str(tmp_path / "swin_tiny_patch4_window7_224.pth"))
    for k, v in enc.items():
        assert torch.equal(fresh.state_dict()[f"encoder.{k}"], v), k


def test_full_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model("pvtv2_b0", K)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    again = build_model("pvtv2_b0", K, pretrained=str(tmp_path / "full.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_unknown_variants_are_errors() -> None:
    from c2vkd.models.vit import DeiTSeg, PVTv2Seg

    with pytest.raises(ValueError, match="b0"):
        PVTv2Seg(K, variant="b9")
    with pytest.raises(ValueError, match="tiny"):
        DeiTSeg(K, variant="huge")
