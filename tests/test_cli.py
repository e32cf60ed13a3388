"""The `c2vkd` command: parsing, error reporting, data check, taps, config, eval."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _toy  # noqa: F401
from c2vkd.cli import main
from c2vkd.data.synthetic import write_folder


def test_config_command_prints_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "demo.yaml", "--set", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "name: segformer_b0" in out


def test_unknown_key_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "demo.yaml", "--set", "optim.lrr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Did you mean: lr" in err and "Traceback" not in err


def test_train_refuses_distill_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "demo.yaml"]) == 2  # the demo's student stage distils (C2VKD)
    assert "c2vkd distill" in capsys.readouterr().err
    assert main(["distill", "demo_teacher.yaml"]) == 2
    assert "needs at least one distillation loss" in capsys.readouterr().err


def test_data_check_reports_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "ds", {"train": 3}, size_hw=(16, 20))
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    # the split row (3 samples, 3 valid, all 20x16) and one row per class with its pixel count, counted here
    assert re.search(r"^train\s+train\s+3\s+3\s+20x16: 3$", out, re.M), out
    raw = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((root / "labels/train").glob("*.png"))])
    for k, name in enumerate(("a", "b", "c")):
        assert re.search(rf"^\s*{k}\s+{name}\s+{int((raw == k).sum())}\s", out, re.M), (name, out)
    assert re.search(rf"^\s*-\s+\(ignore\)\s+{int((raw == 255).sum())}\s", out, re.M) and "no problems found" in out
    (root / "labels/train/train_001.png").unlink()
    assert main(["data", "check", str(root)]) == 1
    assert "train_001" in capsys.readouterr().out


def test_taps_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["taps", "toy_cnn", "--input", "64x64", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    # module, alias, shape (width 8 -> 16 channels; 64 / stride 4 = 16), stride
    assert re.search(r"^layer2\s+feat\s+\[B, 16, 16, 16\]\s+4$", out, re.M), out
    assert re.search(r"^layer1\s+layer1\s+\[B, 8, 32, 32\]\s+2$", out, re.M), out
    assert main(["taps", "toy_cnx"]) == 2
    assert "toy_cnn" in capsys.readouterr().err


def test_taps_and_info_import_user_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "my_models.py"
    plugin.write_text(
        "import torch\nfrom torch import nn\nfrom c2vkd.models import MODELS\n\n"
        "class Tiny(nn.Module):\n"
        "    family = 'cnn'\n    output_stride = 2\n    default_taps = {'feat': 'body'}\n"
        "    def __init__(self, num_classes):\n        super().__init__()\n"
        "        self.body = nn.Conv2d(3, 6, 3, stride=2, padding=1)\n        self.head = nn.Conv2d(6, num_classes, 1)\n"
        "    def forward(self, x):\n"
        "        return nn.functional.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode='bilinear')\n\n"
        "MODELS.add('cli_tiny_plugin', Tiny)\n")
    from c2vkd.models import MODELS

    try:
        assert main(["taps", "cli_tiny_plugin", "--import", str(plugin), "--input", "32x32"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^body\s+feat\s+\[B, 6, 16, 16\]\s+2$", out, re.M), out  # 32 / stride 2
        assert main(["info", "cli_tiny_plugin", "--import", str(plugin), "--input", "32x32", "--runs", "1",
                     "--num-classes", "2"]) == 0
        # params: conv 3->6 3x3 (162 + 6) + conv 6->2 1x1 (12 + 2) = 182
        assert "182" in capsys.readouterr().out
    finally:
        MODELS.remove("cli_tiny_plugin")  # keep the registry as other tests expect it
    assert main(["taps", "x", "--import", str(tmp_path / "missing.py")]) == 2
    assert "missing.py" in capsys.readouterr().err


def test_eval_command_on_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from c2vkd.engine.weights import save_student

    root = write_folder(tmp_path / "ds", {"train": 2, "test": 2}, size_hw=(16, 24))
    save_student(tmp_path / "m.safetensors", _toy.ToyViT(3), "toy_vit", 3, {}, ["a", "b", "c"])
    rc = main(["eval", "demo.yaml", "--checkpoint", str(tmp_path / "m.safetensors"), "--set", f"data.root={root}",
               "--set", "data.format=folder", "--set", "train.progress=false", "--set", "data.num_workers=0",
               "--split", "test", "--out", str(tmp_path / "m.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "toy_vit" in out
    res = json.loads((tmp_path / "m.json").read_text())
    # every labelled test pixel counted once; mIoU recomputed from the matrix (classes in labels or predictions)
    raw = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((root / "labels/test").glob("*.png"))])
    cm = res["confusion"]
    assert res["split"] == "test" and sum(map(sum, cm)) == int((raw != 255).sum()) == res["num_pixels"]
    ious = [cm[k][k] / (sum(cm[k]) + sum(r[k] for r in cm) - cm[k][k]) for k in range(3)
            if sum(cm[k]) + sum(r[k] for r in cm)]
    assert res["miou"] == pytest.approx(sum(ious) / len(ious), rel=1e-12)
    assert re.search(rf"mIoU\s*:\s*{100 * res['miou']:.2f}", out), out


def test_module_entry_point_help() -> None:
    r = subprocess.run([sys.executable, "-m", "c2vkd", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "distill" in r.stdout and "eval" in r.stdout
