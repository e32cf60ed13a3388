"""Core dataset pieces shared by every format: errors, file decoding, label mapping and :class:`SegDataset`.

Every format (see ``formats.py``) reduces to the same thing: a list of ``(image, label)`` file pairs plus a
256-entry lookup table (LUT) that maps each raw 8-bit label value to a class id in ``[0, K)``, to
``IGNORE_INDEX`` (255), or to ``INVALID`` (a value that must never appear in that format's files).
Keeping the mapping as a table means Cityscapes ids, ADE20K's "minus one", CamVid's void 11 and a VOC
palette PNG are all handled by one code path, one validity check and one histogram routine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from c2vkd import IGNORE_INDEX

INVALID = -1  # LUT entry for raw label values that are errors in this format
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

# Guard against decompression bombs but allow very large aerial/driving frames.
Image.MAX_IMAGE_PIXELS = 1 << 30


class DatasetError(ValueError):
    """A problem with the dataset on disk (or its declared metadata). ``path`` names the offending file."""

    def __init__(self, message: str, path: str | Path | None = None, *, prefix_path: bool = True) -> None:
        self.path = None if path is None else Path(path)
        if prefix_path and path is not None and not message.startswith(str(path)):
            message = f"{path}: {message}"
        super().__init__(message)


class SplitNotFoundError(DatasetError):
    """The requested split does not exist at all (no folder / no list file) - distinct from an empty one."""


@dataclass(frozen=True)
class Problem:
    """One issue found in a dataset: which split, which file, what is wrong."""

    split: str
    path: Path | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"[{self.split}] {where}{self.message}"


@dataclass
class SplitIndex:
    """What a format's indexer found for one split, before any pixel is read.

    ``problems`` holds structural issues (missing label, image listed but absent, ...). ``build_dataset``
    refuses to build a dataset with problems; ``check_dataset`` reports them all.
    """

    root: Path
    split: str  # on-disk split name (after aliasing, e.g. ADE20K "train" -> "training")
    classes: list[str]
    palette: list[list[int]] | None
    lut: np.ndarray  # int16[256]: raw value -> class id | IGNORE_INDEX | INVALID
    raw_ignore: int | None  # raw void value in the files (for reports); None when the LUT is a table
    samples: list[tuple[Path, Path]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings that do not stop training


def identity_lut(num_classes: int, raw_ignore: int | None) -> np.ndarray:
    """LUT for files that already store class ids 0..K-1 and one raw void value."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes, dtype=np.int16)
    if raw_ignore is not None:
        lut[raw_ignore] = IGNORE_INDEX
    return lut


# ----------------------------------------------------------------------------------------------------
# File decoding. Each function names the file in its error so a bad frame among 20k is easy to find.
# ----------------------------------------------------------------------------------------------------
def _reason(e: Exception) -> str:
    # PIL's UnidentifiedImageError repeats the path, which the DatasetError already names
    if isinstance(e, UnidentifiedImageError):
        return "not a recognised image file"
    return str(e) or type(e).__name__


