"""`c2vkd report CONFIG`: which loss terms really train the student?

Runs N real training steps of the config through the one engine (Trainer, same data, losses, optimizer and
balancing; a temporary run directory, so no checkpoint is left behind) with the per-term gradient measurement
of engine/balance.py at every step, and reports per term: raw value, weight, weighted value, the L2 norm of
the weighted term's gradient on the student (alignment heads excluded), its share of the summed norms, the
same share within the backbone and within the decode head, the weight that would give it its target share,
and the RMS of the gradient reaching each alignment head against the optimizer's eps.

Targets: the config's ``balance.targets`` when it has them, else equal shares of the distillation terms
(those of losses that need a teacher; supervised terms such as CE keep their current share).
Averages are over the N steps, or over the steps after ``balance.warmup`` when balancing is on.
"""
from __future__ import annotations

import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from c2vkd.config import load_config
from c2vkd.engine.balance import weights_for_targets
from c2vkd.engine.grad_probe import shares

log = logging.getLogger("c2vkd")


def default_targets(weights: dict[str, float], kd_terms: Sequence[str], norms: dict[str, float]) -> dict[str, float]:
    """Equal shares of the KD terms, leaving the other (supervised) non-zero-weight terms their current share."""
    kd = [t for t in kd_terms if weights.get(t, 0.0) != 0.0]
    if not kd:
        return {}
    _, share = shares({t: {"student": g} for t, g in norms.items()}, weights)
    rest = sum(v for t, v in share.items() if t not in kd)
    return {t: (1.0 - rest) / len(kd) for t in kd}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarize_measurements(measurements: list[dict[str, Any]], *, kd_terms: Sequence[str],
                           targets: dict[str, float] | None, eps: float | None, skip: int = 0) -> dict[str, Any]:
    """Aggregate the Trainer's per-step measurements (after the first ``skip`` steps) into the report."""
    ms = [m for m in measurements if m["iter"] > skip]
    if not ms:
        raise ValueError(f"no measured step after step {skip}: raise --iters")
    terms = list(ms[0]["weights"])
    per_term: dict[str, Any] = {}
    for t in terms:
        rows = []
        for m in ms:
            w = m["weights"][t]
            weighted_norm, share = shares(m["raw_norm"], m["weights"])
            _, share_b = shares(m["raw_norm"], m["weights"], "backbone")
            _, share_d = shares(m["raw_norm"], m["weights"], "decode_head")
            rows.append({"raw": m["raw"][t], "weight": w, "weighted": w * m["raw"][t],
                         "grad_norm": weighted_norm[t], "grad_share": share[t], "share_backbone": share_b[t],
                         "share_decode_head": share_d[t], "raw_norm": m["raw_norm"][t]["student"]})
        per_term[t] = {k: _stats([r[k] for r in rows]) for k in rows[0]}
    mean_w = {t: per_term[t]["weight"]["mean"] for t in terms}
    mean_g = {t: per_term[t]["raw_norm"]["mean"] for t in terms}
    tgt = dict(targets) if targets else default_targets(mean_w, kd_terms, mean_g)
    suggested = weights_for_targets(mean_g, mean_w, tgt) if tgt else dict(mean_w)
    heads = {}
    for h in ms[0]["head_rms"]:
        vals = [m["head_rms"][h] for m in ms]
        heads[h] = {**_stats(vals), "optimizer_eps": eps,
                    "below_eps": eps is not None and statistics.fmean(vals) < eps}
    # the exact, documented JSON schema of `--json`
    compact = {"iters": len(measurements), "terms": {
        t: {"raw": per_term[t]["raw"]["mean"], "weight": mean_w[t], "weighted": per_term[t]["weighted"]["mean"],
            "grad_norm": per_term[t]["grad_norm"]["mean"], "grad_share": per_term[t]["grad_share"]["mean"],
            "target": tgt.get(t), "suggested_weight": suggested.get(t, mean_w[t])} for t in terms}}
    return {"compact": compact, "detail": {"averaged_steps": [ms[0]["iter"], ms[-1]["iter"]], "terms": per_term,
                                            "heads": heads, "targets": tgt, "targets_from_config": bool(targets)}}


