"""Two-process DDP (torchrun, gloo on CPU) against one process at the same total batch.

``torchrun --nproc-per-node 2 -m c2vkd distill`` with ``data.batch_size=4`` (2 per rank) must follow the same
per-iteration loss trajectory as a single process with batch 4 and the same seed: the sampler gives the two
ranks' batches the exact samples and augmentations of the single-process batch, DDP averages the gradients,
and the trainer averages the logged terms over ranks. Only rank 0 writes logs, metrics and checkpoints.

What makes the two runs comparable (and what would legitimately break the equality):

* no BatchNorm in the trained student: BN normalises with per-process batch statistics, so 2 + 2 images
  are not 4 images (the toy ViT uses GroupNorm, per sample). The toy CNN teacher has BN but runs in eval
  mode (frozen running statistics), which is per sample too;
* no dropout (``student.kwargs.drop=0``): each rank has its own dropout stream;
* no ignored pixels (no void label, ``scale_range [1, 1]`` so crops are never padded): CE / KD average
  over the valid pixels of each rank's half batch, and the mean of two means equals the mean over the batch
  only when both halves have the same number of valid pixels;
* only per-pixel / per-element losses (ce, kd, fitnet): cross-image terms (VLFD's patch graph, CIRKD)
  relate the images of one process's batch only (docs/architecture.md, "Multi-GPU").
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _toy
from c2vkd.config import load_config
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.trainer import Trainer
from c2vkd.engine.weights import save_student
from c2vkd.utils.io import safe_load

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # torchrun + two worker processes
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", {"train": 8, "val": 2, "test": 3}, ignore_index=None, size_hw=(32, 40))
    torch.manual_seed(1)
    save_student(tmp_path / "teacher.safetensors", _toy.ToyCNN(3), "toy_cnn", 3, {}, ["a", "b", "c"])
    overrides = [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.train_transform.scale_range=[1.0,1.0]", "data.batch_size=4", "data.num_workers=0",
        "student.name=toy_vit", "student.kwargs.drop=0.0", "teacher.name=toy_cnn",
        f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
        "losses=[{name: ce}, {name: kd}, {name: fitnet, weight: 0.5}]", "optim.lr=0.01", "schedule.iters=4",
        "train.progress=false", "train.log_interval=1", "train.ckpt_interval=2", "train.val_interval=2",
        "train.device=cpu", "experiment.imports=[_toy]", "experiment.seed=3",
    ]
    ddp_dir = tmp_path / "ddp"
    (tmp_path / "empty.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "c2vkd", "distill", str(tmp_path / "empty.yaml"),
           "--run-dir", str(ddp_dir), *(a for o in overrides for a in ("--set", o))]
    # start the two-process run, then do the single-process reference in this process meanwhile
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                            cwd=tmp_path)
    try:
        Trainer(load_config(None, overrides), run_dir=tmp_path / "single").fit()
        out, err = proc.communicate(timeout=240)
    except BaseException:
        proc.kill()
        out, err = proc.communicate()
        print(f"--- torchrun stdout ---\n{out}\n--- torchrun stderr ---\n{err}", file=sys.stderr)
        raise
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}):\n{err[-8000:]}"

    single, ddp = _rows(tmp_path / "single"), _rows(ddp_dir)
    # only rank 0 wrote: every record exactly once, in the same sequence as the single-process run
    assert [(r["iter"], "lr" in r, r.get("val_split"), r.get("eval_split")) for r in ddp] == \
        [(r["iter"], "lr" in r, r.get("val_split"), r.get("eval_split")) for r in single]
    train_s = [r for r in single if "lr" in r]
    train_d = [r for r in ddp if "lr" in r]
    assert [r["iter"] for r in train_d] == [1, 2, 3, 4]
    for rs, rd in zip(train_s, train_d):
        for key in ("loss", "ce", "kd", "fitnet", "fitnet/w", "lr", "grad_norm"):
            assert math.isclose(rd[key], rs[key], rel_tol=1e-4, abs_tol=1e-7), (rs["iter"], key, rs[key], rd[key])
    # the loss trajectory is not trivially flat: training actually moved the weights
    assert len({round(r["loss"], 4) for r in train_d}) == 4

    # evaluation is sharded over the ranks and its confusion matrix summed: all 3 test images are counted
    ev_s = json.loads((tmp_path / "single/eval_test.json").read_text())
    ev_d = json.loads((ddp_dir / "eval_test.json").read_text())
    assert ev_d["num_pixels"] == ev_s["num_pixels"] == 3 * 32 * 40

    ckpts = sorted(p.name for p in (ddp_dir / "checkpoints").iterdir())
    assert ckpts == ["iter_0000002.pt", "iter_0000002.pt.sha256", "iter_0000004.pt", "iter_0000004.pt.sha256"]
    final_d = safe_load(ddp_dir / "checkpoints/iter_0000004.pt")
    final_s = safe_load(tmp_path / "single/checkpoints/iter_0000004.pt")
    assert len(final_d["rng_ranks"]) == 2  # every rank's RNG stream, for an exact DDP resume
    for k, v in final_s["student"].items():
        torch.testing.assert_close(final_d["student"][k], v, rtol=1e-4, atol=1e-5, msg=k)

    log = (ddp_dir / "train.log").read_text()
    assert log.count("saved checkpoint") == 2 and log.count("final evaluation") == 1
    assert sorted(p.name for p in ddp_dir.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([x for x in out.splitlines() if x.startswith("{")]) == 1  # one result line, not one per rank
