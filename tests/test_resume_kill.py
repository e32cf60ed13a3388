"""Crash and preemption of a real `c2vkd train` process, then `--resume auto`.

* SIGKILL (no chance to clean up) after the mid-run checkpoint is on disk: resuming from it ends with
  student weights bitwise identical to an uninterrupted run.
* SIGTERM (a scheduler's preemption): the run saves a checkpoint at the end of the current iteration,
  exits 143 with a message naming the checkpoint, and resuming from it is again bitwise identical.

The runs use the toy plugin (``experiment.imports=[_toy]``) and its ``toy_sleep`` loss, a zero term that sleeps
``$C2VKD_TOY_SLEEP`` seconds per step from step ``$C2VKD_TOY_SLEEP_FROM`` on: a signalled run pauses for
seconds right after the point where the test signals it (so the signal always lands mid-run, however loaded
the machine), while its config, and therefore its numbers, stay identical to the fast reference run. The
toy student has dropout, so the RNG state in the checkpoint matters. The resumes run in this process (same
code path as `c2vkd train --resume auto`). In-process resume, corrupt checkpoints and NaN policies are
covered in test_engine.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _toy  # noqa: F401  (the in-process resume needs the toy plugin registered, as the children do)
from c2vkd.cli import main
from c2vkd.data.synthetic import write_folder
from c2vkd.utils.io import safe_load

TESTS = Path(__file__).resolve().parent
ITERS = 8


def _env(sleep: tuple[float, int] | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("C2VKD_TOY_SLEEP", None)
    env.pop("C2VKD_TOY_SLEEP_FROM", None)
    if sleep:
        env["C2VKD_TOY_SLEEP"], env["C2VKD_TOY_SLEEP_FROM"] = str(sleep[0]), str(sleep[1])
    return env


def _overrides(data: Path) -> list[str]:
    return [
        f"data.root={data}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "optim.lr=0.01",
        f"schedule.iters={ITERS}", "train.progress=false", "train.log_interval=1", "train.device=cpu",
        f"train.ckpt_interval={ITERS // 2}", "experiment.deterministic=true", "experiment.imports=[_toy]",
        "eval.split=null", "eval.final_split=null", "losses=[{name: ce}, {name: toy_sleep, weight: 0.0}]",
    ]


def _start(data: Path, run_dir: Path, *extra: str, sleep: tuple[float, int] | None = None,
           new_session: bool = False) -> subprocess.Popen:
    """A `c2vkd train` child; ``new_session``: in its own process group (for signals to the whole group)."""
    cmd = [sys.executable, "-m", "c2vkd", "train", str(data / "empty.yaml"), "--run-dir", str(run_dir),
           *(a for o in _overrides(data) for a in ("--set", o)), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(sleep),
                            cwd=run_dir.parent, start_new_session=new_session)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"c2vkd train timed out\n--- stdout ---\n{out}\n--- stderr ---\n{err}")
    return proc.returncode, out, err


def _ok(proc: subprocess.Popen) -> str:
    rc, out, err = _finish(proc)
    assert rc == 0, f"c2vkd train failed (rc {rc}):\n{err[-6000:]}"
    return err


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            _, out, err = _finish(proc)
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{err[-6000:]}")
        if time.monotonic() > end:
            proc.kill()
            _, out, err = _finish(proc)
            pytest.fail(f"timed out waiting for {what}:\n{err[-6000:]}")
        time.sleep(0.02)


def _logged(run_dir: Path, n: int):
    """Condition for :func:`_wait_for`: the run has logged at least ``n`` iterations."""
    def cond() -> bool:
        m = run_dir / "metrics.jsonl"
        return m.is_file() and len(m.read_text().splitlines()) >= n
    return cond


def _resume_in_process(data: Path, run_dir: Path) -> str:
    """`c2vkd train CONFIG --resume auto`, in this process (saves a Python start-up) with the children's
    single thread, so its arithmetic matches theirs bit for bit. Returns the run's train.log."""
    threads, determ = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(data / "empty.yaml"), "--run-dir", str(run_dir), "--resume", "auto",
                     *(a for o in _overrides(data) for a in ("--set", o))]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(determ)
    return (run_dir / "train.log").read_text()


