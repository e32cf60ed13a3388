"""`c2vkd compare`: variants, summary arithmetic (golden values), resume without redoing finished variants."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import _toy  # registers toy_cnn / toy_vit; write_compare_experiment
from c2vkd.runners import compare as cmp
from c2vkd.cli import main
from c2vkd.config import ConfigError, load_config


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _toy.write_compare_experiment(tmp_path_factory.mktemp("cmp"), iters=3, val_interval=0)


def test_variant_config_layers_method_and_drops_unused_teacher(experiment: Path) -> None:
    none = cmp.variant_config(experiment, "none", 7)
    assert [e["name"] for e in none["losses"]] == ["ce"] and none["teacher"]["name"] is None
    assert none["experiment"]["seed"] == 7
    kd = cmp.variant_config(experiment, "kd", 7, ["optim.lr=0.5"])
    assert [e["name"] for e in kd["losses"]] == ["ce", "kd"] and kd["teacher"]["name"] == "toy_cnn"
    assert kd["optim"]["lr"] == 0.5
    with pytest.raises(ConfigError, match="nosuchmethod"):
        cmp.variant_config(experiment, "nosuchmethod", 0)


def test_parse_seeds() -> None:
    assert cmp.parse_seeds("3", 10) == [10, 11, 12]
    assert cmp.parse_seeds("0,5", 10) == [0, 5]
    for bad in ("0", "x", "1,1"):
        with pytest.raises(ConfigError):
            cmp.parse_seeds(bad, 0)


def _rec(miou: float) -> dict:
    return {"miou": miou, "iou": [miou, miou / 2], "wall_s": 1.0}


def test_summary_golden_values() -> None:
    results = {"none": {0: _rec(0.40), 1: _rec(0.42)},      # mean 0.41
               "kd": {0: _rec(0.42), 1: _rec(0.42)},        # +0.01
               "cwd": {0: _rec(0.43), 1: _rec(0.41)},       # +0.01 (same mean, ties broken by order)
               "dkd": {0: _rec(0.43), 1: _rec(0.43)},       # +0.02 (best prior)
               "c2vkd": {0: _rec(0.46), 1: _rec(0.46)}}     # +0.05 -> ratio 2.5
    s = cmp.summarize(results, ["a", "b"])
    m = s["methods"]
    assert m["none"]["miou_mean"] == pytest.approx(0.41)
    assert m["none"]["miou_std"] == pytest.approx(0.0141421356, rel=1e-6)  # sample std (n-1)
    assert m["dkd"]["gain"] == pytest.approx(0.02)
    assert s["best_prior"] == "dkd"
    assert s["gain_ratio"]["c2vkd"] == pytest.approx(2.5)
    assert m["c2vkd"]["per_class_iou"] == pytest.approx([0.46, 0.23])
    md = cmp.format_markdown(s, title="t")
    assert "claim holds" in md and "| dkd | 43.00 |" in md
    # a best prior that does not beat the student makes the ratio undefined, not a huge or negative number
    results["dkd"] = {0: _rec(0.40), 1: _rec(0.40)}
    results["kd"] = results["cwd"] = {0: _rec(0.39)}
    s = cmp.summarize(results, ["a", "b"])
    assert s["gain_ratio"]["c2vkd"] is None and "undefined" in cmp.format_markdown(s, title="t")


def test_compare_end_to_end_and_resume(experiment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", str(experiment), "--methods", "none,kd,c2vkd-paper", "--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["methods"]) == {"none", "kd", "c2vkd-paper"} and summary["seeds"] == [0, 1]
    for m in ("none", "kd", "c2vkd-paper"):
        per_seed = [json.loads((out / m / f"seed{s}" / "result.json").read_text())["miou"] for s in (0, 1)]
        assert summary["methods"][m]["miou_mean"] == pytest.approx(sum(per_seed) / 2)
        assert summary["methods"][m]["gain"] == pytest.approx(
            summary["methods"][m]["miou_mean"] - summary["methods"]["none"]["miou_mean"])
    assert summary["best_prior"] == "kd"
    assert summary["teacher"]["name"] == "toy_cnn"
    # the config of each variant records its own losses and seed
    for m, seed in (("kd", 1), ("none", 0)):
        cfg = load_config(out / m / f"seed{seed}" / "config.yaml")
        assert cfg["experiment"]["seed"] == seed
        assert {e["name"] for e in cfg["losses"]} == ({"ce", "kd"} if m == "kd" else {"ce"})
    for png in ("per_class_iou.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gain vs none" in capsys.readouterr().out

    # Resume: a finished variant is never retrained; an unfinished one (no result.json) is.
    (out / "kd/seed1/result.json").unlink()
    trained: list[str] = []
    real = cmp.run_variant

    def spy(cfg: dict, run_dir: Path) -> dict:
        if not (run_dir / cmp.RESULT_FILE).is_file():
            trained.append(f"{run_dir.parent.name}/{run_dir.name}")
        return real(cfg, run_dir)

    monkeypatch.setattr(cmp, "run_variant", spy)
    assert main(argv) == 0
    assert trained == ["kd/seed1"]
    again = json.loads((out / "kd/seed1/result.json").read_text())
    assert again["resumed"] is True  # picked up its own final checkpoint instead of starting over


def test_compare_rejects_teacher_method_without_teacher(experiment: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a teacher"):
        cmp.run_compare(experiment, ["none", "kd"], 1, overrides=["teacher.name=null"], out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing was trained or written before the check
