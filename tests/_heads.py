"""Shared checks for losses with trainable alignment heads: the heads are the optimizer's ``align`` group, are
saved in training checkpoints, and resume exactly (a run resumed from its mid checkpoint ends bit-identical to
the straight run: student, heads and optimizer state); and the seeded logit maps their per-pixel transcriptions
are checked on. Used by tests/test_ofa.py, test_hmkd.py, test_heteroakd.py and test_fskd.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def logit_maps(seed: int, *, k: int, h: int, w: int, b: int = 2, dtype=torch.float64, ignore_index: int = 255):
    """Seeded student and teacher logits (``b, k, h, w``, std 2) and labels with ``ignore_index`` pixels in both
    images (the first two rows of image 0, part of row 3 of image 1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, h, w, generator=g, dtype=dtype) * 2
    t = torch.randn(b, k, h, w, generator=g, dtype=dtype) * 2
    y = torch.randint(0, k, (b, h, w), generator=g)
    y[0, :2] = ignore_index
    y[1, 3, 1:5] = ignore_index
    return s, t, y


def report_terms(data_root: Path, out: Path, losses: str) -> dict:
    """``c2vkd report`` (2 iterations) of the toy run with ``losses``: its per-term records (raw, grad_share, ...),
    after checking that every term has a positive gradient share and a finite raw value."""
    import math

    from c2vkd.runners.report import run_report

    cfg = out / "exp.yaml"
    cfg.write_text("{}\n")
    terms = run_report(cfg, toy_overrides(data_root, out, losses), iters=2)["compact"]["terms"]
    assert all(terms[k]["grad_share"] > 0 and math.isfinite(terms[k]["raw"]) for k in terms), terms
    return terms


def toy_overrides(data_root: Path, out: Path, losses: str) -> list[str]:
    """``--set`` overrides of a 4-iteration toy_cnn -> toy_vit run on the toy data, checkpoints every 2."""
    return [
        f"data.root={data_root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "student.kwargs.drop=0.0",
        "optim.lr=0.01", "schedule.iters=4", "schedule.warmup_iters=0", "train.progress=false",
        "train.log_interval=1", f"experiment.output_dir={out}", "train.device=cpu", "eval.split=null",
        "eval.final_split=null", "train.ckpt_interval=2", "experiment.deterministic=true",
        "teacher.name=toy_cnn", "teacher.allow_random_init=true", f"losses={losses}"]


def check_heads_train_and_resume_exactly(cfg: dict, tmp_path: Path, head_prefix: str) -> dict:
    """Run ``cfg`` straight (4 iterations), then resumed from its iteration-2 checkpoint; assert the trainable
    heads are exactly the ``align`` group, that heads named ``head_prefix...`` are checkpointed and trained, and
    that the resumed run ends identical. Returns the last metrics row of the straight run."""
    from c2vkd.engine.trainer import Trainer
    from c2vkd.utils.io import safe_load

    t = Trainer(cfg, run_dir=tmp_path / "straight")
    heads = {id(p) for p in t.model.losses.parameters() if p.requires_grad}
    groups = {g["name"]: {id(p) for p in g["params"]} for g in t.optimizer.param_groups}
    assert heads and groups["align"] == heads and not (groups["base"] & heads)
    t.fit()
    ck = tmp_path / "straight/checkpoints"
    end, mid = safe_load(ck / "iter_0000004.pt"), safe_load(ck / "iter_0000002.pt")
    assert any(k.startswith(head_prefix) for k in end["loss_heads"])
    assert any(not torch.equal(mid["loss_heads"][k], end["loss_heads"][k]) for k in end["loss_heads"])  # trained
    rows = [r for r in map(json.loads, (tmp_path / "straight/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    for suffix in ("", ".sha256"):
        (tmp_path / f"resumed/checkpoints/iter_0000002.pt{suffix}").write_bytes(
            (ck / f"iter_0000002.pt{suffix}").read_bytes())
    r = Trainer(cfg, run_dir=tmp_path / "resumed", resume="auto")
    assert r.iteration == 2
    live = r.model.losses.state_dict()
    assert set(live) == set(mid["loss_heads"]) and all(torch.equal(live[k], mid["loss_heads"][k]) for k in live)
    r.fit()
    res = safe_load(tmp_path / "resumed/checkpoints/iter_0000004.pt")
    for part in ("student", "loss_heads"):
        assert end[part].keys() == res[part].keys()
        for k in end[part]:
            assert torch.equal(end[part][k], res[part][k]), (part, k)
    sa, sb = end["optimizer"]["state"], res["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for pid in sa:
        for name, v in sa[pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[pid][name])), (pid, name)
    return rows[-1]