def _assert_same_student(a: Path, b: Path) -> None:
    sa, sb = safe_load(a), safe_load(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs between {a} and {b}"


class _Straight:
    """The uninterrupted reference run, started once and awaited by whichever test needs it first."""

    def __init__(self, data: Path, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.proc = _start(data, run_dir)
        self.done = False

    def student(self) -> Path:
        if not self.done:
            _ok(self.proc)
            self.done = True
        return self.run_dir / "student.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_folder(tmp_path_factory.mktemp("kill") / "ds", {"train": 6}, size_hw=(32, 40))
    (root / "empty.yaml").write_text("{}\n")
    return root


@pytest.fixture(scope="module")
def straight(data: Path):
    ref = _Straight(data, data.parent / "straight")  # runs while the first test drives its own process
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.communicate()


@pytest.mark.slow  # real `c2vkd train` processes, killed and resumed
def test_sigkill_after_checkpoint_then_resume_auto_is_bitwise_identical(data: Path, straight: _Straight) -> None:
    run = data.parent / "killed"
    mid = run / "checkpoints" / f"iter_{ITERS // 2:07d}.pt"
    proc = _start(data, run, sleep=(5.0, ITERS // 2 + 1))  # pauses 5 s per step after the mid checkpoint
    # the .sha256 sidecar is written after the checkpoint itself: its presence means the checkpoint is complete
    _wait_for(lambda: mid.with_name(mid.name + ".sha256").is_file(), proc, f"{mid.name} appeared")
    os.kill(proc.pid, signal.SIGKILL)
    rc, _, _ = _finish(proc)
    # the kill landed mid-run (if the run had won the race it would have exited 0 and written its export)
    assert rc == -signal.SIGKILL
    assert not (run / "student.safetensors").exists()
    assert not (run / "checkpoints" / f"iter_{ITERS:07d}.pt").exists()

    log = _resume_in_process(data, run)
    assert f"resumed from {mid} at iteration {ITERS // 2}" in log
    _assert_same_student(run / "student.safetensors", straight.student())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == ITERS


@pytest.mark.slow
def test_sigterm_saves_checkpoint_exits_clearly_and_resumes(data: Path, straight: _Straight) -> None:
    run = data.parent / "preempted"
    proc = _start(data, run, sleep=(1.0, 3))  # two fast steps, then 1 s per step
    _wait_for(_logged(run, 2), proc, "two logged iterations")
    proc.send_signal(signal.SIGTERM)
    rc, _, err = _finish(proc)
    assert rc == 128 + signal.SIGTERM, err[-6000:]
    m = re.search(r"stopped by SIGTERM at iteration (\d+): checkpoint saved to (\S+); continue with --resume auto", err)
    assert m, err[-6000:]
    stopped_at, ckpt = int(m.group(1)), Path(m.group(2))
    assert stopped_at in (2, 3)  # stops at the end of the step it was in
    assert ckpt == run / "checkpoints" / f"iter_{stopped_at:07d}.pt" and ckpt.is_file()
    assert "Traceback" not in err
    assert not (run / "student.safetensors").exists()

    log = _resume_in_process(data, run)
    assert f"resumed from {ckpt} at iteration {stopped_at}" in log
    _assert_same_student(run / "student.safetensors", straight.student())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_with_loader_workers_still_checkpoints(data: Path, sig: int) -> None:
    """A scheduler's group kill (Slurm's scancel, `kill -- -PGID`) or Ctrl-C in a terminal signals the DataLoader
    workers too, not only the main process: the run must still end with its checkpoint, not a worker crash."""
    run = data.parent / f"group-{sig}"
    proc = _start(data, run, "--set", "data.num_workers=2", sleep=(1.0, 3), new_session=True)
    _wait_for(_logged(run, 2), proc, "two logged iterations")
    os.killpg(proc.pid, sig)
    rc, _, err = _finish(proc)
    assert rc == 128 + sig, err[-6000:]
    m = re.search(rf"stopped by {signal.Signals(sig).name} at iteration (\d+): checkpoint saved to (\S+);", err)
    assert m, err[-6000:]
    assert Path(m.group(2)).is_file()
    assert "Traceback" not in err, err[-6000:]
    # and no worker outlives the run (the loader's shutdown, else torch's watchdog, ends them)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("DataLoader workers still alive 30 s after the run stopped")
