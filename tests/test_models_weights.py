"""Local weight loading: round trips from randomly initialised reference modules (HF, torchvision, timm,
NVlabs naming), strictness, clear errors, and no unpickling."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from c2vkd.models import WeightLoadError, build_model, load_checkpoint_weights

K = 5


def _same_params(a: nn.Module, b: nn.Module, prefix_a: str = "", prefix_b: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k.startswith(prefix_a) and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, sb[prefix_b + k[len(prefix_a):]], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- SegFormer

@pytest.fixture(scope="module")
def hf_ref():
    """A random HF SegformerForSemanticSegmentation (MiT-B0 config, K classes) and our config for it."""
    from transformers import SegformerForSemanticSegmentation

    cfg = build_model("segformer_b0", K).config
    torch.manual_seed(1)
    return SegformerForSemanticSegmentation(cfg).eval()


def _hf_logits(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(ref(pixel_values=x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_segformer_save_pretrained_dir_round_trip(hf_ref, tmp_path: Path) -> None:
    hf_ref.save_pretrained(tmp_path / "hf")  # transformers 5 writes the 4.x key names (revert mapping)
    model = build_model("segformer_b0", K, pretrained=str(tmp_path / "hf")).eval()
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _hf_logits(hf_ref, x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin_wrapped"])
def test_segformer_state_dict_files_round_trip(hf_ref, tmp_path: Path, fmt: str) -> None:
    sd = {k: v.contiguous() for k, v in hf_ref.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:  # a DDP training checkpoint: wrapped and "module."-prefixed
        path = tmp_path / "ckpt.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = build_model("segformer_b0", K)
    report = load_checkpoint_weights(model, path)
    assert report.complete and not report.not_in_scope and not report.dropped
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), _hf_logits(hf_ref, x), rtol=0, atol=0)


def test_segformer_imagenet_encoder_checkpoint(tmp_path: Path) -> None:
    """ImageNet MiT (SegformerForImageClassification): encoder loads, classifier dropped, decoder stays random."""
    from transformers import SegformerForImageClassification

    cfg = build_model("segformer_b0", 1000).config
    enc = SegformerForImageClassification(cfg)
    enc.save_pretrained(tmp_path / "mit")
    model = build_model("segformer_b0", K)
    head_before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    report = load_checkpoint_weights(model, tmp_path / "mit")
    assert report.complete
    assert report.dropped == ["classifier.bias", "classifier.weight"]
    assert report.not_in_scope and all(k.startswith("decode_head.") for k in report.not_in_scope)
    assert "encoder only" in report.format
    _same_params(enc.segformer, model.segformer)
    for k, v in model.decode_head.state_dict().items():
        torch.testing.assert_close(v, head_before[k])


def _to_nvlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (HF 5.x) encoder names -> the original NVlabs MixVisionTransformer names (mit_b0.pth)."""
    out: dict[str, torch.Tensor] = {}
    kv: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        if not key.startswith("segformer."):
            continue
        m = re.match(r"segformer\.stages\.(\d)\.(.*)$", key)
        i, rest = int(m.group(1)) + 1, m.group(2)
        b = re.match(r"blocks\.(\d+)\.(.*)$", rest)
        if rest.startswith("patch_embeddings.proj."):
            out[f"patch_embed{i}.proj." + rest.split(".")[-1]] = v
        elif rest.startswith("patch_embeddings.layer_norm."):
            out[f"patch_embed{i}.norm." + rest.split(".")[-1]] = v
        elif rest.startswith("layer_norm."):
            out[f"norm{i}." + rest.split(".")[-1]] = v
        else:
            j, r = b.group(1), b.group(2)
            pre = f"block{i}.{j}."
            r2 = (r.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
                  .replace("attention.q_proj", "attn.q").replace("attention.o_proj", "attn.proj")
                  .replace("attention.sequence_reduction.sequence_reduction", "attn.sr")
                  .replace("attention.sequence_reduction.layer_norm", "attn.norm"))
            if r.startswith(("attention.k_proj", "attention.v_proj")):
                kv.setdefault(pre + "attn.kv." + r.split(".")[-1], {})[r.split(".")[1]] = v
            else:
                out[pre + r2] = v
    for k, parts in kv.items():
        out[k] = torch.cat([parts["k_proj"], parts["v_proj"]], dim=0)
    out["head.weight"] = torch.zeros(1000, 256)
    out["head.bias"] = torch.zeros(1000)
    return out


def test_segformer_nvlabs_mit_checkpoint(hf_ref, tmp_path: Path) -> None:
    torch.save(_to_nvlabs(hf_ref.state_dict()), tmp_path / "mit_b0.pth")
    model = build_model("segformer_b0", K)
    report = load_checkpoint_weights(model, tmp_path / "mit_b0.pth")
    assert report.complete and "NVlabs" in report.format and report.dropped == ["head.weight", "head.bias"]
    _same_params(hf_ref.segformer, model.segformer)


def test_segformer_other_variant_fails_with_mismatch_list(tmp_path: Path) -> None:
    save_file(build_model("segformer_b1", K).state_dict(), str(tmp_path / "b1.safetensors"))
    with pytest.raises(WeightLoadError) as err:
        build_model("segformer_b0", K, pretrained=str(tmp_path / "b1.safetensors"))
    msg = str(err.value)
    assert "does not fit segformer_b0" in msg and "shape mismatch" in msg and "allow_partial" in msg
    assert re.search(r"segformer\.stages\.0\.patch_embeddings\.proj\.weight checkpoint \[64, 3, 7, 7\] "
                     r"vs model \[32, 3, 7, 7\]", msg)


