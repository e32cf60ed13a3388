"""`c2vkd compare`: train several KD methods under one schedule and seeds, then tabulate the gains.

Each variant is the experiment config with one method preset's ``losses`` (``configs/methods/<name>.yaml``,
or a path to any YAML holding ``losses``) merged on top, then the ``--set`` overrides, then the seed. Variants
run one after another in this process, each in ``OUT/<method>/seed<k>/``; a finished variant leaves
``result.json`` there, so rerunning the same command skips it, and an interrupted one resumes from its latest
valid checkpoint (``--resume auto`` semantics). The summary goes to ``OUT/compare.json`` / ``compare.md`` plus
``per_class_iou.png`` and ``training_curves.png``.

The claim checked (method.md section 5): gain ratio = (mIoU_C2VKD - mIoU_none) / (mIoU_best_prior - mIoU_none),
where best prior is the baseline method (not ``none``, not a ``c2vkd*`` preset) with the highest mean mIoU.

Statistics: per method the mean and sample std over seeds; the *paired* difference to ``none`` over the seeds
both have (same seed = same initialisation, data order and augmentation) with a 95% Student-t confidence
interval; and the gain ratio with a percentile bootstrap interval over seeds (seeds resampled with
replacement, jointly for every method so the pairing is kept, the best prior re-chosen in every resample, so
the interval includes the uncertainty of which baseline is best).

Results that accumulate across sessions and machines (``--results DIR``): every finished variant's record
(test metrics, per-class IoU, validation curve, the resolved config, seed, code revision, teacher checksum,
wall time) is written to ``DIR/<method>/seed<k>.json``, meant to be committed. A rerun skips every variant
that has a record (after checking that the record's protocol, i.e. its config less paths and names, is the
planned one), and the summary (``DIR/compare.json``, ``compare.md``, plots) is rebuilt from *all* records in
DIR: ``c2vkd compare --summarize DIR`` does only that. ``c2vkd compare --across DIR DIR ...`` sets several
protocols' summaries side by side per method (gains, ranks, rank correlations) without writing into the DIRs.

This module runs the variants and writes the records; the table, markdown and plots are built in
``compare_summary.py``, the statistics and records' format in ``results.py``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from c2vkd.config import ConfigError, dump_config, load_config
# re-exported: `compare` is where users look for the statistics and the summary of a comparison
from c2vkd.runners.compare_summary import (across_protocols, format_across_markdown, format_markdown, plot_compare,
                                           summarize)
from c2vkd.runners.results import (bootstrap_ratio_ci, check_record, code_revision, file_sha256, gain_ratio,  # noqa: F401
                                   load_records, method_label, method_order, paired_difference, protocol_view,
                                   record_path)
from c2vkd.utils import dist
from c2vkd.utils.io import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def parse_seeds(spec: str | int, base_seed: int) -> list[int]:
    """'3' -> three seeds base, base+1, base+2; '0,5,7' -> exactly those."""
    text = str(spec).strip()
    if "," in text:
        try:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be a count or a comma-separated list of ints, got {spec!r}") from None
    else:
        try:
            n = int(text)
        except ValueError:
            raise ConfigError(f"--seeds must be a count or a comma-separated list of ints, got {spec!r}") from None
        if n < 1:
            raise ConfigError(f"--seeds must be at least 1, got {n}")
        seeds = [base_seed + k for k in range(n)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has duplicates: {seeds}")
    return seeds


def method_file(method: str) -> str:
    """The preset file of a method name (packaged ``methods/<name>.yaml``) or the path itself."""
    return method if method.endswith((".yaml", ".yml")) else f"methods/{method}.yaml"


def variant_config(config: str | Path, method: str, seed: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Experiment config + the method's losses + overrides + seed (validated)."""
    from c2vkd.engine.loss_config import needs_teacher, validate_loss_args

    cfg = load_config(config, list(overrides), layers=[method_file(method)])
    validate_loss_args(cfg, source=str(config))
    cfg["experiment"]["seed"] = int(seed)
    cfg["experiment"]["name"] = f"{cfg['experiment']['name']}-{method_label(method)}-seed{seed}"
    if not needs_teacher(cfg):
        # The no-KD student must not pay for (or depend on) a teacher it never uses.
        cfg["teacher"]["name"] = None
        cfg["teacher"]["checkpoint"] = None
    elif not cfg["teacher"]["name"]:
        raise ConfigError(f"method {method!r} needs a teacher, but {config} sets no teacher.name")
    return cfg


