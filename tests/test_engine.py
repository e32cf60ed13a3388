"""End-to-end engine behaviour on tiny models and a synthetic folder dataset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import _toy  # noqa: F401  (registers toy_cnn / toy_vit)
from c2vkd.config import load_config
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.trainer import NonFiniteLossError, Trainer
from c2vkd.engine.weights import build_for_eval, save_student
from c2vkd.losses import LOSSES
from c2vkd.losses.base import DistillLoss, LossInputs
from c2vkd.utils.io import CheckpointError, safe_load


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("ds"), {"train": 6, "val": 2, "test": 2}, size_hw=(32, 40))


def make_cfg(root: Path, out: Path, *extra: str) -> dict:
    return load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "optim.lr=0.01",
        "schedule.iters=6", "train.progress=false", "train.log_interval=1", f"experiment.output_dir={out}",
        "train.device=cpu", *extra])


def test_supervised_run_writes_everything(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "train.val_interval=3")
    res = Trainer(cfg, run_dir=tmp_path / "r").fit()
    r = tmp_path / "r"
    assert (r / "config.yaml").is_file() and (r / "train.log").is_file()
    assert load_config(r / "config.yaml") == cfg  # resolved config round-trips
    assert list((r / "tb").glob("events.*"))
    assert (r / "checkpoints/iter_0000006.pt").is_file() and (r / "checkpoints/iter_0000006.pt.sha256").is_file()
    lines = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "lr" in x]
    assert [x["iter"] for x in train] == [1, 2, 3, 4, 5, 6]
    assert all("ce" in x and "ce/w" in x and x["img_per_s"] > 0 for x in train)
    assert any(x.get("val_split") == "val" and x["iter"] == 3 for x in lines)
    final = json.loads((r / "eval_test.json").read_text())
    assert final["split"] == "test" and 0.0 <= final["miou"] <= 1.0 and len(final["iou"]) == 3
    assert res.final_metrics is not None and abs(res.final_metrics["miou"] - final["miou"]) < 1e-12
    # student export evaluates to the same numbers
    model, name = build_for_eval(r / "student.safetensors", None, 3, torch.device("cpu"))
    assert name == "toy_vit"


def test_exact_resume_bitwise(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "train.ckpt_interval=3", "experiment.deterministic=true")
    Trainer(cfg, run_dir=tmp_path / "straight").fit()
    straight = safe_load(tmp_path / "straight/checkpoints/iter_0000006.pt")
    # a second run resumed from the straight run's mid-point checkpoint must end bitwise identical
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    for suffix in ("", ".sha256"):
        src = tmp_path / f"straight/checkpoints/iter_0000003.pt{suffix}"
        (tmp_path / f"resumed/checkpoints/iter_0000003.pt{suffix}").write_bytes(src.read_bytes())
    t = Trainer(cfg, run_dir=tmp_path / "resumed", resume="auto")
    assert t.iteration == 3
    t.fit()
    resumed = safe_load(tmp_path / "resumed/checkpoints/iter_0000006.pt")
    for k, v in straight["student"].items():
        assert torch.equal(v, resumed["student"][k]), k
    assert straight["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()


def test_resume_auto_skips_corrupt_latest(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "train.ckpt_interval=2", "schedule.iters=4")
    Trainer(cfg, run_dir=tmp_path / "c").fit()
    latest = tmp_path / "c/checkpoints/iter_0000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="checksum"):
        safe_load(latest)
    t = Trainer(cfg, run_dir=tmp_path / "c", resume="auto")
    assert t.iteration == 2


def test_keep_last_retention(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "train.ckpt_interval=1", "train.keep_last=2", "eval.final_split=null")
    Trainer(cfg, run_dir=tmp_path / "k").fit()
    assert sorted(p.name for p in (tmp_path / "k/checkpoints").glob("*.pt")) == ["iter_0000005.pt", "iter_0000006.pt"]


def test_distill_teacher_frozen_and_excluded(data_root: Path, tmp_path: Path) -> None:
    # train a toy teacher, then distil from its export
    tcfg = make_cfg(data_root, tmp_path, "student.name=toy_cnn", "eval.final_split=null", "eval.split=null")
    Trainer(tcfg, run_dir=tmp_path / "teacher").fit()
    cfg = make_cfg(data_root, tmp_path, "teacher.name=toy_cnn",
                   f"teacher.checkpoint={tmp_path / 'teacher/student.safetensors'}",
                   "losses=[{name: kd, weight: 1.0}, {name: fitnet, weight: 0.5}, {name: ce, weight: 0.0}]",
                   "eval.final_split=null")
    t = Trainer(cfg, run_dir=tmp_path / "kd")
    teacher = t.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt_ids = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in teacher.parameters())
    assert any(id(p) in opt_ids for p in t.model.losses.parameters())  # fitnet adapter is trained
    t.fit()
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"  # incl. BN running stats
    ck = safe_load(tmp_path / "kd/checkpoints/iter_0000006.pt")
    assert all(k in dict(t.student.named_parameters()) or k in dict(t.student.named_buffers()) for k in ck["student"])
    rows = [json.loads(x) for x in (tmp_path / "kd/metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "lr" in r][-1]
    assert {"kd", "kd/w", "fitnet", "fitnet/w", "ce", "ce/w"} <= set(last)
    assert last["ce/w"] == 0.0 and last["ce"] > 0
    assert abs(last["loss"] - (last["kd/w"] + last["fitnet/w"])) < 1e-5


def test_teacher_checkpoint_for_other_architecture_is_refused(data_root: Path, tmp_path: Path) -> None:
    model = _toy.ToyViT(3)
    save_student(tmp_path / "vit.safetensors", model, "toy_vit", 3, {}, ["a", "b", "c"])
    cfg = make_cfg(data_root, tmp_path, "teacher.name=toy_cnn", f"teacher.checkpoint={tmp_path / 'vit.safetensors'}",
                   "losses=[{name: kd}]")
    with pytest.raises(CheckpointError, match="toy_vit.*toy_cnn"):
        Trainer(cfg, run_dir=tmp_path / "x")
    save_student(tmp_path / "k5.safetensors", _toy.ToyCNN(5), "toy_cnn", 5, {}, list("abcde"))
    cfg = make_cfg(data_root, tmp_path, "teacher.name=toy_cnn", f"teacher.checkpoint={tmp_path / 'k5.safetensors'}",
                   "losses=[{name: kd}]")
    with pytest.raises(CheckpointError, match="5 classes"):
        Trainer(cfg, run_dir=tmp_path / "y")


def test_distill_loss_without_teacher_is_an_error(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "losses=[{name: kd}]")
    with pytest.raises(ValueError, match="need a teacher"):
        Trainer(cfg, run_dir=tmp_path / "z")


class _Exploding(DistillLoss):
    requires_teacher = False

    def __init__(self, ctx, weight: float = 1.0, at_call: int = 2) -> None:
        super().__init__(ctx, weight)
        self.calls, self.at_call = 0, at_call

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        self.calls += 1
        bad = float("nan") if self.calls == self.at_call else 0.0
        return {"test_explode": inputs.student_logits.sum() * 0 + bad}


if "test_explode" not in LOSSES:
    LOSSES.add("test_explode", _Exploding)


def test_nan_policy_stop_names_the_term(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "losses=[{name: ce}, {name: test_explode}]")
    with pytest.raises(NonFiniteLossError, match=r"iteration 2.*test_explode"):
        Trainer(cfg, run_dir=tmp_path / "n").fit()
    dump = json.loads((tmp_path / "n/nan_debug.json").read_text())
    assert dump["iteration"] == 2 and len(dump["images"]) == 2


def test_nan_policy_skip_keeps_weights(data_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, tmp_path, "losses=[{name: ce}, {name: test_explode, at_call: 1}]",
                   "train.nan_policy=skip", "schedule.iters=1", "eval.final_split=null", "eval.split=null")
    t = Trainer(cfg, run_dir=tmp_path / "s")
    before = {k: v.clone() for k, v in t.student.state_dict().items()}
    t.fit()
    for k, v in t.student.state_dict().items():
        assert torch.equal(v, before[k]), k
    rows = [json.loads(x) for x in (tmp_path / "s/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped"] is True


def test_out_of_memory_names_the_knobs(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from c2vkd.cli import main
    from c2vkd.engine.trainer import TrainingOutOfMemoryError

    def boom(self, x):  # what the CUDA caching allocator raises
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8 GiB total)")

    monkeypatch.setattr(_toy.ToyViT, "forward", boom)  # supervised ce: no dummy forward at construction
    with pytest.raises(TrainingOutOfMemoryError) as info:
        Trainer(make_cfg(data_root, tmp_path, "train.accum_steps=2"), run_dir=tmp_path / "o").fit()
    msg = str(info.value)
    assert isinstance(info.value, torch.OutOfMemoryError)  # callers catching OOM still catch it
    assert "training step 1" in msg and "Tried to allocate 2.00 GiB" in msg
    for knob in ("data.batch_size (now 2 in total, 2 per process)", "train.accum_steps (now 2)",
                 "data.train_transform.crop_size (now [32, 32])", "train.amp=bf16"):
        assert knob in msg, knob
    # the CLI prints it as one line, without a traceback
    (tmp_path / "c.yaml").write_text("{}\n")
    overrides = ["data.root=" + str(data_root), "data.train_transform.crop_size=[32,32]", "data.batch_size=2",
                 "data.num_workers=0", "student.name=toy_vit", "train.progress=false", "train.device=cpu"]
    assert main(["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "cli"),
                 *(a for o in overrides for a in ("--set", o))]) == 2
    err = capsys.readouterr().err
    assert "c2vkd train: error: out of memory in training step 1" in err and "train.amp=bf16" in err
    assert "Traceback" not in err


def test_experiment_imports_register_user_modules(tmp_path: Path) -> None:
    from c2vkd.config import ConfigError
    from c2vkd.models import MODELS

    plugin = tmp_path / "my_models.py"
    plugin.write_text("import _toy\nfrom c2vkd.models import MODELS\n"
                      "if 'my_toy' not in MODELS:\n    MODELS.add('my_toy', _toy.ToyViT)\n")
    cfg = load_config(None, [f"experiment.imports=[{plugin}]", "student.name=my_toy"])
    assert cfg["experiment"]["imports"] == [str(plugin)] and "my_toy" in MODELS
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_module_xyz'.*PYTHONPATH"):
        load_config(None, ["experiment.imports=[no_such_module_xyz]"])
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(None, ["experiment.imports=_toy"])


def test_sync_bn_conversion_rules() -> None:
    """student.sync_bn: a no-op for one process, an error on CPU multi-process, a module swap on CUDA DDP."""
    from types import SimpleNamespace

    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    one = SimpleNamespace(world=1, device=torch.device("cpu"))
    assert Trainer._sync_bn(one, model) is model
    with pytest.raises(ValueError, match="sync_bn=true needs CUDA"):
        Trainer._sync_bn(SimpleNamespace(world=2, device=torch.device("cpu")), model)
    weight = model[1].weight
    out = Trainer._sync_bn(SimpleNamespace(world=2, device=torch.device("cuda", 0)), model)
    assert isinstance(out[1], nn.SyncBatchNorm) and out[1].weight is weight  # parameters reused, not copied
