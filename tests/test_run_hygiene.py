"""Run hygiene (issue 15): run directories never mix, text log lines, pre-flight data check, our own
checkpoint messages, absolute paths in saved configs, integer keys, no silent random teacher, file modes."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _toy
from c2vkd.cli import main
from c2vkd.config import ConfigError, load_config
from c2vkd.data.base import DatasetError
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.run_dir import RunDirectoryError, read_run_id
from c2vkd.engine.trainer import Trainer
from c2vkd.engine.weights import load_model_weights, save_student
from c2vkd.utils.io import CheckpointError, default_file_mode, safe_load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("hyg") / "ds", {"train": 4, "val": 2}, size_hw=(32, 40))


def make_cfg(root: Path | str, *extra: str) -> dict:
    return load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "optim.lr=0.01", "schedule.iters=4",
        "train.progress=false", "train.log_interval=1", "train.device=cpu", "eval.split=null",
        "eval.final_split=null", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- runs never mix
def test_second_train_into_same_dir_is_refused_and_first_run_is_untouched(data_root: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(f"""
experiment: {{output_dir: {tmp_path / 'runs'}}}
data: {{root: {data_root}, batch_size: 2, num_workers: 0, train_transform: {{crop_size: [32, 32], base_size: 40}}}}
student: {{name: toy_vit}}
schedule: {{iters: 2}}
train: {{progress: false, device: cpu, log_interval: 1}}
eval: {{split: null, final_split: null}}
""")
    assert main(["train", str(cfg_file)]) == 0
    run = tmp_path / "runs" / "exp"  # the default run name is the config file's name
    first = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name != "tb"}
    assert "student.safetensors" in first and "run.json" in first
    capsys.readouterr()
    assert main(["train", str(cfg_file), "--set", "schedule.iters=3"]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume auto" in err and "experiment.name" in err and "--run-dir" in err
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name != "tb"}
    assert after == first  # nothing of the first run was touched (student.safetensors byte-identical)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        Trainer(load_config(cfg_file), run_dir=run)


def test_resume_and_export_use_only_this_runs_checkpoints(data_root: Path, tmp_path: Path) -> None:
    from c2vkd.runners.export import find_checkpoint

    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(make_cfg(data_root, "train.ckpt_interval=2"), run_dir=a).fit()        # iter 2, 4 of run A
    Trainer(make_cfg(data_root, "schedule.iters=6"), run_dir=b).fit()             # iter 6 of run B
    for suffix in ("", ".sha256"):  # another run's newer checkpoint lands in A's folder
        shutil.copy(b / f"checkpoints/iter_0000006.pt{suffix}", a / f"checkpoints/iter_0000006.pt{suffix}")
    run_a = read_run_id(a)
    assert run_a and run_a != read_run_id(b)
    assert safe_load(a / "checkpoints/iter_0000004.pt")["run_id"] == run_a
    assert find_checkpoint(a) == a / "checkpoints/iter_0000004.pt"
    t = Trainer(make_cfg(data_root, "schedule.iters=8"), run_dir=a, resume="auto")
    assert t.iteration == 4 and t.run_id == run_a


def test_resume_drops_metrics_past_the_checkpoint(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    cfg = make_cfg(data_root, "train.ckpt_interval=2")
    Trainer(cfg, run_dir=run).fit()
    rid = read_run_id(run)
    for suffix in ("", ".sha256"):  # as if killed after logging iterations 3-4 but before their checkpoint
        (run / f"checkpoints/iter_0000004.pt{suffix}").unlink()
    t = Trainer(cfg, run_dir=run, resume="auto")
    assert t.iteration == 2
    t.fit()
    recs = _records(run)
    assert [r["iter"] for r in recs] == [1, 2, 3, 4]  # 3 and 4 once, from the resumed run
    assert {r["run_id"] for r in recs} == {rid}


# ------------------------------------------------------------------------------------- text log lines
@pytest.mark.parametrize("progress", ["false", "true"])  # true: no bar either, stderr is not a terminal here
def test_text_line_per_log_step_without_progress_bar(data_root: Path, tmp_path: Path, progress: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "t"
    Trainer(make_cfg(data_root, "schedule.iters=5", "train.log_interval=2", f"train.progress={progress}"),
            run_dir=run).fit()
    err = capsys.readouterr().err
    assert "\r" not in err and " iter 4/5  loss " in err  # the same lines on the console, no bar updates
    logging.getLogger("c2vkd").info("a message after the run")  # e.g. the demo's next stage
    assert "after the run" not in (run / "train.log").read_text()
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if " iter " in ln]
    recs = [r for r in _records(run) if "lr" in r]
    assert [r["iter"] for r in recs] == [2, 4, 5] and len(lines) == 3
    pat = re.compile(r" iter (\d+)/5  loss (\d+\.\d{4}) \(ce (\S+)\)  lr (\S+)  (\S+) img/s  eta (\d+:\d\d:\d\d)  "
                     r"peak (rss|mem) \d+\.\d\d GiB$")
    for ln, rec in zip(lines, recs):
        m = pat.search(ln)
        assert m, ln
        assert int(m[1]) == rec["iter"] and float(m[2]) == pytest.approx(rec["loss"], abs=5e-5)
        assert float(m[3]) == pytest.approx(rec["ce"], rel=1e-3) and float(m[4]) == pytest.approx(rec["lr"], rel=1e-3)
    assert lines[-1].split("eta ")[1].startswith("0:00:00")  # nothing left at the last step


# ------------------------------------------------------------------------------------- pre-flight
def test_empty_val_split_fails_before_iteration_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_folder(tmp_path / "ds", {"train": 4}, size_hw=(32, 40))
    for d in ("images/val", "labels/val"):
        (root / d).mkdir(parents=True)
    (root / "val.txt").write_text("")
    monkeypatch.setattr(Trainer, "_train_step", lambda *a, **k: pytest.fail("trained before the data check"))
    with pytest.raises(DatasetError, match="split 'val'"):
        Trainer(make_cfg(root, "eval.split=val"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run/checkpoints").exists()


def test_label_of_another_size_fails_before_iteration_1(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", {"train": 4, "test": 2}, size_hw=(32, 40))
    label = sorted((root / "labels/test").iterdir())[1]
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(label)
    with pytest.raises(DatasetError, match=rf"(?s)split 'test'.*40x32 but its label {re.escape(str(label))} is 40x30"):
        Trainer(make_cfg(root, "eval.final_split=test"), run_dir=tmp_path / "run")


# ------------------------------------------------------------------------------------- our own messages
@pytest.mark.parametrize("content", [os.urandom(4096), b"\x80\x04\x95" + os.urandom(64)])
def test_unreadable_checkpoint_never_suggests_the_unsafe_loader(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    for load in (lambda: safe_load(bad),
                 lambda: load_model_weights(_toy.ToyCNN(3), bad, name="toy_cnn", num_classes=3)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert str(bad) in msg and "never unpickles code" in msg
        assert "False" not in msg and "trust" not in msg  # no hint to switch the safe loader off


def test_pickled_object_is_refused_with_our_message(tmp_path: Path) -> None:
    bad = tmp_path / "obj.pt"
    torch.save({"state": _toy.ToyCNN(3)}, bad)  # a whole module: pickled code, not just tensors
    with pytest.raises(CheckpointError) as e:
        safe_load(bad)
    msg = str(e.value)
    assert "False" not in msg and "add_safe_globals" not in msg and "state dict" in msg


def test_saved_config_has_absolute_paths(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(data_root, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    Trainer(make_cfg("data", "experiment.output_dir=runs"), run_dir=Path("runs/rel")).fit()
    saved = load_config(tmp_path / "runs/rel/config.yaml")
    assert saved["data"]["root"] == str(tmp_path / "data") and saved["experiment"]["output_dir"] == str(tmp_path / "runs")
    assert safe_load(tmp_path / "runs/rel/checkpoints/iter_0000004.pt")["meta"]["config"] == \
        (tmp_path / "runs/rel/config.yaml").read_text()


@pytest.mark.parametrize("item,match", [
    ("schedule.iters=5.5", r"schedule.iters = 5.5 must be an integer \(default 1000\)"),
    ("train.log_interval=1e1", "train.log_interval = 10.0 must be an integer"),
    ("data.train_transform.crop_size=[32.5,32]", "crop_size = \\[32.5, 32\\] must be a list of integers"),
    ("train.max_val_batches=2.5", "train.max_val_batches = 2.5 must be an integer or null"),
    ("experiment.name=7", "experiment.name = 7 must be a string or null"),
    ("data.augment_pool=true", "data.augment_pool = True must be an integer"),
])
def test_integers_must_be_integers(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [item])
    assert load_config(None, ["schedule.iters=5", "train.grad_clip=1", "optim.lr=1"])["schedule"]["iters"] == 5


def test_default_run_name_is_the_config_file_name(tmp_path: Path) -> None:
    (tmp_path / "camvid_kd.yaml").write_text("schedule: {iters: 3}\n")
    (tmp_path / "named.yaml").write_text("experiment: {name: mine}\n")
    assert load_config(tmp_path / "camvid_kd.yaml")["experiment"]["name"] == "camvid_kd"
    assert load_config(tmp_path / "named.yaml")["experiment"]["name"] == "mine"
    assert load_config(tmp_path / "named.yaml", ["experiment.name=x"])["experiment"]["name"] == "x"


def test_teacher_without_checkpoint_is_an_error_unless_allowed(data_root: Path, tmp_path: Path) -> None:
    kd = ["teacher.name=toy_cnn", "losses=[{name: ce}, {name: kd, weight: 1.0}]"]
    with pytest.raises(ConfigError, match="teacher toy_cnn has no weights.*teacher.allow_random_init: true"):
        Trainer(make_cfg(data_root, *kd), run_dir=tmp_path / "a")
    t = Trainer(make_cfg(data_root, *kd, "teacher.allow_random_init=true"), run_dir=tmp_path / "b")
    assert t.teacher is not None
    # a supervised run does not use the teacher: no error (the Distiller drops it with a warning)
    Trainer(make_cfg(data_root, "teacher.name=toy_cnn"), run_dir=tmp_path / "c")


def test_safetensors_written_with_the_mode_of_checkpoints(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "m"
    Trainer(make_cfg(data_root, "schedule.iters=1", "eval.split=val"), run_dir=run).fit()
    mode = default_file_mode()
    for f in ("student.safetensors", "best_student.safetensors", "checkpoints/iter_0000001.pt", "metrics.jsonl"):
        assert (run / f).stat().st_mode & 0o777 == mode, f
    save_student(tmp_path / "x.safetensors", _toy.ToyCNN(3), "toy_cnn", 3, {}, ["a", "b", "c"])
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == mode
