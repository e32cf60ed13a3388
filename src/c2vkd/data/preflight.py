"""Pre-flight data check before a run's first iteration: every split the run will use exists, is not
empty, and each image has a label of the same size. Fast: the indexers list files and the sizes come from
the image headers (no pixel is decoded); ``c2vkd data check`` does the full decode."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image

from c2vkd.data.base import DatasetError, SegDataset
from c2vkd.data.build import build_dataset

_LIMIT = 10


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read the image header: {e}", path) from None


def check_sizes(dataset: SegDataset, split: str) -> None:
    """Raise a :class:`DatasetError` listing the samples whose label size differs from the image size."""
    bad: list[str] = []
    for img, lbl in dataset.samples:
        if lbl is None:
            continue
        wi, hi = image_size(Path(img))
        wl, hl = image_size(Path(lbl))
        if (wi, hi) != (wl, hl):
            bad.append(f"{img} is {wi}x{hi} but its label {lbl} is {wl}x{hl}")
    if bad:
        more = f" (and {len(bad) - _LIMIT} more)" if len(bad) > _LIMIT else ""
        raise DatasetError(f"split {split!r}: {len(bad)} label(s) differ in size from their image{more}:\n  "
                           + "\n  ".join(bad[:_LIMIT]) + "\n(run `c2vkd data check` for the full decode check)")


def preflight(data_cfg: Mapping[str, Any], splits: Iterable[str], *, built: Mapping[str, SegDataset] | None = None
              ) -> None:
    """Check every split in ``splits`` (logical names: train / val / test) before training starts.

    ``built``: datasets already built for some of them (the training set), reused instead of re-indexed."""
    built = dict(built or {})
    for split in dict.fromkeys(s for s in splits if s):
        ds = built.get(split)
        if ds is None:
            try:
                ds = build_dataset(data_cfg, split, train=False)
            except DatasetError as e:
                raise DatasetError(f"pre-flight data check, split {split!r}: {e}", prefix_path=False) from e
        if len(ds) == 0:
            raise DatasetError(f"pre-flight data check: split {split!r} of {data_cfg.get('root')} is empty")
        check_sizes(ds, split)
