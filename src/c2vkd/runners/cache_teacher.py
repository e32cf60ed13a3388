"""``c2vkd cache-teacher``: run the frozen teacher once per pool view and write the cache folder (atomic,
resumable shards; ``index.json`` last)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from c2vkd.data import build_dataset
from c2vkd.data.base import seg_collate
from c2vkd.data.sampler import check_augment_pool, view_seed
from c2vkd.engine.distiller import loss_tap_names
from c2vkd.engine.runtime import autocast_ctx, pick_device, seed_everything
from c2vkd.engine.teacher_cache.codec import DTYPES, encode_logits
from c2vkd.engine.teacher_cache.fingerprint import pool_seed_of, settings_sha256, teacher_fingerprint
from c2vkd.engine.teacher_cache.store import FORMAT, INDEX_FILE
from c2vkd.engine.weights import build_from_config
from c2vkd.models import FeatureTaps
from c2vkd.utils.io import atomic_write_text, replace_with_default_mode

log = logging.getLogger("c2vkd")


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    replace_with_default_mode(tmp, path)


def _shard_ok(path: Path, settings: str, views: int) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("settings_sha256") == settings and f.get_slice("index").get_shape() == [views]
    except Exception:
        return False


def build_teacher_cache(cfg: dict[str, Any], out: str | Path | None = None, *, topk: int = 5, downsample: int = 4,
                        dtype: str = "float16", taps: str | Sequence[str] = "auto", shard_size: int = 256,
                        batch_size: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run the frozen teacher (eval, no_grad, the config's ``train.amp``) over every pool view of the training
    split and write the cache folder ``out`` (default ``teacher.cache``). Returns the index (also written as
    ``index.json``). Resumes an interrupted build; an up-to-date cache is left as it is."""
    t, d = cfg["teacher"], cfg["data"]
    out = out or t["cache"]
    if not out:
        raise ValueError("no output folder: pass --out or set teacher.cache")
    if not t["name"]:
        raise ValueError("teacher.name is not set: there is no teacher to cache")
    pool = check_augment_pool(d["augment_pool"])
    if pool < 1:
        raise ValueError("data.augment_pool is 0 (fresh augmentation every epoch): the teacher's inputs are never seen "
                         "twice, so they cannot be cached. Set data.augment_pool=K (K >= 1 fixed views per image; "
                         "1 = no augmentation across epochs) here and in the training config")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if int(downsample) < 1 or int(shard_size) < 1:
        raise ValueError(f"downsample and shard_size must be >= 1, got {downsample} and {shard_size}")
    out = Path(out).expanduser()
    device = pick_device(cfg["train"]["device"])
    amp = cfg["train"]["amp"]
    # Same construction order and seed as Trainer, so even a randomly initialised teacher is the same one.
    seed_everything(int(cfg["experiment"]["seed"]))
    dataset = build_dataset(d, "train", train=True)
    num_classes = dataset.num_classes
    build_cfg = {**cfg, "student": {**cfg["student"], "pretrained": None}}  # the student is not needed here
    student, teacher = build_from_config(build_cfg, num_classes, list(dataset.classes), device)
    del student
    assert teacher is not None
    if taps == "auto":
        tap_names = loss_tap_names(cfg["losses"])[1]
    elif taps in ("none", "", None):
        tap_names = []
    else:
        tap_names = [n.strip() for n in (taps.split(",") if isinstance(taps, str) else taps) if n.strip()]
    crop = [int(s) for s in d["train_transform"]["crop_size"]]
    k = num_classes if topk <= 0 else min(int(topk), num_classes)
    fingerprint = teacher_fingerprint(cfg, dataset, teacher)
    encoding = {"topk": k, "downsample": int(downsample), "dtype": dtype, "taps": tap_names, "crop": crop,
                "shard_size": int(shard_size)}
    settings = settings_sha256(fingerprint, encoding, FORMAT)

    n = len(dataset)
    pool_seed = pool_seed_of(cfg)
    keys = [(i, view_seed(pool_seed, i, j)) for i in range(n) for j in range(pool)]
    n_shards = -(-len(keys) // int(shard_size))
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_FILE
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
        except ValueError:
            old = {}
        if old.get("settings_sha256") == settings and all(
                _shard_ok(out / s["file"], settings, s["views"]) for s in old.get("shards", [])):
            log.info("teacher cache %s is up to date (%d views): nothing to do", out, old["views"])
            return old
        index_path.unlink()  # from now on the folder is an incomplete cache until the new index is written
    names = [f"shard_{s:05d}.safetensors" for s in range(n_shards)]
    for stale in out.glob("shard_*.safetensors"):
        if stale.name not in names:
            stale.unlink()

    show = cfg["train"]["progress"] if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), desc="cache-teacher", unit="view", dynamic_ncols=True)
    tap_hooks = FeatureTaps(teacher, tap_names) if tap_names else None
    store = DTYPES[dtype]
    bs = int(batch_size or d["batch_size"])
    tap_shapes: dict[str, list[int]] = {}
    shards_meta: list[dict[str, Any]] = []
    computed = 0
    try:
        for s, name in enumerate(names):
            part = keys[s * int(shard_size):(s + 1) * int(shard_size)]
            path = out / name
            if _shard_ok(path, settings, len(part)):
                if bar is not None:
                    bar.update(len(part))
            else:
                loader = DataLoader(dataset, batch_size=bs, sampler=part, collate_fn=seg_collate,
                                    num_workers=int(d["num_workers"]), shuffle=False)
                chunks: dict[str, list[torch.Tensor]] = {}
                for batch in loader:
                    images = batch["image"].to(device)
                    with torch.no_grad(), autocast_ctx(device, amp):
                        logits = teacher(images)
                        feats = tap_hooks.pop() if tap_hooks is not None else {}
                    enc = encode_logits(logits, topk=k, downsample=int(downsample), dtype=store)
                    enc.update({f"tap.{tn}": f.detach().to(store) for tn, f in feats.items()})
                    for key, v in enc.items():
                        chunks.setdefault(key, []).append(v.cpu())
                    computed += images.shape[0]
                    if bar is not None:
                        bar.update(images.shape[0])
                tensors = {key: torch.cat(v) for key, v in chunks.items()}
                tensors["index"] = torch.tensor([i for i, _ in part], dtype=torch.int64)
                tensors["seed"] = torch.tensor([sd for _, sd in part], dtype=torch.int64)
                _save_shard(path, tensors, {"format": FORMAT, "settings_sha256": settings, "shard": str(s)})
                log.info("teacher cache: wrote %s (%d views)", path, len(part))
            shards_meta.append({"file": name, "views": len(part), "bytes": path.stat().st_size})
    finally:
        if bar is not None:
            bar.close()
        if tap_hooks is not None:
            tap_hooks.remove()
    from safetensors import safe_open

    with safe_open(str(out / names[0]), framework="pt") as f:
        tap_shapes = {tn: list(f.get_slice(f"tap.{tn}").get_shape()[1:]) for tn in tap_names}
        logits_hw = list(f.get_slice("max").get_shape()[1:])
    total_bytes = sum(s["bytes"] for s in shards_meta)
    index = {
        "format": FORMAT,
        "settings_sha256": settings,
        "fingerprint": fingerprint,
        "num_classes": num_classes,
        "num_images": n,
        "pool": pool,
        "pool_seed": pool_seed,
        "views": len(keys),
        "topk": k,
        "downsample": int(downsample),
        "dtype": dtype,
        "crop": crop,
        "logits_hw": logits_hw,
        "taps": tap_shapes,
        "shard_size": int(shard_size),
        "shards": shards_meta,
        "bytes": total_bytes,
        "bytes_per_view": total_bytes / max(1, len(keys)),
        "made_with": {"device": str(device), "amp": amp, "batch_size": bs, "views_computed_now": computed},
        "view_order": "view v = index * pool + j has seed view_seed(pool_seed, index, j) (c2vkd.data.sampler); "
                      "shard v // shard_size, row v % shard_size",
    }
    atomic_write_text(index_path, json.dumps(index, indent=1))
    return index
