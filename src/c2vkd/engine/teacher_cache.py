"""Precomputed teacher outputs: ``c2vkd cache-teacher`` writes them, ``teacher.cache`` reads them.

The frozen teacher's outputs are a pure function of its weights and of its input view. With an
augmentation pool (``data.augment_pool = K >= 1``, see ``data/sampler.py``) the student only ever sees N*K
views, each named by ``(index, sample_seed)``, so the teacher can be run once per view ahead of training and
its outputs read back instead of recomputed every epoch. ``K = 1`` is the "no random augmentation" case.

What is exact and what is approximated
--------------------------------------
* The views are exact: the cache is keyed by the same ``(index, sample_seed)`` the training sampler yields,
  and the dataset applies all augmentation from the seed, so the cached view *is* the training view.
* Feature taps (the ones the configured losses read) are stored at full tap resolution in the storage dtype
  (float16 by default: relative error ~ 2^-11; float32 is exact).
* Logits are stored compactly, per pixel, after an optional bilinear downsampling by ``downsample``
  (``align_corners=False``; 4 matches the stride-4 decoder of DeepLabV3+ teachers):
    - ``top_idx``: the ``k`` classes with the largest logits (uint8, int16 beyond 256 classes),
    - ``top_val``: their logits minus the pixel's maximum (``top_val[0] == 0``; storage dtype),
    - ``max``: the pixel's maximum logit (float32),
    - ``rest_lse``: log-sum-exp of the other ``K - k`` logits minus the maximum (absent when ``k == K``).
  Reconstruction puts the ``k`` stored logits back and gives each of the other ``K - k`` classes
  ``max + rest_lse - log(K - k)``. At temperature 1 this preserves softmax exactly where it matters: the
  probabilities of the top-k classes and the total probability ``R`` of the rest are those of the full
  logits (up to the storage dtype); only how ``R`` is split among the non-top-k classes is lost (uniform),
  so ``|p - p_hat| <= R`` per class and ``KL(p || p_hat) <= R * log(K - k)`` per pixel. The fill never
  exceeds the smallest stored logit, so the argmax and the top-k order are kept. At another temperature
  the top-k ratios are exact but the rest's mass is approximate; losses normalising over space rather than
  classes (CWD on logits) see the uniform fill directly - use ``--topk 0`` (all classes) for those.
  Finally the logits are upsampled back to the crop bilinearly (exact only with ``downsample = 1``).
  With ``--topk 0 --downsample 1 --dtype float32`` the cache reproduces the live teacher up to float32
  rounding (tested: same loss trajectory as the live teacher).

Folder layout
-------------
``shard_00000.safetensors``, ... (views ``v = index * K + j`` in order, ``shard_size`` per file), each with
``index`` / ``seed`` (int64 [m]: the view's key), ``top_idx`` / ``top_val`` [m, k, h, w], ``max`` /
``rest_lse`` [m, h, w] and ``tap.<name>`` [m, ...]; written atomically (temporary file + rename), each with
the cache's settings hash in its metadata, so an interrupted ``cache-teacher`` resumes where it stopped.
``index.json`` is written last: the cache is complete iff it exists. It holds the *fingerprint* of
everything the teacher's outputs depend on (teacher name, kwargs, checkpoint file sha256 and the sha256 of
the built teacher's weights; dataset format, split, sample list; mean/std, train transform, pool size and
pool seed); training recomputes the fingerprint and refuses a cache whose fingerprint differs, naming each
difference. Not covered: editing image files in place without changing their size, or changing c2vkd's
transform code - rebuild the cache after either.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from c2vkd.data.base import seg_collate
from c2vkd.data.sampler import check_augment_pool, view_seed
from c2vkd.utils.io import atomic_write_text, sha256_file

log = logging.getLogger("c2vkd")

FORMAT = "c2vkd-teacher-cache-v1"
INDEX_FILE = "index.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class TeacherCacheError(RuntimeError):
    """A teacher cache is missing, incomplete, stale (made for other settings) or lacks a requested view."""


# ----------------------------------------------------------------------------------------------------
# Compact logits
# ----------------------------------------------------------------------------------------------------
def stored_hw(crop_hw: Sequence[int], downsample: int) -> tuple[int, int]:
    """Resolution the logits are stored at for a crop of ``crop_hw``."""
    return max(1, round(int(crop_hw[0]) / downsample)), max(1, round(int(crop_hw[1]) / downsample))


def encode_logits(logits: torch.Tensor, *, topk: int, downsample: int = 1,
                  dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """[B, K, H, W] logits -> compact dict (see the module docstring). ``topk`` <= 0 or >= K keeps all classes."""
    if logits.ndim != 4:
        raise ValueError(f"encode_logits expects [B, K, H, W] logits, got shape {tuple(logits.shape)}")
    z = logits.detach().float()
    num_classes = z.shape[1]
    if downsample > 1:
        z = F.interpolate(z, size=stored_hw(z.shape[-2:], downsample), mode="bilinear", align_corners=False)
    k = num_classes if topk <= 0 else min(int(topk), num_classes)
    vals, idx = z.topk(k, dim=1)  # sorted, largest first
    top = vals[:, :1]
    out = {"top_idx": idx.to(torch.uint8 if num_classes <= 256 else torch.int16),
           "top_val": (vals - top).to(dtype), "max": top[:, 0].contiguous()}
    if k < num_classes:
        rest = z.scatter(1, idx, float("-inf")).logsumexp(dim=1)
        out["rest_lse"] = (rest - top[:, 0]).to(dtype)
    return out


def decode_logits(c: dict[str, torch.Tensor], num_classes: int, out_hw: Sequence[int] | None = None) -> torch.Tensor:
    """Compact dict (batched, as :func:`encode_logits` returns) -> float32 [B, K, H, W] logits, upsampled
    bilinearly to ``out_hw`` when given."""
    idx = c["top_idx"].long()
    val = c["top_val"].float()
    b, k, h, w = idx.shape
    if k < num_classes:
        fill = c["rest_lse"].float() - math.log(num_classes - k)
        z = fill[:, None].expand(b, num_classes, h, w).clone()
    elif k == num_classes:
        z = val.new_empty(b, num_classes, h, w)
    else:
        raise TeacherCacheError(f"the cache stores {k} logits per pixel but the dataset has {num_classes} classes")
    z.scatter_(1, idx, val)
    z = z + c["max"].float()[:, None]
    if out_hw is not None and tuple(z.shape[-2:]) != tuple(out_hw):
        z = F.interpolate(z, size=tuple(int(s) for s in out_hw), mode="bilinear", align_corners=False)
    return z


# ----------------------------------------------------------------------------------------------------
# Fingerprint: everything the teacher's outputs on the training views depend on
# ----------------------------------------------------------------------------------------------------
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


def _settings_sha256(fingerprint: dict[str, Any], encoding: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, "fingerprint": fingerprint, "encoding": encoding}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
class TeacherCache:
    """A complete cache folder. ``read(index, seed)`` returns one view's compact tensors (workers call it);
    ``decode(batch)`` turns a collated batch of them into teacher logits and features on the device."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        index = self.root / INDEX_FILE
        if not index.is_file():
            if self.root.is_dir() and any(self.root.glob("shard_*.safetensors")):
                raise TeacherCacheError(f"teacher cache {self.root} is incomplete (no {INDEX_FILE}: `c2vkd "
                                        "cache-teacher` did not finish); rerun it to complete the cache")
            raise TeacherCacheError(f"teacher cache not found: {index} does not exist; build it with "
                                    "`c2vkd cache-teacher CONFIG` (it writes to teacher.cache)")
        try:
            self.meta: dict[str, Any] = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f"cannot read {index}: {e}") from e
        if self.meta.get("format") != FORMAT:
            raise TeacherCacheError(f"{index} is not a c2vkd teacher cache ({FORMAT}); got format "
                                    f"{self.meta.get('format')!r}")
        self.num_classes = int(self.meta["num_classes"])
        self.num_images = int(self.meta["num_images"])
        self.pool = int(self.meta["pool"])
        self.pool_seed = int(self.meta["pool_seed"])
        self.shard_size = int(self.meta["shard_size"])
        self.taps: dict[str, list[int]] = dict(self.meta["taps"])
        self.shards: list[dict[str, Any]] = list(self.meta["shards"])
        for s in self.shards:
            p = self.root / s["file"]
            if not p.is_file() or p.stat().st_size != int(s["bytes"]):
                raise TeacherCacheError(f"teacher cache shard {p} is missing or has the wrong size "
                                        f"(expected {s['bytes']} bytes); rebuild with `c2vkd cache-teacher`")
        self._pid: int | None = None
        self._handles: dict[int, Any] = {}

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.meta["fingerprint"])

    def check(self, fingerprint: dict[str, Any]) -> None:
        """Raise :class:`TeacherCacheError` naming every difference if the cache was made for other settings."""
        diff = fingerprint_diff(self.fingerprint, json.loads(json.dumps(fingerprint)))
        if diff:
            raise TeacherCacheError(
                f"teacher cache {self.root} was made for other settings, so its teacher outputs would be stale; "
                f"refusing to use it. Differences: {'; '.join(diff)}. Rebuild it with `c2vkd cache-teacher "
                "CONFIG` (same config and --set overrides as the training run), or unset teacher.cache")

    # -- lookup -----------------------------------------------------------------------------------
    def locate(self, index: int, seed: int) -> tuple[int, int]:
        """(shard number, row) of view ``(index, seed)``; :class:`TeacherCacheError` if the cache lacks it."""
        if 0 <= index < self.num_images:
            for j in range(self.pool):
                if view_seed(self.pool_seed, index, j) == seed:
                    return divmod(index * self.pool + j, self.shard_size)
        raise TeacherCacheError(
            f"teacher cache {self.root} has no entry for sample {index} with augmentation seed {seed}: it holds the "
            f"{self.pool} pool views (pool seed {self.pool_seed}) of each of its {self.num_images} images. The "
            "training stream must come from the same data.augment_pool / augment_pool_seed / dataset as the cache")

    def _handle(self, shard: int) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():  # one set of file handles per process (DataLoader workers fork)
            self._pid, self._handles = os.getpid(), {}
        if shard not in self._handles:
            path = self.root / self.shards[shard]["file"]
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise TeacherCacheError(f"cannot read teacher cache shard {path}: {e}") from e
        return self._handles[shard]

    def read(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        """One view's compact tensors (no batch dim), keyed as in the shard files."""
        shard, row = self.locate(int(index), int(seed))
        f = self._handle(shard)
        key = (int(f.get_slice("index")[row]), int(f.get_slice("seed")[row]))
        if key != (int(index), int(seed)):
            raise TeacherCacheError(f"teacher cache shard {self.shards[shard]['file']} row {row} holds view {key}, "
                                    f"expected {(int(index), int(seed))}: the cache is corrupt; rebuild it")
        return {name: f.get_slice(name)[row] for name in f.keys() if name not in ("index", "seed")}

    def __getstate__(self) -> dict[str, Any]:  # spawned DataLoader workers reopen the files themselves
        state = dict(self.__dict__)
        state["_pid"], state["_handles"] = None, {}
        return state

    # -- decoding (in the training process, on the device) ------------------------------------------
    def tap_shapes(self, names: Iterable[str], input_hw: Sequence[int], batch: int = 2) -> dict[str, tuple[int, ...]]:
        """Shapes of the cached teacher taps as ``probe_shapes`` would report them (sizes alignment heads)."""
        names = list(names)
        missing = [n for n in names if n not in self.taps]
        if missing:
            raise TeacherCacheError(f"the losses read teacher taps {missing}, but teacher cache {self.root} holds "
                                    f"{sorted(self.taps) or 'no taps'}; rebuild it with `c2vkd cache-teacher` "
                                    "(--taps auto stores the taps the config's losses read)")
        crop = tuple(self.meta["crop"])
        if tuple(int(s) for s in input_hw) != crop:
            raise TeacherCacheError(f"teacher cache {self.root} holds {crop[0]}x{crop[1]} crops, the training crop "
                                    f"is {input_hw[0]}x{input_hw[1]}")
        return {n: (batch, *self.taps[n]) for n in names}

    def decode(self, batch: dict[str, torch.Tensor], out_hw: Sequence[int], names: Iterable[str] = (),
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Collated compact batch -> (teacher logits [B, K, *out_hw], {tap: features}) in ``dtype``."""
        logits = decode_logits(batch, self.num_classes, out_hw).to(dtype)
        feats = {n: batch[f"tap.{n}"].to(dtype) for n in names}
        return logits, feats


class CachedTeacherDataset(Dataset):
    """A training dataset whose samples also carry the cached teacher outputs of their view (under the key
    ``teacher``), read in the DataLoader workers. Keys must be ``(index, sample_seed)`` tuples."""

    def __init__(self, base: Any, cache: TeacherCache) -> None:
        self.base, self.cache = base, cache

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        if not isinstance(key, tuple):
            raise TypeError("CachedTeacherDataset needs (index, sample_seed) keys from the training sampler")
        sample = self.base[key]
        index = int(key[0]) % len(self.base)
        sample["teacher"] = self.cache.read(index, int(key[1]))
        return sample

    def __repr__(self) -> str:
        return f"CachedTeacherDataset({self.base!r}, cache={str(self.cache.root)!r})"


def open_for_config(path: str | Path, cfg: dict[str, Any], dataset: Any, teacher: nn.Module) -> TeacherCache:
    """Open ``teacher.cache`` for a training run and check it against the run's teacher, data and pool."""
    if not isinstance(path, (str, Path)):
        raise TeacherCacheError(f"teacher.cache must be a folder path or null, got {path!r}")
    if check_augment_pool(cfg["data"]["augment_pool"]) < 1:
        raise TeacherCacheError("teacher.cache is set but data.augment_pool is 0: with fresh augmentation every epoch "
                                "the teacher's inputs are never seen twice, so nothing can be cached. Set "
                                "data.augment_pool=K (K >= 1) and build the cache for it with `c2vkd cache-teacher`")
    cache = TeacherCache(path)
    cache.check(teacher_fingerprint(cfg, dataset, teacher))
    made = cache.meta.get("made_with", {})
    if made.get("amp") != cfg["train"]["amp"]:
        log.warning("teacher cache %s was computed with amp=%s, this run uses amp=%s (the cached outputs are used "
                    "as they are)", cache.root, made.get("amp"), cfg["train"]["amp"])
    log.info("teacher outputs from cache %s (%d views, top-%d logits at 1/%d, taps %s): the teacher is not run",
             cache.root, cache.meta["views"], cache.meta["topk"], cache.meta["downsample"],
             sorted(cache.taps) or "none")
    return cache


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    from c2vkd.data import build_dataset
    from c2vkd.engine.distiller import loss_tap_names
    from c2vkd.engine.trainer import autocast_ctx, pick_device, seed_everything
    from c2vkd.engine.weights import build_from_config
    from c2vkd.models import FeatureTaps

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
    settings = _settings_sha256(fingerprint, encoding)

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