def format_report(rep: dict[str, Any]) -> str:
    c, d = rep["compact"], rep["detail"]
    lo, hi = d["averaged_steps"]
    lines = [f"Gradient share per loss term: {c['iters']} training steps, means over steps {lo}-{hi} "
             "[min, max]; shares are of the summed per-term gradient norms on the student (alignment heads "
             "excluded)", ""]
    head = (f"{'term':<17}{'raw':>10}{'weight':>10}{'weighted':>10}{'grad norm':>11}{'share':>10}  {'[min, max]':<19}"
            f"{'backbone':>10}{'decoder':>10}{'target':>8}{'suggested w':>13}")
    lines += [head, "-" * len(head)]
    for t, r in c["terms"].items():
        dt = d["terms"][t]
        rng = f"[{dt['grad_share']['min']:.1e}, {dt['grad_share']['max']:.1e}]"
        tgt = "-" if r["target"] is None else f"{r['target']:.3f}"
        lines.append(f"{t:<17}{r['raw']:>10.3g}{r['weight']:>10.3g}{r['weighted']:>10.3g}{r['grad_norm']:>11.3g}"
                     f"{r['grad_share']:>10.3g}  {rng:<19}{dt['share_backbone']['mean']:>10.3g}"
                     f"{dt['share_decode_head']['mean']:>10.3g}{tgt:>8}{r['suggested_weight']:>13.4g}")
    if d["heads"]:
        lines += ["", "Gradient RMS reaching each alignment head (total gradient) vs the optimizer's eps:"]
        for h, v in d["heads"].items():
            flag = "  <-- below eps: Adam barely moves it" if v["below_eps"] else ""
            eps = "n/a" if v["optimizer_eps"] is None else f"{v['optimizer_eps']:.0e}"
            lines.append(f"  {h:<28} {v['mean']:.2e} [{v['min']:.1e}, {v['max']:.1e}]  eps {eps}{flag}")
    src = "balance.targets" if d["targets_from_config"] else "equal shares of the distillation terms"
    lines += ["", f"suggested weight = the weight giving each term its target share ({src}) at the measured norms"]
    return "\n".join(lines)


def run_report(config: str | Path, overrides: Sequence[str] = (), *, iters: int = 20,
               json_path: str | Path | None = None, detail_path: str | Path | None = None,
               from_step: int | None = None) -> dict[str, Any]:
    """Measure N training steps of CONFIG; write the JSON files if asked; return the report. Averages are over
    steps ``from_step``..N (default: after ``balance.warmup`` when balancing is on, else all steps)."""
    from c2vkd.engine.loss_config import validate_loss_args
    from c2vkd.engine.trainer import Trainer

    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    cfg = load_config(config, list(overrides))
    validate_loss_args(cfg, source=str(config))
    cfg["schedule"]["iters"] = max(int(cfg["schedule"]["iters"]), iters)
    tr = cfg["train"]
    tr.update(val_interval=0, ckpt_interval=0, progress=False, grad_share_interval=1)
    cfg["eval"]["final_split"] = None
    cfg["teacher"]["allow_random_init"] = True  # a diagnostic: a random teacher is fine (the warning stays)
    with tempfile.TemporaryDirectory(prefix="c2vkd-report-") as tmp:
        trainer = Trainer(cfg, run_dir=Path(tmp) / "run")
        trainer.fit(max_steps=iters, finalize=False)
        b = cfg["balance"]
        skip = int(b["warmup"]) if b["mode"] != "off" else 0
        if from_step is not None:
            skip = max(int(from_step) - 1, 0)
        if skip >= iters:
            log.warning("report: averaging would start after the last step (%d >= --iters %d): averaging over all "
                        "steps", skip, iters)
            skip = 0
        eps = trainer.optimizer_eps()
        kd_terms = [t for m in trainer.model.losses if m.requires_teacher for t in m.weights]
        rep = summarize_measurements(trainer.measurements, kd_terms=kd_terms, targets=b.get("targets") or None,
                                     eps=eps, skip=skip)
    if json_path:
        Path(json_path).write_text(json.dumps(rep["compact"], indent=1))
    if detail_path:
        Path(detail_path).write_text(json.dumps(rep["detail"], indent=1))
    rep["text"] = format_report(rep)
    return rep
