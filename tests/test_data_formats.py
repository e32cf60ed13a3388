"""Every dataset format on tiny synthetic trees: indexing, label mapping, and each bad-input error."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2vkd import IGNORE_INDEX
from c2vkd.data import DATASETS, DatasetError, SplitNotFoundError, build_dataset
from c2vkd.data import meta, synthetic


def cfg(fmt: str, root: Path, **kw) -> dict:
    return {"format": fmt, "root": str(root), **kw}


def raw_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def expected(raw: np.ndarray, table: dict[int, int]) -> torch.Tensor:
    out = np.vectorize(lambda v: table[int(v)])(raw)
    return torch.from_numpy(out.astype(np.int64))


def check_all_samples(ds, table: dict[int, int]) -> None:
    assert len(ds) > 0
    for i in range(len(ds)):
        s = ds[i]
        raw = raw_label(ds.samples[i][1])
        assert s["image"].shape == (3, *raw.shape)
        assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.int64
        assert torch.equal(s["label"], expected(raw, table)), ds.samples[i][1]


# ------------------------------------------------------------------------------------------ formats
def test_registry_lists_all_formats():
    assert set(DATASETS.names()) >= {"folder", "camvid", "camvid_segnet", "cityscapes", "ade20k", "voc"}
    with pytest.raises(DatasetError, match="Did you mean: cityscapes"):
        build_dataset(cfg("citiscapes", "/nonexistent"), "train", False)


def test_folder_loads_with_list_order_and_ignore(tmp_path):
    root = synthetic.write_folder(tmp_path / "d", {"train": 3, "val": 2}, ignore_index=7,
                                  palette=[[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    (root / "val.txt").write_text("val_001\nval_000\n")  # list order wins over sorted order
    ds = build_dataset(cfg("folder", root), "val", train=False)
    assert ds.names == ["val_001", "val_000"]
    assert ds.classes == ["a", "b", "c"] and ds.num_classes == 3 and ds.ignore_index == IGNORE_INDEX
    assert ds.palette == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert ds.split == "val" and ds.root == root
    assert all(isinstance(p, Path) for pair in ds.samples for p in pair)
    check_all_samples(ds, {0: 0, 1: 1, 2: 2, 7: IGNORE_INDEX})
    # pixels are the synthetic grey level normalised with ImageNet statistics
    s = ds[0]
    raw = raw_label(ds.samples[0][1])
    assert torch.allclose(s["image"][0], (torch.from_numpy(raw).float() / 255 - 0.485) / 0.229, atol=1e-5)


def test_folder_without_list_takes_all_images_sorted_and_mixed_extensions(tmp_path):
    root = synthetic.write_folder(tmp_path / "d", {"train": 3}, lists=False)
    (root / "images" / "train" / "train_001.png").rename(root / "images" / "train" / "train_001.jpg")
    ds = build_dataset(cfg("folder", root), "train", train=False)
    assert ds.names == ["train_000", "train_001", "train_002"]
    assert ds.samples[1][0].suffix == ".jpg"


def test_config_ignore_index_overrides_classes_json(tmp_path):
    root = synthetic.write_folder(tmp_path / "d", {"train": 2}, ignore_index=9)
    ds = build_dataset(cfg("folder", root, ignore_index=9), "train", False)
    check_all_samples(ds, {0: 0, 1: 1, 2: 2, 9: IGNORE_INDEX})
    ds = build_dataset(cfg("folder", root, ignore_index=200), "train", False)
    with pytest.raises(DatasetError, match=r"train_000\.png.*\[9\]"):
        ds[0]


def test_split_name_mapping(tmp_path):
    root = synthetic.write_folder(tmp_path / "d", {"trainval": 2, "val": 1})
    ds = build_dataset(cfg("folder", root, splits={"train": "trainval", "val": "val"}), "train", False)
    assert ds.split == "trainval" and len(ds) == 2
    assert len(build_dataset(cfg("folder", root), "trainval", False)) == 2  # raw split names pass through


def test_camvid_void_11_to_ignore_with_and_without_classes_json(tmp_path):
    root = synthetic.write_folder(tmp_path / "cv", {"train": 2}, classes=meta.CAMVID_CLASSES, ignore_index=11,
                                  palette=meta.CAMVID_PALETTE, image_ext=".jpg")
    table = {i: i for i in range(11)} | {11: IGNORE_INDEX}
    ds = build_dataset(cfg("camvid", root), "train", False)
    assert ds.num_classes == 11 and ds.classes[0] == "sky"
    check_all_samples(ds, table)
    (root / "classes.json").unlink()  # built-in metadata
    ds = build_dataset(cfg("camvid", root), "train", False)
    assert ds.classes == meta.CAMVID_CLASSES and ds.palette == meta.CAMVID_PALETTE
    check_all_samples(ds, table)
    with pytest.raises(DatasetError, match="classes.json"):
        build_dataset(cfg("folder", root), "train", False)


def test_camvid_rejects_other_class_sets(tmp_path):
    root = synthetic.write_folder(tmp_path / "cv", {"train": 1}, classes=("a", "b"))
    with pytest.raises(DatasetError, match="11-class"):
        build_dataset(cfg("camvid", root), "train", False)


def test_camvid_segnet_layout(tmp_path):
    root = synthetic.write_camvid_segnet(tmp_path / "CamVid")
    ds = build_dataset(cfg("camvid_segnet", root), "test", False)
    assert len(ds) == 2 and ds.names[0] == "0001TP_000000" and ds.classes == meta.CAMVID_CLASSES
    check_all_samples(ds, {i: i for i in range(11)} | {11: IGNORE_INDEX})
    assert len(build_dataset(cfg("camvid_segnet", root), "train", True)) == 3


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = synthetic.write_cityscapes(tmp_path / "cs")
    ds = build_dataset(cfg("cityscapes", root), "val", False)
    assert len(ds) == 4 and ds.num_classes == 19
    assert ds.names[0] == "aachen/aachen_000000_000000"
    assert ds.classes[13] == "car" and ds.palette[0] == [128, 64, 128]
    table = {i: IGNORE_INDEX for i in range(34)} | {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}
    check_all_samples(ds, table)


def test_cityscapes_rejects_train_id_files_and_ignore_override(tmp_path):
    root = synthetic.write_cityscapes(tmp_path / "cs", {"train": 1}, cities=("ulm",))
    lbl = root / "gtFine/train/ulm/ulm_000000_000000_gtFine_labelIds.png"
    raw = raw_label(lbl)
    raw[0, 0] = 255  # a labelTrainIds file would contain 255
    Image.fromarray(raw).save(lbl)
    ds = build_dataset(cfg("cityscapes", root), "train", False)
    with pytest.raises(DatasetError, match=r"ulm_000000_000000_gtFine_labelIds\.png.*\[255\]"):
        ds[0]
    with pytest.raises(DatasetError, match="fixed table"):
        build_dataset(cfg("cityscapes", root, ignore_index=255), "train", False)


def test_ade20k_zero_to_ignore_and_minus_one(tmp_path):
    root = synthetic.write_ade20k(tmp_path / "ade")
    for split in ("train", "training"):
        ds = build_dataset(cfg("ade20k", root), split, False)
        assert ds.split == "training" and len(ds) == 3 and ds.num_classes == 150
    assert ds.classes[0] == "wall" and ds.classes[149] == "flag"
    check_all_samples(build_dataset(cfg("ade20k", root), "val", False), {0: IGNORE_INDEX, 1: 0, 2: 1, 75: 74, 150: 149})
    # ADE images are JPEG: label values must come out exact anyway (labels are PNG)
    with pytest.raises(SplitNotFoundError, match="'test' not found"):
        build_dataset(cfg("ade20k", root), "test", False)


def test_voc_palette_png_border_and_train_aug(tmp_path):
    root = synthetic.write_voc(tmp_path / "voc")
    lbl = root / "VOCdevkit/VOC2012/SegmentationClass/2007_000000.png"
    with Image.open(lbl) as im:
        assert im.mode == "P"  # the real VOC format: indices are ids, colours are display only
    ds = build_dataset(cfg("voc", root), "train", False)
    assert ds.num_classes == 21 and ds.classes[15] == "person" and ds.palette[15] == [192, 128, 128]
    table = {i: i for i in range(21)} | {255: IGNORE_INDEX}
    check_all_samples(ds, table)
    assert (ds[0]["label"] == IGNORE_INDEX).any()
    aug = build_dataset(cfg("voc", root, splits={"train": "train_aug"}), "train", False)
    assert len(aug) == 4 and aug.samples[0][1].parent.name == "SegmentationClassAug"
    assert aug.samples[0][0].suffix == ".jpg"
    check_all_samples(aug, table)
    # root may also point straight at VOC2012
    assert len(build_dataset(cfg("voc", root / "VOCdevkit" / "VOC2012"), "val", False)) == 2


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture
def folder(tmp_path) -> Path:
    return synthetic.write_folder(tmp_path / "d", {"train": 3}, ignore_index=255)


def test_error_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="dataset root not found"):
        build_dataset(cfg("folder", tmp_path / "nope"), "train", False)
    with pytest.raises(DatasetError, match="data.root is not set"):
        build_dataset({"format": "folder"}, "train", False)


def test_error_missing_or_bad_classes_json(folder):
    (folder / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"classes\.json.*cannot parse"):
        build_dataset(cfg("folder", folder), "train", False)
    (folder / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "palette": [[0, 0, 0]]}))
    with pytest.raises(DatasetError, match="palette"):
        build_dataset(cfg("folder", folder), "train", False)
    (folder / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "ignore_index": 1}))
    with pytest.raises(DatasetError, match="collides"):
        build_dataset(cfg("folder", folder), "train", False)
    (folder / "classes.json").unlink()
    with pytest.raises(DatasetError, match=r"classes\.json not found"):
        build_dataset(cfg("folder", folder), "train", False)


def test_error_image_without_label(folder):
    (folder / "labels/train/train_001.png").unlink()
    with pytest.raises(DatasetError, match=r"train_001\.png: image has no label"):
        build_dataset(cfg("folder", folder), "train", False)


def test_error_listed_label_without_image(folder):
    (folder / "images/train/train_002.png").unlink()
    with pytest.raises(DatasetError, match=r"labels/train/train_002\.png: label has no image \(listed in train\.txt\)"):
        build_dataset(cfg("folder", folder), "train", False)


def test_error_lists_every_missing_file(folder):
    (folder / "labels/train/train_000.png").unlink()
    (folder / "labels/train/train_002.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)2 problems in split.*train_000\.png.*train_002\.png"):
        build_dataset(cfg("folder", folder), "train", False)


def test_error_size_mismatch_on_load(folder):
    Image.new("L", (10, 10)).save(folder / "labels/train/train_001.png")
    ds = build_dataset(cfg("folder", folder), "train", False)  # construction stays cheap
    ds[0]
    with pytest.raises(DatasetError, match=r"train_001\.png: label size 10x10 \(WxH\) does not match image size 20x16"):
        ds[1]


def test_error_label_values_out_of_range(folder):
    raw = raw_label(folder / "labels/train/train_000.png")
    raw[0, :2] = [3, 17]
    Image.fromarray(raw).save(folder / "labels/train/train_000.png")
    ds = build_dataset(cfg("folder", folder), "train", False)
    with pytest.raises(DatasetError, match=re.escape("train_000.png: label has values outside the class range: [3, 17]")):
        ds[0]


def test_error_rgb_label(folder):
    Image.new("RGB", (20, 16)).save(folder / "labels/train/train_000.png")
    ds = build_dataset(cfg("folder", folder), "train", False)
    with pytest.raises(DatasetError, match=r"train_000\.png: label must be a single-channel"):
        ds[0]


def test_error_corrupt_image(folder):
    p = folder / "images/train/train_001.png"
    p.write_bytes(p.read_bytes()[:40])  # truncated PNG
    ds = build_dataset(cfg("folder", folder), "train", True)
    with pytest.raises(DatasetError, match=r"images/train/train_001\.png: unreadable or corrupt image"):
        ds[(1, 5)]


def test_error_empty_split(folder):
    (folder / "train.txt").write_text("\n# nothing here\n")
    with pytest.raises(DatasetError, match=r"train\.txt: split is empty"):
        build_dataset(cfg("folder", folder), "train", False)
    (folder / "train.txt").unlink()
    for p in (folder / "images/train").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="split is empty"):
        build_dataset(cfg("folder", folder), "train", False)


def test_error_unknown_split_lists_available(folder):
    with pytest.raises(SplitNotFoundError, match=r"split 'val' not found\. Available: train"):
        build_dataset(cfg("folder", folder), "val", False)


def test_error_wrong_class_count(folder):
    with pytest.raises(DatasetError, match="data.num_classes is 19 but .* has 3 classes"):
        build_dataset(cfg("folder", folder, num_classes=19), "train", False)
    assert build_dataset(cfg("folder", folder, num_classes=3), "train", False).num_classes == 3


def test_error_unknown_config_key(folder):
    with pytest.raises(ValueError, match="unknown key data.batchsize. Did you mean: batch_size"):
        build_dataset(cfg("folder", folder, batchsize=4), "train", False)
    with pytest.raises(ValueError, match="data.train_transform.crop"):
        build_dataset(cfg("folder", folder, train_transform={"crop": 4}), "train", True)


def test_error_missing_label_folder(folder):
    shutil.rmtree(folder / "labels")
    with pytest.raises(DatasetError, match=r"labels/train: label folder"):
        build_dataset(cfg("folder", folder), "train", False)
