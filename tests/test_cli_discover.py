"""Discoverability: `c2vkd models`, `c2vkd methods`, `c2vkd --version` print real content."""
from __future__ import annotations

import re

import pytest
import torch

import c2vkd
import _toy  # noqa: F401  (registers toy_cnn / toy_vit: they must be listed too)
from c2vkd.cli import main
from c2vkd.config import PACKAGE_CONFIGS
from c2vkd.models import MODELS, build_model


def test_models_lists_every_registered_model_with_params_and_taps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--num-classes", "11"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln and ln.split()[0] in MODELS}
    assert set(rows) == set(MODELS.names())  # every registered model (built-ins and test toys), once
    assert f"{len(MODELS.names())} models; parameters at 11 classes" in out
    for name in ("segformer_b0", "deeplabv3plus_r101", "toy_cnn"):
        params = sum(p.numel() for p in build_model(name, 11).parameters())  # counted on real tensors here
        got = float(rows[name].split()[2])
        assert got == pytest.approx(params / 1e6, abs=0.006), name
    assert "feat=stage4" in rows["segformer_b0"] and "decoder=decode_head.activation" in rows["segformer_b0"]
    assert "feat=backbone.layer4" in rows["deeplabv3plus_r101"] and " cnn " in rows["deeplabv3plus_r101"]
    assert 3.6 < float(rows["segformer_b0"].split()[2]) < 3.8  # MiT-B0 + all-MLP head: ~3.7M


def test_methods_lists_every_preset_with_its_first_comment_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    files = sorted(PACKAGE_CONFIGS.glob("methods/*.yaml"))
    assert len(files) >= 14 and out[-1].startswith(f"{len(files)} presets")
    listed = {ln.split()[0].rstrip("*"): ln.split(None, 1)[1] for ln in out[:-1]}  # NAME*: a reconstruction
    assert sorted(listed) == sorted(p.stem for p in files)
    for p in files:
        first = p.read_text().splitlines()[0].lstrip("#").strip().rstrip(",;:")
        assert listed[p.stem].startswith(first), p.stem
    assert listed["none"].startswith("Student without KD")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"c2vkd {c2vkd.__version__} (torch {torch.__version__.split('+')[0]}")
    assert re.search(r"transformers \d+\.\d+", out) and "timm" in out
