"""The package's layer order (pyproject.toml [tool.importlinter], drawn in docs/architecture.md) holds."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "c2vkd"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.is_file() else [shutil.which("lint-imports") or "lint-imports"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"import-linter contract broken:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_import_linter_contracts_are_kept() -> None:
    pytest.importorskip("importlinter")
    out = _lint_imports()
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in out


def test_every_top_level_module_has_a_layer() -> None:
    """A new module at the package root or a new subpackage must be placed in the layer contract."""
    layered: set[str] = set()
    for line in next(c for c in _contracts() if c["name"].startswith("c2vkd layers"))["layers"]:
        layered |= {m.strip() for m in line.replace(":", "|").split("|")}
    present = {f"c2vkd.{p.stem}" for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {f"c2vkd.{p.name}" for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert present - layered == set(), "not in any layer of pyproject.toml's import-linter contract"


def test_no_module_imports_a_private_name_from_another() -> None:
    """``from c2vkd.x import _helper`` couples a module to another's internals: make the helper public."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("c2vkd"):
                offenders += [f"{path.relative_to(SRC)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []
