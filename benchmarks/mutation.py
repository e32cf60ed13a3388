"""Mutation testing of the loss / engine / metrics / inference code: does the test suite notice small bugs?

A small self-contained AST mutator (no mutmut / cosmic-ray: both want to own the test run and rewrite the
tree in place, and other people edit ``src/`` while this runs). For each target module it enumerates single
edits a person could plausibly make:

* arithmetic ``+ <-> -``, ``* <-> /``, ``** -> *``, ``// -> /``;  comparisons ``< <-> <=``, ``> <-> >=``,
  ``== <-> !=``, ``is <-> is not``, ``in <-> not in``;  ``and <-> or``;  dropping a ``not``;
* numeric constants ``0 -> 1``, ``1 -> 0``, ``x -> x + 1`` (ints), ``x -> 2 x`` (floats);  ``True <-> False``;
* call wiring: dropping one keyword argument (the callee's default is used instead) and swapping the
  values of two keyword arguments of one call (e.g. ``alpha=self.beta, beta=self.alpha``).

Code that only builds messages (``raise`` statements' arguments, logging / warnings calls, docstrings, f-strings)
and type annotations is not mutated. Each mutant is applied to a scratch copy of ``src/`` and ``tests/`` (the
working tree is never touched), then a fast test selection runs in a forked child of a process that has
already imported torch (saves the import per mutant); ``-x`` stops at the first failing test. A mutant is
*killed* when the selection fails or exceeds the per-mutant timeout, *survived* when it passes.

Usage (from the repository root; CPU is shared, so cap the time and the number of mutants per module):

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mutation.py \
        losses/pdd.py losses/kd.py eval/metrics.py --max-mutants 60 --time-cap 1500 --out mutation_report.json

Targets are paths under ``src/c2vkd``; each has a default fast test selection (``DEFAULT_TESTS``), or pass
``--tests`` to use one selection for every target. ``--list`` only prints the mutants.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: target module (relative to src/c2vkd) -> fast test selection: pytest arguments from the repository root
DEFAULT_TESTS: dict[str, list[str]] = {
    "losses/pdd.py": ["tests/test_pdd.py"],
    "losses/vlfd.py": ["tests/test_vlfd.py"],
    "losses/ce.py": ["tests/test_ce.py"],
    "losses/kd.py": ["tests/test_baselines_logits.py", "tests/test_loss_args.py", "-k", "kd and not dkd"],
    "losses/dkd.py": ["tests/test_baselines_logits.py", "tests/test_loss_args.py", "-k", "dkd"],
    "losses/base.py": ["tests/test_ce.py", "tests/test_pdd.py"],
    "eval/metrics.py": ["tests/test_metrics.py", "tests/test_inference.py"],
    "eval/inference.py": ["tests/test_inference.py"],
    "engine/schedule.py": ["tests/test_schedule.py", "tests/test_trainer_wiring.py"],
    "engine/trainer.py": ["tests/test_trainer_wiring.py", "tests/test_engine.py"],
    "engine/distiller.py": ["tests/test_distiller.py", "tests/test_trainer_wiring.py", "tests/test_engine.py"],
}

_BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
           ast.FloorDiv: ast.Div}
_CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_LOG_NAMES = {"log", "logger", "logging", "warnings"}


@dataclass
class Mutant:
    module: str
    number: int
    line: int
    kind: str
    description: str
    status: str = "untested"  # killed | timeout | survived | untested | error
    seconds: float = 0.0


def _is_message_call(node: ast.Call) -> bool:
    f = node.func
    while isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and f.value.id in _LOG_NAMES:
            return True
        f = f.value
    return False


class _Sites(ast.NodeVisitor):
    """Collect mutation sites as (node id in walk order, kind, description, line)."""

    def __init__(self) -> None:
        self.sites: list[tuple[int, str, str, int, object]] = []
        self._order: dict[int, int] = {}

    def collect(self, tree: ast.AST) -> list[tuple[int, str, str, int, object]]:
        for i, node in enumerate(ast.walk(tree)):
            self._order[id(node)] = i
        self._skip: set[int] = set()
        for node in ast.walk(tree):
            skip_children = []
            if isinstance(node, ast.Raise):
                skip_children = [node.exc, node.cause]
            elif isinstance(node, ast.Call) and _is_message_call(node):
                skip_children = [node]
            elif isinstance(node, ast.JoinedStr):
                skip_children = [node]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                skip_children = [node.returns] + [a.annotation for a in
                                                  node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            elif isinstance(node, ast.AnnAssign):
                skip_children = [node.annotation]
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                skip_children = [node]  # docstrings
            elif isinstance(node, ast.Assert):
                skip_children = [node.msg]
            for c in skip_children:
                if c is not None:
                    self._skip.update(id(n) for n in ast.walk(c))
        for node in ast.walk(tree):
            if id(node) in self._skip:
                continue
            self._visit_site(node)
        return self.sites

    def _add(self, node: ast.AST, kind: str, desc: str, payload: object = None) -> None:
        self.sites.append((self._order[id(node)], kind, desc, getattr(node, "lineno", 0), payload))

    def _visit_site(self, node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            new = _BINOPS[type(node.op)]
            self._add(node, "binop", f"{type(node.op).__name__} -> {new.__name__}", new)
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOPS:
            new = _BINOPS[type(node.op)]
            self._add(node, "augassign", f"{type(node.op).__name__}= -> {new.__name__}=", new)
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in _CMPOPS:
                    new = _CMPOPS[type(op)]
                    self._add(node, "compare", f"{type(op).__name__} -> {new.__name__}", (k, new))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            self._add(node, "boolop", f"{type(node.op).__name__} -> {new.__name__}", new)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._add(node, "not", "drop `not`")
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                self._add(node, "const", f"{v} -> {not v}", not v)
            elif isinstance(v, int):
                new = 1 if v == 0 else (0 if v == 1 else v + 1)
                self._add(node, "const", f"{v} -> {new}", new)
            elif isinstance(v, float):
                new = 1.0 if v == 0.0 else v * 2
                self._add(node, "const", f"{v!r} -> {new!r}", new)
        elif isinstance(node, ast.Call):
            kws = [k for k in node.keywords if k.arg is not None]
            for k in kws:
                self._add(node, "drop-kwarg", f"call {_callee(node)}: drop {k.arg}=", k.arg)
            for i in range(len(kws)):
                for j in range(i + 1, len(kws)):
                    a, b = kws[i], kws[j]
                    if ast.dump(a.value) != ast.dump(b.value):
                        self._add(node, "swap-kwargs", f"call {_callee(node)}: swap {a.arg} <-> {b.arg}",
                                  (a.arg, b.arg))


def _callee(node: ast.Call) -> str:
    try:
        return ast.unparse(node.func)
    except Exception:  # pragma: no cover
        return "?"


def _apply(tree: ast.AST, site: tuple[int, str, str, int, object]) -> ast.AST:
    tree = copy.deepcopy(tree)
    order, kind, _desc, _line, payload = site
    for i, node in enumerate(ast.walk(tree)):
        if i != order:
            continue
        if kind in ("binop", "augassign"):
            node.op = payload()  # type: ignore[attr-defined, operator]
        elif kind == "compare":
            k, new = payload  # type: ignore[misc]
            node.ops[k] = new()  # type: ignore[attr-defined]
        elif kind == "boolop":
            node.op = payload()  # type: ignore[attr-defined, operator]
        elif kind == "not":
            return _replace(tree, node, node.operand)  # type: ignore[attr-defined]
        elif kind == "const":
            node.value = payload  # type: ignore[attr-defined]
        elif kind == "drop-kwarg":
            node.keywords = [k for k in node.keywords if k.arg != payload]  # type: ignore[attr-defined]
        elif kind == "swap-kwargs":
            a, b = payload  # type: ignore[misc]
            ka = next(k for k in node.keywords if k.arg == a)  # type: ignore[attr-defined]
            kb = next(k for k in node.keywords if k.arg == b)  # type: ignore[attr-defined]
            ka.value, kb.value = kb.value, ka.value
        return tree
    raise RuntimeError(f"mutation site {site} not found")


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> ast.AST:
    class R(ast.NodeTransformer):
        def generic_visit(self, node):  # noqa: ANN001
            return new if node is old else super().generic_visit(node)

    return ast.fix_missing_locations(R().visit(tree))


def enumerate_mutants(module: str, source: str) -> tuple[ast.AST, list[tuple[int, str, str, int, object]]]:
    tree = ast.parse(source)
    return tree, sorted(_Sites().collect(tree), key=lambda s: s[3])  # by line: --max-mutants spreads over the file


def _evenly(items: list, n: int) -> list:
    if n <= 0 or len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# ------------------------------------------------------------------------------------------- running
def _run_child(scratch: Path, tests: list[str], timeout: float, extra_args: list[str]) -> tuple[str, float]:
    """Fork; the child runs pytest on the scratch tree. Returns (passed | failed | timeout | error, seconds)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        rc = 3
        try:
            os.setpgid(0, 0)  # own process group: a timeout kills subprocesses started by the tests too
            os.chdir(scratch)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            sys.path.insert(0, str(scratch / "src"))
            sys.dont_write_bytecode = True
            import pytest

            rc = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra_args,
                                  *tests]))
        except BaseException:  # noqa: BLE001
            rc = 3
        finally:
            os._exit(rc)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0
        time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    if rc == 0:
        return "passed", secs
    if rc == 1:
        return "failed", secs
    return "error", secs


