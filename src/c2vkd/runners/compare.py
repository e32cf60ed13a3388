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
DIR: ``c2vkd compare --summarize DIR`` does only that.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from c2vkd.config import ConfigError, dump_config, load_config
# re-exported: `compare` is where users look for the statistics of a comparison
from c2vkd.runners.results import (bootstrap_ratio_ci, check_record, code_revision, file_sha256, gain_ratio,  # noqa: F401
                           is_c2vkd, load_records, method_label, paired_difference, protocol_view, record_path)
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
    result = trainer.fit()
    fm = result.final_metrics or {}
    rec = {"miou": fm.get("miou"), "iou": fm.get("iou"), "split": fm.get("split"),
           "acc": fm.get("acc"), "macc": fm.get("macc"),
           "best_val_miou": result.best_miou, "iters": trainer.total_iters,
           "val_curve": [[h["iter"], h["miou"]] for h in result.history if "val_split" in h],
           "wall_s": time.perf_counter() - t0, "resumed": resume is not None,
           "params": sum(p.numel() for p in trainer.student.parameters())}
    if trainer.main:
        atomic_write_text(done, json.dumps(rec, indent=1))
    return rec


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarize(results: dict[str, dict[int, dict[str, Any]]], class_names: list[str],
              teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-method mean/std mIoU, gain over ``none`` (mean and paired, with a 95% interval) and the C2VKD gain
    ratio (method.md section 5) with its bootstrap interval over seeds."""
    methods: dict[str, Any] = {}
    for m, per_seed in results.items():
        mious = [r["miou"] for r in per_seed.values() if r.get("miou") is not None]
        if not mious:
            continue
        mean, std = _mean_std(mious)
        ious = [r["iou"] for r in per_seed.values() if r.get("iou")]
        per_class = [statistics.fmean([v for v in col if v is not None]) if any(v is not None for v in col) else None
                     for col in zip(*ious)] if ious else []
        methods[m] = {"miou_mean": mean, "miou_std": std, "miou_per_seed": {str(s): r["miou"] for s, r in per_seed.items()},
                      "seeds": len(mious), "per_class_iou": per_class,
                      "wall_s_mean": statistics.fmean([r["wall_s"] for r in per_seed.values()])}
    base = methods.get("none")
    summary: dict[str, Any] = {"methods": methods, "class_names": class_names, "teacher": teacher}
    if base is None:
        summary["note"] = "no 'none' (student without KD) variant: gains are not defined"
        return summary
    per_seed = {m: {int(s): r["miou"] for s, r in res.items() if r.get("miou") is not None}
                for m, res in results.items()}
    for m, rec in methods.items():
        rec["gain"] = rec["miou_mean"] - base["miou_mean"]
        rec["paired_vs_none"] = paired_difference(per_seed[m], per_seed["none"]) if m != "none" else None
    priors = {m: r for m, r in methods.items() if m != "none" and not is_c2vkd(m)}
    ratios: dict[str, Any] = {}
    if priors:
        best = max(priors, key=lambda m: priors[m]["miou_mean"])
        best_gain = priors[best]["gain"]
        summary["best_prior"] = best
        for m, rec in methods.items():
            if not is_c2vkd(m):
                continue
            if best_gain > 0:
                ratios[m] = rec["gain"] / best_gain
            else:
                # A ratio over a non-positive denominator is meaningless; report it as undefined.
                ratios[m] = None
        summary["gain_ratio"] = ratios
        common = sorted(set.intersection(*[set(v) for v in per_seed.values() if v]))
        summary["gain_ratio_ci"] = {m: bootstrap_ratio_ci(per_seed, m, common) for m in ratios}
        summary["ratio_seeds"] = common
        summary["claim"] = ("(mIoU_c2vkd - mIoU_none) / (mIoU_best_prior - mIoU_none) > 2 "
                            "(method.md section 5); undefined (null) when the best prior KD gain is <= 0")
    return summary


def format_markdown(summary: dict[str, Any], *, title: str, command: str | None = None) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    t = summary.get("teacher")
    if t:
        lines += [f"Teacher ({t['name']}, evaluated, not trained by this compare): "
                  f"mIoU {100 * t['miou']:.2f} on {t['split']}", ""]
    lines += ["| method | mIoU mean | std | seeds | gain vs none | paired diff vs none [95% CI] | per-seed | "
              "wall time / run |",
              "|---|---:|---:|---:|---:|---|---|---:|"]
    for m, r in summary["methods"].items():
        gain = r.get("gain")
        per_seed = ", ".join(f"{100 * v:.2f}" for v in r["miou_per_seed"].values())
        pd = r.get("paired_vs_none")
        if not pd:
            paired = ""
        elif pd["ci95"] is None:
            paired = f"{100 * pd['mean']:+.2f} (1 seed)"
        else:
            lo, hi = pd["ci95"]
            noise = " (noise)" if lo <= 0 <= hi else ""
            paired = f"{100 * pd['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{noise}"
        lines.append(f"| {m} | {100 * r['miou_mean']:.2f} | {100 * r['miou_std']:.2f} | {r['seeds']} | "
                     f"{'' if gain is None else f'{100 * gain:+.2f}'} | {paired} | {per_seed} | "
                     f"{r['wall_s_mean']:.0f} s |")
    lines.append("")
    if "best_prior" in summary:
        lines.append(f"Best prior KD method: **{summary['best_prior']}** "
                     f"(gain {100 * summary['methods'][summary['best_prior']]['gain']:+.2f} mIoU).")
        for m, ratio in summary.get("gain_ratio", {}).items():
            txt = "undefined (best prior gain <= 0)" if ratio is None else f"{ratio:.2f}"
            verdict = "" if ratio is None else (" (> 2: claim holds here)" if ratio > 2 else " (<= 2: claim not met here)")
            ci = (summary.get("gain_ratio_ci") or {}).get(m)
            ci_txt = ""
            if ci and ci.get("ci95"):
                ci_txt = (f"; 95% bootstrap CI over seeds [{ci['ci95'][0]:.2f}, {ci['ci95'][1]:.2f}]"
                          + (f", undefined in {100 * ci['undefined_fraction']:.0f}% of resamples"
                             if ci["undefined_fraction"] else ""))
            lines.append(f"Gain ratio {m} / best prior: {txt}{verdict}{ci_txt}.")
        lines.append("")
    elif "note" in summary:
        lines += [summary["note"], ""]
    names = summary["class_names"]
    methods = list(summary["methods"])
    if names and methods:
        lines += ["Per-class IoU (mean over seeds):", "",
                  "| class | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for i, c in enumerate(names):
            cells = []
            for m in methods:
                pc = summary["methods"][m]["per_class_iou"]
                v = pc[i] if i < len(pc) else None
                cells.append("-" if v is None else f"{100 * v:.1f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _read_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    its, losses = [], []
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return its, losses
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if "loss" in rec and "iter" in rec:
            its.append(int(rec["iter"]))
            losses.append(float(rec["loss"]))
    return its, losses


def plot_compare(summary: dict[str, Any], run_dirs: dict[str, list[Path]], out_dir: Path, *,
                 records: dict[str, dict[int, dict[str, Any]]] | None = None) -> list[Path]:
    """per_class_iou.png; training_curves.png (from the run dirs' metrics.jsonl); with ``records``,
    val_curves.png (validation mIoU against iteration, mean over seeds: shows whether students plateau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    names, methods = summary["class_names"], list(summary["methods"])
    if names and methods:
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names) * max(1, len(methods)) / 3), 4.5))
        width = 0.8 / len(methods)
        x = np.arange(len(names))
        for j, m in enumerate(methods):
            pc = summary["methods"][m]["per_class_iou"]
            vals = [100 * (v or 0.0) for v in pc] + [0.0] * (len(names) - len(pc))
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylabel("IoU (%)")
        ax.set_title("Per-class IoU (mean over seeds)")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "per_class_iou.png"))
    if records:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for j, (m, per_seed) in enumerate(records.items()):
            curves = [dict((int(i), v) for i, v in r.get("val_curve") or []) for r in per_seed.values()]
            its = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
            if its:
                ax.plot(its, [100 * statistics.fmean(c[i] for c in curves) for i in its], label=m,
                        color=f"C{j % 10}", lw=1.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("val mIoU (%), mean over seeds")
        ax.set_title("Validation curves")
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out_dir / "val_curves.png"))
    if not run_dirs:
        return written
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, dirs in run_dirs.items():
        for k, d in enumerate(dirs):
            its, losses = _read_curve(d)
            if its:
                ax.plot(its, losses, label=m if k == 0 else None, color=f"C{list(run_dirs).index(m) % 10}",
                        alpha=0.8, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total weighted loss")
    ax.set_yscale("log")
    ax.set_title("Training curves (one line per seed)")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "training_curves.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize_results(results_dir: str | Path, *, command: str | None = None) -> dict[str, Any]:
    """Rebuild DIR/compare.json, compare.md and the plots from every record in DIR (no training)."""
    rd = Path(results_dir)
    records = load_records(rd)
    if not records:
        raise ConfigError(f"{rd} holds no <method>/seed<k>.json records")
    order = ["none"] + sorted(m for m in records if m != "none" and not is_c2vkd(m)) + sorted(
        m for m in records if is_c2vkd(m))
    results = {m: records[m] for m in order if m in records}
    first = next(iter(next(iter(results.values())).values()))
    teacher = json.loads((rd / "teacher.json").read_text()) if (rd / "teacher.json").is_file() else None
    summary = summarize(results, list(first.get("class_names") or []), teacher)
    revisions = sorted({(r.get("code") or {}).get("commit") or "unknown" for res in results.values() for r in res.values()})
    summary.update({"results_dir": str(rd), "command": command, "code_revisions": revisions,
                    "protocol": first.get("protocol_name"), "split": first.get("split")})
    atomic_write_text(rd / "compare.json", json.dumps(summary, indent=1, default=_json_default))
    summary["markdown"] = format_markdown(summary, title=f"c2vkd compare: {rd.name} ({first.get('split')})",
                                          command=command)
    atomic_write_text(rd / "compare.md", summary["markdown"])
    summary["plots"] = [str(p) for p in plot_compare(summary, {}, rd, records=results)]
    summary["out_dir"] = str(rd)
    return summary


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
            if rp is not None:
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
    if not rdir:
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
