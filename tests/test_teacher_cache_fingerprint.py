"""A teacher cache is refused when ANY fingerprinted input differs, one field at a time (sample names, file sizes,
sample count, split, mean/std, every train-transform key, pool seed, teacher kwargs), and accepted when only
unfingerprinted things differ (the dataset's location). Plus the cache's view keys against an independent
splitmix64 implementation (not the sampler's own ``view_seed``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import _toy
from c2vkd.config import load_config
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.teacher_cache import TeacherCacheError
from c2vkd.engine.trainer import Trainer
from c2vkd.engine.weights import save_student
from c2vkd.runners.cache_teacher import build_teacher_cache

N, POOL = 4, 2


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fp")
    root = write_folder(tmp / "ds", {"train": N, "val": N}, size_hw=(32, 40))
    torch.manual_seed(1)
    teacher = tmp / "teacher.safetensors"
    save_student(teacher, _toy.ToyCNN(3), "toy_cnn", 3, {}, ["a", "b", "c"])
    env = {"tmp": tmp, "root": root, "teacher": teacher}
    env["cache"] = tmp / "cache"
    build_teacher_cache(make_cfg(env, root), env["cache"], progress=False, topk=0, downsample=1)
    return env


def make_cfg(env: dict, root: Path, *extra: str) -> dict:
    return load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.train_transform.jitter=0.2", "data.batch_size=2", "data.num_workers=0", f"data.augment_pool={POOL}",
        "student.name=toy_vit", "teacher.name=toy_cnn", f"teacher.checkpoint={env['teacher']}",
        "losses=[{name: kd}, {name: ce}]", "schedule.iters=2", "train.progress=false", "train.device=cpu",
        f"experiment.output_dir={env['tmp']}", "eval.split=null", "eval.final_split=null", *extra])


def _copy(env: dict, name: str) -> Path:
    dst = env["tmp"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(env["root"], dst)
    return dst


def _rename_sample(root: Path) -> None:
    for sub, ext in (("images", ".png"), ("labels", ".png")):
        (root / sub / "train" / f"train_003{ext}").rename(root / sub / "train" / f"train_009{ext}")
    (root / "train.txt").write_text("".join(f"train_00{i}\n" for i in (0, 1, 2, 9)))


def _resave_image(root: Path) -> None:
    """Same pixels, another PNG compression: only the file size changes."""
    path = root / "images/train/train_001.png"
    before = np.asarray(Image.open(path)).copy()
    size = path.stat().st_size
    Image.fromarray(before).save(path, compress_level=0)
    assert np.array_equal(np.asarray(Image.open(path)), before) and path.stat().st_size != size


def _add_sample(root: Path) -> None:
    for sub in ("images", "labels"):
        shutil.copy(root / sub / "train/train_000.png", root / sub / "train/train_004.png")
    (root / "train.txt").write_text("".join(f"train_00{i}\n" for i in range(5)))


DATA_CHANGES = {
    "sample name": (_rename_sample, r"data\.samples_sha256: cache '[0-9a-f]{12}\.\.\.', now '[0-9a-f]{12}\.\.\.'"),
    "file size": (_resave_image, r"data\.samples_sha256: cache"),
    "sample count": (_add_sample, r"data\.num_samples: cache 4, now 5"),
}

CONFIG_CHANGES = {
    "split": ("data.splits.train=val", r"data\.split: cache 'train', now 'val'"),
    "mean": ("data.mean=[0.5,0.456,0.406]", r"data\.mean: cache \[0\.485, 0\.456, 0\.406\], now \[0\.5, 0\.456, 0\.406\]"),
    "std": ("data.std=[0.229,0.224,0.3]", r"data\.std: cache \[0\.229, 0\.224, 0\.225\], now \[0\.229, 0\.224, 0\.3\]"),
    "teacher kwargs": ("teacher.kwargs.width=8", r"teacher\.kwargs: cache \{\}, now \{'width': 8\}"),
    "scale_range": ("data.train_transform.scale_range=[0.5,1.5]", r"data\.train_transform\.scale_range: cache"),
    "jitter": ("data.train_transform.jitter=0.3", r"data\.train_transform\.jitter: cache 0\.2, now 0\.3"),
    "base_size": ("data.train_transform.base_size=48", r"data\.train_transform\.base_size: cache 40, now 48"),
    "pool seed": ("data.augment_pool_seed=7", r"data\.augment_pool_seed \(resolved\): cache 0, now 7"),
    "experiment seed (pool seed follows it)": ("experiment.seed=5",
                                               r"data\.augment_pool_seed \(resolved\): cache 0, now 5"),
}


@pytest.mark.parametrize("change", list(DATA_CHANGES))
def test_changed_data_files_are_refused(env: dict, change: str) -> None:
    modify, message = DATA_CHANGES[change]
    root = _copy(env, change.replace(" ", "_"))
    modify(root)
    with pytest.raises(TeacherCacheError, match=r"other settings.*" + message):
        Trainer(make_cfg(env, root, f"teacher.cache={env['cache']}"), run_dir=env["tmp"] / "runs" / change)


@pytest.mark.parametrize("change", list(CONFIG_CHANGES))
def test_changed_settings_are_refused(env: dict, change: str) -> None:
    override, message = CONFIG_CHANGES[change]
    with pytest.raises(TeacherCacheError, match=r"other settings.*" + message):
        Trainer(make_cfg(env, env["root"], f"teacher.cache={env['cache']}", override),
                run_dir=env["tmp"] / "runs" / change)


def test_unfingerprinted_differences_are_accepted(env: dict) -> None:
    """Positive control: a copy of the data elsewhere, another experiment seed with the pool seed pinned to the
    cache's, another student: the cache is used (so the refusals above come from the changed field)."""
    root = _copy(env, "moved")
    t = Trainer(make_cfg(env, root, f"teacher.cache={env['cache']}", "experiment.seed=5",
                         "data.augment_pool_seed=0", "student.kwargs.dim=16"), run_dir=env["tmp"] / "runs/ok")
    assert t.teacher is None and t.teacher_cache is not None


# ------------------------------------------------------------------------------- independent view seeds
_M64 = (1 << 64) - 1


def _splitmix64_next(state: int) -> int:
    """One output of Vigna's splitmix64 for the given state (state advanced by the golden gamma first)."""
    z = (state + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _independent_view_seed(pool_seed: int, index: int, view: int) -> int:
    """The sampler's documented chain: h = splitmix64(h XOR part) over (seed, tag "VIEW", index, view), then >> 1."""
    h = 0
    for part in (pool_seed, int.from_bytes(b"VIEW", "big"), index, view):
        h = _splitmix64_next(h ^ (part & _M64))
    return h >> 1


def test_splitmix64_reference_vector() -> None:
    # the first output of splitmix64 seeded with 0 (Vigna's reference implementation): 0xE220A8397B1DCDAF
    assert _splitmix64_next(0) == 0xE220A8397B1DCDAF


def test_cache_holds_the_independently_computed_views(env: dict) -> None:
    index = json.loads((env["cache"] / "index.json").read_text())
    keys = []
    for s in index["shards"]:
        with safe_open(str(env["cache"] / s["file"]), framework="pt") as f:
            keys += list(zip(f.get_tensor("index").tolist(), f.get_tensor("seed").tolist()))
    # view v = index * pool + j, in order, with seed view_seed(pool_seed = experiment seed 0, index, j)
    assert keys == [(i, _independent_view_seed(0, i, j)) for i in range(N) for j in range(POOL)]
    assert len(set(keys)) == N * POOL
