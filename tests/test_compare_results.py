"""`c2vkd compare --results DIR`: records that accumulate across sessions, protocol checks, paired statistics."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import _toy  # registers toy_cnn / toy_vit; write_compare_experiment
from c2vkd.runners import compare as cmp
from c2vkd.cli import main
from c2vkd.config import ConfigError


def test_paired_difference_golden() -> None:
    a = {0: 0.50, 1: 0.60, 2: 0.70, 5: 0.9}   # seed 5 has no partner: ignored
    b = {0: 0.40, 1: 0.45, 2: 0.62}
    d = cmp.paired_difference(a, b)
    # diffs 0.10, 0.15, 0.08: mean 0.11, sample sd sqrt(0.0013), t(0.975, 2) = 4.303
    assert d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.11)
    assert d["std"] == pytest.approx(math.sqrt(0.0013))
    half = 4.303 * math.sqrt(0.0013) / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.11 - half, 0.11 + half])
    one = cmp.paired_difference({0: 0.5}, {0: 0.4})
    assert one["ci95"] is None and one["mean"] == pytest.approx(0.1)


def test_gain_ratio_and_bootstrap() -> None:
    per_seed = {"none": {0: 0.30, 1: 0.31, 2: 0.32},
                "kd": {0: 0.31, 1: 0.32, 2: 0.33},       # +0.01 on every seed
                "c2vkd": {0: 0.33, 1: 0.34, 2: 0.35}}    # +0.03 on every seed
    r, best = cmp.gain_ratio(per_seed, "c2vkd", [0, 1, 2])
    assert best == "kd" and r == pytest.approx(3.0)
    # constant paired gains: every resample gives the same ratio, so the interval collapses onto it
    ci = cmp.bootstrap_ratio_ci(per_seed, "c2vkd", [0, 1, 2], draws=500)
    assert ci["ci95"] == pytest.approx([3.0, 3.0]) and ci["undefined_fraction"] == 0
    # a prior that never beats the student: no ratio in any resample
    per_seed["kd"] = {0: 0.29, 1: 0.30, 2: 0.31}
    assert cmp.gain_ratio(per_seed, "c2vkd", [0, 1, 2])[0] is None
    assert cmp.bootstrap_ratio_ci(per_seed, "c2vkd", [0, 1, 2], draws=200)["undefined_fraction"] == 1.0
    # noisy gains: the interval brackets the point estimate and is deterministic for a bootstrap seed
    per_seed["kd"] = {0: 0.31, 1: 0.33, 2: 0.325}
    point = cmp.gain_ratio(per_seed, "c2vkd", [0, 1, 2])[0]
    c1 = cmp.bootstrap_ratio_ci(per_seed, "c2vkd", [0, 1, 2], draws=2000, seed=3)
    c2 = cmp.bootstrap_ratio_ci(per_seed, "c2vkd", [0, 1, 2], draws=2000, seed=3)
    assert c1 == c2 and c1["ci95"][0] <= point <= c1["ci95"][1] and c1["ci95"][0] < c1["ci95"][1]


def test_val_stats_golden() -> None:
    from c2vkd.runners.compare_summary import val_stats
    curve = [[250, 0.18], [500, 0.26], [750, 0.22], [1000, 0.22], [1250, 0.25], [1500, 0.26], [1750, 0.25],
             [2000, 0.24]]
    final, quarter = val_stats({"val_curve": curve[::-1]})       # order of the points does not matter
    assert final == 0.24 and quarter == pytest.approx(0.24 - 0.26)   # last quarter starts at 1500 = 0.75 x 2000
    assert val_stats({"val_curve": [[100, 0.2], [160, 0.3]]}) == (0.3, pytest.approx(0.1))   # 100 <= 120
    assert val_stats({"val_curve": [[200, 0.3]]}) == (0.3, None)
    assert val_stats({}) == (None, None)

    from c2vkd.runners.compare_summary import val_trend
    # last half = iterations >= 1000: (1000, 0.22) (1250, 0.25) (1500, 0.26) (1750, 0.25) (2000, 0.24); x mean 1500,
    # y mean 0.244, Sxy = -500*-0.024 + -250*0.006 + 0 + 250*0.006 + 500*-0.004 = 10, Sxx = 625000:
    # slope 1.6e-5 per iteration, x 500 iterations per quarter = +0.008
    assert val_trend({"val_curve": curve}) == pytest.approx(0.008)
    assert val_trend({"val_curve": [[i, 0.1 + 0.001 * i] for i in range(100, 1001, 100)]}) == pytest.approx(0.25)
    assert val_trend({"val_curve": [[100, 0.2], [200, 0.3]]}) is None and val_trend({}) is None
    assert val_trend({"val_curve": [[0, 0.2], [0, 0.3], [0, 0.1]]}) is None   # no spread of iterations: no slope


def _record(miou: float, val_final: float, val_start: float = 0.0) -> dict:
    return {"miou": miou, "iou": [miou], "wall_s": 1.0, "val_curve": [[3, val_start], [4, val_final]]}


def test_summary_pairs_the_gain_ratio_and_recommends_on_val() -> None:
    from c2vkd.runners.compare_summary import format_markdown, summarize
    results = {"none": {0: _record(0.30, 0.28), 1: _record(0.36, 0.30)},   # seed 1 only for none: unpaired
               "kd": {0: _record(0.32, 0.33)},
               "c2vkd": {0: _record(0.33, 0.31, val_start=0.30)},
               "c2vkd-balanced": {0: _record(0.35, 0.29)}}
    s = summarize(results, ["a"])
    # unpaired means would give none 0.33 and kd a negative gain; on the common seed 0: gains 0.02, 0.03, 0.05
    assert s["ratio_seeds"] == [0] and s["ratio_best_prior"] == "kd"
    assert s["gain_ratio"]["c2vkd"] == pytest.approx(1.5) and s["gain_ratio"]["c2vkd-balanced"] == pytest.approx(2.5)
    # chosen on val, not test, among all methods: kd (val 0.33) is what a user should run; among the C2VKD
    # family c2vkd (val 0.31) beats c2vkd-balanced (test 0.35 but val 0.29)
    assert s["recommended"]["method"] == "kd" and s["recommended"]["best_c2vkd_on_val"] == "c2vkd"
    assert s["methods"]["c2vkd"]["val_final_mean"] == 0.31
    assert s["methods"]["c2vkd"]["val_last_quarter_gain_mean"] == pytest.approx(0.01)
    assert s["methods"]["none"]["val_final_mean"] == pytest.approx(0.29)
    md = format_markdown(s, title="t")
    assert ("Recommended method (chosen on val, mean final val mIoU over seeds, among all methods): **kd**; "
            "best C2VKD-family preset on val: c2vkd.") in md
    # every C2VKD-family preset against the best prior (kd on the mean over its seeds), paired by seed
    assert s["best_prior"] == "kd"
    assert s["methods"]["c2vkd-balanced"]["paired_vs_best_prior"]["mean"] == pytest.approx(0.03)
    assert "paired_vs_best_prior" not in s["methods"]["kd"]
    assert "- c2vkd-balanced - kd: +3.00 (1 seed)" in md
    assert "| c2vkd | 33.00 | 0.00 | 1 | +0.00 | +3.00 (1 seed) | 33.00 | 31.00 | +1.00 |  | 1 s |" in md
    assert "Gain ratio c2vkd-balanced / best prior: 2.50 (> 2: claim holds here)." in md
    # interim view: c2vkd has only seed 0 with none, so it equals the main ratio; nothing is left out
    assert s["gain_ratio_partial"]["c2vkd"] == {**s["gain_ratio_partial"]["c2vkd"], "seeds": [0], "priors": ["kd"],
                                               "left_out": [], "best_prior": "kd", "ci": None}
    assert s["gain_ratio_partial"]["c2vkd"]["ratio"] == pytest.approx(1.5)


def test_interim_gain_ratio_uses_every_seed_a_preset_shares_with_none() -> None:
    """Seeds 0-2 for none, kd, cwd and c2vkd, seed 0 only for dkd: the protocol's ratio is on seed 0 alone;
    the interim one uses seeds 0-2 among kd and cwd (dkd named as left out), golden values by hand."""
    from c2vkd.runners.compare_summary import format_markdown, summarize
    miou = {"none": [0.30, 0.31, 0.29], "kd": [0.31, 0.33, 0.30], "cwd": [0.34, 0.32, 0.29],
            "c2vkd": [0.33, 0.34, 0.32], "dkd": [0.40]}
    results = {m: {s: _record(v, v) for s, v in enumerate(vals)} for m, vals in miou.items()}
    s = summarize(results, ["a"])
    assert s["ratio_seeds"] == [0] and s["ratio_best_prior"] == "dkd"
    assert s["gain_ratio"]["c2vkd"] == pytest.approx(0.03 / 0.10)
    p = s["gain_ratio_partial"]["c2vkd"]
    # means over seeds 0-2: none 0.30, kd 0.3133, cwd 0.3167 (best), c2vkd 0.33 -> (0.03) / (0.01667) = 1.8
    assert p["seeds"] == [0, 1, 2] and p["priors"] == ["kd", "cwd"] and p["left_out"] == ["dkd"]
    assert p["best_prior"] == "cwd" and p["ratio"] == pytest.approx(0.03 / (0.95 / 3 - 0.30))
    lo, hi = p["ci"]["ci95"]
    assert lo <= p["ratio"] <= hi or p["ci"]["undefined_fraction"] > 0
    md = format_markdown(s, title="t")
    assert "- c2vkd on seeds 0, 1, 2: 1.80, 95% bootstrap CI [" in md
    assert "best prior cwd among kd, cwd; left out: dkd." in md
    # no prior has seed 2 yet: the interim ratio falls back to seeds 0-1, which kd and cwd both have
    part = {m: {s: r for s, r in res.items() if m in ("none", "c2vkd", "dkd") or s < 2} for m, res in results.items()}
    p = summarize(part, ["a"])["gain_ratio_partial"]["c2vkd"]
    # seeds 0-1: none 0.305, kd 0.32, cwd 0.33 (best), c2vkd 0.335 -> 0.03 / 0.025 = 1.2
    assert p["seeds"] == [0, 1] and p["priors"] == ["kd", "cwd"] and p["ratio"] == pytest.approx(1.2)
    # once every method has every seed, there is no interim view
    full = {m: r for m, r in results.items() if m != "dkd"}
    assert "gain_ratio_partial" not in summarize(full, ["a"])


def test_wall_time_leaves_out_resumed_runs() -> None:
    """A resumed run's wall_s counts only the part after its resume: the mean wall time is over the other runs,
    and '-' when every run of a method was resumed."""
    from c2vkd.runners.compare_summary import format_markdown, summarize
    results = {"none": {0: {**_record(0.30, 0.28), "wall_s": 100.0},
                        1: {**_record(0.31, 0.29), "wall_s": 10.0, "resumed": True},
                        2: {**_record(0.32, 0.30), "wall_s": 120.0, "resumed": False}},
               "kd": {0: {**_record(0.33, 0.31), "wall_s": 5.0, "resumed": True}}}
    s = summarize(results, ["a"])
    assert s["methods"]["none"]["wall_s_mean"] == pytest.approx(110.0) and s["methods"]["kd"]["wall_s_mean"] is None
    md = format_markdown(s, title="t")
    assert md.splitlines()[4].endswith("| +29.00 |  | 110 s |") and md.splitlines()[5].endswith("| +31.00 |  | - |")


def test_screen_variants_show_val_only_until_confirmed() -> None:
    """An ablation preset (configs/ablation/) with fewer than 3 seeds is screened on val: its test mIoU appears
    nowhere in the summary, it is paired with `none` on final val, and it is not what the summary recommends."""
    from c2vkd.runners.compare_summary import format_markdown, summarize
    from c2vkd.runners.results import is_ablation
    abl = "c2vkd-abl-cwd-feat"
    assert is_ablation(abl) and not is_ablation("cwd") and not is_ablation("no-such-preset")
    assert is_ablation("x/ablation/my.yaml") and not is_ablation("x/methods/my.yaml")
    # a user's own ablation preset is known by the command its record was made with
    assert is_ablation("my-variant", [{"command": "c2vkd compare r.yaml --methods x/ablation/my-variant.yaml"}])
    assert not is_ablation("my-variant", [{"command": "c2vkd compare r.yaml --methods x/methods/my-variant.yaml"}])
    results = {"none": {0: _record(0.30, 0.26), 1: _record(0.31, 0.27)},
               "cwd": {0: _record(0.34, 0.31), 1: _record(0.35, 0.30)},
               abl: {0: _record(0.9876, 0.33, val_start=0.29), 1: _record(0.9876, 0.30, val_start=0.29)}}
    s = summarize(results, ["a"])
    assert abl not in s["methods"] and s["confirm_seeds"] == 3
    e = s["screen"][abl]
    assert e["seeds"] == 2 and e["val_final_per_seed"] == {"0": 0.33, "1": 0.30}
    assert e["val_final_mean"] == pytest.approx(0.315)
    assert e["val_last_quarter_gain_mean"] == pytest.approx((0.04 + 0.01) / 2)
    # final val paired with none's: diffs 0.07, 0.03 -> mean 0.05, sd sqrt(0.0008), t(0.975, 1) = 12.706
    pd = e["val_paired_vs_none"]
    half = 12.706 * math.sqrt(0.0008) / math.sqrt(2)
    assert pd["mean"] == pytest.approx(0.05) and pd["ci95"] == pytest.approx([0.05 - half, 0.05 + half])
    # best on val (0.315 > cwd's 0.305) but not confirmed: named as the best screen variant, not recommended
    assert s["recommended"]["method"] == "cwd" and s["recommended"]["best_screen_on_val"] == abl
    assert s["recommended"]["best_c2vkd_on_val"] is None and abl not in s.get("gain_ratio", {})
    md = format_markdown(s, title="t")
    assert "98.76" not in md and "0.9876" not in json.dumps(s)
    assert f"| {abl} | 2 | 31.50 | +5.00 [{100 * (0.05 - half):+.2f}, {100 * (0.05 + half):+.2f}] (noise) | +2.50 |  | 1 s |" in md
    assert "among all methods but the screen variants): **cwd**" in md and f"best screen variant on val: {abl}." in md
    # the third seed confirms it: it becomes an ordinary row, with its test numbers, paired against the best prior
    results[abl][2] = _record(0.9876, 0.30)
    results["none"][2], results["cwd"][2] = _record(0.30, 0.26), _record(0.34, 0.30)
    s = summarize(results, ["a"])
    assert "screen" not in s and s["methods"][abl]["miou_mean"] == pytest.approx(0.9876)
    assert s["methods"][abl]["paired_vs_best_prior"]["mean"] == pytest.approx(0.9876 - 0.3433333, abs=1e-6)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _toy.write_compare_experiment(tmp_path_factory.mktemp("cmpres"), iters=2, val_interval=1)


def test_results_accumulate_skip_and_rebuild(experiment: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results" / "toy-p0"
    argv = ["compare", str(experiment), "--methods", "none,kd", "--seeds", "2", "--out", str(tmp_path / "runs"),
            "--results", str(results)]
    assert main(argv) == 0
    for m in ("none", "kd"):
        for s in (0, 1):
            rec = json.loads((results / m / f"seed{s}.json").read_text())
            assert rec["method"] == m and rec["seed"] == s and rec["config"]["experiment"]["seed"] == s
            assert 0.0 <= rec["miou"] <= 1.0 and len(rec["iou"]) == 3 and rec["wall_s"] > 0
            assert [it for it, _ in rec["val_curve"]] == [1, 2]   # val at every iteration, incl. the last
            assert rec["code"].keys() == {"commit", "dirty"}
            assert rec["teacher_sha256"] == (cmp.file_sha256(experiment.parent / "teacher.safetensors")
                                             if m == "kd" else None)
    summary = json.loads((results / "compare.json").read_text())
    recs = {m: [json.loads((results / m / f"seed{s}.json").read_text())["miou"] for s in (0, 1)] for m in ("none", "kd")}
    assert summary["methods"]["kd"]["paired_vs_none"]["mean"] == pytest.approx(
        ((recs["kd"][0] - recs["none"][0]) + (recs["kd"][1] - recs["none"][1])) / 2)
    assert (results / "val_curves.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun in a fresh output folder (another machine) trains nothing: the committed records are used
    trained: list[str] = []
    monkeypatch.setattr(cmp, "run_variant", lambda cfg, run_dir: trained.append(str(run_dir)) or {})
    argv2 = argv[:]
    argv2[argv2.index("--out") + 1] = str(tmp_path / "elsewhere")
    assert main(argv2 + ["--methods", "none,kd"]) == 0
    assert trained == []
    # --summarize rebuilds the same numbers from the records alone
    (results / "compare.json").unlink()
    assert main(["compare", "--summarize", str(results)]) == 0
    again = json.loads((results / "compare.json").read_text())
    assert again["methods"]["kd"]["miou_mean"] == pytest.approx(summary["methods"]["kd"]["miou_mean"])
    # a record made before a config key existed is still reused while the plan keeps that key's default...
    rec_file = results / "none" / "seed0.json"
    rec = json.loads(rec_file.read_text())
    del rec["protocol"]["train"]["grad_share_interval"]
    rec_file.write_text(json.dumps(rec))
    assert main(argv2 + ["--methods", "none,kd"]) == 0 and trained == []
    # ...but not when the plan sets it to something else
    with pytest.raises(ConfigError, match="grad_share_interval"):
        cmp.run_compare(experiment, ["none"], 1, overrides=["train.grad_share_interval=5"], out_dir=tmp_path / "y",
                        results_dir=results)
    # a planned run under another protocol must not silently reuse them
    with pytest.raises(ConfigError, match="optim.lr"):
        cmp.run_compare(experiment, ["none"], 1, overrides=["optim.lr=0.5"], out_dir=tmp_path / "x",
                        results_dir=results)


def test_compare_explains_per_method_loss_overrides_and_runs_without_eval_split(experiment: Path,
                                                                                tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method presets"):
        cmp.run_compare(experiment, ["none", "kd"], 1, overrides=["losses.1.weight=3"], out_dir=tmp_path / "x")
    s = cmp.run_compare(experiment, ["none"], 1, overrides=["eval.final_split=null", "eval.split=null"],
                        out_dir=tmp_path / "y")
    assert s["teacher"] is None and s["class_names"] and s["methods"] == {}
