"""The summary of a comparison: the table (per-method mean / std mIoU, gain over ``none``, paired differences,
the C2VKD gain ratio; the statistics are in ``results.py``), its markdown and the plots. ``compare.py`` runs
the variants and calls these."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from c2vkd.runners.results import (CONFIRM_SEEDS, RECONSTRUCTION_MARK, bootstrap_ratio_ci, display_label, gain_ratio,
                                   is_ablation, is_c2vkd, is_reconstruction, paired_difference)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def val_stats(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """(final val mIoU, its gain over the last quarter of training) of one record's validation curve
    ``[[iteration, mIoU], ...]``; the last-quarter start is the last evaluation at or before 75% of the last
    evaluated iteration. (None, None) without a curve, (final, None) with a single point."""
    curve = sorted((int(i), float(v)) for i, v in record.get("val_curve") or [])
    if not curve:
        return None, None
    last_it, final = curve[-1]
    before = [v for i, v in curve if i <= 0.75 * last_it]
    return final, (final - before[-1]) if before else None


def _val_finals(per_seed: dict[int, dict[str, Any]]) -> dict[int, float]:
    finals = {int(s): val_stats(r)[0] for s, r in per_seed.items()}
    return {s: v for s, v in finals.items() if v is not None}


def _screen_entry(per_seed: dict[int, dict[str, Any]], none: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    """A screen variant's val-only view: final val mIoU per seed and mean, its last-quarter gain, and its final val
    paired by seed with `none`'s. No test number is read."""
    finals = _val_finals(per_seed)
    quarters = [q for _, q in map(val_stats, per_seed.values()) if q is not None]
    return {"seeds": len(per_seed), "val_final_per_seed": {str(s): v for s, v in finals.items()},
            "val_final_mean": statistics.fmean(finals.values()) if finals else None,
            "val_last_quarter_gain_mean": statistics.fmean(quarters) if quarters else None,
            "val_paired_vs_none": paired_difference(finals, _val_finals(none)) if none else None,
            "wall_s_mean": statistics.fmean([r["wall_s"] for r in per_seed.values()])}


def summarize(results: dict[str, dict[int, dict[str, Any]]], class_names: list[str],
              teacher: dict[str, Any] | None = None, *, confirm_seeds: int = CONFIRM_SEEDS) -> dict[str, Any]:
    """Per-method mean/std mIoU, gain over ``none`` (mean and paired, with a 95% interval) and the C2VKD gain
    ratio (method.md section 5) with its bootstrap interval over seeds.

    An ablation variant with fewer than ``confirm_seeds`` seeds is a screen variant (results.is_ablation): it
    goes to ``summary["screen"]`` with its val numbers only, and takes part in the recommendation (made on val)
    but in nothing read from test."""
    screen_runs = {m: r for m, r in results.items() if r and is_ablation(m) and len(r) < confirm_seeds}
    results = {m: r for m, r in results.items() if m not in screen_runs}
    methods: dict[str, Any] = {}
    for m, per_seed in results.items():
        mious = [r["miou"] for r in per_seed.values() if r.get("miou") is not None]
        if not mious:
            continue
        mean, std = _mean_std(mious)
        ious = [r["iou"] for r in per_seed.values() if r.get("iou")]
        per_class = [statistics.fmean([v for v in col if v is not None]) if any(v is not None for v in col) else None
                     for col in zip(*ious)] if ious else []
        vals = [val_stats(r) for r in per_seed.values()]
        finals = [f for f, _ in vals if f is not None]
        quarters = [q for _, q in vals if q is not None]
        methods[m] = {"miou_mean": mean, "miou_std": std, "miou_per_seed": {str(s): r["miou"] for s, r in per_seed.items()},
                      "seeds": len(mious), "per_class_iou": per_class,
                      "val_final_mean": statistics.fmean(finals) if finals else None,
                      "val_last_quarter_gain_mean": statistics.fmean(quarters) if quarters else None,
                      "wall_s_mean": statistics.fmean([r["wall_s"] for r in per_seed.values()])}
    summary: dict[str, Any] = {"methods": methods, "class_names": class_names, "teacher": teacher}
    if screen_runs:
        summary["screen"] = {m: _screen_entry(r, results.get("none")) for m, r in screen_runs.items()}
        summary["confirm_seeds"] = confirm_seeds
    recon = [m for m in methods if is_reconstruction(m)]
    if recon:
        summary["reconstructions"] = recon  # shown as NAME* (results.display_label)
    on_val = {m: r["val_final_mean"] for m, r in methods.items() if r["val_final_mean"] is not None}
    ours_on_val = {m: v for m, v in on_val.items() if is_c2vkd(m)}
    screen_on_val = {m: r["val_final_mean"] for m, r in summary.get("screen", {}).items()
                     if r["val_final_mean"] is not None}
    if on_val:
        # Chosen on val, never on test: what a user should run is the method with the best mean final val mIoU,
        # whatever family it belongs to, among the methods that are not still being screened; the best
        # C2VKD-family preset on val and the best screen variant are said beside it.
        best = lambda d: max(d, key=lambda m: d[m]) if d else None  # noqa: E731
        summary["recommended"] = {"method": best(on_val), "best_c2vkd_on_val": best(ours_on_val),
                                  "best_screen_on_val": best(screen_on_val),
                                  "by": "mean final val mIoU over seeds"}
    base = methods.get("none")
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
        summary["best_prior"] = best
        # the question a user asks of a C2VKD-family preset: is it better than the best method that existed
        for m, rec in methods.items():
            if is_c2vkd(m):
                rec["paired_vs_best_prior"] = paired_difference(per_seed[m], per_seed[best])
        # The ratio is taken on the seeds every method has (paired; while records accumulate, methods may hold
        # different seeds and their means would not be comparable); the best prior is chosen on those seeds.
        # None (undefined) when the best prior gain is <= 0: a ratio over it is meaningless.
        common = sorted(set.intersection(*[set(v) for v in per_seed.values() if v]))
        best_on_common = None
        for m in methods:
            if is_c2vkd(m):
                ratios[m], best_on_common = gain_ratio(per_seed, m, common) if common else (None, None)
        summary["gain_ratio"] = ratios
        summary["ratio_best_prior"] = best_on_common
        summary["gain_ratio_ci"] = {m: bootstrap_ratio_ci(per_seed, m, common) for m in ratios}
        summary["ratio_seeds"] = common
        if any(set(v) != set(common) for v in per_seed.values() if v):
            summary["gain_ratio_partial"] = {m: _partial_ratio(per_seed, m, list(priors)) for m in ratios}
        summary["claim"] = ("(mIoU_c2vkd - mIoU_none) / (mIoU_best_prior - mIoU_none) > 2 "
                            "(method.md section 5); undefined (null) when the best prior KD gain is <= 0")
    return summary


