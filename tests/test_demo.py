"""`c2vkd demo` (the README's main command) end to end at a 1-iteration schedule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from c2vkd.cli import main
from c2vkd.runners.demo import DEMO_METHOD


@pytest.mark.slow
def test_demo_runs_all_stages_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "demo"
    # the 16 test frames are evaluated 9 times (3 final evaluations, twice the table's 3): at 60x80 (resize mode,
    # labels at full size) instead of 180x240, which was most of this test's time; the wiring checked is the same
    fast = ["--set", "schedule.iters=1", "--set", "schedule.warmup_iters=0", "--set", "train.progress=false",
            "--set", "data.batch_size=2", "--set", "data.train_transform.crop_size=[64,64]",
            "--set", "data.eval_transform.mode=resize", "--set", "data.eval_transform.size=[60,80]"]
    assert main(["demo", "--run-dir", str(run), *fast]) == 0
    out = capsys.readouterr().out
    for row in ("teacher (no KD)", "student, no KD", "student + C2VKD"):
        assert row in out
    demo = json.loads((run / "demo.json").read_text())
    rows = {r["row"]: r for r in demo["rows"]}
    assert rows["teacher (no KD)"]["model"] == "deeplabv3plus_r18"
    assert rows["student + C2VKD"]["model"] == rows["student, no KD"]["model"] == "segformer_b0"
    assert rows["teacher (no KD)"]["params"] > 3 * rows["student, no KD"]["params"]
    # the table's student numbers are the runs' own final test evaluations
    for label, m in (("student, no KD", "none"), ("student + C2VKD", DEMO_METHOD)):
        final = json.loads((run / "students" / m / "seed0" / "eval_test.json").read_text())
        assert rows[label]["miou"] == pytest.approx(final["miou"], abs=1e-9)
    cfg = (run / f"students/{DEMO_METHOD}/seed0/config.yaml").read_text()
    assert "pdd" in cfg and "vlfd" in cfg and str(run / "teacher" / "student.safetensors") in cfg
    assert "pdd" not in (run / "students/none/seed0/config.yaml").read_text()
    # rerunning skips every finished stage (no new checkpoints are written)
    before = sorted(p.stat().st_mtime_ns for p in run.rglob("*.pt"))
    assert main(["demo", "--run-dir", str(run), *fast]) == 0
    assert sorted(p.stat().st_mtime_ns for p in run.rglob("*.pt")) == before


def test_demo_verdict_uses_the_measured_noise(tmp_path: Path) -> None:
    from c2vkd.runners.demo import format_verdict, load_noise

    assert load_noise(tmp_path / "missing.json") is None
    text = format_verdict(0.004, None)
    assert "+0.40 mIoU" in text and "has not been measured" in text and "benchmarks/protocol.md" in text
    noise = {"method": DEMO_METHOD, "seeds": [0, 1, 2], "paired_mean": 0.001, "paired_sd": 0.005, "noise_band": 0.0098}
    inside = format_verdict(-0.009, noise)
    assert "-0.90 mIoU" in inside and "+/-0.98 mIoU is noise" in inside and "within the noise" in inside
    assert "larger than the noise" in format_verdict(0.0099, noise)
    stale = format_verdict(0.05, {**noise, "method": "some-other-preset"})
    assert "is for the preset 'some-other-preset', not the demo's" in stale
    assert "within the noise" not in stale and "larger than the noise" not in stale


def test_demo_config_and_noise_measurement_use_the_demo_preset() -> None:
    """demo.yaml (what `c2vkd train demo.yaml` trains) inherits the preset the demo compares, and the stored
    noise measurement, when there is one, was made for that preset."""
    import yaml

    from c2vkd.config import PACKAGE_CONFIGS
    from c2vkd.runners.demo import load_noise

    base = yaml.safe_load((PACKAGE_CONFIGS / "demo.yaml").read_text())["_base_"]
    assert f"methods/{DEMO_METHOD}.yaml" in base
    noise = load_noise()
    assert noise is None or noise["method"] == DEMO_METHOD
