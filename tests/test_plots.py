"""`c2vkd plot RUN_DIR`: PNG figures from metrics.jsonl and eval_<split>.json of a real (tiny) run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import _toy  # noqa: F401  (registers toy_vit)
from c2vkd.cli import main
from c2vkd.config import load_config
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.trainer import Trainer
from c2vkd.runners.plots import PlotError, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plots")
    root = write_folder(tmp / "ds", {"train": 4, "val": 2, "test": 2}, size_hw=(32, 40))
    cfg = load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.batch_size=2", "data.num_workers=0",
        "student.name=toy_vit", "optim.lr=0.01", "schedule.iters=4", "train.progress=false", "train.log_interval=1",
        "train.val_interval=2", "train.device=cpu", "losses=[{name: ce}, {name: toy_sleep, weight: 0.0}]"])
    Trainer(cfg, run_dir=tmp / "run").fit()
    return tmp / "run"


def test_plot_command_writes_valid_pngs(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["iou_test.png", "losses.png", "lr.png", "val_miou.png"]
    for p in map(Path, printed):
        assert p.parent == tmp_path / "figs" and p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    # default output folder
    assert {p.name for p in plot_run(run)} == set(names) and (run / "plots/losses.png").is_file()
    # the eval file names the classes, so the bar chart can label them
    assert json.loads((run / "eval_test.json").read_text())["classes"] == ["a", "b", "c"]


def test_metrics_reading_dedupes_resumed_iterations(tmp_path: Path) -> None:
    rows = [{"iter": 1, "lr": 0.1, "loss": 3.0, "ce": 3.0, "ce/w": 3.0},
            {"iter": 2, "lr": 0.1, "loss": 2.0, "ce": 2.0, "ce/w": 2.0},
            {"iter": 2, "lr": 0.1, "loss": 1.5, "ce": 1.5, "ce/w": 1.5},  # re-logged after a resume
            {"iter": 2, "val_split": "val", "miou": 0.5, "acc": 0.6, "macc": 0.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"iter": 3, "lr": 0.'  # cut by a crash
    (tmp_path / "metrics.jsonl").write_text(text)
    train, val, final = read_metrics(tmp_path)
    assert [(r["iter"], r["loss"]) for r in train] == [(1, 3.0), (2, 1.5)]
    assert len(val) == 1 and final == []
    assert {p.name for p in plot_run(tmp_path)} == {"losses.png", "lr.png", "val_miou.png"}


def test_missing_or_empty_metrics_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err and "Traceback" not in err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PlotError, match="no metrics records"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()
