"""Pictures of segmentations people can read: class-id mask PNGs, captioned panels, colour legends, and
`c2vkd data show ROOT` (ground-truth overlays with a legend for a few samples of every split).

Drawing helpers (used by `c2vkd predict` too):

* :func:`save_mask` writes a class-id mask as an 8-bit palette PNG: the stored pixel values *are* the class
  ids (any image library reads them back as integers), the PNG palette shows them in the dataset's colours,
  and the ignore value (255) is black;
* :func:`figure` puts panels side by side with a caption above each and a legend (colour swatch + class
  name, wrapped to the figure width) below.

``c2vkd data show`` writes, for the first ``--per-split`` samples (evenly spaced over the split) of every split
present, ``SPLIT_NAME_gt.png`` = [image | ground-truth overlay] with a legend of the classes in that label;
ignored (void) pixels keep the image's colours and the legend says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from c2vkd import IGNORE_INDEX
from c2vkd.data.base import DatasetError, SplitNotFoundError, load_image, load_label, map_label
from c2vkd.data.meta import voc_colormap

GAP = 8  # white pixels between panels
_PAD = 4
_SWATCH = 12


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_wh(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def palette_array(palette: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    """uint8 [K, 3]: the dataset's palette when it has K entries, else the VOC colour map without black."""
    if palette is not None and len(palette) == num_classes:
        return np.asarray(palette, dtype=np.uint8)
    return np.asarray(voc_colormap(num_classes + 1)[1:], dtype=np.uint8)


def colorize(ids: np.ndarray, colors: np.ndarray, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """int [H, W] class ids (IGNORE_INDEX allowed) -> uint8 [H, W, 3]."""
    out = np.empty((*ids.shape, 3), dtype=np.uint8)
    valid = ids != IGNORE_INDEX
    out[valid] = colors[ids[valid]]
    out[~valid] = np.asarray(ignore_color, dtype=np.uint8)
    return out


def blend(image: np.ndarray, color: np.ndarray, alpha: float, mask: np.ndarray | None = None) -> np.ndarray:
    """(1 - alpha) * image + alpha * color, rounded; where ``mask`` is False the image is kept as is."""
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mask is not None:
        out[~mask] = image[~mask]
    return out


def save_mask(ids: np.ndarray, colors: np.ndarray, path: str | Path) -> Path:
    """Class-id mask as a palette PNG: pixel value = class id (255 = ignore, black), palette = ``colors``."""
    if ids.size and int(ids[ids != IGNORE_INDEX].max(initial=0)) >= len(colors):
        raise ValueError(f"mask holds class id {int(ids[ids != IGNORE_INDEX].max())} but only {len(colors)} colours")
    if len(colors) > 255:
        raise ValueError(f"a palette PNG holds at most 255 classes besides ignore, got {len(colors)}")
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(colors)] = colors
    im.putpalette(pal.reshape(-1).tolist())
    path = Path(path)
    im.save(path)
    return path


