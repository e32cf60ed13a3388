"""Teachers from other toolkits (issue 30): mmsegmentation and CIRKD checkpoints load into c2vkd's models and
give the reference network's outputs; auxiliary heads are dropped loudly; what cannot be mapped is an error
naming the keys and pointing to --import; our default models are unchanged.

The reference networks are plain-torch transcriptions (tests/_toolkit_refs.py) with random weights, saved in
each toolkit's own file format."""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch

import _toolkit_refs as ref
from c2vkd.config import load_config
from c2vkd.engine.weights import build_from_config, load_model_weights
from c2vkd.models import MODELS, WeightLoadError, build_model, load_checkpoint_weights
from c2vkd.models.convert import convert_foreign

pytestmark = pytest.mark.usefixtures("one_thread")
K = 5
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 50, 66, generator=torch.Generator().manual_seed(3))


def _save_mmseg(model: torch.nn.Module, path: Path) -> Path:
    """mmseg's checkpoint layout: {"meta": {...}, "state_dict": {...}} (plus what a weights-only load reads)."""
    torch.save({"meta": {"mmseg_version": "1.2.2", "CLASSES": [f"c{i}" for i in range(K)]},
                "state_dict": model.state_dict()}, path)
    return path


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


# ------------------------------------------------------------------------------------------ mmsegmentation

@pytest.mark.parametrize("family,depth,channels,c1", [
    ("deeplabv3plus", 18, 128, 12),   # mmseg's deeplabv3plus_r18-d8 (layer1 projected to 12 channels)
    ("deeplabv3plus", 101, 512, 48),  # the paper's teacher: deeplabv3plus_r101-d8 (R101 layer counts)
    ("deeplabv3", 18, 128, 0),        # ASPPHead; BasicBlock's undilated conv2
    ("pspnet", 50, 512, 0),           # PSPHead
])
def test_mmseg_checkpoint_gives_the_reference_outputs(tmp_path: Path, family: str, depth: int, channels: int,
                                                      c1: int) -> None:
    theirs = ref.mmseg_model(family, depth, K, channels=channels, c1_channels=c1 or 48)
    path = _save_mmseg(theirs, tmp_path / "mmseg.pth")
    ours = build_model(f"{family}_r{depth}_v1c", K, pretrained=str(path)).eval()
    x = _x()
    with torch.no_grad():
        _same(ours(x), theirs(x))


def test_mmseg_d16_multigrid_config_with_kwargs(tmp_path: Path) -> None:
    """-d16-mg124 configs: the weights cannot tell the stride, so output_stride / multi_grid are kwargs."""
    theirs = ref.mmseg_model("deeplabv3", 50, K, channels=512, d16_mg124=True)
    path = _save_mmseg(theirs, tmp_path / "mmseg.pth")
    ours = build_model("deeplabv3_r50_v1c", K, output_stride=16, multi_grid=[1, 2, 4], pretrained=str(path)).eval()
    x = _x()
    with torch.no_grad():
        _same(ours(x), theirs(x))


def test_mmseg_v1b_backbone_implies_name_and_kwargs(tmp_path: Path) -> None:
    """mmseg's ``r18b`` configs (7x7 stem): the pure mapping names our model and the kwargs it needs."""
    theirs = ref.mmseg_model("deeplabv3plus", 18, K, channels=128, c1_channels=12, deep_stem=False)
    sd = theirs.state_dict()
    fc = convert_foreign(sd)
    assert fc is not None and fc.arch == "deeplabv3plus_r18"
    assert fc.kwargs == {"layout": "mmseg", "output_stride": 8, "aspp_channels": 128, "decoder_channels": 128,
                         "low_level_channels": 12}
    assert fc.dropped == sorted(k for k in sd if k.startswith("auxiliary_head."))
    assert fc.source == "mmsegmentation DeepLabV3+ on ResNetV1b-18"
    ours = build_model(fc.arch, K, **fc.kwargs, pretrained=str(_save_mmseg(theirs, tmp_path / "m.pth"))).eval()
    x = _x()
    with torch.no_grad():
        _same(ours(x), theirs(x))


