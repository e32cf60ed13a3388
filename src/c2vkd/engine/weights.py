"""Building the configured student/teacher and moving weights in and out of c2vkd's own formats.

Formats written by c2vkd:
  * training checkpoint ``checkpoints/iter_N.pt`` (torch.save dict, ``format: c2vkd-train-v1``),
  * student export ``*.safetensors`` with metadata ``c2vkd_model``, ``num_classes``, ``kwargs``, ``classes``.
Either can be used as ``student.pretrained`` / ``teacher.checkpoint`` or with ``c2vkd eval --checkpoint``.
Foreign formats (timm / torchvision / HF / mmseg / CIRKD ...) go through
``c2vkd.models.load_checkpoint_weights``.
Every load is strict: missing/unexpected keys or shape mismatches are errors naming the file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from c2vkd.config import ConfigError
from c2vkd.engine.loss_config import needs_teacher
from c2vkd.models import build_model, load_checkpoint_weights
from c2vkd.utils.io import CheckpointError, replace_with_default_mode, safe_load

log = logging.getLogger("c2vkd")


def save_student(path: Path, model: nn.Module, name: str, num_classes: int, kwargs: dict[str, Any],
                 classes: list[str]) -> Path:
    """Student-only export (no teacher, no alignment heads) as safetensors, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "c2vkd-student-v1", "c2vkd_model": name, "num_classes": str(num_classes),
            "kwargs": json.dumps(kwargs), "classes": json.dumps(classes)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    replace_with_default_mode(tmp, path)  # safetensors creates 0600 files; checkpoints and logs are 0644
    return path


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, what: str, arch: str,
                   allow_partial: bool = False, error: type[Exception] = CheckpointError) -> None:
    """Load ``state`` into ``model``; missing or unexpected keys are an ``error`` "<what> does not fit <arch>:
    missing [...], unexpected [...]" (``what`` names the file), or, with ``allow_partial``, a loud PARTIAL LOAD
    warning. Shape mismatches raise from torch."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if (missing or unexpected) and not allow_partial:
        raise error(f"{what} does not fit {arch}: missing {list(missing)[:10]}, unexpected {list(unexpected)[:10]}")
    if missing or unexpected:
        log.warning("PARTIAL LOAD of %s: %d missing, %d unexpected keys", what, len(missing), len(unexpected))


def read_c2vkd_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(state_dict, meta) for a c2vkd training checkpoint or student export; None for foreign files."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
        if meta.get("format") != "c2vkd-student-v1":
            return None
        state = safe_load(path)
        return state, {"model": meta["c2vkd_model"], "num_classes": int(meta["num_classes"]),
                       "kwargs": json.loads(meta.get("kwargs", "{}")), "classes": json.loads(meta.get("classes", "[]"))}
    obj = safe_load(path)
    if isinstance(obj, dict) and obj.get("format") == "c2vkd-train-v1":
        return obj["student"], dict(obj["meta"])
    return None


def load_model_weights(model: nn.Module, path: str | Path, *, name: str, num_classes: int,
                       allow_partial: bool = False) -> None:
    """Load weights into `model` strictly, checking the architecture recorded in c2vkd files."""
    got = read_c2vkd_weights(path)
    if got is None:  # a foreign format (ImageNet, torchvision, mmseg, CIRKD...): say which and what was dropped
        report = load_checkpoint_weights(model, path, allow_partial=allow_partial)
        (log.info if report.complete else log.warning)("%s: %s", name, report.summary())
        return
    state, meta = got
    if meta["model"] != name or int(meta["num_classes"]) != num_classes:
        raise CheckpointError(f"{path} holds a {meta['model']} with {meta['num_classes']} classes, but the config "
                              f"asks for {name} with {num_classes} classes")
    fit_state_dict(model, state, what=f"{path}: state dict", arch=name, allow_partial=allow_partial)


def build_from_config(cfg: dict[str, Any], num_classes: int, class_names: list[str],
                      device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """Student (trainable) and teacher (frozen, eval, or None) as configured."""
    s = cfg["student"]
    ds_k = cfg["data"]["num_classes"]
    if ds_k is not None and ds_k != num_classes:
        raise ValueError(f"data.num_classes={ds_k} but the dataset has {num_classes} classes")
    student = build_model(s["name"], num_classes, **s["kwargs"])
    if s["pretrained"]:
        load_model_weights(student, s["pretrained"], name=s["name"], num_classes=num_classes)
        log.info("student %s: loaded %s", s["name"], s["pretrained"])
    student.to(device)
    t = cfg["teacher"]
    teacher = None
    if t["name"]:
        teacher = build_model(t["name"], num_classes, **t["kwargs"])
        if t["checkpoint"]:
            load_model_weights(teacher, t["checkpoint"], name=t["name"], num_classes=num_classes)
            log.info("teacher %s: loaded %s", t["name"], t["checkpoint"])
        elif needs_teacher(cfg) and not t["allow_random_init"]:
            raise ConfigError(f"teacher {t['name']} has no weights: teacher.checkpoint is not set, so the losses "
                              "would distil a randomly initialised network. Set teacher.checkpoint to the trained "
                              "teacher (a c2vkd run checkpoint or export, or a supported checkpoint format), or "
                              "set teacher.allow_random_init: true (smoke tests only)")
        else:
            log.warning("TEACHER %s HAS RANDOM WEIGHTS (teacher.checkpoint is not set): distillation from it "
                        "is meaningless except for smoke tests", t["name"])
        teacher.to(device).eval()
        if t["channels_last"]:
            teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
    return student, teacher


def build_for_eval(path: str | Path, cfg: dict[str, Any] | None, num_classes: int,
                   device: torch.device) -> tuple[nn.Module, str]:
    """Model for `c2vkd eval/predict`: architecture from the file's metadata, else from the config."""
    got = read_c2vkd_weights(path)
    if got is not None:
        state, meta = got
        if meta["num_classes"] != num_classes:
            raise CheckpointError(f"{path} predicts {meta['num_classes']} classes, the dataset has {num_classes}")
        model = build_model(meta["model"], num_classes, **meta.get("kwargs", {}))
        fit_state_dict(model, state, what=f"{path}: state dict", arch=meta["model"])
        return model.to(device).eval(), meta["model"]
    if cfg is None:
        raise CheckpointError(f"{path} is not a c2vkd file; give a config naming the architecture")
    s = cfg["student"]
    model = build_model(s["name"], num_classes, **s["kwargs"])
    load_checkpoint_weights(model, path)
    return model.to(device).eval(), s["name"]
