"""Pre-flight data check before a run's first iteration: every split the run will use exists, is not
empty, each image has a label of the same size (image headers only), and every label value is a class id or
the void value (``data.label_check``). A bad value found only by a loader worker costs a failed run minutes
in; found here it costs seconds.

The label-value scan decodes every label when that is cheap (at most ``FULL_SCAN_PIXELS`` label pixels per
split, about 10 s at this machine's ~150 Mpx/s) and otherwise an evenly spaced sample of that size, and says
so. Each file's result (the set of raw values present) is cached by path, size and mtime under
:func:`cache_dir`, so a rerun on unchanged data decodes nothing. ``c2vkd data check`` does the full decode of
images and labels."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from c2vkd.data.base import DatasetError, SegDataset, bad_label_values, load_label
from c2vkd.data.build import LABEL_CHECK_MODES, build_dataset

log = logging.getLogger("c2vkd")

_LIMIT = 10
FULL_SCAN_PIXELS = 1_500_000_000


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read the image header: {e}", path) from None


def check_sizes(dataset: SegDataset, split: str) -> int:
    """Raise a :class:`DatasetError` listing the samples whose label size differs from the image size. Returns
    the split's label pixels (from the same headers), for :func:`check_label_values`."""
    bad: list[str] = []
    pixels = 0
    for img, lbl in dataset.samples:
        if lbl is None:
            continue
        wi, hi = image_size(Path(img))
        wl, hl = image_size(Path(lbl))
        pixels += wl * hl
        if (wi, hi) != (wl, hl):
            bad.append(f"{img} is {wi}x{hi} but its label {lbl} is {wl}x{hl}")
    if bad:
        more = f" (and {len(bad) - _LIMIT} more)" if len(bad) > _LIMIT else ""
        raise DatasetError(f"split {split!r}: {len(bad)} label(s) differ in size from their image{more}:\n  "
                           + "\n  ".join(bad[:_LIMIT]) + "\n(run `c2vkd data check` for the full decode check)")
    return pixels


def cache_dir() -> Path:
    """Where c2vkd keeps per-user caches: ``$C2VKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/c2vkd``, else
    ``~/.cache/c2vkd``."""
    env = os.environ.get("C2VKD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "c2vkd"


def _scan_cache_file(labels: list[Path]) -> Path:
    key = hashlib.sha256("\n".join(str(p.resolve()) for p in labels).encode()).hexdigest()[:24]
    return cache_dir() / "label_values" / f"{key}.json"


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def label_values_present(labels: list[Path], split_labels: list[Path] | None = None) -> dict[Path, np.ndarray]:
    """For each label file, a bool [256] of the raw values it holds; cached by (path, size, mtime) in one file
    per split (``split_labels``: every label of the split, when ``labels`` is a sample of it)."""
    split_labels = split_labels or labels
    cache_file = _scan_cache_file(split_labels)
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    out: dict[Path, np.ndarray] = {}
    in_split = {str(p) for p in split_labels}
    fresh: dict[str, list[Any]] = {k: v for k, v in cached.items() if k in in_split}  # a sample keeps the rest
    for p in labels:
        fk = _file_key(p)
        hit = cached.get(str(p))
        if isinstance(hit, list) and len(hit) == 2 and hit[0] == fk:
            present = np.zeros(256, dtype=bool)
            present[list(hit[1])] = True
        else:
            present = np.bincount(load_label(p).ravel(), minlength=256) > 0
        out[p] = present
        fresh[str(p)] = [fk, np.nonzero(present)[0].tolist()]
    if fresh != cached:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache_file)
        except OSError as e:  # the check itself is done; only the next run's speed-up is lost
            log.warning("pre-flight: cannot write the label-scan cache %s (%s); the next run scans again",
                        cache_file, e)
    return out


def check_label_values(dataset: SegDataset, split: str, mode: str = "auto", label_pixels: int | None = None
                       ) -> None:
    """Raise a :class:`DatasetError` naming the label files that hold values which are neither a class id nor
    the void value. ``mode``: ``full`` scans every label, ``auto`` every label when the split has at most
    ``FULL_SCAN_PIXELS`` label pixels and an evenly spaced sample of that size otherwise (logged), ``off`` skips.
    ``label_pixels``: the split's label pixels when known (:func:`check_sizes` returns them); else ``auto`` reads
    the label headers for them."""
    if mode not in LABEL_CHECK_MODES:
        raise ValueError(f"data.label_check must be one of {', '.join(LABEL_CHECK_MODES)}, got {mode!r}")
    labels = split_labels = [Path(lbl) for _, lbl in dataset.samples if lbl is not None]
    if mode == "off" or not labels:
        return
    if mode == "auto":
        total = label_pixels if label_pixels is not None else sum(w * h for w, h in map(image_size, labels))
        if total > FULL_SCAN_PIXELS:
            n = max(1, int(len(labels) * FULL_SCAN_PIXELS / total))
            picks = np.linspace(0, len(labels) - 1, n).round().astype(int)
            labels = [labels[i] for i in dict.fromkeys(picks.tolist())]
            log.warning("pre-flight, split %r: label values checked on a sample of %d of %d labels (the split "
                        "is large); a bad value elsewhere stops the run when a loader reaches it. "
                        "data.label_check=full checks all (cached for reruns), or run `c2vkd data check`.",
                        split, len(labels), len(dataset.samples))
    bad: list[str] = []
    for path, present in label_values_present(labels, split_labels).items():
        values = bad_label_values(present.astype(np.int64), dataset.lut)
        if values:
            bad.append(f"{path}: {values[:10]}")
    if bad:
        more = f" (and {len(bad) - _LIMIT} more)" if len(bad) > _LIMIT else ""
        expected = f"0..{dataset.num_classes - 1} or the void value"
        raise DatasetError(
            f"split {split!r}: {len(bad)} label file(s) hold values that are not a class id ({expected}){more}:"
            "\n  " + "\n  ".join(bad[:_LIMIT]) + "\n(fix the files, set data.num_classes / data.ignore_index or "
            "classes.json to match them, or run `c2vkd data check` for every problem)")


def preflight(data_cfg: Mapping[str, Any], splits: Iterable[str], *, built: Mapping[str, SegDataset] | None = None
              ) -> None:
    """Check every split in ``splits`` (logical names: train / val / test) before training starts.

    ``built``: datasets already built for some of them (the training set), reused instead of re-indexed."""
    built = dict(built or {})
    label_check = str(data_cfg.get("label_check", "auto"))
    for split in dict.fromkeys(s for s in splits if s):
        ds = built.get(split)
        if ds is None:
            try:
                ds = build_dataset(data_cfg, split, train=False)
            except DatasetError as e:
                raise DatasetError(f"pre-flight data check, split {split!r}: {e}", prefix_path=False) from e
        if len(ds) == 0:
            raise DatasetError(f"pre-flight data check: split {split!r} of {data_cfg.get('root')} is empty")
        pixels = check_sizes(ds, split)  # one pass over the headers: sizes, and the pixels `auto` sizes its scan by
        check_label_values(ds, split, label_check, pixels)
