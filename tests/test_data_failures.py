"""A bad label never hangs a run, and a run that fails early never blocks its folder (issue 30, item 1).

* The pre-flight scans label values before iteration 1 (every label when cheap, else a sample; cached by
  file size and mtime) and names the files that hold a value that is neither a class id nor void.
* An exception raised in a loader worker ends the process with a non-zero exit and a one-line message that
  names the file; the workers (which ignore SIGTERM) never keep the process alive at exit.
* A run that failed before its first checkpoint does not block the same ``--out``: its files are moved to
  ``failed/<run id>/``, nothing is deleted; a folder with a checkpoint, a user's own file, or a live run in it is
  still refused.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from c2vkd.cli import worker_error_line
from c2vkd.data import build_dataset
from c2vkd.data import preflight as pf
from c2vkd.data.base import DatasetError
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.run_dir import FAILED_DIR, RunDirectoryError, refuse_used

CLASSES = ("a", "b", "c")


def _data(tmp_path: Path, bad: dict[str, int] | None = None, n_train: int = 4) -> Path:
    """A folder dataset (3 classes, void 255); ``bad`` = {split: value} writes ``value`` into that split's last
    label (a 4x4 corner, the rest stays valid)."""
    root = write_folder(tmp_path / "data", {"train": n_train, "val": 2, "test": 2}, CLASSES)
    for split, value in (bad or {}).items():
        name = (root / f"{split}.txt").read_text().split()[-1]
        p = root / "labels" / split / f"{name}.png"
        a = np.array(Image.open(p))
        a[:4, :4] = value
        Image.fromarray(a).save(p)
    return root


def _bad_label(root: Path, split: str = "train") -> Path:
    return root / "labels" / split / f"{(root / f'{split}.txt').read_text().split()[-1]}.png"


# ------------------------------------------------------------------------------------------- pre-flight scan
def test_label_scan_names_the_file_and_value(tmp_path):
    root = _data(tmp_path, {"val": 7})
    ds = build_dataset({"format": "folder", "root": str(root)}, "val", train=False)
    with pytest.raises(DatasetError) as e:
        pf.check_label_values(ds, "val")
    msg = str(e.value)
    assert str(_bad_label(root, "val")) in msg and "[7]" in msg and "0..2 or the void value" in msg
    pf.check_label_values(ds, "val", "off")  # off: no scan, no error


def test_label_scan_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    root = _data(tmp_path)
    ds = build_dataset({"format": "folder", "root": str(root)}, "train", train=False)
    decoded: list[Path] = []
    real = pf.load_label
    monkeypatch.setattr(pf, "load_label", lambda p: decoded.append(Path(p)) or real(p))
    pf.check_label_values(ds, "train", "full")
    assert len(decoded) == 4
    decoded.clear()
    pf.check_label_values(ds, "train", "full")
    assert decoded == []  # every file answered from the cache
    # a label edited in place (new size or mtime) is decoded again, and its new bad value is found
    p = _bad_label(root)
    a = np.array(Image.open(p))
    a[0, 0] = 9
    Image.fromarray(a).save(p)
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(DatasetError, match=r"\[9\]"):
        pf.check_label_values(ds, "train", "full")
    assert decoded == [p]


def test_label_scan_samples_a_large_split_and_says_so(tmp_path, monkeypatch, caplog):
    root = _data(tmp_path, n_train=10)
    ds = build_dataset({"format": "folder", "root": str(root)}, "train", train=False)
    h, w = np.array(Image.open(_bad_label(root))).shape
    monkeypatch.setattr(pf, "FULL_SCAN_PIXELS", 3 * h * w)  # room for 3 of the 10 labels
    decoded: list[Path] = []
    real = pf.load_label
    monkeypatch.setattr(pf, "load_label", lambda p: decoded.append(Path(p)) or real(p))
    with caplog.at_level(logging.WARNING, logger="c2vkd"):
        pf.check_label_values(ds, "train", "auto")
    assert len(decoded) == 3 and "sample of 3 of 10 labels" in caplog.text
    decoded.clear()
    pf.check_label_values(ds, "train", "full")  # full: all ten (the three sampled come from the cache)
    assert len(decoded) == 7


def test_preflight_reads_the_config_key(tmp_path):
    root = _data(tmp_path, {"test": 200})
    cfg = {"format": "folder", "root": str(root), "label_check": "auto"}
    with pytest.raises(DatasetError, match="(?s)split 'test'.*200"):
        pf.preflight(cfg, ["train", "val", "test"])
    pf.preflight({**cfg, "label_check": "off"}, ["train", "val", "test"])


def test_preflight_reads_each_header_once_in_auto_mode(tmp_path, monkeypatch, caplog):
    """check_sizes returns the label pixels the auto scan is sized by: one header read per file, and the same
    sampling decision as counting them apart."""
    root = _data(tmp_path, n_train=10)
    h, w = np.array(Image.open(_bad_label(root))).shape
    monkeypatch.setattr(pf, "FULL_SCAN_PIXELS", 3 * h * w)
    opened: list[Path] = []
    real = pf.image_size
    monkeypatch.setattr(pf, "image_size", lambda p: opened.append(Path(p)) or real(p))
    with caplog.at_level(logging.WARNING, logger="c2vkd"):
        pf.preflight({"format": "folder", "root": str(root), "label_check": "auto"}, ["train"])
    assert len(opened) == 20 and len(set(opened)) == 20  # 10 images + 10 labels, each once
    assert "sample of 3 of 10 labels" in caplog.text
    ds = build_dataset({"format": "folder", "root": str(root)}, "train", train=False)
    assert pf.check_sizes(ds, "train") == 10 * h * w


# ------------------------------------------------------------------------------------------- worker failures
def test_worker_error_becomes_one_line():
    msg = ("Caught DatasetError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
           '  File "x.py", line 3, in f\n    raise DatasetError(...)\n'
           "c2vkd.data.base.DatasetError: /d/labels/train/x.png: label has values outside the class range: [40]")
    assert worker_error_line(msg) == ("/d/labels/train/x.png: label has values outside the class range: [40] "
                                      "(raised in data-loader worker 1)")
    assert worker_error_line("plain message") == "plain message"


def _run(cmd: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; a hang fails the test (and the group is killed) instead of hanging
    the suite."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the process hung (no exit within {timeout} s)\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_bad_label_seen_only_by_a_worker_ends_the_run(tmp_path):
    """The pre-flight is switched off, so only a loader worker meets the bad label: the run must exit non-zero
    with the file named (it used to print the error and then sleep until killed), and a rerun into the same
    folder must not be refused."""
    root = _data(tmp_path, {"train": 40})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "c2vkd", "train", "--model", "segformer_b0", "--data", str(root), "--iters", "50",
           "--out", str(out), "--set", "data.num_workers=2", "--set", "data.batch_size=4",
           "--set", "train.progress=false", "--set", "train.device=cpu"]
    t0 = time.perf_counter()
    res = _run(cmd + ["--set", "data.label_check=off"], tmp_path)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert str(_bad_label(root)) in last and "[40]" in last and "data-loader worker" in last, res.stderr
    assert "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 150
    # the same command again: the early-failed run is set aside, not an obstacle; with the pre-flight on, the
    # bad file is named before iteration 1
    res2 = _run(cmd, tmp_path)
    assert res2.returncode == 2, res2.stderr
    assert "failed before its first checkpoint" in res2.stderr + res2.stdout
    assert "not a class id" in res2.stderr and str(_bad_label(root)) in res2.stderr
    kept = list((out / FAILED_DIR).iterdir())
    assert len(kept) == 1 and (kept[0] / "config.yaml").is_file() and (kept[0] / "train.log").is_file()


def test_uncaught_worker_error_exits_instead_of_waiting_on_workers(tmp_path):
    """Any exception, not only the ones the CLI reports: the interpreter's exit must not wait forever on
    workers that ignore SIGTERM (data/workers.py shuts them down from its atexit hook)."""
    script = tmp_path / "boom.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch
        from c2vkd.data.sampler import build_dataloader

        class Boom(torch.utils.data.Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, key):
                raise TypeError("boom in a worker")

        loader = build_dataloader(Boom(), batch_size=2, train=True, num_workers=2)
        it = iter(loader)
        print("workers", *[w.pid for w in it._workers], flush=True)
        next(it)
    """))
    res = _run([sys.executable, str(script)], tmp_path, timeout=90)
    assert res.returncode == 1 and "boom in a worker" in res.stderr
    pids = [int(p) for p in res.stdout.split()[1:]]
    assert len(pids) == 2
    for pid in pids:  # no worker survives its parent
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


