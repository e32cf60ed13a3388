"""The training loop's wiring, on tiny models: what each config knob must do to the optimizer steps, the logs,
the checkpoints and the evaluation. References are computed independently here (the warm-up + poly formula, a
naive SGD update, a doubled batch), never with the engine's own helpers.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _toy  # noqa: F401  (registers toy_cnn / toy_vit)
from c2vkd.config import load_config
from c2vkd.data import build_dataset
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.trainer import Trainer
from c2vkd.utils.io import CheckpointError, safe_load

TESTS = Path(__file__).resolve().parent
# StepSpy replaces optimizer.step after the lr scheduler wrapped it; torch warns about that, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def make_cfg(root: Path, out: Path, *extra: str) -> dict:
    return load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "optim.lr=0.01",
        "schedule.iters=6", "train.progress=false", "train.log_interval=1", f"experiment.output_dir={out}",
        "train.device=cpu", "eval.split=null", "eval.final_split=null", *extra])


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class StepSpy:
    """Wraps ``optimizer.step``: before every step records each group's lr, the total gradient norm, and (with
    ``keep``) copies of the parameters and gradients; after it, the updated parameters."""

    def __init__(self, trainer: Trainer, keep: bool = False) -> None:
        self.opt, self.keep = trainer.optimizer, keep
        self.lrs: list[list[float]] = []
        self.norms: list[float] = []
        self.before: list[list[list[torch.Tensor]]] = []
        self.grads: list[list[list[torch.Tensor]]] = []
        self.after: list[list[list[torch.Tensor]]] = []
        real = self.opt.step

        def step(*a, **kw):
            groups = self.opt.param_groups
            self.lrs.append([g["lr"] for g in groups])
            gs = [p.grad for g in groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in gs]))))
            if keep:
                self.before.append([[p.detach().clone() for p in g["params"]] for g in groups])
                self.grads.append([[p.grad.detach().clone() for p in g["params"]] for g in groups])
            out = real(*a, **kw)
            if keep:
                self.after.append([[p.detach().clone() for p in g["params"]] for g in groups])
            return out

        self.opt.step = step


def schedule(k: int, *, lr: float, iters: int, warmup: int, ratio: float, power: float, min_lr: float) -> float:
    """lr of optimizer step k (0-based): poly decay to min_lr, times a linear warm-up from ratio to 1."""
    poly = (lr - min_lr) * (1 - k / iters) ** power + min_lr
    return poly * (ratio + (1 - ratio) * k / warmup) if k < warmup else poly


# --------------------------------------------------------------------------------- lr schedule + groups
SCHED = dict(lr=0.01, iters=7, warmup=3, ratio=0.1, power=0.9, min_lr=0.0005)
HEAD_MULT = 10.0


@pytest.fixture(scope="module")
def sched_run(data_root: Path, teacher_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sched")
    cfg = make_cfg(data_root, out, "teacher.name=toy_cnn", f"teacher.checkpoint={teacher_ckpt}",
                   "losses=[{name: ce}, {name: fitnet, weight: 0.5}]", f"optim.lr={SCHED['lr']}",
                   f"optim.head_lr_mult={HEAD_MULT}", f"schedule.iters={SCHED['iters']}",
                   f"schedule.warmup_iters={SCHED['warmup']}", f"schedule.warmup_ratio={SCHED['ratio']}",
                   f"schedule.power={SCHED['power']}", f"schedule.min_lr={SCHED['min_lr']}", "train.log_interval=2")
    t = Trainer(cfg, run_dir=out / "r")
    spy = StepSpy(t)
    head_ids = {id(p) for p in t.model.losses.parameters() if p.requires_grad}
    groups = [{id(p) for p in g["params"]} for g in t.optimizer.param_groups]
    t.fit()
    return {"spy": spy, "rows": [r for r in rows(out / "r") if "lr" in r], "head_ids": head_ids, "groups": groups,
            "student_ids": {id(p) for p in t.student.parameters() if p.requires_grad}}


def test_every_step_uses_the_warmup_poly_lr_in_both_groups(sched_run) -> None:
    spy = sched_run["spy"]
    assert len(spy.lrs) == SCHED["iters"]
    for k, lrs in enumerate(spy.lrs):
        want = schedule(k, **SCHED)
        assert lrs == pytest.approx([want, HEAD_MULT * want], rel=1e-9), k
    # the head group holds exactly the loss's alignment head (fitnet's adapter), the base group the student
    base, heads = sched_run["groups"]
    assert heads == sched_run["head_ids"] and heads
    assert base == sched_run["student_ids"]


def test_logged_grad_norm_is_the_unclipped_norm_at_the_step(sched_run) -> None:
    spy, logged = sched_run["spy"], sched_run["rows"]
    assert [r["iter"] for r in logged] == [2, 4, 6, 7]
    for r in logged:
        assert r["grad_norm"] == pytest.approx(spy.norms[r["iter"] - 1], rel=1e-5)


def test_logged_lr_is_the_lr_of_the_logged_step(sched_run) -> None:
    logged = sched_run["rows"]
    for r in logged:
        assert r["lr"] == pytest.approx(schedule(r["iter"] - 1, **SCHED), rel=1e-9), r["iter"]


# ----------------------------------------------------------------------------------- SGD and clipping
def test_sgd_momentum_weight_decay_and_head_group_match_a_naive_update(data_root: Path, teacher_ckpt: Path,
                                                                     tmp_path: Path) -> None:
    lr, mom, wd, mult, iters = 0.05, 0.6, 0.05, 3.0, 3
    cfg = make_cfg(data_root, tmp_path, "teacher.name=toy_cnn", f"teacher.checkpoint={teacher_ckpt}",
                   "losses=[{name: ce}, {name: fitnet, weight: 0.5}]", "optim.name=sgd", f"optim.lr={lr}",
                   f"optim.momentum={mom}", f"optim.weight_decay={wd}", f"optim.head_lr_mult={mult}",
                   f"schedule.iters={iters}")
    t = Trainer(cfg, run_dir=tmp_path / "sgd")
    assert isinstance(t.optimizer, torch.optim.SGD)
    spy = StepSpy(t, keep=True)
    t.fit()
    assert len(spy.after) == iters
    bufs = None
    for k in range(iters):
        factor = 1 - k / iters  # power 1, no warm-up, min_lr 0
        new_bufs = []
        for gi, (ps, gs, qs) in enumerate(zip(spy.before[k], spy.grads[k], spy.after[k])):
            group_lr = lr * (mult if gi == 1 else 1.0) * factor
            assert spy.lrs[k][gi] == pytest.approx(group_lr, rel=1e-9)
            nb = []
            for j, (p, g, q) in enumerate(zip(ps, gs, qs)):
                d = g + wd * p
                b = d if bufs is None else mom * bufs[gi][j] + d
                nb.append(b)
                torch.testing.assert_close(q, p - group_lr * b, rtol=1e-5, atol=1e-7)
            new_bufs.append(nb)
        bufs = new_bufs


def test_grad_clip_caps_the_norm_of_the_applied_gradient(data_root: Path, tmp_path: Path) -> None:
    clip = 0.05
    t = Trainer(make_cfg(data_root, tmp_path, f"train.grad_clip={clip}", "schedule.iters=3"), run_dir=tmp_path / "c")
    spy = StepSpy(t)
    t.fit()
    logged = [r["grad_norm"] for r in rows(tmp_path / "c") if "lr" in r]
    assert len(logged) == 3 and min(logged) > 2 * clip  # the clip was active at every step ...
    assert spy.norms == pytest.approx([clip] * 3, rel=1e-4)  # ... and the applied gradient has norm = clip


# ------------------------------------------------------------------------------- accumulation + resume
@pytest.fixture(scope="module")
def plain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No void pixels: then the mean CE of two 1-image micro-batches equals that of the 2-image batch."""
    return write_folder(tmp_path_factory.mktemp("plain"), {"train": 6}, ignore_index=None, size_hw=(32, 40))


