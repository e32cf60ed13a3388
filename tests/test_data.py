"""build_dataset, sample-seed determinism, TrainSampler exactness (DDP / resume), loaders, check_dataset,
and the bundled CamVid sample."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2vkd import IGNORE_INDEX
from c2vkd.data import (
    DEFAULT_DATA_CFG,
    SegDataset,
    ShardedEvalSampler,
    TrainSampler,
    build_dataloader,
    build_dataset,
    check_dataset,
    format_report,
    sample_root,
    seg_collate,
    synthetic,
)
from c2vkd.data.make_sample import evenly_spaced, make_sample


@pytest.fixture
def root(tmp_path) -> Path:
    return synthetic.write_folder(tmp_path / "d", {"train": 6, "val": 3}, ignore_index=255)


def data_cfg(root: Path, **kw) -> dict:
    base = {"format": "folder", "root": str(root), "train_transform": {"crop_size": [12, 12], "jitter": 0.2}}
    base.update(kw)
    return base


def take(it, n):
    return list(itertools.islice(it, n))


# --------------------------------------------------------------------------------- build_dataset
def test_build_dataset_train_and_eval(root):
    ds = build_dataset(data_cfg(root), "train", train=True)
    assert isinstance(ds, SegDataset) and ds.train and len(ds) == 6
    s = ds[(2, 123)]
    assert set(s) == {"image", "label", "name"} and s["name"] == "train_002"
    assert s["image"].shape == (3, 12, 12) and s["label"].shape == (12, 12)
    ev = build_dataset(data_cfg(root), "val", train=False)
    e = ev[0]
    assert e["image"].shape == (3, 16, 20) and e["label"].shape == (16, 20)
    assert torch.equal(ev[0]["image"], ev[(0, 999)]["image"])  # eval ignores the seed
    with pytest.raises(IndexError):
        ev[3]
    assert ev[-1]["name"] == "val_002"


def test_default_config_is_accepted(root):
    cfg = json.loads(json.dumps(DEFAULT_DATA_CFG)) | {"root": str(root)}
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 3


def test_eval_resize_keeps_native_label(root):
    ev = build_dataset(data_cfg(root, eval_transform={"mode": "resize", "size": [32, 40]}), "val", False)
    s = ev[0]
    assert s["image"].shape == (3, 32, 40) and s["label"].shape == (16, 20)


def test_sample_seed_determinism(root):
    ds = build_dataset(data_cfg(root), "train", train=True)
    a, b, c = ds[(1, 42)], ds[(1, 42)], ds[(1, 43)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    outs = [ds[(1, s)] for s in range(6)]
    assert len({o["image"].numpy().tobytes() for o in outs}) > 3
    # the global RNG plays no part
    torch.manual_seed(999)
    np.random.seed(999)
    assert torch.equal(ds[(1, 42)]["image"], a["image"])
    # an int key on a training set is deterministic too (seed = index)
    assert torch.equal(ds[1]["image"], ds[(1, 1)]["image"])


# --------------------------------------------------------------------------------- TrainSampler
def test_train_sampler_epochs_are_permutations():
    s = take(iter(TrainSampler(7, seed=3)), 21)
    idx = [i for i, _ in s]
    for e in range(3):
        assert sorted(idx[7 * e : 7 * e + 7]) == list(range(7))
    assert idx[:7] != idx[7:14]  # a new order every epoch
    seeds = [sd for _, sd in s]
    assert len(set(seeds)) == 21 and all(0 <= sd < 2**63 for sd in seeds)
    assert take(iter(TrainSampler(7, seed=3)), 21) == s  # reproducible
    assert take(iter(TrainSampler(7, seed=4)), 7) != s[:7]
    assert [i for i, _ in take(iter(TrainSampler(7, shuffle=False)), 9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


@pytest.mark.parametrize("n,b,world_size", [(10, 3, 2), (7, 2, 3), (5, 4, 2), (2, 1, 4)])
def test_train_sampler_ddp_equals_single_process(n, b, world_size):
    """World size W with per-rank batch b == one process with batch W*b: same samples, same seeds;
    element j of rank r's k-th batch is element W*j + r of the single-process k-th batch."""
    B = world_size * b
    steps = 2 * n + 3  # several epochs, batches straddling epoch ends
    single = take(iter(TrainSampler(n, seed=11)), steps * B)
    ranks = [take(iter(TrainSampler(n, seed=11, rank=r, world_size=world_size)), steps * b) for r in range(world_size)]
    for k in range(steps):
        glob = single[k * B : (k + 1) * B]
        per_rank = [ranks[r][k * b : (k + 1) * b] for r in range(world_size)]
        assert sorted(sum(per_rank, [])) == sorted(glob)  # same set (with seeds)
        for r in range(world_size):
            for j in range(b):
                assert per_rank[r][j] == glob[world_size * j + r]


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (3, 2)])
def test_train_sampler_resume_mid_epoch(world_size, rank):
    full = take(iter(TrainSampler(9, seed=5, rank=rank, world_size=world_size)), 40)
    for start in (0, 1, 4, 9, 13, 27):
        resumed = take(iter(TrainSampler(9, seed=5, rank=rank, world_size=world_size, start=start)), 40 - start)
        assert resumed == full[start:]