# ------------------------------------------------------------------------------------------- run folders
def _early_failed(run_dir: Path, *, run_json: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    for name in ("config.yaml", "train.log", "metrics.jsonl"):
        (run_dir / name).write_text(name)
    (run_dir / "tb").mkdir()
    if run_json:
        (run_dir / "run.json").write_text('{"run_id": "20260101-000000-abcdef"}\n')
    return run_dir


def test_early_failed_run_is_set_aside_not_deleted(tmp_path):
    run = _early_failed(tmp_path / "r")
    refuse_used(run)
    kept = run / FAILED_DIR / "20260101-000000-abcdef"
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "metrics.jsonl", "run.json", "tb", "train.log"]
    assert [p.name for p in run.iterdir()] == [FAILED_DIR]
    refuse_used(run)  # a folder with only earlier failures is free


@pytest.mark.parametrize("extra", ["checkpoint", "student", "user_config"])
def test_folders_that_hold_more_than_a_failure_are_still_refused(tmp_path, extra):
    if extra == "user_config":  # a user's own config.yaml, no run.json: not a run of ours
        run = tmp_path / "r"
        run.mkdir()
        (run / "config.yaml").write_text("x")
    else:
        run = _early_failed(tmp_path / "r")
        if extra == "checkpoint":
            (run / "checkpoints").mkdir()
            (run / "checkpoints" / "iter_0000010.pt").write_bytes(b"x")
        else:
            (run / "student.safetensors").write_bytes(b"x")
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        refuse_used(run)


def test_a_live_run_is_never_set_aside(tmp_path):
    run = _early_failed(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from c2vkd.engine.run_dir import lock_run_dir
        lock_run_dir(Path({str(run)!r}))
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match="in use by another running c2vkd process"):
            refuse_used(run)
        assert (run / "run.json").is_file()  # untouched
    finally:
        holder.kill()
        holder.wait()
    refuse_used(run)  # the lock died with its process
    assert not (run / "run.json").exists()
