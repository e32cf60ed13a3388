"""Every command the toolkit prints or documents works verbatim (issue 30, items 3 and 4).

* The one-line run's ``# repeat:`` line and the exported model card's "Reproduce" command run as printed, in a
  real shell, from a folder whose path has spaces: each repeat goes to a new folder (``RUN-repeat<N>``) and the
  original run is left byte for byte as it was.
* The README's shell blocks: every ``c2vkd`` command in them parses, every ``--set`` key exists, and the cheap
  ones run on the bundled sample (the train example and the eval example after it, which must read the folder
  the train example writes; the one-line distill's export path is the folder that run writes).
* The demo's closing lines name files that exist.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from c2vkd.cli import main
from c2vkd.cli.parser import build_parser
from c2vkd.data import sample_root

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FAST = ["--set", "data.train_transform.crop_size=[32,32]", "--set", "data.batch_size=2", "--set",
        "data.num_workers=0", "--set", "train.progress=false", "--set", "train.device=cpu",
        "--set", "eval.final_split=null"]


def _tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (what "never touched" means here)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shell(command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` exactly as printed, through bash, with this interpreter's ``c2vkd`` first on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_repeat_line_and_model_card_reproduce_run_verbatim(tmp_path, capsys):
    base = tmp_path / "my runs"  # a space in the path: the printed commands must be quoted
    run = base / "first run"
    assert main(["train", "--model", "segformer_b0", "--data", str(sample_root()), "--iters", "2",
                 "--out", str(run), *FAST]) == 0
    printed = capsys.readouterr().out
    repeat = [ln for ln in printed.splitlines() if ln.startswith("# repeat: ")]
    assert len(repeat) == 1
    command = repeat[0][len("# repeat: "):]
    assert shlex.split(command, comments=True)[:3] == ["c2vkd", "train", str(run / "config.yaml")]
    before = _tree_digest(run)

    res = _shell(command, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    first_repeat = base / "first run-repeat1"
    assert (first_repeat / "student.safetensors").is_file()
    assert _tree_digest(run) == before  # the original run is untouched

    # the model card's Reproduce command, from an export of the original run
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "export dir")]) == 0
    card = (tmp_path / "export dir" / "hf" / "README.md").read_text()
    block = card.split("## Reproduce", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    reproduce = [ln for ln in block.splitlines() if ln.startswith("c2vkd ") and "config.yaml" in ln]
    assert len(reproduce) == 1
    before = _tree_digest(run)
    res = _shell(reproduce[0], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (base / "first run-repeat2" / "student.safetensors").is_file()
    assert _tree_digest(run) == before
    # --resume auto on the run's own config continues that run (here: already finished), not a new folder
    res = _shell(f"{reproduce[0].split('#')[0]} --resume auto", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (base / "first run-repeat3").exists()


# ------------------------------------------------------------------------------------------- README
def readme_commands(text: str) -> list[str]:
    """The c2vkd commands in the README's ```bash blocks: continuation lines joined, ``&&`` chains split,
    comments dropped."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if words and Path(words[0]).name == "c2vkd":
                    out.append(shlex.join(["c2vkd", *words[1:]]))
    return out


def test_readme_commands_parse_and_name_real_keys(tmp_path):
    commands = readme_commands(README.read_text())
    assert len(commands) >= 5, commands  # the one-line pair, the demo, the train / eval example
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}")
        config = getattr(args, "config", None)
        if config and Path(REPO / config).is_file() and args.overrides:
            # every --set key is a real config key: `c2vkd config` validates them like a run does
            assert main(["config", str(REPO / config), *(a for o in args.overrides for a in ("--set", o))]) == 0


def test_readme_oneline_export_reads_the_folder_the_distill_writes(tmp_path):
    from c2vkd.runners.oneline import oneline_config

    commands = readme_commands(README.read_text())
    distill = next(c for c in commands if c.startswith("c2vkd distill --teacher"))
    export = next(c for c in commands if c.startswith("c2vkd export"))
    args = build_parser().parse_args(shlex.split(distill)[1:])
    data = tmp_path / Path(args.data).name  # the README's /path/to/dataset, as a real dataset
    shutil.copytree(sample_root(), data)
    teacher = args.teacher.partition("=")[0]  # the name decides nothing about the folder; no weights needed
    cfg, _ = oneline_config(data=data, student=args.student, teacher=teacher, method=args.method,
                            iters=args.iters, extra=args.overrides)
    run_dir = Path(cfg["experiment"]["output_dir"]).relative_to(Path.cwd()) / cfg["experiment"]["name"]
    assert shlex.split(export)[2] == str(run_dir)


@pytest.mark.slow
def test_readme_train_then_eval_example_run_on_the_sample(tmp_path):
    """The README's CamVid example, on the bundled sample with a 2-iteration schedule (the only edits: the
    data root and schedule.iters), then its eval line verbatim: it must find what the train line wrote."""
    commands = readme_commands(README.read_text())
    train = next(c for c in commands if c.startswith("c2vkd train src/c2vkd/configs/datasets/camvid.yaml"))
    evaluate = commands[commands.index(train) + 1]
    assert evaluate.startswith("c2vkd eval ")
    train = train.replace("data.root=/path/to/camvid", f"data.root={sample_root()}")
    train = re.sub(r"schedule\.iters=\d+", "schedule.iters=2", train)
    cwd = tmp_path / "work"
    shutil.copytree(REPO / "src" / "c2vkd" / "configs", cwd / "src" / "c2vkd" / "configs")
    res = _shell(f"{train} {shlex.join(FAST)}", cwd=cwd)
    assert res.returncode == 0, res.stderr
    res = _shell(evaluate, cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert "mIoU" in res.stdout


def test_demo_prints_paths_that_exist(tmp_path, capsys, monkeypatch):
    """cmd_demo's closing lines come from the run (they used to name students/c2vkd/, which the demo never
    writes since it trains c2vkd-balanced)."""
    run = tmp_path / "demo run"
    ckpt = run / "students" / "c2vkd-balanced" / "seed0" / "student.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    paths = {"run_dir": run, "teacher": run / "teacher", "students": run / "students", "student_checkpoint": ckpt,
             "demo_md": run / "demo.md", "compare_md": run / "students" / "compare.md"}
    monkeypatch.setattr("c2vkd.runners.demo.run_demo",
                        lambda *a, **k: {"table": "t", "verdict": "v", "paths": paths})
    assert main(["demo", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("student checkpoint: "))
    assert shlex.split(line[len("student checkpoint: "):]) == [str(ckpt)]
    assert "students/c2vkd/" not in out