def _accum_cfg(root: Path, out: Path, batch: int, accum: int) -> dict:
    return make_cfg(root, out, f"data.batch_size={batch}", f"train.accum_steps={accum}", "student.kwargs.drop=0.0",
                    "data.train_transform.scale_range=[1.0,1.0]", "schedule.iters=4", "train.ckpt_interval=2",
                    "experiment.deterministic=true")


def test_accum_steps_two_equals_the_doubled_batch_and_resumes_exactly(plain_root: Path, tmp_path: Path) -> None:
    Trainer(_accum_cfg(plain_root, tmp_path, 2, 1), run_dir=tmp_path / "b2").fit()
    acc_cfg = _accum_cfg(plain_root, tmp_path, 1, 2)
    Trainer(acc_cfg, run_dir=tmp_path / "acc").fit()
    big, acc = safe_load(tmp_path / "b2/checkpoints/iter_0000004.pt"), safe_load(tmp_path / "acc/checkpoints/iter_0000004.pt")
    for k, v in big["student"].items():
        torch.testing.assert_close(acc["student"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    rb, ra = [r for r in rows(tmp_path / "b2") if "lr" in r], [r for r in rows(tmp_path / "acc") if "lr" in r]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-4)
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=1e-3)
    assert len({round(r["loss"], 5) for r in ra}) == 4  # the weights moved

    # resume the accumulating run from its mid checkpoint: bitwise the same weights AND optimizer state values
    (tmp_path / "res/checkpoints").mkdir(parents=True)
    for suffix in ("", ".sha256"):
        src = tmp_path / f"acc/checkpoints/iter_0000002.pt{suffix}"
        (tmp_path / f"res/checkpoints/iter_0000002.pt{suffix}").write_bytes(src.read_bytes())
    t = Trainer(acc_cfg, run_dir=tmp_path / "res", resume="auto")
    assert t.iteration == 2
    t.fit()
    res = safe_load(tmp_path / "res/checkpoints/iter_0000004.pt")
    assert_same_training_state(acc, res)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Student, alignment heads, optimizer state VALUES (not only keys), scheduler and iteration: bitwise."""
    assert a["iteration"] == b["iteration"]
    for part in ("student", "loss_heads"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for pid in sa:
        assert sa[pid].keys() == sb[pid].keys() and {"exp_avg", "exp_avg_sq"} <= set(sa[pid])
        for name, v in sa[pid].items():
            w = sb[pid][name]
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(w)), (pid, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]


def test_exact_resume_restores_optimizer_state_values(data_root: Path, tmp_path: Path) -> None:
    """The straight run and a run resumed at its mid-point end with equal optimizer moments, not only keys."""
    cfg = make_cfg(data_root, tmp_path, "train.ckpt_interval=2", "schedule.iters=4", "experiment.deterministic=true")
    Trainer(cfg, run_dir=tmp_path / "straight").fit()
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    for suffix in ("", ".sha256"):
        src = tmp_path / f"straight/checkpoints/iter_0000002.pt{suffix}"
        (tmp_path / f"resumed/checkpoints/iter_0000002.pt{suffix}").write_bytes(src.read_bytes())
    t = Trainer(cfg, run_dir=tmp_path / "resumed", resume="auto")
    assert t.iteration == 2
    # the resumed optimizer holds the checkpoint's moments before any step
    mid = safe_load(tmp_path / "straight/checkpoints/iter_0000002.pt")
    live = t.optimizer.state_dict()["state"]
    for pid, st in mid["optimizer"]["state"].items():
        assert torch.equal(live[pid]["exp_avg"], st["exp_avg"]) and torch.equal(live[pid]["exp_avg_sq"], st["exp_avg_sq"])
    t.fit()
    assert_same_training_state(safe_load(tmp_path / "straight/checkpoints/iter_0000004.pt"),
                               safe_load(tmp_path / "resumed/checkpoints/iter_0000004.pt"))


def test_a_resumed_run_returns_the_whole_runs_history(data_root: Path, tmp_path: Path) -> None:
    """A run stopped after its mid checkpoint and resumed in the same folder returns the history of the whole run
    (the records before the resume are read back from metrics.jsonl), equal to the straight run's: a compare
    record's val curve used to hold only the points after a resume."""
    cfg = make_cfg(data_root, tmp_path, "train.ckpt_interval=2", "schedule.iters=4", "train.val_interval=1",
                   "experiment.deterministic=true", "eval.split=val")
    straight = Trainer(cfg, run_dir=tmp_path / "straight").fit().history
    Trainer(cfg, run_dir=tmp_path / "stopped").fit(max_steps=2, finalize=False)   # checkpoint at 2, then "killed"
    with open(tmp_path / "stopped/metrics.jsonl", "a") as f:  # another run's line (a folder reused): not ours
        f.write(json.dumps({"iter": 1, "val_split": "val", "miou": 0.99, "run_id": "someone-else"}) + "\n")
    resumed = Trainer(cfg, run_dir=tmp_path / "stopped", resume="auto")
    assert resumed.iteration == 2
    history = resumed.fit().history
    val = lambda h: [(r["iter"], r["miou"]) for r in h if "val_split" in r]  # noqa: E731
    assert [i for i, _ in val(straight)] == [1, 2, 3, 4] and val(history) == val(straight)
    train = lambda h: [(r["iter"], r["loss"]) for r in h if "lr" in r]  # noqa: E731
    assert [i for i, _ in train(history)] == [1, 2, 3, 4] and train(history) == train(straight)
    assert all("run_id" not in r for r in history)


