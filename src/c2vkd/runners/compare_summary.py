"""The summary of a comparison: the table (per-method mean / std mIoU, gain over ``none``, paired differences,
the C2VKD gain ratio; the statistics are in ``results.py``), its markdown and the plots; and several protocols'
summaries side by side per method (:func:`across_protocols`: does the ranking hold across datasets?).
``compare.py`` runs the variants and calls these."""
from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any

from c2vkd.engine.run_dir import read_metrics
from c2vkd.runners.results import (CONFIRM_SEEDS, RECONSTRUCTION_MARK, bootstrap_ratio_ci, display_label, gain_ratio,
                                   is_ablation, is_c2vkd, is_reconstruction, method_order, paired_difference)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _val_curve(record: dict[str, Any]) -> list[tuple[int, float]]:
    """A record's validation curve ``[[iteration, mIoU], ...]`` as sorted (iteration, mIoU) pairs."""
    return sorted((int(i), float(v)) for i, v in record.get("val_curve") or [])


def val_stats(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """(final val mIoU, its gain over the last quarter of training) of one record's validation curve
    ``[[iteration, mIoU], ...]``; the last-quarter start is the last evaluation at or before 75% of the last
    evaluated iteration. (None, None) without a curve, (final, None) with a single point."""
    curve = _val_curve(record)
    if not curve:
        return None, None
    last_it, final = curve[-1]
    before = [v for i, v in curve if i <= 0.75 * last_it]
    return final, (final - before[-1]) if before else None


def val_trend(record: dict[str, Any]) -> float | None:
    """The least-squares slope of one record's val curve over the last half of training (evaluations at or after
    50% of the last evaluated iteration), in mIoU per quarter of that schedule; None with fewer than 3 such points.
    A steadier plateau reading than the last-quarter gain, which is the difference of two single evaluations that
    each move 1-4 mIoU (benchmarks/protocol.md)."""
    curve = _val_curve(record)
    if not curve:
        return None
    last_it = curve[-1][0]
    pts = [(i, v) for i, v in curve if i >= 0.5 * last_it]
    if len(pts) < 3:
        return None
    mx, my = statistics.fmean(i for i, _ in pts), statistics.fmean(v for _, v in pts)
    sxx = sum((i - mx) ** 2 for i, _ in pts)
    if not sxx:  # every point at one iteration: no slope
        return None
    return sum((i - mx) * (v - my) for i, v in pts) / sxx * 0.25 * last_it


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _wall_mean(per_seed: dict[int, dict[str, Any]]) -> float | None:
    """Mean wall time of the runs that were not resumed (a resumed run's ``wall_s`` counts only the part after
    its resume); None when every run was resumed."""
    walls = [r["wall_s"] for r in per_seed.values() if not r.get("resumed")]
    return statistics.fmean(walls) if walls else None


def _wall_text(wall: float | None) -> str:
    return "-" if wall is None else f"{wall:.0f} s"


def _val_finals(per_seed: dict[int, dict[str, Any]]) -> dict[int, float]:
    finals = {int(s): val_stats(r)[0] for s, r in per_seed.items()}
    return {s: v for s, v in finals.items() if v is not None}


def _val_columns(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The val-curve columns of a method's row (means over its seeds) and its wall time: what a screen variant
    and a confirmed method both show."""
    vals = [val_stats(r) for r in per_seed.values()]
    return {"val_final_mean": _mean_or_none([f for f, _ in vals]),
            "val_last_quarter_gain_mean": _mean_or_none([q for _, q in vals]),
            "val_trend_mean": _mean_or_none([val_trend(r) for r in per_seed.values()]),
            "wall_s_mean": _wall_mean(per_seed)}


def _screen_entry(per_seed: dict[int, dict[str, Any]], none: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    """A screen variant's val-only view: final val mIoU per seed and mean, its last-quarter gain and trend, and its
    final val paired by seed with `none`'s. No test number is read."""
    finals = _val_finals(per_seed)
    return {"seeds": len(per_seed), "val_final_per_seed": {str(s): v for s, v in finals.items()},
            **_val_columns(per_seed),
            "val_paired_vs_none": paired_difference(finals, _val_finals(none)) if none else None}


def summarize(results: dict[str, dict[int, dict[str, Any]]], class_names: list[str],
              teacher: dict[str, Any] | None = None, *, confirm_seeds: int = CONFIRM_SEEDS) -> dict[str, Any]:
    """Per-method mean/std mIoU, gain over ``none`` (mean and paired, with a 95% interval) and the C2VKD gain
    ratio (method.md section 5) with its bootstrap interval over seeds.

    An ablation variant with fewer than ``confirm_seeds`` seeds is a screen variant (results.is_ablation): it
    goes to ``summary["screen"]`` with its val numbers only and takes part in nothing read from test; the
    recommendation is made on val among the other methods, and the best screen variant on val is named beside it."""
    screen_runs = {m: r for m, r in results.items()
                   if r and is_ablation(m, list(r.values())) and len(r) < confirm_seeds}
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
        methods[m] = {"miou_mean": mean, "miou_std": std, "miou_per_seed": {str(s): r["miou"] for s, r in per_seed.items()},
                      "seeds": len(mious), "per_class_iou": per_class, **_val_columns(per_seed)}
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
              "val final | val last-quarter gain | val trend, last half (per quarter) | wall time / run (not resumed) |",
              "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    pct = lambda v, sign="": "" if v is None else f"{100 * v:{sign}.2f}"  # noqa: E731
    # the cells both tables end with (screen and confirmed rows carry the same _val_columns)
    tail = lambda r: (f"{pct(r.get('val_last_quarter_gain_mean'), '+')} | {pct(r.get('val_trend_mean'), '+')} | "  # noqa: E731
                      f"{_wall_text(r['wall_s_mean'])} |")
    for m, r in summary["methods"].items():
        gain = r.get("gain")
        per_seed = ", ".join(f"{100 * v:.2f}" for v in r["miou_per_seed"].values())
        paired = _paired_text(r.get("paired_vs_none"))
        lines.append(f"| {lab(m)} | {100 * r['miou_mean']:.2f} | {100 * r['miou_std']:.2f} | {r['seeds']} | "
                     f"{'' if gain is None else f'{100 * gain:+.2f}'} | {paired} | {per_seed} | "
                     f"{pct(r.get('val_final_mean'))} | {tail(r)}")
    lines.append("")
    screen = summary.get("screen") or {}
    if screen:
        lines += [f"Screen variants (ablation presets with fewer than {summary['confirm_seeds']} seeds): chosen on "
                  "val, so only their val numbers are shown; their test numbers are withheld until a variant is "
                  "confirmed with that many seeds.", "",
                  "| screen variant | seeds | val final | paired val diff vs none [95% CI] | val last-quarter gain | "
                  "val trend, last half (per quarter) | wall time / run (not resumed) |", "|---|---:|---:|---|---:|---:|---:|"]
        for m, r in screen.items():
            lines.append(f"| {lab(m)} | {r['seeds']} | {pct(r['val_final_mean'])} | "
                         f"{_paired_text(r['val_paired_vs_none'])} | {tail(r)}")
        lines.append("")
    rec = summary.get("recommended")
    if rec:
        lines += [f"Recommended method (chosen on val, {rec['by']}, among all methods"
                  f"{' but the screen variants' if screen else ''}): **{lab(rec['method'])}**; "
                  f"best C2VKD-family preset on val: {rec['best_c2vkd_on_val'] or '-'}"
                  + (f"; best screen variant on val: {rec['best_screen_on_val']}" if rec.get("best_screen_on_val")
                     else "")
                  + ". Val final / last-quarter gain: the last validation mIoU and its change over the last quarter "
                  "of training (near 0: the student is near its plateau); val trend: the least-squares slope of the "
                  "val curve over the last half of training, in mIoU per quarter (the steadier plateau reading: "
                  "single evaluations move by 1-4 mIoU).", ""]
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


def _tie_key(value: float) -> float:
    # gains are differences of means of the same stored numbers: equal gains may differ in the last bits
    return round(value, 12)


def rank_by_value(values: dict[str, float]) -> dict[str, float]:
    """{key: rank}, 1 = the largest value; tied values share the mean of the ranks they span (2.5 for a tie
    at 2 and 3), the usual convention that makes Spearman's rho the Pearson correlation of ranks."""
    order = sorted(values, key=lambda k: -_tie_key(values[k]))
    ranks: dict[str, float] = {}
    for _, group in itertools.groupby(enumerate(order), key=lambda ik: _tie_key(values[ik[1]])):
        members = list(group)
        mean_rank = (members[0][0] + members[-1][0]) / 2 + 1
        ranks.update((k, mean_rank) for _, k in members)
    return ranks


def spearman_rho(x: dict[str, float], y: dict[str, float]) -> float | None:
    """Spearman's rank correlation of two {key: value} maps on the keys both have (ties: mean ranks); None with
    fewer than 2 common keys or when either side's common values all tie (the correlation is undefined)."""
    keys = [k for k in x if k in y]
    rx = rank_by_value({k: x[k] for k in keys})
    ry = rank_by_value({k: y[k] for k in keys})
    try:
        return statistics.correlation([rx[k] for k in keys], [ry[k] for k in keys])
    except statistics.StatisticsError:  # < 2 points or a constant side
        return None


def kendall_tau_b(x: dict[str, float], y: dict[str, float]) -> float | None:
    """Kendall's tau-b of two {key: value} maps on the keys both have: (concordant - discordant pairs) /
    sqrt((pairs - pairs tied in x) (pairs - pairs tied in y)); None where that denominator is 0."""
    keys = [k for k in x if k in y]
    concordant = discordant = tied_x = tied_y = 0
    for a, b in itertools.combinations(keys, 2):
        dx = _tie_key(x[a]) - _tie_key(x[b])
        dy = _tie_key(y[a]) - _tie_key(y[b])
        tied_x += dx == 0
        tied_y += dy == 0
        concordant += dx * dy > 0
        discordant += dx * dy < 0
    pairs = len(keys) * (len(keys) - 1) // 2
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denom if denom else None


def across_protocols(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several protocols side by side per method (issue 27: does the ranking hold across datasets?).

    summaries: {protocol name: summary as returned by :func:`summarize`}, in column order. Returns
    {"protocols": [names],
     "per_protocol": {name: {"top", "methods", "best_prior", "recommended", "best_c2vkd_on_val",
                             "best_screen_on_val", "screened": {method: seeds}, "confirm_seeds", "split"}},
     "methods": {method: {name: cell or None}}   (table order; None: the protocol has no record of it),
     "most_seeds": the most seeds any confirmed method has in any protocol,
     "pairs": [{"protocols": [a, b], "methods": [...], "n", "spearman", "kendall_tau_b"}] (every pair of protocols),
     "top_same": bool, "common": {"methods": [...], "top": {name: method}}}.
    A confirmed method's cell is {"seeds", "miou_mean", "paired_vs_none" (summarize's), "rank" (by mean test
    mIoU among the protocol's confirmed methods, `none` included, 1 = best)}; a screen variant's is
    {"screen": True, "seeds"}: summarize withheld its test numbers, so none are read here, and it takes part in
    no rank or correlation. The correlations compare the methods' paired gains over `none` (the numbers the
    table shows) on the methods that have one in both protocols (`none` and screen variants left out), so n
    says how many methods a coefficient rests on."""
    per: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, Any]] = {}
    gains: dict[str, dict[str, float]] = {}
    for p, s in summaries.items():
        methods = s["methods"]
        means = {m: r["miou_mean"] for m, r in methods.items()}
        ranks = rank_by_value(means)
        screen = s.get("screen") or {}
        rec = s.get("recommended") or {}
        per[p] = {"top": max(means, key=means.get) if means else None, "methods": len(methods),
                  "best_prior": s.get("best_prior"), "recommended": rec.get("method"),
                  "best_c2vkd_on_val": rec.get("best_c2vkd_on_val"),
                  "best_screen_on_val": rec.get("best_screen_on_val"),
                  "screened": {m: r["seeds"] for m, r in screen.items()}, "confirm_seeds": s.get("confirm_seeds"),
                  "split": s.get("split")}
        for m, r in methods.items():
            cells.setdefault(m, {})[p] = {"seeds": r["seeds"], "miou_mean": r["miou_mean"],
                                          "paired_vs_none": r.get("paired_vs_none"), "rank": ranks[m]}
        for m, r in screen.items():
            cells.setdefault(m, {})[p] = {"screen": True, "seeds": r["seeds"]}
        gains[p] = {m: r["paired_vs_none"]["mean"] for m, r in methods.items() if r.get("paired_vs_none")}
    pairs = []
    for a, b in itertools.combinations(summaries, 2):
        common = [m for m in method_order(gains[a]) if m in gains[b]]
        x, y = ({m: g[m] for m in common} for g in (gains[a], gains[b]))
        pairs.append({"protocols": [a, b], "methods": common, "n": len(common), "spearman": spearman_rho(x, y),
                      "kendall_tau_b": kendall_tau_b(x, y)})
    tops = [per[p]["top"] for p in summaries]
    everywhere = [m for m in method_order(cells) if all("rank" in (cells[m].get(p) or {}) for p in summaries)]
    return {"protocols": list(summaries), "per_protocol": per,
            "methods": {m: {p: cells[m].get(p) for p in summaries} for m in method_order(cells)},
            # a cell with a rank is a confirmed method's (a screen variant's has none)
            "most_seeds": max((c["seeds"] for by_p in cells.values() for c in by_p.values() if "rank" in c),
                              default=0),
            "pairs": pairs,
            "top_same": len(summaries) > 1 and None not in tops and len(set(tops)) == 1,
            "common": {"methods": everywhere,
                       "top": {p: max(everywhere, key=lambda m: cells[m][p]["miou_mean"]) for p in summaries}
                       if everywhere else {}}}


def _count_text(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _across_cell(method: str, cell: dict[str, Any] | None, most_seeds: int) -> str:
    """One protocol's "gain vs none [95% CI]" cell: "-" without a record, no test number for a screen variant,
    the seed count where the method has fewer seeds than the best-covered one in the table."""
    if cell is None:
        return "-"
    if cell.get("screen"):
        return f"screened ({_count_text(cell['seeds'], 'seed')}, test withheld)"
    pd = cell["paired_vs_none"]
    if pd:
        text = _paired_text(pd)
        said = pd["ci95"] is None  # _paired_text already says "(1 seed)"
    else:  # `none` itself, or a protocol without `none`: its mean mIoU is the reference point
        text = f"{'reference, ' if method == 'none' else 'no none, '}{100 * cell['miou_mean']:.2f} mIoU"
        said = False
    return text + (f" ({_count_text(cell['seeds'], 'seed')})" if cell["seeds"] < most_seeds and not said else "")


def _coefficient(v: float | None) -> str:
    return "undefined" if v is None else f"{v:+.2f}"


def format_across_markdown(across: dict[str, Any], *, title: str = "Protocols side by side",
                           command: str | None = None) -> str:
    """The markdown of :func:`across_protocols`: one row per method, per protocol a "gain vs none [95% CI]"
    and a "rank" column; the rank correlations per pair of protocols; per protocol its best prior and the
    method recommended on val; and whether the top method is the same in every protocol."""
    lab = display_label
    names = across["protocols"]
    per = across["per_protocol"]
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["Per protocol: the test-mIoU difference to `none` paired by seed, in mIoU points [95% t interval] "
              "(\"(noise)\": the interval holds 0), and the rank by mean test mIoU among the protocol's confirmed "
              "methods, `none` included (1 = best; ties share the mean rank). `-`: no record of the method in that "
              "protocol. A seed count is shown where a method has fewer seeds than the best-covered method in "
              f"the table ({across['most_seeds']}).", "",
              "| method | " + " | ".join(f"{p} gain vs none [95% CI] | {p} rank" for p in names) + " |",
              "|---|" + "---|---:|" * len(names)]
    for m, by_protocol in across["methods"].items():
        row = []
        for p in names:
            cell = by_protocol[p]
            rank = f"{cell['rank']:g}/{per[p]['methods']}" if cell and "rank" in cell else "-"
            row += [_across_cell(m, cell, across["most_seeds"]), rank]
        lines.append(f"| {lab(m)} | " + " | ".join(row) + " |")
    lines.append("")
    confirm = {per[p]["confirm_seeds"] for p in names if per[p]["screened"]}
    if confirm:
        lines += [f"Screened: an ablation preset with fewer than {'/'.join(map(str, sorted(confirm)))} seeds in a "
                  "protocol is still being screened on val there: its test numbers are withheld (its val numbers "
                  "are in that protocol's compare.md), and it takes no part in the ranks or the correlations.", ""]
    lines += ["Does the ranking hold? Rank correlation of the methods' paired gains over `none`, on the methods "
              "both protocols have a gain for (`none` and screen variants left out; n methods):", ""]
    for pair in across["pairs"]:
        a, b = pair["protocols"]
        if pair["spearman"] is None:
            why = " (needs at least 2 common methods)" if pair["n"] < 2 else " (the gains tie in one protocol)"
        else:  # two methods are either in the same order or not: the coefficient says nothing more
            why = " (with 2 methods always +1 or -1)" if pair["n"] == 2 else ""
        lines.append(f"- {a} vs {b}: Spearman rho {_coefficient(pair['spearman'])}, Kendall tau-b "
                     f"{_coefficient(pair['kendall_tau_b'])}, n = {pair['n']}{why}"
                     + (f" ({', '.join(map(lab, pair['methods']))})" if pair["methods"] else "") + ".")
    lines += ["", "Per protocol (the best prior by mean test mIoU; the recommendation chosen on val, as in each "
              "protocol's compare.md):", ""]
    for p in names:
        q = per[p]
        extra = "".join(f"; {what}: {lab(q[key])}" for what, key in (
            ("best C2VKD-family preset on val", "best_c2vkd_on_val"), ("best screen variant on val",
                                                                        "best_screen_on_val")) if q[key])
        lines.append(f"- {p} ({_count_text(q['methods'], 'confirmed method')}, {q['split'] or 'unknown'} split): "
                     f"best prior {lab(q['best_prior']) if q['best_prior'] else '-'}; recommended on val "
                     f"{lab(q['recommended']) if q['recommended'] else '-'}{extra}.")
    lines.append("")
    tops = ", ".join(f"{lab(per[p]['top']) if per[p]['top'] else '-'} ({p})" for p in names)
    if across["top_same"]:
        lines.append("The top method by mean test mIoU is the same in every protocol: "
                     f"**{lab(per[names[0]]['top'])}**.")
    else:
        lines.append(f"The top method by mean test mIoU is not the same in every protocol: {tops}.")
    common = across["common"]
    if len(common["methods"]) >= 2 and not across["top_same"]:
        top = common["top"]
        same = len(set(top.values())) == 1
        lines.append(f"Among the {len(common['methods'])} methods every protocol has confirmed "
                     f"({', '.join(map(lab, common['methods']))}), the top one is "
                     + (f"the same in every protocol: **{lab(top[names[0]])}**." if same else
                        "not the same: " + ", ".join(f"{lab(top[p])} ({p})" for p in names) + "."))
    lines.append("")
    return "\n".join(lines)


def _read_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(iterations, total weighted loss) of a run's training records (metrics.jsonl; none without the file)."""
    rows = [(int(r["iter"]), float(r["loss"])) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return [i for i, _ in rows], [v for _, v in rows]


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
