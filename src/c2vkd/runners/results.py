"""Results that accumulate across sessions and machines, and the statistics `c2vkd compare` reports.

* Records: every finished (method, seed) variant of a protocol is one ``<results>/<method>/seed<k>.json`` (test
  metrics, per-class IoU, validation curve, resolved config, code revision, teacher sha256, wall time), meant to
  be committed; :func:`check_record` refuses to reuse a record made under another protocol (its config less
  paths and names, :data:`RUN_LOCAL_KEYS`) or with another teacher.
* Statistics: the paired difference of two methods over their common seeds with a 95% Student-t interval, and
  C2VKD's gain ratio (method.md section 5) with a percentile bootstrap interval over seeds.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Sequence

from c2vkd.config import PACKAGE_CONFIGS, ConfigError


def method_label(method: str) -> str:
    return Path(method).stem if method.endswith((".yaml", ".yml")) else method


#: A method preset is a **reconstruction** (a method without official code, rebuilt from papers and third-party
#: code; shown as ``name*`` by `c2vkd methods` and in the compare tables) when a line of its leading comment block
#: starts with ``# Reconstruction:``, e.g. ``# Reconstruction: the paper has no code; ...``. That line is the
#: whole opt-in.
RECONSTRUCTION_LINE = re.compile(r"#\s*reconstruction\s*:", re.IGNORECASE)
RECONSTRUCTION_MARK = "*"


@functools.lru_cache(maxsize=256)
def _header_lines(path: Path, mtime_ns: int) -> tuple[str, ...]:
    """A preset's leading comment block (read once per file version: tables ask for every row's label)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if not line.lstrip().startswith("#"):
            break  # the header ends at the first YAML line
        header.append(line.strip())
    return tuple(header)


def _preset_path(method: str, folder: str) -> Path:
    return Path(method) if method.endswith((".yaml", ".yml")) else PACKAGE_CONFIGS / folder / f"{method}.yaml"


def is_reconstruction(method: str) -> bool:
    """Whether ``method`` (a packaged preset name, as records and summaries name methods, or a preset path) opts
    in with a ``# Reconstruction:`` header line. False for a name without a preset file."""
    path = _preset_path(method, "methods")
    try:
        header = _header_lines(path, path.stat().st_mtime_ns)
    except OSError:
        return False
    return any(RECONSTRUCTION_LINE.match(line) for line in header)


#: An ablation variant (a preset in configs/ablation/) is a **screen** variant until it has this many seeds: the
#: recipe is chosen on val, so the summaries show a screen variant's val numbers only and withhold its test ones
#: until it is confirmed (issue 26).
CONFIRM_SEEDS = 3


def is_ablation(method: str, records: Sequence[dict[str, Any]] = ()) -> bool:
    """Whether ``method`` names a packaged ablation preset (records name it by its label), is a preset path in a
    folder named ``ablation``, or has a record whose command ran it from such a folder (a user's own ablation
    preset, or a packaged one renamed since)."""
    if method.endswith((".yaml", ".yml")):
        return Path(method).parent.name == "ablation"
    if _preset_path(method, "ablation").is_file():
        return True
    return any(f"ablation/{method}.y" in (r.get("command") or "") for r in records)


def display_label(method: str) -> str:
    """A method's name as tables and listings show it: :func:`method_label`, plus ``*`` for a reconstruction.
    Records, run folders and summary keys keep the plain label."""
    label = method_label(method)
    return label + RECONSTRUCTION_MARK if is_reconstruction(method) else label


def is_c2vkd(method: str) -> bool:
    return method_label(method).startswith("c2vkd")


def method_order(methods: Iterable[str]) -> list[str]:
    """The order tables list methods in: ``none`` (the reference), then the prior methods, then the C2VKD
    family, each group alphabetical; every name once."""
    names = set(methods)
    return (["none"] if "none" in names else []) + sorted(m for m in names if m != "none" and not is_c2vkd(m)) + sorted(
        m for m in names if is_c2vkd(m))


# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard table values); normal beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError("a confidence interval needs at least 2 paired values")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """mean of a[s] - b[s] over the seeds both have, with a 95% t interval (None for the interval with one
    seed). Pairing removes the between-seed variance both runs share (same init, data order, augmentation)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    out: dict[str, Any] = {"mean": mean, "seeds": seeds, "ci95": None, "std": None}
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out.update(std=sd, ci95=[mean - half, mean + half])
    return out