def test_mmseg_r101_mapping_is_complete() -> None:
    """Every key of an mmseg deeplabv3plus_r101-d8 checkpoint has a place in deeplabv3plus_r101_v1c and
    vice versa, with equal shapes (R101: 3, 4, 23, 3 blocks)."""
    theirs = ref.mmseg_model("deeplabv3plus", 101, K, channels=512)
    fc = convert_foreign(theirs.state_dict())
    assert fc is not None and (fc.arch, fc.kwargs) == ("deeplabv3plus_r101_v1c", {})
    own = build_model("deeplabv3plus_r101_v1c", K).state_dict()
    assert {k: tuple(v.shape) for k, v in fc.state_dict.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert any(k.startswith("backbone.layer3.22.") for k in own)


def test_imagenet_v1c_backbone_initialises_the_backbone_only() -> None:
    """mmcv's ImageNet ResNetV1c (``stem.*``, ``layer*``, ``fc.*``): a start for training a ``_v1c`` teacher."""
    sd = {**ref.randomize(ref.MMResNet(18)).state_dict(), "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    model = build_model("deeplabv3_r18_v1c", K)
    report = load_checkpoint_weights(model, sd)
    assert report.complete and report.dropped == ["fc.bias", "fc.weight"]
    assert report.not_in_scope and not any(k.startswith("backbone.") for k in report.not_in_scope)
    torch.testing.assert_close(model.backbone.stem[6].weight, sd["stem.6.weight"], rtol=0, atol=0)


def test_auxiliary_head_is_dropped_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    theirs = ref.mmseg_model("deeplabv3", 18, K, channels=128)
    aux = sorted(k for k in theirs.state_dict() if k.startswith("auxiliary_head."))
    model = build_model("deeplabv3_r18_v1c", K)
    with caplog.at_level(logging.WARNING, logger="c2vkd"):
        report = load_checkpoint_weights(model, _save_mmseg(theirs, tmp_path / "m.pth"))
    assert report.complete and report.dropped == aux and "mmsegmentation DeepLabV3 on ResNetV1c-18" in report.format
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"dropping {len(aux)} tensors of its training-only auxiliary head" in warning


# ---------------------------------------------------------------------------------------------------- CIRKD

@pytest.mark.parametrize("depth,deep_stem", [(18, True), (101, True), (50, False)])
def test_cirkd_deeplabv3_gives_the_reference_outputs(tmp_path: Path, depth: int, deep_stem: bool) -> None:
    theirs = ref.cirkd_deeplabv3(depth, K, deep_stem)
    path = tmp_path / "deeplabv3_citys_best_model.pth"
    torch.save(theirs.state_dict(), path)  # CIRKD's save_checkpoint: the bare state dict
    fc = convert_foreign(theirs.state_dict())
    expected = (f"deeplabv3_r{depth}_cirkd", {}) if deep_stem else \
        (f"deeplabv3_r{depth}", {"output_stride": 8, "aspp_channels": 512})
    assert fc is not None and (fc.arch, fc.kwargs) == expected
    ours = build_model(fc.arch, K, **fc.kwargs, pretrained=str(path)).eval()
    x = _x()
    from c2vkd.models import FeatureTaps

    with torch.no_grad(), FeatureTaps(ours, ["logits"]) as taps:
        out = ours(x)
        low = taps.pop()["logits"]
        theirs_low = theirs(x)
    _same(low, theirs_low)  # CIRKD's own output: logits at 1/8
    # at input size ours upsample with align_corners=False (CIRKD's evaluation uses True: an interpolation detail)
    _same(out, ref.up(theirs_low, x.shape[-2:]))


def test_cirkd_pspnet_is_refused_with_the_reason() -> None:
    sd = {"pretrained.conv1.weight": torch.zeros(64, 3, 3, 3), "pretrained.conv2.weight": torch.zeros(64, 64, 3, 3),
          "head.psp.conv1.0.weight": torch.zeros(512, 2048, 1, 1), "auxlayer.block.0.weight": torch.zeros(1)}
    fc = convert_foreign(sd)
    assert fc is not None and fc.arch is None and fc.dropped == ["auxlayer.block.0.weight"]
    assert "PSPNet" in fc.problem and "--import" in fc.hint()


# ---------------------------------------------------------------------------------------------- errors

def _error(model_name: str, path: Path) -> str:
    with pytest.raises(WeightLoadError) as e:
        load_model_weights(build_model(model_name, K), path, name=model_name, num_classes=K)
    return str(e.value)


def test_mmseg_checkpoint_for_our_default_model_names_the_right_one(tmp_path: Path) -> None:
    path = _save_mmseg(ref.mmseg_model("deeplabv3plus", 18, K, channels=128, c1_channels=12), tmp_path / "m.pth")
    msg = _error("deeplabv3plus_r18", path)
    assert "missing in checkpoint" in msg and "backbone.conv1.weight" in msg
    assert "unexpected in checkpoint" in msg and "backbone.stem.0.weight" in msg
    assert "built by deeplabv3plus_r18_v1c: --teacher deeplabv3plus_r18_v1c=PATH" in msg
    assert "--import" in msg and "experiment.imports" in msg


def test_partial_mmseg_checkpoint_is_an_error(tmp_path: Path) -> None:
    """No silent partial load: a checkpoint without its second decoder conv fails, naming the missing keys."""
    sd = {k: v for k, v in ref.mmseg_model("deeplabv3plus", 18, K, channels=128, c1_channels=12).state_dict().items()
          if not k.startswith("decode_head.sep_bottleneck.1.")}
    path = tmp_path / "partial.pth"
    torch.save({"meta": {}, "state_dict": sd}, path)
    msg = _error("deeplabv3plus_r18_v1c", path)
    assert re.search(r"missing in checkpoint \(10\): decoder\.fuse\.1\.0\.0\.weight", msg)
    assert "unexpected" not in msg and "--import" in msg


def test_unmappable_mmseg_head_is_an_error_pointing_to_import(tmp_path: Path) -> None:
    """An mmseg FCNHead as decode head: no c2vkd model has it; the error names its keys and --import."""
    net = ref.mmseg_model("deeplabv3", 18, K, channels=128)
    net.decode_head = ref.MMFCNHead(512, 128, K)
    path = _save_mmseg(net, tmp_path / "fcn.pth")
    msg = _error("deeplabv3_r18_v1c", path)
    assert "unexpected in checkpoint" in msg and "decode_head.convs.0.conv.weight" in msg
    assert "none of DepthwiseSeparableASPPHead, ASPPHead, PSPHead" in msg
    assert "--import my_teacher.py" in msg and "Bring your own teacher" in msg


# ------------------------------------------------------------------------------------ config / engine path

def test_teacher_checkpoint_from_a_config_loads_the_mmseg_teacher(tmp_path: Path) -> None:
    """What `c2vkd distill --teacher deeplabv3plus_r18_v1c=CKPT` and a YAML teacher section both become."""
    import _toy  # noqa: F401  (registers the toy student)

    theirs = ref.mmseg_model("deeplabv3plus", 18, K, channels=128, c1_channels=12)
    path = _save_mmseg(theirs, tmp_path / "m.pth")
    cfg = load_config(None, ["student.name=toy_vit", "teacher.name=deeplabv3plus_r18_v1c",
                             f"teacher.checkpoint={path}"])
    _, teacher = build_from_config(cfg, K, [f"c{i}" for i in range(K)], torch.device("cpu"))
    x = _x()
    with torch.no_grad():
        _same(teacher(x), theirs(x))


# ------------------------------------------------------------------------------- our models are unchanged

def _digest(name: str) -> tuple[str, str]:
    torch.manual_seed(0)
    sd = build_model(name, K).state_dict()
    keys = hashlib.sha256("\n".join(f"{k}:{list(v.shape)}" for k, v in sd.items()).encode()).hexdigest()[:16]
    values = hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for v in sd.values())).hexdigest()[:16]
    return keys, values


