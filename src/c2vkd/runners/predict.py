"""`c2vkd predict`: run a trained student (optionally next to its teacher) on images and write colour PNGs.

For every image ``NAME.(jpg|jpeg|png)`` in ``--input`` (a file or a folder, not recursive) it writes to ``--out``:

* ``NAME_mask.png``: the student's prediction as raw class ids (8-bit palette PNG: pixel value = class id,
  the palette shows the class colours), for scripts and annotation tools;
* ``NAME_pred.png``: the student's prediction, one palette colour per class (RGB);
* ``NAME_overlay.png``: the image blended with that colour map (``--alpha`` = colour weight);
* ``NAME_side_by_side.png``: captioned panels (image | student overlay [| teacher overlay]) with a legend of
  the classes predicted (colour swatch + id + name);
* with ``--teacher``: also ``NAME_teacher_mask.png`` and ``NAME_teacher_pred.png``, the teacher being
  ``teacher.name`` / ``teacher.checkpoint`` of the config.

Images go through the config's evaluation transform (``data.eval_transform``, normalisation) and inference
mode (``eval.mode`` / ``window`` / ``stride`` / ``scales`` / ``flip``, ``train.amp``), exactly as `c2vkd eval`
scores them; predictions are at the label resolution the transform keeps (the native image size for the
``whole`` and ``resize`` transforms). ``eval.mode: center_crop`` scores only a central window, so for pictures
it is replaced by ``slide`` over the whole image with the same window.

Colours: the dataset's palette (``classes.json`` ``palette`` or the format's built-in one, from ``data.root``)
when it has one entry per predicted class, else :func:`generated_palette` (the VOC colour map without
its black), with a log line saying so. Class names come from the checkpoint's metadata, else from the dataset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from c2vkd.data.base import IMAGE_EXTS, DatasetError, load_image
from c2vkd.data.build import build_transform, index_split, resolve_data_cfg
from c2vkd.data.meta import voc_colormap
from c2vkd.data.show import blend, figure, legend_for, save_mask
from c2vkd.data.transforms import denormalize, resize_image
from c2vkd.engine.weights import build_for_eval, read_c2vkd_weights
from c2vkd.eval.inference import predict_logits
from c2vkd.utils.device import autocast_ctx, pick_device
from c2vkd.utils.sizes import as_hw

log = logging.getLogger("c2vkd")


class PredictError(ValueError):
    """Bad input for `c2vkd predict` (missing input, no images, no teacher configured...)."""


@dataclass
class Palette:
    colors: np.ndarray  # uint8 [K, 3]
    source: str

    def colorize(self, pred: np.ndarray) -> np.ndarray:
        """int [H, W] class ids -> uint8 [H, W, 3]."""
        return self.colors[pred]


def list_images(path: str | Path) -> list[Path]:
    """The image itself, or the images directly in a folder (sorted by name)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PredictError(f"--input {p} does not exist")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTS:
            raise PredictError(f"--input {p} is not an image ({', '.join(IMAGE_EXTS)})")
        return [p]
    images = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise PredictError(f"--input folder {p} holds no images ({', '.join(IMAGE_EXTS)})")
    return images


def _dataset_meta(data_cfg: dict[str, Any]) -> tuple[list[str], list[list[int]] | None] | None:
    """(classes, palette) from the configured dataset's metadata, or None when it cannot be read."""
    d = resolve_data_cfg(data_cfg)
    if not d["root"]:
        return None
    for split in [s for s in (d["splits"] or {}).values() if s] or ["train", "val", "test"]:
        try:
            idx = index_split(d["format"], d["root"], str(split), d["ignore_index"])
        except (DatasetError, OSError, KeyError):
            continue
        return list(idx.classes), idx.palette
    return None


def resolve_palette(num_classes: int, data_cfg: dict[str, Any]) -> tuple[Palette, list[str] | None]:
    meta = _dataset_meta(data_cfg)
    names = meta[0] if meta and len(meta[0]) == num_classes else None
    if meta and meta[1] and len(meta[1]) == num_classes:
        return Palette(np.asarray(meta[1], dtype=np.uint8), f"dataset at {data_cfg.get('root')}"), names
    why = ("the dataset at data.root has no palette" if meta else "data.root is not set or not readable")
    if meta and len(meta[0]) != num_classes:
        why = f"the dataset has {len(meta[0])} classes, the model predicts {num_classes}"
    log.info("predict: %s; using a generated palette (VOC colour map without its black, %d colours)",
             why, num_classes)
    return Palette(generated_palette(num_classes), "generated (VOC colour map)"), names


def generated_palette(num_classes: int) -> np.ndarray:
    """Fixed fallback colours: the VOC colour map from index 1 (index 0 is black, invisible in overlays)."""
    return np.asarray(voc_colormap(num_classes + 1)[1:], dtype=np.uint8)


def _load_teacher(cfg: dict[str, Any], num_classes: int, device: torch.device) -> nn.Module:
    t = cfg["teacher"]
    if not t["name"] or not t["checkpoint"]:
        raise PredictError("--teacher needs teacher.name and teacher.checkpoint in the config "
                           f"(got name={t['name']!r}, checkpoint={t['checkpoint']!r})")
    as_student = {"student": {"name": t["name"], "kwargs": t["kwargs"]}}
    model, _ = build_for_eval(t["checkpoint"], as_student, num_classes, device)
    return model