def run_variant(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train one variant (resuming if it was interrupted) and return its result record."""
    from c2vkd.engine.trainer import Trainer

    done = run_dir / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    # rerun = resume: an interrupted variant's folder (even one that died before its first checkpoint)
    resume = "auto" if run_dir.is_dir() and any(run_dir.iterdir()) else None
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    started_at = trainer.iteration  # > 0: a checkpoint was loaded (a folder with none restarts from scratch)
    result = trainer.fit()
    fm = result.final_metrics or {}
    rec = {"miou": fm.get("miou"), "iou": fm.get("iou"), "split": fm.get("split"),
           "acc": fm.get("acc"), "macc": fm.get("macc"),
           "best_val_miou": result.best_miou, "iters": trainer.total_iters,
           "val_curve": [[h["iter"], h["miou"]] for h in result.history if "val_split" in h],
           "wall_s": time.perf_counter() - t0, "resumed": started_at > 0,
           "params": sum(p.numel() for p in trainer.student.parameters())}
    if trainer.main:
        atomic_write_text(done, json.dumps(rec, indent=1))
    return rec


def load_summary(results_dir: str | Path, *, command: str | None = None
                 ) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    """(summary, records by method and seed) of every record in DIR, methods in table order; writes nothing.
    ``summary["protocol"]`` is the records' ``protocol_name`` (None in records that predate it)."""
    rd = Path(results_dir)
    records = load_records(rd)
    if not records:
        raise ConfigError(f"{rd} holds no <method>/seed<k>.json records")
    results = {m: records[m] for m in method_order(records)}
    first = next(iter(next(iter(results.values())).values()))
    teacher = json.loads((rd / "teacher.json").read_text()) if (rd / "teacher.json").is_file() else None
    summary = summarize(results, list(first.get("class_names") or []), teacher)
    revisions = sorted({(r.get("code") or {}).get("commit") or "unknown" for res in results.values() for r in res.values()})
    summary.update({"results_dir": str(rd), "command": command, "code_revisions": revisions,
                    "protocol": first.get("protocol_name"), "split": first.get("split")})
    return summary, results


def summarize_results(results_dir: str | Path, *, command: str | None = None) -> dict[str, Any]:
    """Rebuild DIR/compare.json, compare.md and the plots from every record in DIR (no training)."""
    rd = Path(results_dir)
    summary, results = load_summary(rd, command=command)
    atomic_write_text(rd / "compare.json", json.dumps(summary, indent=1, default=_json_default))
    summary["markdown"] = format_markdown(summary, title=f"c2vkd compare: {rd.name} ({summary['split']})",
                                          command=command)
    atomic_write_text(rd / "compare.md", summary["markdown"])
    summary["plots"] = [str(p) for p in plot_compare(summary, {}, rd, records=results)]
    summary["out_dir"] = str(rd)
    return summary


def protocol_names(summaries: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Each (DIR, summary)'s column name: its records' protocol_name, else the folder's name; names that would
    repeat (a pilot folder records under its protocol's name) fall back to the folder name, then to the path."""
    names = [s.get("protocol") or d.name for d, s in summaries]
    for fallback in (lambda d: d.name, str):
        names = [fallback(d) if names.count(n) > 1 else n for n, (d, _) in zip(names, summaries)]
    return names


def compare_across(results_dirs: Sequence[str | Path], *, command: str | None = None) -> dict[str, Any]:
    """``c2vkd compare --across DIR DIR ...``: every DIR's summary built from its records as ``--summarize``
    builds it (nothing is written into the DIRs), set side by side per method (``across_protocols``); the
    result has the markdown under "markdown"."""
    dirs = [Path(d) for d in results_dirs]
    if len(dirs) < 2:
        raise ConfigError(f"--across sets protocols side by side, so it needs at least two results folders; got "
                          f"{len(dirs)} ({', '.join(map(str, dirs)) or 'none'})")
    seen = [d.resolve() for d in dirs]
    twice = [str(d) for d, r in zip(dirs, seen) if seen.count(r) > 1]
    if twice:
        raise ConfigError(f"--across names the same results folder more than once: {', '.join(twice)}")
    loaded = [(d, load_summary(d)[0]) for d in dirs]
    across = across_protocols(dict(zip(protocol_names(loaded), (s for _, s in loaded))))
    across["results_dirs"] = {n: str(d) for n, (d, _) in zip(across["protocols"], loaded)}
    across["markdown"] = format_across_markdown(
        across, title=f"c2vkd compare --across: {', '.join(across['protocols'])}", command=command)
    return across


def run_compare(config: str | Path, methods: Sequence[str], seeds: str | int = 1, *,
                overrides: Sequence[str] = (), out_dir: str | Path | None = None,
                command: str | None = None, eval_teacher: bool = True,
                results_dir: str | Path | None = None) -> dict[str, Any]:
    """Train every (method, seed) variant not yet finished, then write compare.json/.md and plots.

    With ``results_dir`` every finished variant also leaves its record there (to commit), a variant with a
    record is skipped, and the summary is rebuilt from all records in results_dir."""
    if not methods:
        raise ConfigError("--methods is empty")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods has duplicates: {list(methods)}")
    per_loss = [o for o in overrides if o.split("=", 1)[0].strip().startswith("losses")]
    if per_loss:
        raise ConfigError(f"--set {per_loss[0]}: loss settings differ per method, so `compare` takes them from the "
                          "method presets; write a preset (e.g. my-cirkd.yaml with `_base_: methods/cirkd.yaml` and "
                          "your `losses`) and pass its path in --methods")
    base = load_config(config, list(overrides))
    seed_list = parse_seeds(seeds, base["experiment"]["seed"])
    out = Path(out_dir) if out_dir else Path(base["experiment"]["output_dir"]) / f"compare-{base['experiment']['name']}"
    # Resolve every variant's config before training anything, so a typo in the last method fails first.
    plan = {m: {s: variant_config(config, m, s, overrides) for s in seed_list} for m in methods}
    rdir = Path(results_dir) if results_dir else None
    revision = code_revision()  # the code this process runs: read now, not when a variant finishes
    # hashed once here (the teacher file can be large) and reused for the records and the teacher row
    teacher_sha = file_sha256(base["teacher"]["checkpoint"]) if (rdir or eval_teacher) else None
    if rdir:  # check every committed record against the plan before training anything
        for m in methods:
            for s in seed_list:
                rp = record_path(rdir, m, s)
                if rp.is_file():
                    check_record(json.loads(rp.read_text()), plan[m][s], rp,
                                 teacher_sha if plan[m][s]["teacher"]["name"] else None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.yaml", dump_config({"config": str(config), "methods": list(methods),
                                                       "seeds": seed_list, "overrides": list(overrides)}))
    split = base["eval"]["final_split"] or base["eval"]["split"]  # None: no evaluation split configured
    teacher = _teacher_row(base, split, rdir or out, teacher_sha) if (eval_teacher and split) else None
    from c2vkd.data import build_dataset

    class_names = list(build_dataset(base["data"], split or "train", train=False).classes)
    title = f"c2vkd compare: {base['experiment']['name']} ({split})"

    def write_summary(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
        if not dist.is_main():  # under torchrun only rank 0 writes (the other ranks' histories start at a resume)
            return {}
        if rdir:
            return summarize_results(rdir, command=command)
        summary = summarize({m: r for m, r in results.items() if r}, class_names, teacher)
        summary.update({"config": str(config), "seeds": seed_list, "overrides": list(overrides), "split": split,
                        "command": command})
        atomic_write_text(out / "compare.json", json.dumps(summary, indent=1, default=_json_default))
        summary["markdown"] = format_markdown(summary, title=title, command=command)
        atomic_write_text(out / "compare.md", summary["markdown"])
        return summary

    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    dirs: dict[str, list[Path]] = {m: [] for m in methods}
    total = len(methods) * len(seed_list)
    k = 0
    # Seed-major order: after each seed every method has a result, so an interrupted compare already
    # holds complete comparisons for the finished seeds (the summary is rewritten after every variant).
    for s in seed_list:
        for m in methods:
            k += 1
            run_dir = out / method_label(m) / f"seed{s}"
            dirs[m].append(run_dir)
            rp = record_path(rdir, m, s) if rdir else None
            if rp is not None and rp.is_file():
                log.info("compare [%d/%d] %s seed %d: recorded in %s, skipping", k, total, m, s, rp)
                results[m][s] = json.loads(rp.read_text())
                continue
            state = "done, skipping" if (run_dir / RESULT_FILE).is_file() else "training"
            log.info("compare [%d/%d] %s seed %d: %s (%s)", k, total, m, s, state, run_dir)
            results[m][s] = run_variant(plan[m][s], run_dir)
            if rp is not None and dist.is_main():
                cfg = plan[m][s]
                rec = {"method": method_label(m), "seed": s, **results[m][s], "class_names": class_names,
                       "protocol_name": rdir.name, "protocol": protocol_view(cfg), "config": json.loads(
                           json.dumps(cfg, default=str)), "code": revision,
                       "teacher_sha256": teacher_sha if cfg["teacher"]["name"] else None,
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
                rp.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(rp, json.dumps(rec, indent=1, default=_json_default))
            write_summary(results)
    summary = write_summary(results)
    if not rdir and dist.is_main():
        summary["plots"] = [str(p) for p in plot_compare(summary, dirs, out)]
        summary["out_dir"] = str(out)
    return summary


def _teacher_row(base: dict[str, Any], split: str, out: Path, sha: str | None) -> dict[str, Any] | None:
    """Evaluate the configured teacher checkpoint once (cached in OUT/teacher.json)."""
    t = base["teacher"]
    if not (t["name"] and t["checkpoint"]):
        return None
    tfile = out / "teacher.json"
    if tfile.is_file():
        row = json.loads(tfile.read_text())
        if row.get("sha256") not in (None, sha):
            raise ConfigError(f"{tfile} describes a teacher with sha256 {row['sha256']}, but teacher.checkpoint "
                              f"{t['checkpoint']} has sha256 {sha}")
        return row
    from c2vkd.engine.evaluation import evaluate_checkpoint

    tm, _, tname, _ = evaluate_checkpoint(t["checkpoint"], base, split)
    teacher = {"name": tname, "checkpoint": str(t["checkpoint"]), "sha256": sha, "split": split, "miou": tm.miou,
               "iou": tm.to_dict()["iou"]}
    atomic_write_text(tfile, json.dumps(teacher, indent=1))
    return teacher


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
