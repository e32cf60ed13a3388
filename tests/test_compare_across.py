"""`c2vkd compare --across DIR DIR ...`: protocols side by side per method (issue 27), golden values by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from c2vkd.cli import main
from c2vkd.runners.compare import protocol_names
from c2vkd.runners.compare_summary import (across_protocols, format_across_markdown, kendall_tau_b, rank_by_value,
                                           spearman_rho, summarize)
from c2vkd.runners.results import method_order

ABL = "c2vkd-abl-cwd-feat"  # an ablation preset: a screen variant below 3 seeds
T2 = 4.303  # t_{0.975, 2}: three paired seeds


def _record(miou: float, val_final: float | None = None) -> dict:
    val = miou if val_final is None else val_final
    return {"miou": miou, "iou": [miou], "wall_s": 1.0, "val_curve": [[3, 0.0], [4, val]]}


def _protocol(none: list[float], deltas: dict[str, list[float]], val: dict[str, float] | None = None) -> dict:
    """{method: {seed: record}} in table order: `none` per seed, every other method as none + delta per seed
    (fewer deltas: fewer seeds); val final = test mIoU unless ``val`` says otherwise."""
    runs = {"none": none, **{m: [none[s] + d for s, d in enumerate(ds)] for m, ds in deltas.items()}}
    return {m: {s: _record(v, (val or {}).get(m)) for s, v in enumerate(runs[m])} for m in method_order(runs)}


def test_rank_correlations_golden() -> None:
    assert rank_by_value({"a": 0.3, "b": 0.5, "c": 0.5, "d": 0.1}) == {"b": 1.5, "c": 1.5, "a": 3, "d": 4}
    x = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert spearman_rho(x, dict(x)) == pytest.approx(1.0) and kendall_tau_b(x, dict(x)) == pytest.approx(1.0)
    rev = {"a": 3.0, "b": 2.0, "c": 1.0}
    assert spearman_rho(x, rev) == pytest.approx(-1.0) and kendall_tau_b(x, rev) == pytest.approx(-1.0)
    # a and b swap: rank differences 1, 1, 0 -> rho = 1 - 6 * 2 / (3 (9 - 1)) = 0.5; one discordant pair of 3
    # -> tau = (2 - 1) / 3; a key only one side has ("z") is left out
    swap = {"a": 2.0, "b": 1.0, "c": 3.0, "z": 9.0}
    assert spearman_rho(x, swap) == pytest.approx(0.5) and kendall_tau_b(x, swap) == pytest.approx(1 / 3)
    # a tie: y ranks (1.5, 1.5, 3) against (1, 2, 3): Pearson of ranks = 1.5 / sqrt(2 x 1.5) = sqrt(3) / 2;
    # tau-b = (2 - 0) / sqrt((3 - 0) (3 - 1))
    tie = {"a": 1.0, "b": 1.0, "c": 3.0}
    assert spearman_rho(x, tie) == pytest.approx(math.sqrt(3) / 2)
    assert kendall_tau_b(x, tie) == pytest.approx(2 / math.sqrt(6))
    # undefined: fewer than 2 common keys, or one side all tied
    assert spearman_rho(x, {"a": 1.0}) is None and kendall_tau_b(x, {"a": 1.0}) is None
    flat = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert spearman_rho(x, flat) is None and kendall_tau_b(x, flat) is None


def _summaries() -> dict[str, dict]:
    """pa: 3 seeds, gains kd +2 (noisy), cwd +3, dkd +1, the ablation screened on 1 seed (test 98.76, never to be
    shown); pb: kd +3, cwd +2, dkd +1, fitnet on 2 seeds, the ablation confirmed on 3; pc: pa's gains reversed."""
    pa = _protocol([0.30, 0.31, 0.32], {"kd": [0.01, 0.02, 0.03], "cwd": [0.03] * 3, "dkd": [0.01] * 3})
    pa[ABL] = {0: _record(0.9876, 0.50)}
    pb = _protocol([0.40, 0.41, 0.42], {"kd": [0.03] * 3, "cwd": [0.02] * 3, "dkd": [0.01] * 3,
                                        "fitnet": [0.015, 0.025], ABL: [0.05] * 3})
    pc = _protocol([0.30, 0.31, 0.32], {"kd": [0.02] * 3, "cwd": [0.01] * 3, "dkd": [0.03] * 3})
    return {p: summarize(r, ["a"]) for p, r in {"pa": pa, "pb": pb, "pc": pc}.items()}