def load_image(path: Path) -> np.ndarray:
    """Decode an image as uint8 RGB [H, W, 3].

    EXIF orientation is deliberately *not* applied: labels are stored in the raw pixel grid, so rotating
    only the image would misalign them.
    """
    try:
        with Image.open(path) as im:
            im.load()  # force a full decode so truncated files fail here, not later
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError("image file not found", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"unreadable or corrupt image ({_reason(e)})", path) from None
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def load_label(path: Path) -> np.ndarray:
    """Decode a label PNG as raw uint8 class values [H, W].

    Accepts 8-bit grayscale (mode L) and palette PNGs (mode P: the stored *indices* are the class ids,
    as in VOC; the palette is only for display). 16-bit files are accepted if every value fits in 8 bits.
    Colour (RGB) label images are rejected: converting colours back to ids needs a palette we may not have.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "P"):
                arr = np.asarray(im, dtype=np.uint8)
            elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                wide = np.asarray(im).astype(np.int64)
                bad = np.unique(wide[(wide < 0) | (wide > 255)])
                if bad.size:
                    raise DatasetError(
                        f"label values {bad[:10].tolist()} do not fit in 8 bits (mode {mode})", path
                    )
                arr = wide.astype(np.uint8)
            else:
                raise DatasetError(
                    f"label must be a single-channel class-id PNG (mode L or P), got mode {mode}; "
                    "colour-coded masks must be converted to class ids first",
                    path,
                )
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError("label file not found", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"unreadable or corrupt label ({_reason(e)})", path) from None
    return arr


def map_label(raw: np.ndarray, lut: np.ndarray, path: Path, classes: Sequence[str] | None = None) -> np.ndarray:
    """Map raw label values through ``lut``; raise listing every value that is not a class or void."""
    mapped = lut[raw]
    if (mapped == INVALID).any():
        bad = np.unique(raw[mapped == INVALID])
        k = f" (expected 0..{len(classes) - 1} or the void value)" if classes else ""
        raise DatasetError(f"label has values outside the class range: {bad.tolist()}{k}", path)
    return mapped


def bad_label_values(raw_hist: np.ndarray, lut: np.ndarray) -> list[int]:
    """Raw values present (per a 256-bin histogram) that the LUT marks invalid."""
    return np.nonzero((raw_hist > 0) & (lut == INVALID))[0].tolist()


# ----------------------------------------------------------------------------------------------------
# The dataset.
# ----------------------------------------------------------------------------------------------------
Transform = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], tuple[torch.Tensor, torch.Tensor]]


class SegDataset(Dataset):
    """Semantic segmentation dataset over ``(image, label)`` file pairs.

    ``ds[i]`` (int key) applies the deterministic (eval) path; ``ds[(i, sample_seed)]`` seeds a private
    ``torch.Generator`` with ``sample_seed`` and draws *all* augmentation randomness from it, so a sample
    is bit-identical whichever worker/process/rank loads it. An int key on a training dataset uses
    ``sample_seed = i`` (handy for inspecting augmentations; the training loader always passes tuples).

    Returns ``{"image": float32 [3, H, W] normalised, "label": int64 [H', W'] (255 = ignore), "name": str}``.
    H', W' equal H, W except with the eval ``resize`` mode, where the label stays at native resolution.

    Pixel-level checks (decodable image, matching sizes, label values) happen here, on load; construction
    only does the cheap structural checks (see ``build_dataset``).
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        *,
        classes: Sequence[str],
        lut: np.ndarray,
        transform: Transform,
        palette: Sequence[Sequence[int]] | None = None,
        names: Sequence[str] | None = None,
        root: Path | str | None = None,
        split: str = "",
        train: bool = False,
    ) -> None:
        if lut.shape != (256,):
            raise ValueError(f"lut must have 256 entries, got shape {lut.shape}")
        self.samples: list[tuple[Path, Path]] = [(Path(i), Path(l)) for i, l in samples]
        self.names: list[str] = list(names) if names is not None else [p[0].stem for p in self.samples]
        if len(self.names) != len(self.samples):
            raise ValueError("names and samples differ in length")
        self.classes: list[str] = list(classes)
        self.num_classes: int = len(self.classes)
        self.palette: list[list[int]] | None = [list(map(int, c)) for c in palette] if palette else None
        self.lut = lut.astype(np.int16)
        self.transform = transform
        self.root = Path(root) if root is not None else None
        self.split = split
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"SegDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, train={self.train})"
        )

    def load_raw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded, validated pair before any transform: uint8 [3, H, W] image and int64 [H, W] label."""
        img_path, lbl_path = self.samples[index]
        image = load_image(img_path)
        raw = load_label(lbl_path)
        if raw.shape != image.shape[:2]:
            raise DatasetError(
                f"label size {raw.shape[1]}x{raw.shape[0]} (WxH) does not match image size "
                f"{image.shape[1]}x{image.shape[0]} ({img_path})",
                lbl_path,
            )
        mapped = map_label(raw, self.lut, lbl_path, self.classes)
        img_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        return img_t, torch.from_numpy(mapped.astype(np.int64))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, sample_seed = int(key[0]), int(key[1])
        else:
            index, sample_seed = int(key), None
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        index %= n
        generator = None
        if self.train:
            generator = torch.Generator().manual_seed(sample_seed if sample_seed is not None else index)
        image, label = self.load_raw(index)
        image, label = self.transform(image, label, generator)
        return {"image": image, "label": label, "name": self.names[index]}


def seg_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate samples whose sizes may differ (whole-image evaluation with batch > 1).

    Images are padded bottom/right with 0 (the normalised mean) and labels with 255 to the largest size
    in the batch. ``image_size`` / ``label_size`` (int64 [B, 2], H then W) give each sample's unpadded
    size so the engine can crop logits before upsampling them to the label size. When all samples have
    the same size (training crops) this is exactly ``torch.stack``. Any further keys (e.g. the cached teacher
    outputs that ``engine.teacher_cache.CachedTeacherDataset`` adds) go through ``default_collate``.
    """
    images = [b["image"] for b in batch]
    labels = [b["label"] for b in batch]
    image_size = torch.tensor([list(t.shape[-2:]) for t in images], dtype=torch.long)
    label_size = torch.tensor([list(t.shape[-2:]) for t in labels], dtype=torch.long)
    return {
        "image": _pad_stack(images, 0.0),
        "label": _pad_stack(labels, IGNORE_INDEX),
        "name": [b["name"] for b in batch],
        "image_size": image_size,
        "label_size": label_size,
        **{k: default_collate([b[k] for b in batch]) for k in batch[0] if k not in ("image", "label", "name")},
    }


def _pad_stack(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    if all(t.shape[-2:] == (h, w) for t in tensors):
        # default_collate stacks straight into shared memory inside workers (saves a copy per batch)
        return default_collate(tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], h, w), value)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out