def test_adamw_default_kernel_is_fused_and_matches_a_naive_update(data_root: Path, tmp_path: Path) -> None:
    """optim.impl=auto picks torch's fused AdamW on CPU; each step equals the textbook decoupled-decay update."""
    lr, wd, (b1, b2), eps, iters = 0.01, 0.05, (0.8, 0.95), 1e-8, 3
    cfg = make_cfg(data_root, tmp_path, f"optim.lr={lr}", f"optim.weight_decay={wd}", f"optim.betas=[{b1}, {b2}]",
                   f"schedule.iters={iters}")
    t = Trainer(cfg, run_dir=tmp_path / "adamw")
    assert all(g["fused"] for g in t.optimizer.param_groups)
    spy = StepSpy(t, keep=True)
    t.fit()
    m = v = None
    for k in range(iters):
        lr_k = lr * (1 - k / iters)
        ps, gs, qs = ([x for grp in lists[k] for x in grp] for lists in (spy.before, spy.grads, spy.after))
        m = [g * (1 - b1) if m is None else b1 * mi + (1 - b1) * g for mi, g in zip(m or gs, gs)]
        v = [g * g * (1 - b2) if v is None else b2 * vi + (1 - b2) * g * g for vi, g in zip(v or gs, gs)]
        for p, mi, vi, q in zip(ps, m, v, qs):
            step = (mi / (1 - b1 ** (k + 1))) / ((vi / (1 - b2 ** (k + 1))).sqrt() + eps)
            torch.testing.assert_close(q, p * (1 - lr_k * wd) - lr_k * step, rtol=1e-5, atol=1e-6)


