"""Config system: _base_ inheritance, --set overrides, unknown-key rejection with suggestions."""
from __future__ import annotations

from pathlib import Path

import pytest

from c2vkd.config import DEFAULTS, ConfigError, apply_overrides, load_config, merge


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_only() -> None:
    cfg = load_config(None)
    assert cfg == merge(DEFAULTS, {"experiment": {"name": "run"}})  # no config file: the run is called "run"
    assert cfg is not DEFAULTS  # a copy: callers may mutate it


def test_inheritance_chain_and_list_replacement(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "optim: {lr: 0.1, weight_decay: 0.5}\nschedule: {iters: 10}\n"
          "losses: [{name: ce, weight: 2.0}]\n")
    write(tmp_path / "sub/b.yaml", "_base_: ../a.yaml\noptim: {lr: 0.2}\ndata: {mean: [0, 0, 0]}\n")
    cfg = load_config(write(tmp_path / "sub/c.yaml", "_base_: [b.yaml]\nschedule: {warmup_iters: 3}\n"))
    assert cfg["optim"]["lr"] == 0.2              # child wins
    assert cfg["optim"]["weight_decay"] == 0.5    # dict keys merge
    assert cfg["optim"]["name"] == "adamw"        # defaults fill the rest
    assert cfg["schedule"] == {**DEFAULTS["schedule"], "iters": 10, "warmup_iters": 3}
    assert cfg["data"]["mean"] == [0, 0, 0]       # lists replace
    assert cfg["losses"] == [{"name": "ce", "weight": 2.0}]


def test_multiple_bases_later_wins(tmp_path: Path) -> None:
    write(tmp_path / "x.yaml", "optim: {lr: 1.0}\n")
    write(tmp_path / "y.yaml", "optim: {lr: 2.0, momentum: 0.5}\n")
    cfg = load_config(write(tmp_path / "z.yaml", "_base_: [x.yaml, y.yaml]\n"))
    assert cfg["optim"]["lr"] == 2.0 and cfg["optim"]["momentum"] == 0.5


def test_packaged_base_is_found(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "mine.yaml", "_base_: demo.yaml\nschedule: {iters: 7}\n"))
    assert cfg["student"]["name"] == "segformer_b0" and cfg["schedule"]["iters"] == 7


