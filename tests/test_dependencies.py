"""The declared dependencies are what the code imports: pyproject's `dependencies` = the package's third-party
imports, the `test` extra = what only the tests import (issue 15: lean install)."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch", "importlinter": "import_linter"}
#: imported inside try/except ImportError (optional at run time) -> the extra that provides it, or None
OPTIONAL = {"onnx": "onnx", "onnxruntime": None}


def _imports(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        found.update(re.findall(r"importorskip\(\"([A-Za-z_]+)", text))  # optional test references
    # the package, and modules of the folder itself (tests import helpers from each other: _toy, test_ddp, ...)
    local = {"c2vkd"} | {p.stem for p in folder.rglob("*.py")}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("-", "_")


def test_dependencies_are_exactly_the_packages_imports() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    src = _imports(REPO / "src")
    required = {DIST.get(m, m).lower() for m in src if m not in OPTIONAL}
    # tensorboard is imported as torch.utils.tensorboard (its SummaryWriter needs the tensorboard package)
    assert "torch.utils.tensorboard" in (REPO / "src/c2vkd/engine/run_log.py").read_text()
    assert declared == required | {"tensorboard"}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert {e for e in OPTIONAL.values() if e} <= extras["onnx"]
    tests_only = {DIST.get(m, m).lower() for m in _imports(REPO / "tests")} - declared - {"onnxruntime"}
    assert extras["test"] == tests_only  # every test-only import is in the extra, and nothing else


def test_requirements_pin_the_same_set() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]} | {_name(r) for r in project["optional-dependencies"]["test"]}
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    pinned = {_name(ln) for ln in lines if ln and not ln.startswith("-")}
    assert pinned == wanted
    assert all("==" in ln for ln in lines if ln and not ln.startswith("-"))


def test_readme_and_ci_run_the_same_test_command_that_prints_the_summary() -> None:
    """-q once (command) and not in addopts: pytest keeps its "N passed" line (-qq would hide it)."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    cmd = next(ln for ln in ci.splitlines() if "-m pytest" in ln and not ln.startswith("#"))
    assert f"```bash\n{cmd}\n```" in readme
    addopts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert cmd.split("-m pytest", 1)[1].split().count("-q") + addopts.split().count("-q") == 1