def test_resume_with_another_optimizer_kernel_uses_the_configured_one(data_root: Path, tmp_path: Path) -> None:
    """A checkpoint saved with the foreach kernel resumed with optim.impl=fused (and back) runs the configured
    kernel (torch would restore the saved flag) with the saved moments, and ends where the straight run does."""
    base = ("train.ckpt_interval=2", "schedule.iters=4", "experiment.deterministic=true")
    Trainer(make_cfg(data_root, tmp_path, *base, "optim.impl=foreach"), run_dir=tmp_path / "straight").fit()
    for impl in ("fused", "foreach"):
        run = tmp_path / f"resumed-{impl}"
        (run / "checkpoints").mkdir(parents=True)
        saved = tmp_path / "straight/checkpoints/iter_0000002.pt"
        if impl == "foreach":  # saved by a fused run this time
            Trainer(make_cfg(data_root, tmp_path, *base, "optim.impl=fused"),
                    run_dir=tmp_path / "fused2").fit()
            saved = tmp_path / "fused2/checkpoints/iter_0000002.pt"
        for suffix in ("", ".sha256"):
            (run / f"checkpoints/iter_0000002.pt{suffix}").write_bytes(Path(f"{saved}{suffix}").read_bytes())
        t = Trainer(make_cfg(data_root, tmp_path, *base, f"optim.impl={impl}"), run_dir=run, resume="auto")
        assert [bool(g["fused"]) for g in t.optimizer.param_groups] == [impl == "fused"] * len(t.optimizer.param_groups)
        t.fit()
        straight = safe_load(tmp_path / "straight/checkpoints/iter_0000004.pt")["student"]
        resumed = safe_load(run / "checkpoints/iter_0000004.pt")["student"]
        for k in straight:
            torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5)