def test_across_protocols_golden() -> None:
    across = across_protocols(_summaries())
    assert across["protocols"] == ["pa", "pb", "pc"] and across["most_seeds"] == 3
    assert list(across["methods"]) == ["none", "cwd", "dkd", "fitnet", "kd", ABL]
    kd = across["methods"]["kd"]
    # pa: diffs 0.01, 0.02, 0.03 -> mean 0.02, sd 0.01; ranks by mean test mIoU cwd .34, kd .33, dkd .32, none .31
    assert kd["pa"]["paired_vs_none"]["mean"] == pytest.approx(0.02)
    assert kd["pa"]["paired_vs_none"]["ci95"] == pytest.approx([0.02 - T2 * 0.01 / math.sqrt(3),
                                                                0.02 + T2 * 0.01 / math.sqrt(3)])
    assert {m: across["methods"][m]["pa"]["rank"] for m in ("cwd", "kd", "dkd", "none")} == {
        "cwd": 1, "kd": 2, "dkd": 3, "none": 4}
    # pb: ABL .46, kd .44, cwd .43, fitnet .425 (seeds 0-1), dkd .42, none .41
    assert {m: c["pb"]["rank"] for m, c in across["methods"].items()} == {
        ABL: 1, "kd": 2, "cwd": 3, "fitnet": 4, "dkd": 5, "none": 6}
    assert across["methods"]["fitnet"]["pa"] is None and across["methods"]["fitnet"]["pb"]["seeds"] == 2
    # the screen variant: seeds only, no test number, no rank, no gain in any correlation
    assert across["methods"][ABL]["pa"] == {"screen": True, "seeds": 1}
    assert "0.9876" not in json.dumps(across)
    pairs = {tuple(p["protocols"]): p for p in across["pairs"]}
    assert list(pairs) == [("pa", "pb"), ("pa", "pc"), ("pb", "pc")]
    # pa ranks cwd 1, kd 2, dkd 3; pb kd 1, cwd 2, dkd 3: the swap case, rho 0.5, tau 1/3 (ABL, fitnet: not in pa)
    ab = pairs["pa", "pb"]
    assert ab["methods"] == ["cwd", "dkd", "kd"] and ab["n"] == 3
    assert ab["spearman"] == pytest.approx(0.5) and ab["kendall_tau_b"] == pytest.approx(1 / 3)
    # pc ranks dkd 1, kd 2, cwd 3: pa's reversed -> -1; against pb rank differences kd 1, cwd 1, dkd 2 ->
    # rho = 1 - 6 x 6 / 24 = -0.5, pairs (kd, cwd) concordant, (kd, dkd) and (cwd, dkd) discordant -> -1/3
    assert pairs["pa", "pc"]["spearman"] == pytest.approx(-1.0)
    assert pairs["pa", "pc"]["kendall_tau_b"] == pytest.approx(-1.0)
    assert pairs["pb", "pc"]["spearman"] == pytest.approx(-0.5)
    assert pairs["pb", "pc"]["kendall_tau_b"] == pytest.approx(-1 / 3)
    per = across["per_protocol"]
    assert (per["pa"]["top"], per["pb"]["top"], per["pc"]["top"]) == ("cwd", ABL, "dkd") and not across["top_same"]
    assert per["pa"]["best_prior"] == "cwd" and per["pb"]["best_prior"] == "kd"
    # on val: pa's screen variant (val .50) is named, not recommended; pb's confirmed ablation is recommended
    assert per["pa"]["recommended"] == "cwd" and per["pa"]["best_screen_on_val"] == ABL
    assert per["pb"]["recommended"] == ABL and per["pa"]["screened"] == {ABL: 1}
    assert across["common"] == {"methods": ["none", "cwd", "dkd", "kd"],
                                "top": {"pa": "cwd", "pb": "kd", "pc": "dkd"}}