def _partial_ratio(per_seed: dict[str, dict[int, float]], method: str, priors: list[str]) -> dict[str, Any]:
    """While records accumulate: the gain ratio on the most seeds `none`, `method` and some prior share, among
    the priors that have all of those seeds (the others are named as left out: the best prior may be among
    them). Ties: the seed set more priors have."""
    shared = set(per_seed["none"]) & set(per_seed[method])
    candidates = [shared & set(per_seed[p]) for p in priors] or [set()]
    best_set = max(candidates, key=lambda c: (len(c), sum(c <= set(per_seed[p]) for p in priors)))
    seeds = sorted(best_set)
    included = [p for p in priors if seeds and set(seeds) <= set(per_seed[p])]
    sub = {k: per_seed[k] for k in ("none", method, *included)}
    ratio, best = gain_ratio(sub, method, seeds) if seeds and included else (None, None)
    return {"seeds": seeds, "priors": included, "left_out": [p for p in priors if p not in included],
            "ratio": ratio, "best_prior": best, "ci": bootstrap_ratio_ci(sub, method, seeds) if included else None}


def _ci_text(ci: dict[str, Any] | None, lead: str) -> str:
    """A gain ratio's bootstrap interval as text ("" when there is none), with the share of undefined resamples."""
    if not ci or not ci.get("ci95"):
        return ""
    lo, hi = ci["ci95"]
    undefined = ci["undefined_fraction"]
    return (f"{lead} [{lo:.2f}, {hi:.2f}]"
            + (f", undefined in {100 * undefined:.0f}% of resamples" if undefined else ""))


def _paired_text(pd: dict[str, Any] | None) -> str:
    """A paired difference in mIoU points with its 95% interval; "(noise)" when the interval holds 0."""
    if not pd:
        return ""
    if pd["ci95"] is None:
        return f"{100 * pd['mean']:+.2f} (1 seed)"
    lo, hi = pd["ci95"]
    noise = " (noise)" if lo <= 0 <= hi else ""
    return f"{100 * pd['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{noise}"