class Predictor:
    """Student (+ optional teacher) with the config's eval transform and inference mode."""

    def __init__(self, cfg: dict[str, Any], checkpoint: str | Path, *, teacher: bool = False,
                 device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or pick_device(cfg["train"]["device"])
        got = read_c2vkd_weights(checkpoint)
        if got is not None:
            k, names = int(got[1]["num_classes"]), list(got[1].get("classes") or [])
        else:  # a foreign checkpoint: the class count comes from the dataset
            meta = _dataset_meta(cfg["data"])
            if meta is None:
                raise PredictError(f"{checkpoint} records no class count (not a c2vkd file) and data.root is not "
                                   "readable; set data.root or use a c2vkd checkpoint / export")
            k, names = len(meta[0]), meta[0]
        self.num_classes = k
        self.model, self.model_name = build_for_eval(checkpoint, cfg, k, self.device)
        self.teacher = _load_teacher(cfg, k, self.device) if teacher else None
        self.palette, ds_names = resolve_palette(k, cfg["data"])
        self.class_names = names if len(names) == k else (ds_names or [str(i) for i in range(k)])
        d = resolve_data_cfg(cfg["data"])
        self.transform = build_transform(d, train=False)
        self.mean, self.std = d["mean"], d["std"]
        e = cfg["eval"]
        self.mode, self.window, self.stride = e["mode"], as_hw(e["window"]), as_hw(e["stride"])
        if self.mode == "center_crop":
            log.info("predict: eval.mode center_crop scores a central window only; predicting the whole image "
                     "with a sliding window of the same size")
            self.mode = "slide"

    @torch.inference_mode()
    def predict(self, model: nn.Module, image: torch.Tensor, out_hw: tuple[int, int]) -> np.ndarray:
        """Normalised [3, H, W] image -> int64 [h, w] class ids at ``out_hw``."""
        e = self.cfg["eval"]
        with autocast_ctx(self.device, self.cfg["train"]["amp"]):
            logits = predict_logits(model, image[None].to(self.device), mode=self.mode, window=self.window,
                                    stride=self.stride, scales=e["scales"], flip=e["flip"],
                                    num_classes=self.num_classes, out_size=out_hw)
        return logits.argmax(1)[0].cpu().numpy()

    def run(self, inputs: str | Path, out_dir: str | Path, *, alpha: float = 0.5) -> list[Path]:
        if not 0.0 <= alpha <= 1.0:
            raise PredictError(f"--alpha must be in [0, 1], got {alpha}")
        images = list_images(inputs)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stems = [p.stem for p in images]
        written: list[Path] = []
        for path, stem in zip(images, stems):
            if stems.count(stem) > 1:  # a.jpg and a.png side by side
                stem = path.name.replace(".", "_")
            raw = load_image(path)  # uint8 [H, W, 3]
            img_t = torch.from_numpy(raw).permute(2, 0, 1).contiguous()
            x, lbl = self.transform(img_t, torch.zeros(raw.shape[:2], dtype=torch.long), None)
            hw = (int(lbl.shape[-2]), int(lbl.shape[-1]))
            if hw == raw.shape[:2]:
                shown = raw
            else:  # the transform cropped: show the crop the prediction covers
                vis = denormalize(x, self.mean, self.std).clamp(0, 1)
                shown = (resize_image(vis, hw) * 255).round().byte().permute(1, 2, 0).numpy()
            ids = self.predict(self.model, x, hw)
            color = self.palette.colorize(ids)
            overlay = blend(shown, color, alpha)
            written += [save_mask(ids, self.palette.colors, out / f"{stem}_mask.png"),
                        _save(color, out / f"{stem}_pred.png"), _save(overlay, out / f"{stem}_overlay.png")]
            panels, captions, all_ids = [shown, overlay], ["image", "student (overlay)"], [ids]
            if self.teacher is not None:
                t_ids = self.predict(self.teacher, x, hw)
                t_color = self.palette.colorize(t_ids)
                panels.append(blend(shown, t_color, alpha))
                captions.append("teacher (overlay)")
                all_ids.append(t_ids)
                written += [save_mask(t_ids, self.palette.colors, out / f"{stem}_teacher_mask.png"),
                            _save(t_color, out / f"{stem}_teacher_pred.png")]
            side = figure(panels, captions, legend_for(all_ids, self.class_names, self.palette.colors))
            written.append(_save(side, out / f"{stem}_side_by_side.png"))
        return written


def _save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


def predict_images(cfg: dict[str, Any], checkpoint: str | Path, inputs: str | Path, out_dir: str | Path, *,
                   teacher: bool = False, alpha: float = 0.5) -> list[Path]:
    """Library entry point of `c2vkd predict` (see the module docstring); returns the written files."""
    list_images(inputs)  # fail on a bad --input before loading any model
    return Predictor(cfg, checkpoint, teacher=teacher).run(inputs, out_dir, alpha=alpha)
