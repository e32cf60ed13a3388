"""Configs from a command line, no YAML: ``c2vkd distill --teacher NAME[=CKPT] --student NAME --data DIR`` and
``c2vkd train --model NAME --data DIR``; plus the method-preset listing of ``c2vkd methods``.

What is decided here, and from what:

* **data format**: detected from the folder (:func:`c2vkd.data.detect.detect_format`): ``classes.json`` +
  ``images/`` + ``labels/`` is the generic ``folder`` layout; ``leftImg8bit/`` + ``gtFine/`` Cityscapes;
  ``ADEChallengeData2016`` ADE20K; ``VOCdevkit/VOC2012`` (or ``JPEGImages`` + ``SegmentationClass``) VOC;
  ``train/`` + ``trainannot/`` CamVid in the SegNet layout. Anything else is an error listing what was
  looked for.
* **sizes**: for the standard datasets, their packaged preset (``configs/datasets/*.yaml``: the field's crop
  and sliding-window evaluation). For a generic folder / SegNet CamVid they follow the images: the first
  training image's H x W gives the crop (each side capped at 512 and rounded down to a multiple of 32, at
  least 32) and evaluation is on whole images at their native size.
* **splits**: train, val and test as found on disk; the final evaluation is on test, else val.
* **recipe**: the method preset (``configs/methods/NAME.yaml``, default ``c2vkd`` for distill, ``none`` for
  train) layered on the defaults; ``--iters`` sets ``schedule.iters`` (and a 10% warm-up).
* **run directory**: ``--out``, else ``runs/STUDENT-METHOD-DATA``.

The result is an ordinary resolved config: the trainer writes it to ``RUN/config.yaml``, so
``c2vkd distill RUN/config.yaml`` (or ``train``) repeats the run exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from c2vkd.config import PACKAGE_CONFIGS, ConfigError, load_config
from c2vkd.data.detect import detect_format

#: packaged dataset preset of each detected standard format (their crops and sliding-window evaluation)
_DATASET_PRESETS = {"cityscapes": "datasets/cityscapes.yaml", "ade20k": "datasets/ade20k.yaml",
                    "voc": "datasets/voc.yaml"}


def method_presets() -> dict[str, str]:
    """{preset name: the first comment line of its YAML} for every packaged method preset ("..." marks a
    sentence that continues on the next comment line)."""
    out: dict[str, str] = {}
    for path in sorted((PACKAGE_CONFIGS / "methods").glob("*.yaml")):
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("#"):
            out[path.stem] = "(no description)"
            continue
        first = lines[0].lstrip("#").strip()
        continues = len(lines) > 1 and lines[1].startswith("#") and not first.endswith((".", ")"))
        out[path.stem] = first.rstrip(",;:") + (" ..." if continues else "")
    return out


def _present_splits(fmt: str, root: Path) -> list[str]:
    if fmt == "folder":
        return [s for s in ("train", "val", "test") if (root / "images" / s).is_dir()]
    if fmt == "camvid_segnet":
        return [s for s in ("train", "val", "test") if (root / s).is_dir() and (root / f"{s}annot").is_dir()]
    return ["train", "val"]


def _first_image_hw(fmt: str, root: Path) -> tuple[int, int]:
    from PIL import Image

    from c2vkd.data.build import index_split

    index = index_split(fmt, root, "train", None)
    if not index.samples:
        raise ConfigError(f"--data {root}: the train split is empty")
    with Image.open(index.samples[0][0]) as im:
        w, h = im.size
    return h, w


def crop_for(hw: tuple[int, int]) -> list[int]:
    """Training crop for images of size ``hw``: each side capped at 512, rounded down to a multiple of 32
    (what the ViT students' patch grids like), at least 32."""
    return [max(32, min(512, side) // 32 * 32) for side in hw]


def oneline_overrides(*, data: str | Path, student: str, teacher: str | None, method: str,
                      iters: int | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """(base layers, --set style overrides, what was detected) for a one-line run."""
    root = Path(data).expanduser().resolve()
    fmt = detect_format(root)
    presets = method_presets()
    if method not in presets and not Path(method).is_file():
        from c2vkd.registry import suggest

        raise ConfigError(f"--method {method!r} is not a method preset.{suggest(method, list(presets))} "
                          f"Presets: {', '.join(presets)} (or a YAML path)")
    layers: list[str] = []
    dataset_preset = _DATASET_PRESETS.get(fmt)
    sets = [f"data.format={fmt}", f"data.root={root}", f"student.name={student}"]
    detected: dict[str, Any] = {"format": fmt, "root": str(root)}
    if dataset_preset:
        layers.append(dataset_preset)
        detected["sizes"] = f"from {dataset_preset}"
        if fmt == "voc" and not any((root / p / "SegmentationClassAug").is_dir()
                                    for p in ("", "VOCdevkit/VOC2012", "VOC2012")):
            sets.append("data.splits.train=train")  # no SBD augmentation set: VOC's own train list
    else:
        hw = _first_image_hw(fmt, root)
        crop = crop_for(hw)
        splits = _present_splits(fmt, root)
        if "train" not in splits:
            raise ConfigError(f"--data {root}: no train split found ({fmt} layout)")
        final = "test" if "test" in splits else ("val" if "val" in splits else None)
        sets += [f"data.train_transform.crop_size=[{crop[0]},{crop[1]}]", "data.train_transform.base_size=null",
                 "data.eval_transform={mode: whole, size: null}", "eval.mode=whole",
                 f"data.splits={{train: train, val: {'val' if 'val' in splits else 'null'}, "
                 f"test: {'test' if 'test' in splits else 'null'}}}",
                 f"eval.split={'val' if 'val' in splits else 'null'}", f"eval.final_split={final or 'null'}"]
        detected.update(image_hw=list(hw), crop=crop, splits=splits)
    layers.append(method if Path(method).is_file() else f"methods/{method}.yaml")
    if teacher:
        name, _, ckpt = teacher.partition("=")
        sets.append(f"teacher.name={name}")
        if ckpt:
            p = Path(ckpt).expanduser()
            if not p.exists():
                raise ConfigError(f"--teacher {teacher}: checkpoint {p} not found")
            sets.append(f"teacher.checkpoint={p.resolve()}")
    if iters is not None:
        if iters < 1:
            raise ConfigError(f"--iters must be >= 1, got {iters}")
        sets += [f"schedule.iters={iters}", f"schedule.warmup_iters={iters // 10}"]
    tag = Path(method).stem if Path(method).is_file() else method
    sets.append(f"experiment.name={student}-{tag}-{root.name}")
    detected["method"] = tag
    return layers, sets, detected


def oneline_config(*, data: str | Path, student: str, teacher: str | None, method: str, iters: int | None,
                   extra: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(resolved config, detected facts) for a one-line run; ``extra`` = the user's ``--set`` overrides."""
    layers, sets, detected = oneline_overrides(data=data, student=student, teacher=teacher, method=method,
                                               iters=iters)
    cfg = load_config(None, sets + list(extra or []), layers=layers)
    # paths absolute (the run's saved config.yaml must work from any directory): what is printed is what is saved
    for section, key in (("experiment", "output_dir"), ("student", "pretrained"), ("teacher", "checkpoint"),
                         ("teacher", "cache")):
        value = cfg[section].get(key)
        if isinstance(value, str) and value:
            cfg[section][key] = str(Path(value).expanduser().resolve())
    return cfg, detected


def summary(cfg: dict[str, Any], detected: dict[str, Any], run_dir: Path, command: str) -> str:
    """The resolved config in one screen: the detected facts, then the config as YAML with one flow-style
    mapping per section (valid YAML, a few lines each), then how to repeat the run."""
    import yaml

    from c2vkd.engine.run_dir import REPEAT_SUFFIX, repeat_command

    head = [f"# {command}",
            "# detected: " + json.dumps(detected),
            f"# run directory: {run_dir} (the full config is written to {run_dir}/config.yaml)"]
    body = "".join(f"{k}: " + yaml.safe_dump(v, sort_keys=False, default_flow_style=True, width=108)
                   .replace("\n...\n", "\n") for k, v in cfg.items())
    # after "# repeat: " the line is a shell command as it stands (its note is a shell comment)
    tail = [f"# repeat: {repeat_command(cfg, run_dir)}   # runs in a new folder {run_dir.name}{REPEAT_SUFFIX}N"]
    return "\n".join(head) + "\n" + body + "\n".join(tail)
