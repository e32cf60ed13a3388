"""Balancing under the engine's guarantees: a SIGKILLed balanced run resumes bit-identically (student and
balancer state), and under 2-process gloo DDP every rank trains with the same live weights at every step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _toy  # noqa: F401
from c2vkd.cli import main
from c2vkd.data.synthetic import write_folder
from c2vkd.utils.io import safe_load
from test_ddp import _free_port
from test_resume_kill import _assert_same_student, _env, _finish, _ok, _wait_for

TESTS = Path(__file__).resolve().parent
ITERS = 8

# A teacher-free plugin loss whose term can be balanced, and which records the weight it is trained with at
# every forward, per rank (RANK is set by torchrun), so the test can compare the ranks' live weights.
PROBE = '''
import json, os
from c2vkd.losses.base import LOSSES, DistillLoss

class WeightProbe(DistillLoss):
    requires_teacher = False

    def forward(self, inputs):
        out = os.environ.get("PROBE_DIR")
        if out and self.training:
            with open(os.path.join(out, "rank%s.jsonl" % os.environ.get("RANK", "0")), "a") as f:
                f.write(json.dumps(self.weights["weight_probe"]) + "\\n")
        return {"weight_probe": (inputs.student_logits.float() - 0.5).pow(2).mean()}

if "weight_probe" not in LOSSES:
    LOSSES.add("weight_probe", WeightProbe)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_folder(tmp_path_factory.mktemp("balkill") / "ds", {"train": 8}, ignore_index=None, size_hw=(32, 40))
    (root / "empty.yaml").write_text("{}\n")
    (root / "probe_loss.py").write_text(PROBE)
    return root


def _overrides(data: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
            "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "student.kwargs.drop=0.0",
            "optim.lr=0.01", f"schedule.iters={ITERS}", "train.progress=false", "train.log_interval=1",
            "train.device=cpu", f"train.ckpt_interval={ITERS // 2}", "experiment.deterministic=true",
            f"experiment.imports=[_toy, {data / 'probe_loss.py'}]", "eval.split=null", "eval.final_split=null",
            "losses=[{name: ce}, {name: weight_probe, weight: 1.0}, {name: toy_sleep, weight: 0.0}]",
            "balance.mode=grad_norm", "balance.targets={weight_probe: 0.3}", "balance.warmup=3",
            "balance.interval=2", "balance.ema=0.5", *extra]


def _start(data: Path, run_dir: Path, sleep: tuple[float, int] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "c2vkd", "train", str(data / "empty.yaml"), "--run-dir", str(run_dir),
           *(a for o in _overrides(data) for a in ("--set", o))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(sleep),
                            cwd=run_dir.parent)


@pytest.mark.slow
def test_sigkill_resume_with_balancing_is_bitwise_identical(data: Path) -> None:
    straight = _start(data, data.parent / "straight")
    run = data.parent / "killed"
    mid = run / "checkpoints" / f"iter_{ITERS // 2:07d}.pt"
    proc = _start(data, run, sleep=(5.0, ITERS // 2 + 1))
    _wait_for(lambda: mid.with_name(mid.name + ".sha256").is_file(), proc, f"{mid.name} appeared")
    os.kill(proc.pid, signal.SIGKILL)
    rc, _, _ = _finish(proc)
    assert rc == -signal.SIGKILL
    assert safe_load(mid)["balance"]["updates"] == 3  # measured at steps 0, 1, 2 (warm-up); step 3 is not due
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(data / "empty.yaml"), "--run-dir", str(run), "--resume", "auto",
                     *(a for o in _overrides(data) for a in ("--set", o))]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    _ok(straight)
    _assert_same_student(run / "student.safetensors", data.parent / "straight" / "student.safetensors")
    end_a = safe_load(run / "checkpoints" / f"iter_{ITERS:07d}.pt")["balance"]
    end_b = safe_load(data.parent / "straight" / "checkpoints" / f"iter_{ITERS:07d}.pt")["balance"]
    assert end_a == end_b and end_a["weights"]["weight_probe"] != 1.0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (data.parent / "straight" / "metrics.jsonl").read_text().splitlines()]
    last = {r["iter"]: r["weight/weight_probe"] for r in rows if "weight/weight_probe" in r}
    assert last[ITERS] == next(r["weight/weight_probe"] for r in rows_b if r.get("iter") == ITERS and "lr" in r)


@pytest.mark.slow
def test_ddp_ranks_train_with_identical_balanced_weights(data: Path, tmp_path: Path) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    over = [o for o in _overrides(data, "data.batch_size=4") if not o.startswith("experiment.deterministic")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "c2vkd", "train", str(data / "empty.yaml"),
           "--run-dir", str(tmp_path / "ddp"), *(a for o in over for a in ("--set", o))]
    env = dict(_env(), PROBE_DIR=str(probe_dir))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-6000:]
    r0 = [json.loads(x) for x in (probe_dir / "rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (probe_dir / "rank1.jsonl").read_text().splitlines()]
    assert len(r0) == len(r1) == ITERS
    assert r0 == r1                      # bit-identical weights on both ranks at every step
    assert r0[0] == 1.0 and len(set(r0)) > 2  # and they were really re-estimated
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    # the logged live weight (after step k) is what rank 0 trains with at step k + 1
    assert [r["weight/weight_probe"] for r in rows][:-1] == r0[1:]
