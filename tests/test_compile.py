"""train.compile (issue 29): torch.compile of the student (and of the loss modules) in the training forward.

Compiled and eager training must agree to float32 rounding over a few real steps (losses, parameters), the
feature taps must still reach the losses, checkpoints and exports must hold the plain student's keys, resume must
work, and a machine without a working compiler must continue eager with one loud line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import _toy  # noqa: F401  (registers toy_cnn / toy_vit)
from c2vkd.config import load_config
from c2vkd.engine import runtime
from c2vkd.engine.trainer import Trainer
from c2vkd.utils.io import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(root: Path, teacher: Path, out: Path, *extra: str) -> dict:
    # no dropout: compiled code draws its random numbers differently from eager
    return load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "student.kwargs={drop: 0.0}",
        "teacher.name=toy_cnn", f"teacher.checkpoint={teacher}",
        "losses=[{name: ce}, {name: kd, weight: 0.5}, {name: fitnet, weight: 0.5}]", "optim.lr=0.01",
        "schedule.iters=3", "train.progress=false", "train.log_interval=1", f"experiment.output_dir={out}",
        "train.device=cpu", "eval.split=val", "eval.final_split=null", *extra])


def losses_logged(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("ce", "kd", "fitnet")} for r in rows if "ce" in r]


@pytest.fixture
def eager_backend(monkeypatch: pytest.MonkeyPatch):
    """torch.compile with the aot_eager backend (dynamo + AOTAutograd, no C++ compilation): the wiring in
    seconds; the inductor numbers are in the slow test."""
    real = torch.compile
    monkeypatch.setattr(runtime.torch, "compile",
                        lambda fn, **kw: real(fn, **{**kw, "backend": kw.get("backend", "aot_eager")}))
    monkeypatch.setattr(runtime, "compile_fallback_reason", lambda device: None)


def _train(cfg: dict, run: Path, **kw) -> Trainer:
    t = Trainer(cfg, run_dir=run, **kw)
    t.fit()
    return t


def _assert_same_training(a: Trainer, b: Trainer, rtol: float, atol: float) -> None:
    la, lb = losses_logged(a.run_dir), losses_logged(b.run_dir)
    assert len(la) == len(lb) == 3
    for ra, rb in zip(la, lb):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=rtol, abs=atol), (k, ra, rb)
    assert la[0]["fitnet"] > 0  # the student's feature tap reached the loss through the compiled forward
    sa, sb = a.student.state_dict(), b.student.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol)


def test_compiled_training_matches_eager_and_keeps_plain_state_dicts(data_root: Path, teacher_ckpt: Path,
                                                                     tmp_path: Path, eager_backend) -> None:
    eager = _train(make_cfg(data_root, teacher_ckpt, tmp_path), tmp_path / "eager")
    comp = _train(make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=all"), tmp_path / "comp")
    assert comp.model.compiled_student is not None and comp.model.compiled_losses is not None
    _assert_same_training(eager, comp, rtol=1e-5, atol=1e-6)
    # checkpoints and exports hold the plain student's keys (no _orig_mod.), so export / eval / resume read them
    ckpt = safe_load(next((tmp_path / "comp" / "checkpoints").glob("*.pt")))
    assert list(ckpt["student"]) == list(eager.student.state_dict())
    from safetensors.torch import load_file
    assert not any("_orig_mod" in k for k in load_file(tmp_path / "comp" / "student.safetensors"))


def test_compiled_run_resumes_like_a_straight_one(data_root: Path, teacher_ckpt: Path, tmp_path: Path,
                                                  eager_backend) -> None:
    cfg = make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=student", "train.ckpt_interval=2")
    straight = _train(cfg, tmp_path / "straight")
    part = Trainer(cfg, run_dir=tmp_path / "resumed")
    part.fit(max_steps=2, finalize=False)
    part.save_checkpoint()
    resumed = _train(cfg, tmp_path / "resumed", resume="auto")
    assert resumed.model.compiled_student is not None
    for k, v in straight.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_no_compiler_continues_eager_with_one_loud_line(data_root: Path, teacher_ckpt: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def no_compiler(*a, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\n"
                           "more lines of the traceback")
    monkeypatch.setattr(runtime.torch, "compile", no_compiler)
    reason = runtime.compile_fallback_reason(torch.device("cpu"))
    assert reason == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx"
    with caplog.at_level(logging.WARNING, logger="c2vkd"):
        t = Trainer(make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=student", "schedule.iters=1"),
                    run_dir=tmp_path / "r")
    lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(lines) == 1 and "CONTINUING IN EAGER MODE" in lines[0] and "No working C++ compiler" in lines[0]
    assert "\n" not in lines[0]
    assert t.model.compiled_student is None and t.model.compiled_losses is None
    t.fit()  # and it trains
    assert (tmp_path / "r" / "student.safetensors").is_file()


def test_unknown_compile_mode_is_a_clear_error(data_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.compile must be one of off, student, all, got 'yes'"):
        Trainer(make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=yes"), run_dir=tmp_path / "bad")


@pytest.mark.slow
def test_inductor_training_matches_eager_to_float32_rounding(data_root: Path, teacher_ckpt: Path,
                                                             tmp_path: Path) -> None:
    if runtime.compile_fallback_reason(torch.device("cpu")) is not None:
        pytest.skip("torch.compile (inductor) is not usable on this machine")
    eager = _train(make_cfg(data_root, teacher_ckpt, tmp_path), tmp_path / "eager")
    comp = _train(make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=all"), tmp_path / "comp")
    assert comp.model.compiled_student is not None
    # inductor fuses and reorders float32 reductions: equal to rounding, not bit for bit
    _assert_same_training(eager, comp, rtol=1e-4, atol=1e-5)


def test_two_compiled_runs_in_one_process_keep_their_own_taps(data_root: Path, teacher_ckpt: Path, tmp_path: Path,
                                                              eager_backend) -> None:
    """compare trains its variants in one process: a compiled student without taps (none) must not hand its
    graph to the next variant's compiled student, whose tap hooks feed the losses (dynamo shares compiled code
    between instances of one class and by default does not guard on hooks)."""
    plain = Trainer(make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=student", "teacher.name=null",
                             "losses=[{name: ce}]"), run_dir=tmp_path / "plain")
    tapped = Trainer(make_cfg(data_root, teacher_ckpt, tmp_path, "train.compile=student"), run_dir=tmp_path / "tap")
    plain.fit()
    tapped.fit()
    assert losses_logged(tapped.run_dir)[0]["fitnet"] > 0
