"""One-line runs: `c2vkd distill --teacher NAME=CKPT --student NAME --data DIR` and `c2vkd train --model NAME
--data DIR` with no config file: format detection, sizes from the images, the method preset, the printed
config, and a written config.yaml that repeats the run exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import _toy
from c2vkd.cli import main
from c2vkd.config import load_config
from c2vkd.data import DatasetError
from c2vkd.data import sample_root, synthetic
from c2vkd.engine.weights import save_student
from c2vkd.data.detect import detect_format
from c2vkd.runners.oneline import crop_for, oneline_config
from c2vkd.utils.io import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE_CLASSES = json.loads((sample_root() / "classes.json").read_text())["classes"]
FAST = ["data.num_workers=0", "data.batch_size=2", "train.progress=false", "train.device=cpu"]


def _printed_config(out: str) -> dict:
    """The config part of what a one-line run printed first (comment lines are its header / footer)."""
    block = out.split("# repeat:")[0]
    return yaml.safe_load("\n".join(ln for ln in block.splitlines() if not ln.startswith("#")))


def test_oneline_distill_runs_and_its_config_repeats_the_run(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    teacher = save_student(tmp_path / "teacher.safetensors", _toy.ToyCNN(11), "toy_cnn", 11, {}, SAMPLE_CLASSES)
    run = tmp_path / "run"
    sets = [x for s in FAST for x in ("--set", s)]
    assert main(["distill", "--teacher", f"toy_cnn={teacher}", "--student", "toy_vit", "--data", str(sample_root()),
                 "--method", "kd", "--iters", "3", "--out", str(run), *sets]) == 0
    out = capsys.readouterr().out
    header = out.split("# repeat:")[0]
    assert len(header.splitlines()) <= 30  # one screen
    assert f"# repeat: c2vkd distill {run}/config.yaml" in out

    written = load_config(run / "config.yaml")
    assert _printed_config(out) == written  # what was printed is what ran
    d = written["data"]
    assert d["format"] == "folder" and Path(d["root"]) == sample_root().resolve()
    assert d["train_transform"]["crop_size"] == crop_for((180, 240)) == [160, 224]  # the sample is 240x180
    assert d["eval_transform"] == {"mode": "whole", "size": None} and written["eval"]["final_split"] == "test"
    assert written["teacher"] == {**written["teacher"], "name": "toy_cnn", "checkpoint": str(teacher.resolve())}
    assert written["losses"] == load_config(None, layers=["methods/kd.yaml"])["losses"]
    assert written["schedule"]["iters"] == 3 and written["student"]["name"] == "toy_vit"
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*.pt")) == ["iter_0000003.pt"]
    ev = json.loads((run / "eval_test.json").read_text())
    assert ev["classes"] == SAMPLE_CLASSES

    # the written config alone repeats the run: same weights, bit for bit
    again = tmp_path / "again"
    assert main(["distill", str(run / "config.yaml"), "--run-dir", str(again)]) == 0
    first, second = safe_load(run / "student.safetensors"), safe_load(again / "student.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    assert json.loads((again / "eval_test.json").read_text())["miou"] == ev["miou"]


def test_oneline_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = synthetic.write_folder(tmp_path / "ds", {"train": 2, "val": 1}, size_hw=(40, 70))
    run = tmp_path / "r"
    sets = [x for s in FAST for x in ("--set", s)]
    assert main(["train", "--model", "toy_cnn", "--data", str(root), "--iters", "2", "--out", str(run), *sets]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg["teacher"]["name"] is None and cfg["losses"] == [{"name": "ce", "weight": 1.0}]
    assert cfg["data"]["train_transform"]["crop_size"] == [32, 64]  # 40x70 rounded down to multiples of 32
    assert cfg["data"]["splits"] == {"train": "train", "val": "val", "test": None}
    assert cfg["eval"]["final_split"] == "val"  # no test split on disk
    assert f"# repeat: c2vkd train {run}/config.yaml" in capsys.readouterr().out
    assert (run / "eval_val.json").is_file()


def test_format_detection_of_standard_layouts(tmp_path: Path) -> None:
    assert detect_format(synthetic.write_cityscapes(tmp_path / "cs")) == "cityscapes"
    assert detect_format(synthetic.write_ade20k(tmp_path / "ade")) == "ade20k"
    assert detect_format(synthetic.write_voc(tmp_path / "voc")) == "voc"
    assert detect_format(synthetic.write_camvid_segnet(tmp_path / "segnet")) == "camvid_segnet"
    assert detect_format(sample_root()) == "folder"
    cfg, det = oneline_config(data=tmp_path / "cs", student="segformer_b0", teacher=None, method="none", iters=5)
    # standard datasets keep their packaged preset's crop and sliding-window evaluation
    assert cfg["data"]["format"] == "cityscapes" and cfg["eval"]["mode"] == "slide"
    assert cfg["schedule"] == {**cfg["schedule"], "iters": 5, "warmup_iters": 0}
    cfg, det = oneline_config(data=tmp_path / "segnet", student="segformer_b0", teacher=None, method="none",
                              iters=None)
    assert det["splits"] == ["train", "val", "test"] and det["image_hw"] == list(synthetic.SIZE_HW)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd/pictures").mkdir()
    with pytest.raises(DatasetError, match=r"cannot tell the dataset format.*classes.json.*pictures/"):
        detect_format(tmp_path / "odd")


def test_oneline_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", "--student", "toy_vit", "--data", str(sample_root())]) == 2
    assert "--teacher for a one-line run" in capsys.readouterr().err
    assert main(["distill", "demo.yaml", "--student", "toy_vit"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["distill", "--teacher", "toy_cnn=" + str(tmp_path / "nope.pt"), "--student", "toy_vit",
                 "--data", str(sample_root())]) == 2
    assert "nope.pt not found" in capsys.readouterr().err
    assert main(["distill", "--teacher", "toy_cnn", "--student", "toy_vit", "--data", str(sample_root()),
                 "--method", "c2vdk"]) == 2
    assert "c2vkd" in capsys.readouterr().err  # the suggestion
    assert main(["train", "--model", "toy_vit", "--data", str(tmp_path)]) == 2
    assert "cannot tell the dataset format" in capsys.readouterr().err