def test_unknown_optimizer_kernel_is_a_clear_error(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optim.impl must be one of auto, fused, foreach, got 'fast'"):
        Trainer(make_cfg(data_root, tmp_path, "optim.impl=fast"), run_dir=tmp_path / "bad")


def test_resume_restores_the_alignment_heads(data_root: Path, tmp_path: Path) -> None:
    """A distillation run's loss heads (here FitNet's hint regressor) come back from the checkpoint on resume,
    not re-initialised (mutation survivor: restore_training_state's loss_heads / scaler arguments swapped)."""
    cfg = make_cfg(data_root, tmp_path, "train.ckpt_interval=2", "schedule.iters=2", "teacher.name=toy_cnn",
                   "teacher.allow_random_init=true", "losses=[{name: fitnet, weight: 1.0}, {name: ce, weight: 1.0}]")
    Trainer(cfg, run_dir=tmp_path / "straight").fit()
    saved = safe_load(tmp_path / "straight/checkpoints/iter_0000002.pt")["loss_heads"]
    assert saved and any("adapter" in k for k in saved)
    t = Trainer(cfg, run_dir=tmp_path / "straight", resume="auto")
    assert t.iteration == 2
    live = t.model.losses.state_dict()
    assert set(live) == set(saved) and all(torch.equal(live[k], saved[k]) for k in saved)


# -------------------------------------------------------------------------------------------- bf16
def test_amp_bf16_runs_a_real_training_step(data_root: Path, tmp_path: Path) -> None:
    t = Trainer(make_cfg(data_root, tmp_path, "train.amp=bf16", "schedule.iters=2"), run_dir=tmp_path / "bf")
    dtypes = []
    t.student.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = {k: v.clone() for k, v in t.student.state_dict().items()}
    t.fit()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the forwards ran under bf16 autocast
    after = t.student.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay float32
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "head.weight" in changed and "patch.weight" in changed
    logged = [r for r in rows(tmp_path / "bf") if "lr" in r]
    assert len(logged) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 and not r["skipped"] for r in logged)


