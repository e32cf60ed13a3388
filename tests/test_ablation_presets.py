"""The issue-26 ablation presets (src/c2vkd/configs/ablation/) are the variants they claim to be.

Each preset is loaded exactly as `c2vkd compare` layers it on the camvid-p2 recipe (runners/compare.py
variant_config), and its resolved config must equal c2vkd-balanced's except for the stated change: the exact
losses (names and arguments) and balance (mode and per-term targets). No training (fast).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from c2vkd.runners.compare import variant_config
from c2vkd.runners.results import is_c2vkd, method_label

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src/c2vkd/configs/recipes/camvid_p2.yaml"
ABLATION = ROOT / "src/c2vkd/configs/ablation"
QUEUE = ROOT / "benchmarks/ablation_queue.txt"
OVERRIDES = ["data.root=/nonexistent/camvid"]  # loading never reads the data

PDD = {"name": "pdd", "weight": 1.0, "preset": "default"}
VLFD = {"name": "vlfd", "weight": 1.0, "global_weight": 1.0, "patch_weight": 1.0, "linguistic_weight": 1.0,
        "reduction": "distribution", "graph_mode": "gram"}
CE = {"name": "ce", "weight": 1.0}
# methods/cwd.yaml's two channel-wise terms, verbatim
CWD_LOGITS = {"name": "cwd", "weight": 3.0, "temperature": 4.0, "on": "logits", "at": "stride"}
CWD_FEAT = {"name": "cwd", "weight": 50.0, "temperature": 4.0, "on": "features", "student_tap": "decoder",
            "teacher_tap": "decoder", "adapter": "auto", "reduction": "reference"}
TARGETS = {"vlfd_global": 0.1, "vlfd_patch": 0.1, "vlfd_linguistic": 0.1}


def _cfg(method: str) -> dict:
    return variant_config(RECIPE, method, 0, OVERRIDES)


def _vlfd(**kw) -> dict:
    return {**VLFD, **kw}


def _one_term(term: str) -> dict:
    w = {f"{t}_weight": (1.0 if t == term else 0.0) for t in ("global", "patch", "linguistic")}
    return _vlfd(**w)


# preset stem -> (losses, balance mode, balance targets) after layering
EXPECTED: dict[str, tuple[list[dict], str, dict[str, float]]] = {
    "c2vkd-abl-pdd-ce": ([PDD, CE], "off", {}),
    "c2vkd-abl-kd-for-pdd": ([{"name": "kd", "weight": 1.0, "temperature": 1.0, "at": "input", "mask_ignore": True},
                              VLFD, CE], "grad_norm", TARGETS),
    "c2vkd-abl-vlfd-global": ([PDD, _one_term("global"), CE], "grad_norm", {"vlfd_global": 0.1}),
    "c2vkd-abl-vlfd-patch": ([PDD, _one_term("patch"), CE], "grad_norm", {"vlfd_patch": 0.1}),
    "c2vkd-abl-vlfd-linguistic": ([PDD, _one_term("linguistic"), CE], "grad_norm", {"vlfd_linguistic": 0.1}),
    "c2vkd-abl-vlfd-decoder": ([PDD, _vlfd(student_tap="decoder", teacher_tap="decoder"), CE], "grad_norm",
                               TARGETS),
    "c2vkd-abl-vlfd-s34": ([PDD, VLFD, {**_vlfd(student_tap="stage3", teacher_tap="layer3"), "tag": "s3"}, CE],
                           "grad_norm", {f"{t}{s}": 0.05 for s in ("", "_s3") for t in TARGETS}),
    "c2vkd-abl-target005": ([PDD, VLFD, CE], "grad_norm",
                            {"vlfd_global": 0.05, "vlfd_patch": 0.05, "vlfd_linguistic": 0.05}),
    "c2vkd-abl-target02": ([PDD, VLFD, CE], "grad_norm",
                           {"vlfd_global": 0.2, "vlfd_patch": 0.2, "vlfd_linguistic": 0.2}),
    "c2vkd-abl-cwd-logits": ([PDD, VLFD, CE, CWD_LOGITS], "grad_norm", TARGETS),
    "c2vkd-abl-cwd-feat": ([PDD, VLFD, CE, CWD_FEAT], "grad_norm", TARGETS),
    "c2vkd-abl-cwd-logits-feat": ([PDD, VLFD, CE, CWD_LOGITS, CWD_FEAT], "grad_norm", TARGETS),
    "c2vkd-abl-pdd-t4": ([{**PDD, "temperature": 4.0}, VLFD, CE], "grad_norm", TARGETS),
    "c2vkd-abl-pdd-a1-b8": ([{**PDD, "alpha": 1.0, "beta": 8.0}, VLFD, CE], "grad_norm", TARGETS),
    "c2vkd-abl-pdd-stride": ([{**PDD, "at": "stride"}, VLFD, CE], "grad_norm", TARGETS),
}


def test_the_folder_holds_exactly_the_listed_presets() -> None:
    assert sorted(p.stem for p in ABLATION.glob("*.yaml")) == sorted(EXPECTED)
    for stem in EXPECTED:
        assert is_c2vkd(str(ABLATION / f"{stem}.yaml")) and method_label(f"x/{stem}.yaml") == stem


def test_reference_presets_are_what_the_ablation_is_measured_against() -> None:
    """The ablation's fixed points: c2vkd-balanced's own terms, and cwd.yaml's CWD terms (copied verbatim)."""
    bal = _cfg("c2vkd-balanced")
    assert bal["losses"] == [PDD, VLFD, CE]
    assert bal["balance"]["mode"] == "grad_norm" and bal["balance"]["targets"] == TARGETS
    cwd = _cfg("cwd")["losses"]
    assert CWD_LOGITS in cwd and CWD_FEAT in cwd


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_preset_is_the_variant_it_claims(stem: str) -> None:
    path = ABLATION / f"{stem}.yaml"
    losses, mode, targets = EXPECTED[stem]
    cfg = _cfg(str(path))
    assert cfg["losses"] == losses
    assert cfg["balance"]["mode"] == mode
    assert cfg["balance"]["targets"] == pytest.approx(targets) and set(cfg["balance"]["targets"]) == set(targets)
    assert cfg["experiment"]["name"] == f"camvid_p2-{stem}-seed0"
    # everything else is c2vkd-balanced's: same recipe, same balancer settings, the teacher kept
    ref = _cfg("c2vkd-balanced")
    mine, theirs = copy.deepcopy(cfg), copy.deepcopy(ref)
    for c in (mine, theirs):
        c.pop("losses")
        c["experiment"].pop("name")
        c["balance"].pop("targets")
        if mode == "off":
            c["balance"].pop("mode")
    assert mine == theirs
    assert cfg["teacher"]["name"] == "deeplabv3plus_r18"
    # the header says what differs and that it belongs to the screen
    head = path.read_text().splitlines()[0]
    assert head.startswith("# Ablation screen (issue 26")