def test_train_sampler_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        TrainSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        TrainSampler(0)
    with pytest.raises(ValueError, match="start"):
        TrainSampler(5, start=-1)


def test_eval_sampler_shards_without_duplicates():
    shards = [list(ShardedEvalSampler(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(ShardedEvalSampler(7, r, 3)) for r in range(3)] == [3, 2, 2]


# --------------------------------------------------------------------------------- DataLoader
def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_loader_ddp_and_resume_exact(root):
    ds = build_dataset(data_cfg(root), "train", train=True)
    single = batches(build_dataloader(ds, batch_size=4, train=True, seed=7), 4)
    assert single[0]["image"].shape == (4, 3, 12, 12) and single[0]["label"].shape == (4, 12, 12)
    r0 = batches(build_dataloader(ds, batch_size=2, train=True, seed=7, rank=0, world_size=2), 4)
    r1 = batches(build_dataloader(ds, batch_size=2, train=True, seed=7, rank=1, world_size=2), 4)
    for k in range(4):
        for key in ("image", "label"):
            merged = torch.stack([r0[k][key], r1[k][key]], dim=1).flatten(0, 1)  # documented interleave
            assert torch.equal(merged, single[k][key])
    # resume after 2 iterations (8 samples consumed) continues identically
    resumed = batches(build_dataloader(ds, batch_size=4, train=True, seed=7, start_sample=8), 2)
    for a, b in zip(resumed, single[2:]):
        assert torch.equal(a["image"], b["image"]) and a["name"] == b["name"]


def test_train_loader_workers_match_main_process(root):
    ds = build_dataset(data_cfg(root), "train", train=True)
    main = batches(build_dataloader(ds, batch_size=3, train=True, seed=1, num_workers=0), 3)
    loader = build_dataloader(ds, batch_size=3, train=True, seed=1, num_workers=2)
    assert loader.persistent_workers
    rng_before = torch.get_rng_state()
    work = batches(loader, 3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # loader does not consume the global RNG
    for a, b in zip(main, work):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_eval_loader_covers_everything_once(root):
    ev = build_dataset(data_cfg(root), "val", train=False)
    names = [n for r in range(2) for b in build_dataloader(ev, batch_size=2, train=False, rank=r, world_size=2) for n in b["name"]]
    assert sorted(names) == ["val_000", "val_001", "val_002"]
    assert len(build_dataloader(ev, batch_size=2, train=False)) == 2  # last partial batch kept


def test_seg_collate_pads_different_sizes():
    a = {"image": torch.ones(3, 4, 5), "label": torch.zeros(4, 5, dtype=torch.long), "name": "a"}
    b = {"image": torch.ones(3, 6, 3), "label": torch.ones(6, 3, dtype=torch.long), "name": "b"}
    out = seg_collate([a, b])
    assert out["image"].shape == (2, 3, 6, 5) and out["label"].shape == (2, 6, 5)
    assert out["image_size"].tolist() == [[4, 5], [6, 3]] and out["label_size"].tolist() == [[4, 5], [6, 3]]
    assert torch.all(out["image"][0, :, 4:] == 0) and torch.all(out["label"][0, 4:] == IGNORE_INDEX)
    assert torch.all(out["label"][1, :, 3:] == IGNORE_INDEX) and out["name"] == ["a", "b"]


# --------------------------------------------------------------------------------- check_dataset
def test_check_dataset_counts_and_histogram(root):
    rep = check_dataset(root)
    assert rep.ok and set(rep.splits) == {"train", "val"} and rep.splits["train"].num_samples == 6
    want = np.zeros(3, dtype=np.int64)
    ign = 0
    for split in ("train", "val"):
        for p in sorted((root / "labels" / split).glob("*.png")):
            raw = np.asarray(Image.open(p))
            want += np.bincount(raw[raw < 3], minlength=3)
            ign += int((raw == 255).sum())
    assert rep.class_pixels.tolist() == want.tolist() and rep.ignore_pixels == ign
    text = format_report(rep)
    for needle in ("(ignore)", "no problems found", "split 'test' not present"):
        assert needle in text
    # one row per split (samples, valid) and per class (id, name, pixels as counted above, with thousands separator)
    assert re.search(r"^train\s+train\s+6\s+6\s", text, re.M) and re.search(r"^val\s+val\s+3\s+3\s", text, re.M)
    for k, name in enumerate(("a", "b", "c")):
        assert re.search(rf"^\s*{k}\s+{name}\s+{int(want[k]):,}\s", text, re.M), (name, text)
    assert re.search(rf"^\s*-\s+\(ignore\)\s+{ign:,}\s", text, re.M)


def test_check_dataset_collects_every_problem(root):
    (root / "labels/train/train_000.png").unlink()  # image without label
    (root / "images/train/train_001.png").unlink()  # listed label without image
    Image.new("L", (7, 7)).save(root / "labels/train/train_002.png")  # size mismatch
    raw = np.asarray(Image.open(root / "labels/train/train_003.png")).copy()
    raw[0, 0] = 9
    Image.fromarray(raw).save(root / "labels/train/train_003.png")  # bad value
    (root / "images/val/val_001.png").write_bytes(b"not an image")  # corrupt
    rep = check_dataset(root, splits=["train", "val", "test"], num_classes=4)
    assert not rep.ok
    text = format_report(rep)
    expected = [
        ("train_000.png", "image has no label"),
        ("train_001.png", "label has no image"),
        ("train_002.png", "does not match image size"),
        ("train_003.png", "[9]"),
        ("val_001.png", "unreadable or corrupt image"),
        ("images/test", "not found"),
        ("d", "expected 4 classes"),
    ]
    for fname, msg in expected:
        assert any(str(p.path).endswith(fname) and msg in p.message for p in rep.problems), (fname, msg, rep.problems)
        assert msg in text
    assert len(rep.problems) == len(expected)
    assert f"{len(expected)} problem(s)" in text
    assert rep.splits["train"].num_samples == 4 and rep.splits["train"].num_ok == 2


def test_check_dataset_missing_classes_json(root):
    (root / "classes.json").unlink()
    rep = check_dataset(root)
    assert len(rep.problems) == 1 and rep.problems[0].path == root / "classes.json"  # reported once
    assert "classes.json not found" in format_report(rep)


# --------------------------------------------------------------------------------- bundled sample
def test_bundled_camvid_sample_loads():
    root = sample_root()
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 2_000_000
    readme = (root / "README.md").read_text()
    assert "CC BY-NC 4.0" in readme and "Brostow" in readme and "make_sample" in readme
    counts = {"train": 48, "val": 16, "test": 16}
    for split, n in counts.items():
        ds = build_dataset({"format": "camvid", "root": str(root)}, split, train=False)
        assert len(ds) == n and ds.num_classes == 11 and ds.palette is not None
    s = ds[0]
    assert s["image"].shape == (3, 180, 240) and s["label"].shape == (180, 240)
    assert set(s["label"].unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}
    tr = build_dataset({"format": "camvid", "root": str(root), "train_transform": {"crop_size": [96, 96]}}, "train", True)
    assert tr[(0, 1)]["image"].shape == (3, 96, 96)


def test_make_sample(tmp_path):
    assert evenly_spaced(list("abcdefghij"), 4) == ["a", "d", "g", "j"]
    assert evenly_spaced(list("ab"), 5) == ["a", "b"]
    src = synthetic.write_folder(tmp_path / "src", {"train": 5, "val": 3}, classes=[str(i) for i in range(11)],
                                 ignore_index=11, size_hw=(32, 40), image_ext=".jpg")
    (src / "README.md").write_text("# x\n\nLicence and attribution: CC BY-NC 4.0. Cite: someone.\n")
    out = make_sample(src, tmp_path / "out", counts={"train": 3, "val": 2}, size=(20, 16))
    assert (out / "train.txt").read_text().split() == ["train_000", "train_002", "train_004"]
    assert (out / "classes.json").read_bytes() == (src / "classes.json").read_bytes()
    assert "CC BY-NC 4.0" in (out / "README.md").read_text()
    ds = build_dataset({"format": "camvid", "root": str(out)}, "val", train=False)
    assert len(ds) == 2 and ds[0]["label"].shape == (16, 20)
    with Image.open(out / "labels/train/train_002.png") as im:  # nearest: only original values survive
        src_vals = set(np.unique(np.asarray(Image.open(src / "labels/train/train_002.png"))).tolist())
        assert set(np.unique(np.asarray(im)).tolist()) <= src_vals