def gain_ratio(per_seed: dict[str, dict[int, float]], method: str, seeds: Sequence[int]) -> tuple[float | None, str | None]:
    """(ratio, best prior) on the given seeds (a seed may repeat: bootstrap); None when the best prior gain
    is <= 0 (the ratio is then meaningless) or a method lacks a seed."""
    def mean(m: str) -> float | None:
        vals = per_seed.get(m, {})
        if any(s not in vals for s in seeds):
            return None
        return statistics.fmean([vals[s] for s in seeds])

    base, ours = mean("none"), mean(method)
    priors = {m: mean(m) for m in per_seed if m != "none" and not is_c2vkd(m)}
    priors = {m: v for m, v in priors.items() if v is not None}
    if base is None or ours is None or not priors:
        return None, None
    best = max(priors, key=lambda m: priors[m])
    denom = priors[best] - base
    return ((ours - base) / denom if denom > 0 else None), best


def bootstrap_ratio_ci(per_seed: dict[str, dict[int, float]], method: str, seeds: Sequence[int], *,
                       draws: int = 10000, seed: int = 0) -> dict[str, Any] | None:
    """Percentile 95% bootstrap interval of the gain ratio over seeds (resampled jointly for all methods; the
    best prior re-chosen in each resample). Resamples whose best prior gain is <= 0 have no ratio: their
    fraction is reported, and the interval is taken over the others."""
    if len(seeds) < 2:
        return None
    rng = random.Random(seed)
    vals: list[float] = []
    undefined = 0
    for _ in range(draws):
        sample = [rng.choice(list(seeds)) for _ in seeds]
        r, _best = gain_ratio(per_seed, method, sample)
        if r is None:
            undefined += 1
        else:
            vals.append(r)
    if not vals:
        return {"ci95": None, "undefined_fraction": 1.0, "draws": draws}
    vals.sort()
    lo = vals[int(0.025 * (len(vals) - 1))]
    hi = vals[int(math.ceil(0.975 * (len(vals) - 1)))]
    return {"ci95": [lo, hi], "undefined_fraction": undefined / draws, "draws": draws}


# Keys that may differ between machines and sessions without changing the experiment (paths, names, UI);
# everything else in a record's config must equal the planned config for the record to be reused.
RUN_LOCAL_KEYS = {("experiment", "name"), ("experiment", "output_dir"), ("experiment", "seed"), ("data", "root"),
                  ("data", "num_workers"), ("teacher", "checkpoint"), ("teacher", "cache"), ("train", "progress"),
                  ("train", "device")}


def protocol_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config less RUN_LOCAL_KEYS: what defines the experiment."""
    out = json.loads(json.dumps(cfg, default=str))
    for sec, key in RUN_LOCAL_KEYS:
        out.get(sec, {}).pop(key, None)
    return out


_ABSENT = object()


def _diff(a: Any, b: Any, prefix: str = "", defaults: Any = _ABSENT) -> list[str]:
    """Differences between a record's protocol ``a`` and the planned one ``b``. A key the record lacks (a config
    key added by a later version) is no difference when the plan leaves it at its default."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        sub = defaults if isinstance(defaults, dict) else {}
        return [d for k in keys for d in _diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{prefix}{k}.",
                                                sub.get(k, _ABSENT))]
    if a is _ABSENT and defaults is not _ABSENT and b == defaults:
        return []
    if a == b:
        return []
    show = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
    return [f"{prefix[:-1]}: {show(a)} != {show(b)}"]


def code_revision() -> dict[str, Any]:
    """Git commit of the package source (and whether tracked files were modified), or nulls if unknown."""
    where = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def file_sha256(path: str | Path | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_path(results_dir: Path, method: str, seed: int) -> Path:
    return results_dir / method_label(method) / f"seed{seed}.json"


def check_record(record: dict[str, Any], cfg: dict[str, Any], path: Path, teacher_sha: str | None) -> None:
    """Refuse to reuse a committed record made under another protocol or with another teacher."""
    from c2vkd.config import DEFAULTS

    diffs = _diff(record.get("protocol"), protocol_view(cfg), defaults=json.loads(json.dumps(DEFAULTS)))
    if diffs:
        raise ConfigError(f"{path} was made under another protocol than the planned run ({len(diffs)} "
                          f"differences: {'; '.join(diffs[:6])}). Use another --results folder, or delete the "
                          "record to rerun it")
    if record.get("teacher_sha256") != teacher_sha:
        raise ConfigError(f"{path} was made with teacher sha256 {record.get('teacher_sha256')}, but the planned "
                          f"teacher.checkpoint has sha256 {teacher_sha}")


def load_records(results_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Every ``<method>/seed<k>.json`` record under results_dir, by method and seed."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(results_dir.glob("*/seed*.json")):
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON ({e}); restore it from git or delete it") from None
        out.setdefault(rec.get("method", f.parent.name), {})[int(rec["seed"])] = rec
    return out