def test_pdd_and_vlfd_numbers_differ_from_balanced_only_where_claimed() -> None:
    """Spot-check the resolved numbers the screen varies (guards against a preset silently inheriting)."""
    t4 = _cfg(str(ABLATION / "c2vkd-abl-pdd-t4.yaml"))["losses"][0]
    assert t4["temperature"] == 4.0 and "alpha" not in t4 and "beta" not in t4
    ab = _cfg(str(ABLATION / "c2vkd-abl-pdd-a1-b8.yaml"))["losses"][0]
    assert (ab["alpha"], ab["beta"]) == (1.0, 8.0) and "temperature" not in ab
    assert sum(_cfg(str(ABLATION / "c2vkd-abl-target02.yaml"))["balance"]["targets"].values()) == pytest.approx(0.6)
    assert sum(_cfg(str(ABLATION / "c2vkd-abl-target005.yaml"))["balance"]["targets"].values()) == pytest.approx(0.15)
    assert not any(e["name"] == "vlfd" for e in _cfg(str(ABLATION / "c2vkd-abl-pdd-ce.yaml"))["losses"])
    kd = [e["name"] for e in _cfg(str(ABLATION / "c2vkd-abl-kd-for-pdd.yaml"))["losses"]]
    assert "kd" in kd and "pdd" not in kd


def test_queue_lists_none_the_references_and_every_preset_at_seed_0() -> None:
    """benchmarks/ablation_queue.txt: protocol_queue.sh's "SEED METHOD" lines (no comments: the worker reads every
    line as a job), `none` first, then the references c2vkd-balanced and cwd, then every preset by its path
    relative to the code dir (where protocol_queue.sh runs compare)."""
    lines = [ln.split() for ln in QUEUE.read_text().splitlines()]
    assert all(len(ln) == 2 and ln[0] == "0" for ln in lines)
    methods = [ln[1] for ln in lines]
    assert methods[:3] == ["none", "c2vkd-balanced", "cwd"] and len(set(methods)) == len(methods)
    assert sorted(method_label(m) for m in methods[3:]) == sorted(EXPECTED)
    for m in methods[3:]:
        assert (ROOT / m).is_file() and m.startswith("src/c2vkd/configs/ablation/")