def format_markdown(summary: dict[str, Any], *, title: str, command: str | None = None) -> str:
    lab = display_label  # a reconstruction shows as NAME*
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    t = summary.get("teacher")
    if t:
        lines += [f"Teacher ({t['name']}, evaluated, not trained by this compare): "
                  f"mIoU {100 * t['miou']:.2f} on {t['split']}", ""]
    lines += ["| method | mIoU mean | std | seeds | gain vs none | paired diff vs none [95% CI] | per-seed | "
              "val final | val last-quarter gain | wall time / run |",
              "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    pct = lambda v, sign="": "" if v is None else f"{100 * v:{sign}.2f}"  # noqa: E731
    for m, r in summary["methods"].items():
        gain = r.get("gain")
        per_seed = ", ".join(f"{100 * v:.2f}" for v in r["miou_per_seed"].values())
        paired = _paired_text(r.get("paired_vs_none"))
        lines.append(f"| {lab(m)} | {100 * r['miou_mean']:.2f} | {100 * r['miou_std']:.2f} | {r['seeds']} | "
                     f"{'' if gain is None else f'{100 * gain:+.2f}'} | {paired} | {per_seed} | "
                     f"{pct(r.get('val_final_mean'))} | {pct(r.get('val_last_quarter_gain_mean'), '+')} | "
                     f"{r['wall_s_mean']:.0f} s |")
    lines.append("")
    screen = summary.get("screen") or {}
    if screen:
        lines += [f"Screen variants (ablation presets with fewer than {summary['confirm_seeds']} seeds): chosen on "
                  "val, so only their val numbers are shown; their test numbers are withheld until a variant is "
                  "confirmed with that many seeds.", "",
                  "| screen variant | seeds | val final | paired val diff vs none [95% CI] | val last-quarter gain | "
                  "wall time / run |", "|---|---:|---:|---|---:|---:|"]
        for m, r in screen.items():
            lines.append(f"| {lab(m)} | {r['seeds']} | {pct(r['val_final_mean'])} | "
                         f"{_paired_text(r['val_paired_vs_none'])} | {pct(r['val_last_quarter_gain_mean'], '+')} | "
                         f"{r['wall_s_mean']:.0f} s |")
        lines.append("")
    rec = summary.get("recommended")
    if rec:
        lines += [f"Recommended method (chosen on val, {rec['by']}, among all methods"
                  f"{' but the screen variants' if screen else ''}): **{lab(rec['method'])}**; "
                  f"best C2VKD-family preset on val: {rec['best_c2vkd_on_val'] or '-'}"
                  + (f"; best screen variant on val: {rec['best_screen_on_val']}" if rec.get("best_screen_on_val")
                     else "")
                  + ". Val final / last-quarter gain: the last validation mIoU and its change over the last quarter "
                  "of training (near 0: the student is near its plateau).", ""]
    if "best_prior" in summary:
        best = summary["best_prior"]
        lines.append(f"Best prior KD method: **{lab(best)}** "
                     f"(gain {100 * summary['methods'][best]['gain']:+.2f} mIoU).")
        vs_best = {m: r["paired_vs_best_prior"] for m, r in summary["methods"].items() if r.get("paired_vs_best_prior")}
        if vs_best:
            lines += ["", f"C2VKD-family presets against the best prior ({lab(best)}), paired by seed [95% t CI]:", ""]
            lines += [f"- {m} - {lab(best)}: {_paired_text(pd)}" for m, pd in vs_best.items()]
            lines.append("")
        seeds = summary.get("ratio_seeds") or []
        ratio_best = summary.get("ratio_best_prior")
        lines.append(f"Gain ratios on the seeds every method has ({', '.join(map(str, seeds)) or 'none'}; best "
                     f"prior on those seeds: {lab(ratio_best) if ratio_best else None}):")
        for m, ratio in summary.get("gain_ratio", {}).items():
            txt = "undefined (best prior gain <= 0)" if ratio is None else f"{ratio:.2f}"
            verdict = "" if ratio is None else (" (> 2: claim holds here)" if ratio > 2 else " (<= 2: claim not met here)")
            ci_txt = _ci_text((summary.get("gain_ratio_ci") or {}).get(m), "; 95% bootstrap CI over seeds")
            lines.append(f"Gain ratio {m} / best prior: {txt}{verdict}{ci_txt}.")
        lines.append("")
        partial = summary.get("gain_ratio_partial")
        if partial:
            lines += ["Interim (records still accumulating; not the protocol's number): the gain ratio on the most "
                      "seeds a C2VKD preset shares with `none` and some prior, among the prior methods that have "
                      "all of those seeds (a prior left out may be the best one):", ""]
            for m, p in partial.items():
                if p["ratio"] is None:
                    txt = "undefined" + (" (best prior gain <= 0)" if p["best_prior"] else " (no prior has those seeds)")
                else:
                    txt = f"{p['ratio']:.2f}"
                txt += _ci_text(p.get("ci"), ", 95% bootstrap CI")
                lines.append(f"- {m} on seeds {', '.join(map(str, p['seeds']))}: {txt}; best prior "
                             f"{lab(p['best_prior']) if p['best_prior'] else '-'} among "
                             f"{', '.join(map(lab, p['priors'])) or 'none'}"
                             f"{'; left out: ' + ', '.join(map(lab, p['left_out'])) if p['left_out'] else ''}.")
            lines.append("")
    elif "note" in summary:
        lines += [summary["note"], ""]
    names = summary["class_names"]
    methods = list(summary["methods"])
    if names and methods:
        lines += ["Per-class IoU (mean over seeds):", "",
                  "| class | " + " | ".join(map(lab, methods)) + " |", "|---|" + "---:|" * len(methods)]
        for i, c in enumerate(names):
            cells = []
            for m in methods:
                pc = summary["methods"][m]["per_class_iou"]
                v = pc[i] if i < len(pc) else None
                cells.append("-" if v is None else f"{100 * v:.1f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("reconstructions"):
        lines += [f"`{RECONSTRUCTION_MARK}` marks a reconstruction: a method without official code, rebuilt from its "
                  "paper and third-party code; its preset header and docs/methods.md list every inferred choice.", ""]
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
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=display_label(m))
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
                ax.plot(its, [100 * statistics.fmean(c[i] for c in curves) for i in its], label=display_label(m),
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
                ax.plot(its, losses, label=display_label(m) if k == 0 else None,
                        color=f"C{list(run_dirs).index(m) % 10}", alpha=0.8, lw=1)
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
