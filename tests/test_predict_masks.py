"""`c2vkd predict` class-id masks and captioned side-by-side figures with a legend; `c2vkd data show`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _toy
from c2vkd.cli import main
from c2vkd.data import sample_root
from c2vkd.data.show import GAP, figure, legend, save_mask
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.weights import save_student

PALETTE = [[200, 10, 10], [10, 200, 10], [10, 10, 200]]


def _halves(self, x: torch.Tensor) -> torch.Tensor:
    """Class 2 on the left half of the image, class 0 on the right half (any input size)."""
    logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
    w = x.shape[-1]
    logits[..., 2, :, : w // 2] = 1.0
    logits[..., 0, :, w // 2:] = 1.0
    return logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("masks")
    write_folder(tmp / "ds", {"train": 2, "test": 2}, palette=PALETTE, size_hw=(24, 32))
    save_student(tmp / "student.safetensors", _toy.ToyViT(3), "toy_vit", 3, {}, ["road", "car", "sky"])
    save_student(tmp / "teacher.safetensors", _toy.ToyCNN(3), "toy_cnn", 3, {}, ["road", "car", "sky"])
    (tmp / "c.yaml").write_text("{}\n")
    return tmp


def test_predict_writes_class_id_masks(setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_toy.ToyViT, "forward", _halves)
    out = tmp_path / "out"
    assert main(["predict", str(setup / "c.yaml"), "--checkpoint", str(setup / "student.safetensors"),
                 "--input", str(setup / "ds/images/test"), "--out", str(out), "--set", f"data.root={setup / 'ds'}",
                 "--set", "train.device=cpu", "--set", "teacher.name=toy_cnn",
                 "--set", f"teacher.checkpoint={setup / 'teacher.safetensors'}", "--teacher"]) == 0
    with Image.open(out / "test_000_mask.png") as im:
        assert im.mode == "P"
        ids = np.asarray(im)  # the stored values: class ids, not colours
        pal = np.asarray(im.getpalette()[: 3 * 3]).reshape(3, 3)
    expected = np.zeros((24, 32), dtype=np.uint8)
    expected[:, :16] = 2
    assert (ids == expected).all()
    assert (pal == np.asarray(PALETTE)).all()  # the dataset's colours in the PNG palette
    # the colour PNG is the same prediction through the palette
    colour = np.asarray(Image.open(out / "test_000_pred.png").convert("RGB"))
    assert (colour == np.asarray(PALETTE)[expected]).all()
    with Image.open(out / "test_000_teacher_mask.png") as im:
        t = np.asarray(im)
    assert t.shape == (24, 32) and t.max() < 3


def test_side_by_side_has_captions_and_legend(setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_toy.ToyViT, "forward", _halves)
    out = tmp_path / "o"
    assert main(["predict", str(setup / "c.yaml"), "--checkpoint", str(setup / "student.safetensors"),
                 "--input", str(setup / "ds/images/test/test_001.png"), "--out", str(out),
                 "--set", f"data.root={setup / 'ds'}", "--set", "train.device=cpu"]) == 0
    side = np.asarray(Image.open(out / "test_001_side_by_side.png").convert("RGB"))
    assert side.shape[1] == 2 * 32 + GAP
    # find the panel row: the input image's rows appear unchanged in the left panel
    image = np.asarray(Image.open(setup / "ds/images/test/test_001.png").convert("RGB"))
    top = next(r for r in range(side.shape[0] - 23) if (side[r:r + 24, :32] == image).all())
    assert top > 0  # a caption strip above the panels
    caption, legend_strip = side[:top], side[top + 24:]
    assert (caption != 255).any() and legend_strip.shape[0] > 0  # text drawn above, legend below
    # legend swatches: exactly the predicted classes' colours (sky = 2 and road = 0), not car's
    colours = {tuple(c) for c in legend_strip.reshape(-1, 3)}
    assert tuple(PALETTE[2]) in colours and tuple(PALETTE[0]) in colours and tuple(PALETTE[1]) not in colours


def test_save_mask_and_figure_helpers(tmp_path: Path) -> None:
    ids = np.array([[0, 1], [255, 2]])
    colours = np.asarray(PALETTE, dtype=np.uint8)
    save_mask(ids, colours, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert (np.asarray(im) == ids).all()
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[1, 0] == 0).all() and (rgb[0, 1] == PALETTE[1]).all()  # ignore shows black
    with pytest.raises(ValueError, match="class id 5 but only 3 colours"):
        save_mask(np.array([[5]]), colours, tmp_path / "bad.png")
    fig = figure([np.zeros((10, 20, 3), np.uint8)] * 3, ["a", "b", "c"], [("x", [1, 2, 3])])
    assert fig.shape[1] == 3 * 20 + 2 * GAP
    wide = legend([(f"class {i}", [i, i, i]) for i in range(30)], width=120)
    narrow_rows = wide.shape[0]
    assert narrow_rows > legend([(f"class {i}", [i, i, i]) for i in range(30)], width=1200).shape[0]  # wraps


def test_data_show_writes_gt_overlays_for_every_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "show"
    assert main(["data", "show", str(sample_root()), "--per-split", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3 * 2 and {n.split("_")[0] for n in names} == {"train", "val", "test"}
    assert "wrote 6 ground-truth overlays" in capsys.readouterr().out
    fig = np.asarray(Image.open(out / names[0]).convert("RGB"))
    assert fig.shape[1] == 2 * 240 + GAP and fig.shape[0] > 180  # image | overlay, caption and legend rows
    # a synthetic folder: every ground-truth pixel of class c is coloured towards PALETTE[c] in the overlay
    root = write_folder(tmp_path / "ds", {"val": 1}, palette=PALETTE, size_hw=(24, 32))
    assert main(["data", "show", str(root), "--out", str(tmp_path / "s2"), "--alpha", "1.0"]) == 0
    (f,) = list((tmp_path / "s2").iterdir())
    fig = np.asarray(Image.open(f).convert("RGB"))
    label = np.asarray(Image.open(root / "labels/val/val_000.png"))
    image = np.asarray(Image.open(root / "images/val/val_000.png").convert("RGB"))
    top = next(r for r in range(fig.shape[0] - 23) if (fig[r:r + 24, :32] == image).all())
    overlay = fig[top:top + 24, 32 + GAP:]
    valid = label < 3
    assert (overlay[valid] == np.asarray(PALETTE)[label[valid]]).all()
    assert (overlay[~valid] == image[~valid]).all()  # ignored pixels keep the image
    assert main(["data", "show", str(root), "--splits", "test", "--out", str(tmp_path / "s3")]) == 2