# ------------------------------------------------------------------------------- validation wiring
def test_best_student_is_the_best_validation_checkpoint(data_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation quality is scripted (bad, medium, GOOD, medium, bad): best_student.safetensors must hold the
    weights of the 3rd validation, not the last nor the first; later, worse validations must not overwrite it."""
    import c2vkd.eval.inference as inference

    cfg = make_cfg(data_root, tmp_path, "eval.split=val", "train.val_interval=1", "schedule.iters=5",
                   "optim.lr=0.05")
    val = build_dataset(cfg["data"], "val", train=False)
    val_items = [val[i] for i in range(len(val))]
    quality = iter(["bad", "bad", "medium", "medium", "good", "good", "medium", "medium", "bad", "bad"])
    snapshots = []

    def scripted(model, images, **kw):
        q = next(quality)
        label = next(it["label"] for it in val_items if torch.equal(it["image"], images[0].cpu()))
        pred = label.clamp(0, 2).clone()
        if q == "bad":
            pred = (pred + 1) % 3
        elif q == "medium":
            pred[: pred.shape[0] // 2] = (pred[: pred.shape[0] // 2] + 1) % 3
        snapshots.append((q, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float()

    monkeypatch.setattr(inference, "predict_logits", scripted)
    t = Trainer(cfg, run_dir=tmp_path / "v")
    t.fit()
    vals = [r for r in rows(tmp_path / "v") if "val_split" in r]
    assert [r["iter"] for r in vals] == [1, 2, 3, 4, 5]
    mious = [r["miou"] for r in vals]
    assert mious.index(max(mious)) == 2 and max(mious) == 1.0 and mious[1] < 1.0 and mious[3] < 1.0
    best = safe_load(tmp_path / "v/best_student.safetensors")
    good = snapshots[4][1]  # the first image of the 3rd validation
    assert best.keys() == good.keys()
    assert all(torch.equal(best[k], good[k]) for k in best)
    final = t.student.state_dict()
    assert not all(torch.equal(best[k], final[k]) for k in best)  # training went on after the best validation
    assert safe_load(tmp_path / "v/checkpoints/iter_0000005.pt")["best_miou"] == 1.0


def test_trainer_eval_settings_reach_inference(data_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import c2vkd.eval.inference as inference

    calls = []
    real = inference.predict_logits

    def spy(model, images, **kw):
        calls.append(kw)
        return real(model, images, **kw)

    monkeypatch.setattr(inference, "predict_logits", spy)
    cfg = make_cfg(data_root, tmp_path, "eval.split=val", "eval.mode=slide", "eval.window=[16,24]",
                   "eval.stride=[8,12]", "eval.scales=[0.75,1.0]", "eval.flip=true", "train.max_val_batches=1",
                   "schedule.iters=2", "train.val_interval=1")
    Trainer(cfg, run_dir=tmp_path / "e").fit()
    # validations after iterations 1 and 2 (the final one), one batch each (2 val images, max_val_batches=1)
    assert len(calls) == 2
    for kw in calls:
        assert kw["mode"] == "slide" and tuple(kw["window"]) == (16, 24) and tuple(kw["stride"]) == (8, 12)
        assert list(kw["scales"]) == [0.75, 1.0] and kw["flip"] is True


def test_exported_student_evaluates_to_the_final_numbers(data_root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Replaces test_engine's check of the export (which only compared the model name): `c2vkd eval` of
    student.safetensors gives the run's final confusion matrix exactly."""
    from c2vkd.cli import main

    cfg = make_cfg(data_root, tmp_path, "eval.final_split=test", "schedule.iters=3")
    Trainer(cfg, run_dir=tmp_path / "x").fit()
    final = json.loads((tmp_path / "x/eval_test.json").read_text())
    (tmp_path / "c.yaml").write_text("{}\n")
    sets = [f"data.root={data_root}", "data.num_workers=0", "train.progress=false", "train.device=cpu"]
    assert main(["eval", str(tmp_path / "c.yaml"), "--checkpoint", str(tmp_path / "x/student.safetensors"),
                 "--split", "test", "--out", str(tmp_path / "ev.json"), *(a for s in sets for a in ("--set", s))]) == 0
    capsys.readouterr()
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["confusion"] == final["confusion"] and sum(map(sum, ev["confusion"])) == final["num_pixels"] > 0
    assert ev["miou"] == final["miou"] and ev["iou"] == final["iou"]


# ------------------------------------------------------------------------------------------- resume
def test_resume_path_refuses_another_architecture(data_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from c2vkd.cli import main

    Trainer(make_cfg(data_root, tmp_path, "schedule.iters=1"), run_dir=tmp_path / "vit").fit()
    ckpt = tmp_path / "vit/checkpoints/iter_0000001.pt"
    assert ckpt.is_file()
    with pytest.raises(CheckpointError, match=r"toy_vit.*toy_cnn"):
        Trainer(make_cfg(data_root, tmp_path, "student.name=toy_cnn"), run_dir=tmp_path / "cnn", resume=str(ckpt))
    # the CLI: one clear line, exit 2, nothing trained
    (tmp_path / "c.yaml").write_text("{}\n")
    sets = [f"data.root={data_root}", "data.train_transform.crop_size=[32,32]", "data.batch_size=2",
            "data.num_workers=0", "student.name=toy_cnn", "train.progress=false", "train.device=cpu",
            "eval.split=null", "eval.final_split=null", "schedule.iters=1"]
    rc = main(["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "cli"), "--resume", str(ckpt),
               *(a for s in sets for a in ("--set", s))])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"toy_vit.*toy_cnn", err) and "Traceback" not in err
    assert not (tmp_path / "cli/student.safetensors").exists()


# ------------------------------------------------------------------------------------------- SIGINT
@pytest.mark.slow
def test_sigint_exits_130_with_a_checkpoint(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "ds", {"train": 6}, size_hw=(32, 40))
    (tmp_path / "empty.yaml").write_text("{}\n")
    run = tmp_path / "run"
    sets = [f"data.root={data}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
            "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "schedule.iters=50",
            "train.progress=false", "train.log_interval=1", "train.device=cpu", "experiment.imports=[_toy]",
            "eval.split=null", "eval.final_split=null", "losses=[{name: ce}, {name: toy_sleep, weight: 0.0}]"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", C2VKD_TOY_SLEEP="1.0", C2VKD_TOY_SLEEP_FROM="3",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.Popen([sys.executable, "-m", "c2vkd", "train", str(tmp_path / "empty.yaml"), "--run-dir",
                             str(run), *(a for s in sets for a in ("--set", s))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        end = time.monotonic() + 400
        m = run / "metrics.jsonl"
        while not (m.is_file() and len(m.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < end, "no two logged iterations within 400 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-4000:]
    found = re.search(r"stopped by SIGINT at iteration (\d+): checkpoint saved to (\S+); continue with --resume auto",
                      err)
    assert found, err[-4000:]
    it, ckpt = int(found.group(1)), Path(found.group(2))
    assert it in (2, 3) and ckpt == run / "checkpoints" / f"iter_{it:07d}.pt"
    assert safe_load(ckpt)["iteration"] == it
    assert "Traceback" not in err and not (run / "student.safetensors").exists()
