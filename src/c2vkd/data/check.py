"""``check_dataset``: scan every file of a dataset, collect *all* problems, and summarise class statistics.

Used by ``c2vkd data check ROOT``. Unlike ``build_dataset`` (which stops at the first broken sample)
this decodes every image and label and keeps going, so one run lists everything to fix.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from c2vkd import IGNORE_INDEX
from c2vkd.data.base import (
    DatasetError,
    Problem,
    SplitIndex,
    SplitNotFoundError,
    bad_label_values,
    load_image,
    load_label,
)
from c2vkd.data.build import index_split
from c2vkd.data.formats import DATASETS


@dataclass
class SplitReport:
    name: str  # split name as requested
    disk_name: str  # on-disk name (ADE20K: training/validation)
    num_samples: int = 0  # complete image+label pairs found
    num_ok: int = 0  # pairs that decoded and validated
    sizes: Counter = field(default_factory=Counter)  # (W, H) -> count
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignore_pixels: int = 0


@dataclass
class DataReport:
    root: Path
    format: str
    classes: list[str] = field(default_factory=list)
    raw_ignore: int | None = None
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def class_pixels(self) -> np.ndarray:
        """Pixels per class summed over all scanned splits."""
        total = np.zeros(len(self.classes), dtype=np.int64)
        for s in self.splits.values():
            if s.class_pixels.size == total.size:
                total += s.class_pixels
        return total

    @property
    def ignore_pixels(self) -> int:
        return sum(s.ignore_pixels for s in self.splits.values())


def check_dataset(
    root: str | Path,
    format: str = "folder",
    splits: Sequence[str] | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> DataReport:
    """Scan ``splits`` (default: the format's usual splits that exist) and report every problem found.

    ``ignore_index`` is the raw void value in the label files (as in the data config). Never raises for
    data problems: they all end up in ``report.problems``; an unknown format name still raises KeyError.
    """
    fmt = DATASETS.get(format)
    report = DataReport(root=Path(root), format=format)
    explicit = splits is not None
    for split in splits if splits is not None else fmt.splits:
        try:
            index = index_split(format, root, split, ignore_index)
        except SplitNotFoundError as e:
            if explicit:
                report.problems.append(Problem(split, e.path, _msg(e)))
            else:
                report.notes.append(f"split {split!r} not present, skipped")
            continue
        except DatasetError as e:
            # root / classes.json problems repeat for every split: report each distinct one once
            if not any(p.path == e.path and p.message == _msg(e) for p in report.problems):
                report.problems.append(Problem(split, e.path, _msg(e)))
            continue
        if not report.classes:
            report.classes, report.raw_ignore = index.classes, index.raw_ignore
            report.root = index.root
            if num_classes is not None and int(num_classes) != len(index.classes):
                report.problems.append(
                    Problem(split, index.root, f"expected {num_classes} classes, the dataset has {len(index.classes)}")
                )
        report.problems.extend(index.problems)
        report.notes.extend(index.notes)
        report.splits[split] = _scan_split(split, index, report.problems)
    if not report.splits and not report.problems:
        report.problems.append(Problem("-", Path(root), f"no split found (looked for {', '.join(fmt.splits)})"))
    return report


def _scan_split(split: str, index: SplitIndex, problems: list[Problem]) -> SplitReport:
    k = len(index.classes)
    rep = SplitReport(split, index.split, num_samples=len(index.samples), class_pixels=np.zeros(k, dtype=np.int64))
    # raw value -> class id lookup for histogram binning: classes 0..k-1, then ignore, then invalid
    lut = index.lut.astype(np.int64)
    for img_path, lbl_path in index.samples:
        ok = True
        try:
            image = load_image(img_path)
            img_hw = image.shape[:2]
            del image
        except DatasetError as e:
            problems.append(Problem(split, e.path, _msg(e)))
            ok, img_hw = False, None
        try:
            raw = load_label(lbl_path)
        except DatasetError as e:
            problems.append(Problem(split, e.path, _msg(e)))
            continue
        if img_hw is not None:
            rep.sizes[(img_hw[1], img_hw[0])] += 1
            if raw.shape != img_hw:
                problems.append(
                    Problem(
                        split, lbl_path,
                        f"label size {raw.shape[1]}x{raw.shape[0]} (WxH) does not match image size "
                        f"{img_hw[1]}x{img_hw[0]} ({img_path.name})",
                    )
                )
                ok = False
        hist = np.bincount(raw.ravel(), minlength=256)
        bad = bad_label_values(hist, index.lut)
        if bad:
            problems.append(
                Problem(split, lbl_path, f"label has values outside the class range: {bad} (expected 0..{k - 1} or the void value)")
            )
            ok = False
        valid = (lut >= 0) & (lut < k)
        np.add.at(rep.class_pixels, lut[valid], hist[valid])
        rep.ignore_pixels += int(hist[lut == IGNORE_INDEX].sum())
        rep.num_ok += ok
    return rep


def _msg(e: DatasetError) -> str:
    """Message without the leading 'path: ' (the Problem already carries the path)."""
    s = str(e)
    prefix = f"{e.path}: "
    return s[len(prefix):] if e.path is not None and s.startswith(prefix) else s


def format_report(report: DataReport) -> str:
    """Human-readable summary: splits, image sizes, class pixel histogram, then every problem."""
    lines = [f"dataset: {report.root} (format {report.format})"]
    if report.classes:
        void = f", raw void value {report.raw_ignore}" if report.raw_ignore is not None else ""
        lines.append(f"classes: {len(report.classes)}{void}")
    lines.append("")
    lines.append(f"{'split':<12}{'on disk':<14}{'samples':>8}{'valid':>8}  sizes (WxH: count)")
    for s in report.splits.values():
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in s.sizes.most_common(3))
        if len(s.sizes) > 3:
            sizes += f", ... ({len(s.sizes)} sizes)"
        lines.append(f"{s.name:<12}{s.disk_name:<14}{s.num_samples:>8}{s.num_ok:>8}  {sizes}")
    if report.classes and report.splits:
        lines.append("")
        total_px = report.class_pixels
        labelled = int(total_px.sum())
        all_px = labelled + report.ignore_pixels
        names = list(report.splits)
        width = max(12, max(len(c) for c in report.classes) + 2)
        head = f"{'id':>4}  {'class':<{width}}{'pixels':>14}{'%':>8}" + "".join(f"{n + ' %':>12}" for n in names)
        lines.append(head)
        split_totals = {n: max(1, int(s.class_pixels.sum()) + s.ignore_pixels) for n, s in report.splits.items()}
        for i, c in enumerate(report.classes):
            pct = 100.0 * total_px[i] / max(all_px, 1)
            row = f"{i:>4}  {c:<{width}}{int(total_px[i]):>14,}{pct:>8.2f}"
            row += "".join(f"{100.0 * s.class_pixels[i] / split_totals[n]:>12.2f}" for n, s in report.splits.items())
            if total_px[i] == 0:
                row += "   (never labelled)"
            lines.append(row)
        ign = report.ignore_pixels
        row = f"{'-':>4}  {'(ignore)':<{width}}{ign:>14,}{100.0 * ign / max(all_px, 1):>8.2f}"
        row += "".join(f"{100.0 * s.ignore_pixels / split_totals[n]:>12.2f}" for n, s in report.splits.items())
        lines.append(row)
    if report.notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(f"  {n}" for n in report.notes)
    lines.append("")
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines.extend(f"  {p}" for p in report.problems)
    else:
        lines.append("no problems found")
    return "\n".join(lines)
