"""Evaluation sharded over 2 gloo processes (as the trainer does it under DDP: ShardedEvalSampler loaders, confusion
matrix summed over ranks) gives exactly the single-process confusion matrix and mIoU, on an odd number of images
(unequal shards) with TTA; the single-process numbers are checked against a plain-Python count as well."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _toy
from c2vkd.data import build_dataloader, build_dataset
from c2vkd.data.synthetic import write_folder
from c2vkd.eval.inference import evaluate, predict_logits

DATA = {"format": "folder", "train_transform": {"crop_size": [32, 32]}}
EVAL = dict(mode="slide", window=(16, 24), stride=(12, 16), scales=(0.75, 1.0), flip=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, root: str, state: dict, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _toy.ToyViT(3)
        model.load_state_dict(state)
        ds = build_dataset(dict(DATA, root=root), "val", train=False)
        loader = build_dataloader(ds, batch_size=2, train=False, rank=rank, world_size=world)
        names = [n for b in loader for n in b["name"]]
        m = evaluate(model, loader, num_classes=3, device="cpu", progress=False, **EVAL)
        out[rank] = (names, m.confusion.clone(), m.miou, m.num_pixels)
    finally:
        dist.destroy_process_group()


def test_shards_cover_every_image_once_and_sum_to_the_whole(tmp_path: Path) -> None:
    """In one process (fast): the two ranks' eval loaders are disjoint, cover every image, and their confusion
    matrices sum to the single-process one. The real all-reduce over gloo is the slow test below."""
    root = write_folder(tmp_path / "ds", {"val": 5}, size_hw=(32, 40))
    torch.manual_seed(0)
    model = _toy.ToyViT(3).eval()
    ds = build_dataset(dict(DATA, root=str(root)), "val", train=False)
    single = evaluate(model, build_dataloader(ds, batch_size=2, train=False), num_classes=3, device="cpu",
                      progress=False, **EVAL)
    total, names = torch.zeros(3, 3, dtype=torch.int64), []
    for rank in (0, 1):
        loader = build_dataloader(ds, batch_size=2, train=False, rank=rank, world_size=2)
        names.append([n for b in loader for n in b["name"]])
        total += evaluate(model, loader, num_classes=3, device="cpu", progress=False, **EVAL).confusion
    assert names == [["val_000", "val_002", "val_004"], ["val_001", "val_003"]]
    assert torch.equal(total, single.confusion) and int(total.sum()) == single.num_pixels > 0


@pytest.mark.slow  # two spawned processes: minutes when the shared CPU is loaded
def test_sharded_evaluation_equals_single_process(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", {"val": 5}, size_hw=(32, 40))
    torch.manual_seed(0)
    model = _toy.ToyViT(3).eval()
    ds = build_dataset(dict(DATA, root=str(root)), "val", train=False)
    single = evaluate(model, build_dataloader(ds, batch_size=2, train=False), num_classes=3, device="cpu",
                      progress=False, **EVAL)

    # independent count of the single-process matrix: per image, argmax of the TTA logits vs the label
    mat = [[0] * 3 for _ in range(3)]
    for i in range(len(ds)):
        item = ds[i]
        pred = predict_logits(model, item["image"][None], num_classes=3, **EVAL)[0].argmax(0)
        for p, t in zip(pred.reshape(-1).tolist(), item["label"].reshape(-1).tolist()):
            if t != 255:
                mat[t][p] += 1
    assert single.confusion.tolist() == mat

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _port(), str(root), model.state_dict(), out), nprocs=2, join=True)
        got = dict(out)
    names0, names1 = got[0][0], got[1][0]
    assert sorted(names0 + names1) == [f"val_{i:03d}" for i in range(5)] and len(names0) == 3  # disjoint, unequal
    for rank in (0, 1):
        _, confusion, miou, pixels = got[rank]
        assert torch.equal(confusion, single.confusion), rank  # every rank holds the summed matrix
        assert miou == single.miou and pixels == single.num_pixels == sum(map(sum, mat))