@pytest.mark.parametrize("name,keys,values", [  # recorded before the toolkit options existed
    ("deeplabv3plus_r18", "3303bd4034e5b915", "bcb81aea73e4a709"),
    ("deeplabv3_r18", "da60cf61c3ca7f6d", "81eb98d3c8c02802"),
    ("pspnet_r18", "be7743054902a2e7", "1261e9db10edbb93"),
])
def test_default_teachers_are_bit_identical(name: str, keys: str, values: str) -> None:
    """Same state-dict keys, shapes and seeded initial values as before the deep stem / mmseg layout options."""
    assert _digest(name) == (keys, values)


def test_layout_and_backbone_options_are_checked() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        build_model("deeplabv3_r18", K, layout="mmcv")
    with pytest.raises(ValueError, match="one dilation per layer4 block"):
        build_model("deeplabv3_r18_v1c", K, multi_grid=[1, 2, 4])


def test_docs_wrapped_teacher_example_loads_its_own_checkpoint(tmp_path: Path) -> None:
    """docs/models.md's --import example: a network c2vkd does not build (torchvision FCN) wrapped as it is."""
    import _toy  # noqa: F401
    from torchvision.models.segmentation import fcn_resnet50

    code = re.search(r"<!-- file: my_fcn_teacher.py -->\s*```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert code, "docs/models.md lost its my_fcn_teacher.py example"
    (tmp_path / "my_fcn_teacher.py").write_text(code.group(1))
    tv = ref.randomize(fcn_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=True))
    torch.save(tv.state_dict(), tmp_path / "fcn.pth")
    try:
        cfg = load_config(None, [f"experiment.imports=[{tmp_path / 'my_fcn_teacher.py'}]", "student.name=toy_vit",
                                 "teacher.name=fcn_r50_tv", f"teacher.checkpoint={tmp_path / 'fcn.pth'}"])
        _, teacher = build_from_config(cfg, K, [f"c{i}" for i in range(K)], torch.device("cpu"))
        x = _x()
        with torch.no_grad():
            _same(teacher(x), tv(x)["out"])
    finally:
        MODELS._items.pop("fcn_r50_tv", None)