def _make_scratch() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="c2vkd-mutation-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", scratch / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", scratch / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", scratch / "pyproject.toml")
    return scratch


def _check_import_path(scratch: Path) -> None:
    pid = os.fork()
    if pid == 0:
        sys.path.insert(0, str(scratch / "src"))
        sys.dont_write_bytecode = True
        import c2vkd

        os._exit(0 if Path(c2vkd.__file__).resolve().is_relative_to(scratch.resolve()) else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"c2vkd does not import from the scratch copy {scratch}: mutants would not be tested")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", help="modules under src/c2vkd, e.g. losses/pdd.py eval/metrics.py")
    ap.add_argument("--tests", nargs="*", help="one test selection for every target (default: DEFAULT_TESTS)")
    ap.add_argument("--max-mutants", type=int, default=0, help="per module, evenly spaced over the file (0 = all)")
    ap.add_argument("--time-cap", type=float, default=1500.0, help="total seconds; later mutants stay untested")
    ap.add_argument("--timeout-factor", type=float, default=3.0, help="per-mutant timeout = factor x baseline")
    ap.add_argument("--pytest-args", default="-m not slow", help="extra pytest arguments (one string)")
    ap.add_argument("--out", type=Path, help="write every mutant and its status as JSON")
    ap.add_argument("--only", type=int, nargs="*", help="test only these mutant numbers (as --list / the JSON "
                    "report number them; with one target), e.g. to re-check survivors after adding tests")
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    args = ap.parse_args(argv)
    extra = args.pytest_args.split() if args.pytest_args else []
    if extra[:1] == ["-m"] and len(extra) > 2:
        extra = ["-m", " ".join(extra[1:])]

    plan: list[tuple[str, str, ast.AST, list]] = []
    for target in args.targets:
        src = (ROOT / "src/c2vkd" / target).read_text()
        tree, sites = enumerate_mutants(target, src)
        plan.append((target, src, tree, sites))
        if args.list:
            for n, s in enumerate(sites):
                print(f"{target}:{s[3]} #{n} {s[1]}: {s[2]}")
    if args.list:
        return 0

    import numpy  # noqa: F401  heavy imports once, inherited by every forked child
    import torch  # noqa: F401

    scratch = _make_scratch()
    _check_import_path(scratch)
    t_start = time.perf_counter()
    results: list[Mutant] = []
    summary = []
    try:
        for target, src, tree, sites in plan:
            tests = args.tests or DEFAULT_TESTS.get(target)
            if not tests:
                raise SystemExit(f"no default tests for {target}; pass --tests")
            path = scratch / "src/c2vkd" / target
            status, base_secs = _run_child(scratch, tests, 1800, extra)
            if status != "passed":
                raise SystemExit(f"the unmutated tests fail for {target} ({status}): {' '.join(tests)}")
            timeout = max(args.timeout_factor * base_secs, 20.0)
            chosen = _evenly(list(enumerate(sites)), args.max_mutants)
            if args.only:
                chosen = [(n, s) for n, s in enumerate(sites) if n in set(args.only)]
            print(f"{target}: {len(sites)} mutants, testing {len(chosen)}; baseline {base_secs:.1f} s "
                  f"({' '.join(tests)})", flush=True)
            mods = []
            for n, site in chosen:
                m = Mutant(target, n, site[3], site[1], site[2])
                mods.append(m)
                if time.perf_counter() - t_start > args.time_cap:
                    continue
                try:
                    path.write_text(ast.unparse(_apply(tree, site)) + "\n")
                except Exception as e:  # noqa: BLE001
                    m.status, m.description = "error", f"{m.description} (cannot apply: {e})"
                    continue
                outcome, m.seconds = _run_child(scratch, tests, timeout, extra)
                m.status = {"passed": "survived", "failed": "killed", "timeout": "timeout",
                            "error": "killed"}[outcome]
                path.write_text(src)
                if m.status == "survived":
                    print(f"  SURVIVED {target}:{m.line} {m.kind}: {m.description}", flush=True)
            path.write_text(src)
            results += mods
            tested = [m for m in mods if m.status in ("killed", "timeout", "survived")]
            surv = sum(m.status == "survived" for m in tested)
            summary.append({"module": target, "mutants": len(sites), "tested": len(tested),
                            "killed": sum(m.status == "killed" for m in tested),
                            "timeout": sum(m.status == "timeout" for m in tested), "survived": surv,
                            "survival_rate": surv / len(tested) if tested else None,
                            "tests": tests})
            print(f"{target}: tested {len(tested)}, survived {surv}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    print("\n| module | mutants | tested | killed | timeout | survived | survival |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        rate = "n/a" if s["survival_rate"] is None else f"{100 * s['survival_rate']:.0f}%"
        print(f"| `{s['module']}` | {s['mutants']} | {s['tested']} | {s['killed']} | {s['timeout']} | "
              f"{s['survived']} | {rate} |")
    print(f"\nwall time {elapsed:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "elapsed_s": elapsed,
                                        "mutants": [asdict(m) for m in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
