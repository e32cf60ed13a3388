"""Reading a complete teacher cache folder: the index, shard lookup by ``(index, sample_seed)``, the training
dataset wrapper whose workers read the views, and the fingerprint check a training run makes on open."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from c2vkd.data.sampler import check_augment_pool, view_seed
from c2vkd.engine.teacher_cache.codec import TeacherCacheError, decode_logits
from c2vkd.engine.teacher_cache.fingerprint import fingerprint_diff, teacher_fingerprint

log = logging.getLogger("c2vkd")

FORMAT = "c2vkd-teacher-cache-v1"
INDEX_FILE = "index.json"


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