def test_num_classes_mismatch_strict_then_partial(hf_ref, tmp_path: Path) -> None:
    save_file(dict(hf_ref.state_dict()), str(tmp_path / "k5.safetensors"))
    with pytest.raises(WeightLoadError, match=r"decode_head\.classifier\.weight checkpoint \[5, 256, 1, 1\]"):
        build_model("segformer_b0", 19, pretrained=str(tmp_path / "k5.safetensors"))
    model = build_model("segformer_b0", 19, pretrained=str(tmp_path / "k5.safetensors"), allow_partial=True)
    _same_params(hf_ref.segformer, model.segformer)


# ---------------------------------------------------------------------------------------------- teachers

def test_torchvision_resnet50_backbone_import_matches_dilated_torchvision(tmp_path: Path) -> None:
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter

    # OS16 here; OS8 (layer3 and layer4 dilated) is covered by the torchvision DeepLabV3 test below
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    torch.save(tv.state_dict(), tmp_path / "r50.pth")
    model = build_model("deeplabv3plus_r50", K, output_stride=16).eval()
    report = load_checkpoint_weights(model, tmp_path / "r50.pth")
    assert report.complete and report.dropped == ["fc.bias", "fc.weight"]
    assert report.not_in_scope and not any(k.startswith("backbone.") for k in report.not_in_scope)
    getter = IntermediateLayerGetter(tv, {"layer1": "c1", "layer4": "c4"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = getter(x)
        c1, _, _, c4 = model.backbone(x)
    torch.testing.assert_close(c1, ref["c1"])
    torch.testing.assert_close(c4, ref["c4"])


def test_timm_resnet18_backbone_import_matches_timm(tmp_path: Path) -> None:
    import timm

    ref = timm.create_model("resnet18", pretrained=False, output_stride=16).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = build_model("deeplabv3plus_r18", K, pretrained=str(tmp_path / "r18.safetensors")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x)[3], ref.forward_features(x))


def test_torchvision_deeplabv3_checkpoint_gives_torchvision_outputs(tmp_path: Path) -> None:
    from torchvision.models.segmentation import deeplabv3_resnet50

    tv = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=True).eval()
    torch.save(tv.state_dict(), tmp_path / "tv_dlv3.pth")
    model = build_model("deeplabv3_r50", K, output_stride=8).eval()
    report = load_checkpoint_weights(model, tmp_path / "tv_dlv3.pth")
    assert report.complete and report.dropped and all(k.startswith("aux_classifier.") for k in report.dropped)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x)["out"])


def test_full_teacher_checkpoint_round_trip(tmp_path: Path) -> None:
    src = build_model("deeplabv3plus_r18", K).eval()
    with torch.no_grad():  # make BN statistics non-trivial so a missed buffer would show
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in src.state_dict().items()}, "step": 10},
               tmp_path / "full.pt")
    dst = build_model("deeplabv3plus_r18", K, pretrained=str(tmp_path / "full.pt")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_checkpoint_of_other_architecture_fails_clearly(tmp_path: Path) -> None:
    torch.save(build_model("deeplabv3plus_r18", K).state_dict(), tmp_path / "r18_full.pt")
    with pytest.raises(WeightLoadError) as err:
        build_model("deeplabv3plus_r50", K, pretrained=str(tmp_path / "r18_full.pt"))
    msg = str(err.value)
    assert "does not fit deeplabv3plus_r50" in msg
    assert "missing in checkpoint" in msg and "backbone.layer1.0.conv3.weight" in msg
    assert "shape mismatch" in msg and "backbone.layer1.0.conv1.weight" in msg
    assert "unexpected" not in msg  # ResNet-18 names are a subset of ResNet-50 names
    # a student checkpoint into a teacher: nothing matches at all
    save_file(build_model("segformer_b0", K).state_dict(), str(tmp_path / "b0.safetensors"))
    with pytest.raises(WeightLoadError, match="no tensor matches deeplabv3plus_r18"):
        build_model("deeplabv3plus_r18", K, pretrained=str(tmp_path / "b0.safetensors"), allow_partial=True)


class _NotAWeight:
    pass


def test_never_unpickles_and_reports_bad_paths(tmp_path: Path) -> None:
    sd = build_model("segformer_b0", K).state_dict()
    torch.save({"model": sd, "extra": _NotAWeight()}, tmp_path / "pickled.pt")
    with pytest.raises(WeightLoadError, match="weights_only"):
        build_model("segformer_b0", K, pretrained=str(tmp_path / "pickled.pt"))
    with pytest.raises(WeightLoadError, match="not found"):
        build_model("segformer_b0", K, pretrained=str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "config.json").write_text("{}")
    with pytest.raises(WeightLoadError, match="config.json"):
        build_model("segformer_b0", K, pretrained=str(tmp_path / "empty_dir"))
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "meta.pt")
    with pytest.raises(WeightLoadError, match="no tensors found"):
        build_model("segformer_b0", K, pretrained=str(tmp_path / "meta.pt"))
