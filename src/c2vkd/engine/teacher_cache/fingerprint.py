"""The fingerprint of a teacher cache: everything the teacher's outputs on the training views depend on
(teacher weights and checkpoint, dataset samples, transform, pool), compared field by field on use."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from c2vkd.utils.io import sha256_file


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry, in sorted order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def samples_sha256(dataset: Any) -> str:
    """sha256 over the dataset's sample names, image file names and sizes (cheap: no pixel is read)."""
    h = hashlib.sha256()
    for name, (img, _lbl) in zip(dataset.names, dataset.samples):
        size = Path(img).stat().st_size if Path(img).exists() else -1
        h.update(f"{name}\t{Path(img).name}\t{size}\n".encode())
    return h.hexdigest()


def pool_seed_of(cfg: dict[str, Any]) -> int:
    ps = cfg["data"].get("augment_pool_seed")
    return int(cfg["experiment"]["seed"] if ps is None else ps)


def teacher_fingerprint(cfg: dict[str, Any], dataset: Any, teacher: nn.Module) -> dict[str, Any]:
    """Flat, JSON-normalised description of what the cached teacher outputs depend on."""
    t, d = cfg["teacher"], cfg["data"]
    ckpt = t["checkpoint"]
    fp: dict[str, Any] = {
        "teacher.name": t["name"],
        "teacher.kwargs": dict(t["kwargs"] or {}),
        "teacher.checkpoint_sha256": sha256_file(Path(ckpt)) if ckpt else None,
        "teacher.weights_sha256": state_dict_sha256(teacher),
        "num_classes": int(dataset.num_classes),
        "data.format": d["format"],
        "data.split": str(dataset.split),
        "data.num_samples": len(dataset),
        "data.samples_sha256": samples_sha256(dataset),
        "data.mean": list(d["mean"]),
        "data.std": list(d["std"]),
        **{f"data.train_transform.{k}": v for k, v in sorted(d["train_transform"].items())},
        "data.augment_pool": int(d["augment_pool"]),
        "data.augment_pool_seed (resolved)": pool_seed_of(cfg),
    }
    return json.loads(json.dumps(fp))


def fingerprint_diff(cached: dict[str, Any], now: dict[str, Any]) -> list[str]:
    lines = []
    for key in list(now) + [k for k in cached if k not in now]:
        a, b = cached.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            short = (lambda v: v[:12] + "..." if isinstance(v, str) and len(v) == 64 else v)
            lines.append(f"{key}: cache {short(a)!r}, now {short(b)!r}")
    return lines


def settings_sha256(fingerprint: dict[str, Any], encoding: dict[str, Any], fmt: str) -> str:
    """Hash of the cache's format, fingerprint and encoding: a shard made with other settings is rebuilt."""
    blob = json.dumps({"format": fmt, "fingerprint": fingerprint, "encoding": encoding}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
