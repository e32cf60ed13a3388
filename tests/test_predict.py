"""`c2vkd predict`: colour predictions, overlays and teacher side-by-side on a folder of images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _toy
from c2vkd.cli import main
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.weights import save_student
from c2vkd.runners.predict import generated_palette

PALETTE = [[200, 10, 10], [10, 200, 10], [10, 10, 200]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("predict")
    write_folder(tmp / "ds", {"train": 2, "test": 3}, palette=PALETTE, size_hw=(24, 32))
    write_folder(tmp / "ds_nopal", {"train": 1}, size_hw=(24, 32))
    save_student(tmp / "student.safetensors", _toy.ToyViT(3), "toy_vit", 3, {}, ["a", "b", "c"])
    save_student(tmp / "teacher.safetensors", _toy.ToyCNN(3), "toy_cnn", 3, {}, ["a", "b", "c"])
    (tmp / "c.yaml").write_text("{}\n")
    return tmp


def _args(tmp: Path, out: Path, *extra: str, root: str = "ds", inp: Path | None = None) -> list[str]:
    sets = [f"data.root={tmp / root}", "train.device=cpu", "teacher.name=toy_cnn",
            f"teacher.checkpoint={tmp / 'teacher.safetensors'}"]
    return ["predict", str(tmp / "c.yaml"), "--checkpoint", str(tmp / "student.safetensors"),
            "--input", str(inp or tmp / "ds/images/test"), "--out", str(out),
            *(a for s in sets for a in ("--set", s)), *extra]


def _constant(cls: int):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        logits[:, cls] = 1.0
        return logits
    return forward


def _rgb(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_predict_writes_palette_colours_and_overlays(setup: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_toy.ToyViT, "forward", _constant(2))
    monkeypatch.setattr(_toy.ToyCNN, "forward", _constant(1))
    out = tmp_path / "out"
    assert main(_args(setup, out, "--teacher", "--alpha", "0.25")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 * 6
    assert names[:6] == ["test_000_mask.png", "test_000_overlay.png", "test_000_pred.png",
                         "test_000_side_by_side.png", "test_000_teacher_mask.png", "test_000_teacher_pred.png"]
    image = np.asarray(Image.open(setup / "ds/images/test/test_000.png").convert("RGB")).astype(np.float32)
    pred = _rgb(out / "test_000_pred.png")
    assert pred.shape == (24, 32, 3) and (pred == PALETTE[2]).all()  # the dataset's colour of class 2
    assert (_rgb(out / "test_000_teacher_pred.png") == PALETTE[1]).all()
    expected = np.rint(0.75 * image + 0.25 * np.array(PALETTE[2], np.float32)).astype(np.uint8)
    assert np.abs(_rgb(out / "test_000_overlay.png").astype(int) - expected).max() <= 1
    side = _rgb(out / "test_000_side_by_side.png")
    assert side.shape[1] == 3 * 32 + 2 * 8 and side.shape[0] > 24  # three panels, plus caption and legend rows


def test_predict_single_image_generated_palette(setup: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_toy.ToyViT, "forward", _constant(0))
    out = tmp_path / "one"
    assert main(_args(setup, out, root="ds_nopal", inp=setup / "ds/images/test/test_001.png")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test_001_mask.png", "test_001_overlay.png", "test_001_pred.png",
                                                     "test_001_side_by_side.png"]
    colour = generated_palette(3)[0]
    assert (_rgb(out / "test_001_pred.png") == colour).all() and colour.any()  # not black


def test_predict_errors_are_clear(setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(setup, tmp_path / "o", inp=tmp_path / "missing")) == 2
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(_args(setup, tmp_path / "o", inp=tmp_path / "empty")) == 2
    assert "holds no images" in capsys.readouterr().err
    args = _args(setup, tmp_path / "o", "--teacher") + ["--set", "teacher.checkpoint=null"]
    assert main(args) == 2
    assert "--teacher needs teacher.name and teacher.checkpoint" in capsys.readouterr().err