def test_circular_base(tmp_path: Path) -> None:
    write(tmp_path / "p.yaml", "_base_: q.yaml\n")
    write(tmp_path / "q.yaml", "_base_: p.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "p.yaml")


def test_unknown_key_rejected_with_suggestion_and_file(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.yaml", "optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.lrr'.*Did you mean: lr"):
        load_config(f)
    f = write(tmp_path / "bad2.yaml", "data:\n  train_transform: {crop_sise: [64, 64]}\n")
    with pytest.raises(ConfigError, match="crop_size"):
        load_config(f)
    f = write(tmp_path / "bad3.yaml", "schedul: {iters: 3}\n")
    with pytest.raises(ConfigError, match="schedule"):
        load_config(f)


def test_unknown_key_in_base_names_the_base(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "train: {amp_mode: bf16}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*amp"):
        load_config(write(tmp_path / "child.yaml", "_base_: base.yaml\n"))


def test_type_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schedule.iters"):
        load_config(write(tmp_path / "t.yaml", "schedule: {iters: lots}\n"))
    with pytest.raises(ConfigError, match="train.progress"):
        load_config(write(tmp_path / "t2.yaml", "train: {progress: 3}\n"))


def test_overrides_parse_types_and_lists() -> None:
    cfg = load_config(None, ["optim.lr=1e-3", "data.train_transform.crop_size=[64,96]", "train.amp=bf16",
                             "losses.0.weight=0.5", "student.kwargs.drop_path=0.1", "teacher.name=null"])
    assert cfg["optim"]["lr"] == 1e-3
    assert cfg["data"]["train_transform"]["crop_size"] == [64, 96]
    assert cfg["train"]["amp"] == "bf16"
    assert cfg["losses"][0]["weight"] == 0.5
    assert cfg["student"]["kwargs"] == {"drop_path": 0.1}   # open section accepts new keys
    assert cfg["teacher"]["name"] is None


@pytest.mark.parametrize("item,match", [
    ("optim.lrate=1", "Did you mean: lr"),
    ("optim=3", "must be a mapping"),
    ("losses.5.weight=1", "out of range"),
    ("noequals", "key=value"),
    ("optim.lr.x=1", "not a section"),
])
def test_override_errors(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [item])


def test_loss_entries_validated_against_signature(tmp_path: Path) -> None:
    # config.py checks structure; names and arguments are checked against the loss registry by the engine
    # (validate_loss_args, called by the CLI, compare and the Trainer), so the config layer never imports losses
    from c2vkd.engine.loss_config import validate_loss_args

    def load_and_check(path: Path) -> dict:
        cfg = load_config(path)
        validate_loss_args(cfg, source=str(path))
        return cfg

    with pytest.raises(ConfigError, match="l.yaml: losses\\[0\\]: unknown loss 'cee'.*Did you mean: ce"):
        load_and_check(write(tmp_path / "l.yaml", "losses: [{name: cee}]\n"))
    with pytest.raises(ConfigError, match="unknown argument 'wieght'.*weight"):
        load_and_check(write(tmp_path / "l2.yaml", "losses: [{name: ce, wieght: 1.0}]\n"))
    with pytest.raises(ConfigError, match="'name' key"):
        load_config(write(tmp_path / "l3.yaml", "losses: [{weight: 1.0}]\n"))  # structure: still config.py's
    assert [e["name"] for e in load_and_check(write(tmp_path / "ok.yaml", "losses: [{name: kd}]\n"))["losses"]] == ["kd"]


def test_config_layer_imports_no_losses() -> None:
    import subprocess
    import sys

    code = "import sys, c2vkd.config; print(sorted(m for m in sys.modules if m.startswith(('c2vkd.losses', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path / "y.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(write(tmp_path / "y2.yaml", "- 1\n- 2\n"))


def test_merge_does_not_mutate_inputs() -> None:
    a = {"x": {"y": [1]}}
    b = {"x": {"z": 2}}
    out = merge(a, b)
    out["x"]["y"].append(5)
    assert a == {"x": {"y": [1]}} and out["x"] == {"y": [1, 5], "z": 2}
    assert apply_overrides(a, ["x.y=[3]"])["x"]["y"] == [3] and a["x"]["y"] == [1]


def test_every_packaged_config_resolves() -> None:
    import c2vkd.config as c

    files = sorted(c.PACKAGE_CONFIGS.rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_yaml_scalars_follow_yaml_1_2(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "s.yaml", "optim: {lr: 6e-5}\nlosses: [{name: cwd, 'on': logits}, "
                            "{name: kd, mask_ignore: false}]\n"))
    assert cfg["optim"]["lr"] == 6e-5 and isinstance(cfg["optim"]["lr"], float)
    cfg = load_config(write(tmp_path / "s2.yaml", "losses: [{name: cwd, on: features}]\n"))
    assert cfg["losses"][0]["on"] == "features"  # YAML 1.1 would read `on` as True
    assert load_config(None, ["train.progress=false"])["train"]["progress"] is False


def test_a_method_layer_owns_balance(tmp_path, caplog):
    """An experiment inheriting a balanced preset, with another preset layered on (as `c2vkd compare` does):
    the layer's own balance applies (here none), not the experiment's."""
    import logging

    from c2vkd.config import load_config

    exp = tmp_path / "exp.yaml"
    exp.write_text("_base_: [methods/c2vkd-balanced.yaml]\n")
    assert load_config(exp)["balance"]["mode"] == "grad_norm"
    with caplog.at_level(logging.INFO, logger="c2vkd"):
        none = load_config(exp, layers=["methods/none.yaml"])
    assert none["balance"]["mode"] == "off" and none["balance"]["targets"] == {}
    assert not [r for r in caplog.records if "balance" in r.getMessage()]  # compare's documented rule: quiet
    assert load_config(exp, layers=["methods/c2vkd-balanced.yaml"])["balance"]["mode"] == "grad_norm"
    # --set still wins over the layer
    assert load_config(exp, ["balance.mode=off"], layers=["methods/c2vkd-balanced.yaml"])["balance"]["mode"] == "off"


def test_balance_belongs_to_the_file_that_sets_losses(tmp_path, caplog):
    """`_base_: [balanced experiment, methods/kd.yaml]`: kd's file sets losses and no balance, so the balanced
    experiment's grad-norm targets (which name VLFD's terms) are dropped, loudly; a file that repeats
    `balance:` keeps it, and a file that sets neither inherits both."""
    import logging

    from c2vkd.config import DEFAULTS, load_config

    bal = tmp_path / "bal.yaml"
    bal.write_text("_base_: [methods/c2vkd-balanced.yaml]\nschedule: {iters: 7}\n")
    kd = tmp_path / "kd_on_bal.yaml"
    kd.write_text("_base_: [bal.yaml, methods/kd.yaml]\n")
    with caplog.at_level(logging.INFO, logger="c2vkd"):
        cfg = load_config(kd)
    assert cfg["balance"] == DEFAULTS["balance"] and "kd" in [e["name"] for e in cfg["losses"]]
    assert cfg["schedule"]["iters"] == 7  # everything else still inherited
    assert any("sets losses without balance" in r.getMessage() and "kd.yaml" in r.getMessage()
               for r in caplog.records)
    # the same, with the losses in the file itself
    own = tmp_path / "own.yaml"
    own.write_text("_base_: bal.yaml\nlosses: [{name: ce, weight: 1.0}]\n")
    assert load_config(own)["balance"]["mode"] == "off"
    # repeating balance keeps it; setting neither losses nor balance inherits the balanced method whole
    keep = tmp_path / "keep.yaml"
    keep.write_text("_base_: bal.yaml\nlosses: [{name: ce, weight: 1.0}]\nbalance: {mode: grad_norm, "
                    "targets: {ce: 0.5}}\n")
    assert load_config(keep)["balance"]["targets"] == {"ce": 0.5}
    assert load_config(keep)["balance"]["interval"] == DEFAULTS["balance"]["interval"]
    assert load_config(bal)["balance"]["targets"] == {"vlfd_global": 0.1, "vlfd_patch": 0.1,
                                                      "vlfd_linguistic": 0.1}