def test_across_markdown() -> None:
    md = format_across_markdown(across_protocols(_summaries()), title="t")
    half = T2 * 0.01 / math.sqrt(3)
    fit_half = 12.706 * math.sqrt(0.00005) / math.sqrt(2)   # fitnet diffs 0.015, 0.025: sd sqrt(5e-5), t(0.975, 1)
    assert "| method | pa gain vs none [95% CI] | pa rank | pb gain vs none [95% CI] | pb rank | pc gain" in md
    assert "| none | reference, 31.00 mIoU | 4/4 | reference, 41.00 mIoU | 6/6 | reference, 31.00 mIoU | 4/4 |" in md
    assert (f"| kd | +2.00 [{100 * (0.02 - half):+.2f}, {100 * (0.02 + half):+.2f}] (noise) | 2/4 | "
            "+3.00 [+3.00, +3.00] | 2/6 | +2.00 [+2.00, +2.00] | 2/4 |") in md
    # missing in pa and pc: "-"; two seeds where others have three: the count is said
    assert (f"| fitnet | - | - | +2.00 [{100 * (0.02 - fit_half):+.2f}, {100 * (0.02 + fit_half):+.2f}] (noise) "
            "(2 seeds) | 4/6 | - | - |") in md
    # screened in pa: no test number anywhere; confirmed in pb: an ordinary cell
    assert f"| {ABL} | screened (1 seed, test withheld) | - | +5.00 [+5.00, +5.00] | 1/6 | - | - |" in md
    assert "98.76" not in md and "test numbers are withheld" in md
    assert "- pa vs pb: Spearman rho +0.50, Kendall tau-b +0.33, n = 3 (cwd, dkd, kd)." in md
    assert "- pa vs pc: Spearman rho -1.00, Kendall tau-b -1.00, n = 3 (cwd, dkd, kd)." in md
    assert ("- pa (4 confirmed methods, unknown split): best prior cwd; recommended on val cwd; best screen variant "
            f"on val: {ABL}.") in md
    assert ("The top method by mean test mIoU is not the same in every protocol: cwd (pa), "
            f"{ABL} (pb), dkd (pc).") in md
    assert ("Among the 4 methods every protocol has confirmed (none, cwd, dkd, kd), the top one is not the same: "
            "cwd (pa), kd (pb), dkd (pc).") in md
    # the same top everywhere: said in one sentence
    s = _summaries()
    same = format_across_markdown(across_protocols({"pa": s["pa"], "pa2": s["pa"]}))
    assert "The top method by mean test mIoU is the same in every protocol: **cwd**." in same
    assert "- pa vs pa2: Spearman rho +1.00, Kendall tau-b +1.00, n = 3" in same


def test_protocol_names_fall_back_to_folders() -> None:
    a, b, c = Path("r/camvid-p2"), Path("r/idd-p1"), Path("r/idd-p1-pilot")
    assert protocol_names([(a, {"protocol": None}), (b, {"protocol": "idd-p1"})]) == ["camvid-p2", "idd-p1"]
    # a pilot folder recording under its protocol's name: both columns take their folder names
    assert protocol_names([(b, {"protocol": "idd-p1"}), (c, {"protocol": "idd-p1"})]) == ["idd-p1", "idd-p1-pilot"]
    assert protocol_names([(Path("x/p"), {"protocol": "q"}), (Path("y/p"), {"protocol": "q"})]) == ["x/p", "y/p"]


def _write_results(folder: Path, runs: dict[str, dict[int, dict]], protocol: str | None) -> None:
    """Record files as `compare --results` writes them, with only the fields the summary reads."""
    for m, per_seed in runs.items():
        for s, rec in per_seed.items():
            (folder / m).mkdir(parents=True, exist_ok=True)
            extra = {"protocol_name": protocol} if protocol else {}
            (folder / m / f"seed{s}.json").write_text(json.dumps(
                {"method": m, "seed": s, **rec, "class_names": ["a"], "split": "test", **extra}))


def test_cli_across(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "results" / "pa-folder", tmp_path / "results" / "pb"
    _write_results(a, _protocol([0.30, 0.31], {"kd": [0.01, 0.04], "cwd": [0.02, 0.02]}), "pa")
    _write_results(b, _protocol([0.40], {"kd": [0.01], "cwd": [0.03]}), None)   # older records: no protocol_name
    out = tmp_path / "across.md"
    assert main(["compare", "--across", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = out.read_text()
    assert md in printed and f"written: {out}" in printed
    assert "| method | pa gain vs none [95% CI] | pa rank | pb gain vs none [95% CI] | pb rank |" in md
    assert "| none | reference, 30.50 mIoU | 3/3 | reference, 40.00 mIoU (1 seed) | 3/3 |" in md
    assert "| cwd | +2.00 [+2.00, +2.00] | 2/3 | +3.00 (1 seed) | 1/3 |" in md
    # gains pa kd +2.5, cwd +2; pb kd +1, cwd +3: the order flips
    assert ("- pa vs pb: Spearman rho -1.00, Kendall tau-b -1.00, n = 2 (with 2 methods always +1 or -1) "
            "(cwd, kd).") in md
    assert "test split" in md and not (a / "compare.json").exists() and not (b / "compare.md").exists()
    # errors: one folder; a folder without records (named); the same folder twice
    assert main(["compare", "--across", str(a)]) == 2
    assert "needs at least two results folders" in capsys.readouterr().err
    empty = tmp_path / "results" / "empty"
    empty.mkdir()
    assert main(["compare", "--across", str(a), str(empty)]) == 2
    assert f"{empty} holds no <method>/seed<k>.json records" in capsys.readouterr().err
    assert main(["compare", "--across", str(a), str(a)]) == 2
    assert "more than once" in capsys.readouterr().err