def legend(entries: Sequence[tuple[str, Sequence[int] | None]], width: int, font_size: int = 12) -> np.ndarray:
    """uint8 [h, width, 3] white strip: a colour swatch and a name per entry, wrapped to ``width``
    (an entry with colour None is a note, e.g. "void: not coloured")."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_SWATCH, _text_wh(probe, "Ag", font)[1]) + _PAD
    placed: list[tuple[int, int, str, Sequence[int] | None]] = []
    x = y = _PAD
    for name, color in entries:
        w = (_SWATCH + _PAD if color is not None else 0) + _text_wh(probe, name, font)[0] + 3 * _PAD
        if x > _PAD and x + w > width:
            x, y = _PAD, y + line_h
        placed.append((x, y, name, color))
        x += w
    img = Image.new("RGB", (width, y + line_h + _PAD), "white")
    draw = ImageDraw.Draw(img)
    for x, y, name, color in placed:
        if color is not None:
            draw.rectangle([x, y, x + _SWATCH - 1, y + _SWATCH - 1], fill=tuple(int(c) for c in color),
                           outline=(0, 0, 0))
            x += _SWATCH + _PAD
        draw.text((x, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def figure(panels: Sequence[np.ndarray], captions: Sequence[str], legend_entries: Sequence[tuple[str, Sequence[int] | None]],
           font_size: int = 12) -> np.ndarray:
    """Panels (uint8 [H, W_i, 3], same H) side by side with ``GAP`` white pixels between them, a caption
    above each and a legend below."""
    if len(panels) != len(captions):
        raise ValueError(f"{len(panels)} panels but {len(captions)} captions")
    h = panels[0].shape[0]
    gap = np.full((h, GAP, 3), 255, dtype=np.uint8)
    row = np.concatenate([p for pair in zip(panels, [gap] * len(panels)) for p in pair][:-1], axis=1)
    width = row.shape[1]
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_h = _text_wh(probe, "Ag", font)[1] + 2 * _PAD
    header = Image.new("RGB", (width, cap_h), "white")
    draw = ImageDraw.Draw(header)
    x = 0
    for panel, text in zip(panels, captions):
        draw.text((x + _PAD, _PAD), text, fill=(0, 0, 0), font=font)
        x += panel.shape[1] + GAP
    parts = [np.asarray(header), row]
    if legend_entries:
        parts.append(legend(legend_entries, width, font_size))
    return np.concatenate(parts, axis=0)


def legend_for(ids: Sequence[np.ndarray], classes: Sequence[str], colors: np.ndarray
               ) -> list[tuple[str, Sequence[int] | None]]:
    """Legend entries for the classes present in any of these id maps (by id), plus a note for ignore."""
    present: set[int] = set()
    has_ignore = False
    for a in ids:
        u = np.unique(a)
        has_ignore |= bool((u == IGNORE_INDEX).any())
        present.update(int(v) for v in u if v != IGNORE_INDEX)
    entries: list[tuple[str, Sequence[int] | None]] = [(f"{i} {classes[i]}", colors[i].tolist())
                                                       for i in sorted(present)]
    if has_ignore:
        entries.append(("ignore (void): not coloured", None))
    return entries


def show_dataset(root: str | Path, out_dir: str | Path, *, format: str | None = None,
                 splits: Sequence[str] | None = None, per_split: int = 3, alpha: float = 0.5) -> list[Path]:
    """Write ground-truth overlays with a legend for ``per_split`` samples of each split (see module doc).

    format: a registered dataset format, or None to detect it from the folder. Returns the written files."""
    from c2vkd.data.build import index_split
    from c2vkd.data.formats import DATASETS

    if per_split < 1:
        raise ValueError(f"--per-split must be >= 1, got {per_split}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    if format is None:
        from c2vkd.data.detect import detect_format

        format = detect_format(root)
    wanted = list(splits) if splits else list(DATASETS.get(format).splits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    found = 0
    for split in wanted:
        try:
            index = index_split(format, root, split, None)
        except SplitNotFoundError:
            if splits:  # asked for by name: an error; otherwise a split this copy of the dataset lacks
                raise
            continue
        found += 1
        if not index.samples:
            continue
        colors = palette_array(index.palette, len(index.classes))
        n = len(index.samples)
        picks = sorted({round(i * (n - 1) / max(per_split - 1, 1)) for i in range(min(per_split, n))})
        for i in picks:
            img_path, lbl_path = index.samples[i]
            image = load_image(img_path)
            raw = load_label(lbl_path)
            if raw.shape != image.shape[:2]:
                raise DatasetError(f"label size {raw.shape[::-1]} does not match image size "
                                   f"{image.shape[1::-1]} (WxH)", lbl_path)
            ids = map_label(raw, index.lut, lbl_path, index.classes).astype(np.int64)
            overlay = blend(image, colorize(ids, colors), alpha, mask=ids != IGNORE_INDEX)
            name = index.names[i] if i < len(index.names) else img_path.stem
            fig = figure([image, overlay], [f"{split}: {name}", "ground truth (overlay)"],
                         legend_for([ids], index.classes, colors))
            path = out / f"{split}_{Path(name).name}_gt.png"
            Image.fromarray(fig).save(path)
            written.append(path)
    if not found:
        raise DatasetError(f"none of the splits {wanted} exists in the {format} dataset", Path(root))
    return written
