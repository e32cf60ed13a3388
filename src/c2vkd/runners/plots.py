"""`c2vkd plot RUN_DIR`: PNG figures from a run directory's ``metrics.jsonl`` and ``eval_<split>.json``.

Figures (written to ``RUN_DIR/plots`` unless ``out_dir`` is given):

* ``losses.png``: the total loss, then one panel per logged term with its raw value (solid) and its
  weighted value ``term/w`` (dashed; weight-0 "log only" terms are flat at 0);
* ``lr.png``: the learning rate of the first parameter group and, when logged, the gradient norm;
* ``val_miou.png``: periodic-validation mIoU per split, with the final evaluation(s) marked;
* ``iou_<split>.png``: per-class IoU bars for every ``eval_<split>.json`` (classes absent from labels and
  predictions are marked n/a, as in the printed table);
* ``grad_share.png`` (runs with ``train.grad_share_interval`` or ``balance``): each loss term's share of the
  student's gradient, its weighted gradient norm and, when balancing, its live weight (log scales).

Records come from the trainer's JSONL: training records carry ``lr``; validation records ``val_split``;
final evaluations ``eval_split``. A resumed run may log an iteration twice (before the crash and after the
resume): the later record wins. An unreadable line (e.g. cut by a crash) is skipped with a warning.

Matplotlib is driven through ``Figure`` objects with the Agg canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("c2vkd")

# keys of a training record that are not loss terms
_META = {"iter", "lr", "loss", "img_per_s", "grad_norm", "skipped", "run_id"}


class PlotError(ValueError):
    """The run directory has nothing plottable (no metrics, no records); the message says why."""


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, validation, final-evaluation) records of ``run_dir/metrics.jsonl``, sorted by iteration."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run directory {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: is {run_dir} a c2vkd run directory (train / distill write it)?")
    train: dict[int, dict] = {}
    val: dict[tuple[str, int], dict] = {}
    final: dict[tuple[str, int], dict] = {}
    bad = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            it = int(rec["iter"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            log.warning("%s line %d is not a metrics record; skipped", path, n)
            continue
        if "val_split" in rec:
            val[(str(rec["val_split"]), it)] = rec
        elif "eval_split" in rec:
            final[(str(rec["eval_split"]), it)] = rec
        elif "lr" in rec:
            train[it] = rec  # a resumed run re-logs iterations after its checkpoint: the later one wins
    if not train and not val and not final:
        raise PlotError(f"{path} has no metrics records{f' ({bad} unreadable lines)' if bad else ''}: the run "
                        "has not logged yet (records are written every train.log_interval iterations)")
    return ([train[k] for k in sorted(train)], [val[k] for k in sorted(val, key=lambda k: (k[1], k[0]))],
            [final[k] for k in sorted(final, key=lambda k: (k[1], k[0]))])


def _figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _iteration_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            xs.append(int(r["iter"]))
            ys.append(float(v))
    return xs, ys


def plot_losses(train: list[dict], out: Path) -> Path:
    terms: list[str] = []
    for r in train:
        terms += [k for k in r if k not in _META and not k.endswith("/w") and not k.startswith("weight/")
                  and k not in terms]
    fig, axes = _figure(1 + len(terms))
    ax = axes[0]
    ax.plot(*_series(train, "loss"), color="black")
    ax.set_title("total loss (sum of weighted terms)")
    for ax, term in zip(axes[1:], terms):
        ax.plot(*_series(train, term), label=f"{term} (raw)")
        xs, ys = _series(train, f"{term}/w")
        if xs:
            ax.plot(xs, ys, "--", label=f"{term}/w (weighted)")
        ax.set_title(term)
        ax.legend(fontsize="small")
    for ax in axes:
        _iteration_axis(ax)
    fig.suptitle("training losses")
    fig.savefig(out, dpi=100)
    return out


def plot_lr(train: list[dict], out: Path) -> Path:
    has_gn = any(isinstance(r.get("grad_norm"), (int, float)) for r in train)
    fig, axes = _figure(2 if has_gn else 1, ncols=2)
    axes[0].plot(*_series(train, "lr"))
    axes[0].set_title("learning rate")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if has_gn:
        axes[1].plot(*_series(train, "grad_norm"), color="tab:orange")
        axes[1].set_title("gradient norm (before clipping)")
    for ax in axes:
        _iteration_axis(ax)
    fig.savefig(out, dpi=100)
    return out


def plot_val(val: list[dict], final: list[dict], out: Path) -> Path:
    fig, (ax,) = _figure(1, panel=(6.0, 3.8))
    for split in dict.fromkeys(str(r["val_split"]) for r in val):
        xs, ys = _series([r for r in val if r["val_split"] == split], "miou")
        ax.plot(xs, [100 * y for y in ys], marker="o", label=f"{split} (validation)")
    for r in final:
        if isinstance(r.get("miou"), (int, float)):
            ax.scatter([r["iter"]], [100 * r["miou"]], marker="*", s=140, zorder=3,
                       label=f"{r['eval_split']} (final) {100 * r['miou']:.2f}")
    _iteration_axis(ax)
    ax.set_ylabel("mIoU %")
    ax.set_title("evaluation mIoU")
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def _class_names(run_dir: Path, metrics: dict, k: int) -> list[str]:
    names = metrics.get("classes")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    for export in ("student.safetensors", "best_student.safetensors"):
        p = run_dir / export
        if p.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(p), framework="pt") as f:
                    names = json.loads((f.metadata() or {}).get("classes", "[]"))
                if len(names) == k:
                    return [str(n) for n in names]
            except Exception:  # a damaged export only costs the class names
                pass
    return [str(i) for i in range(k)]


def plot_class_iou(run_dir: Path, eval_json: Path, out: Path) -> Path:
    try:
        m = json.loads(eval_json.read_text())
        iou = m["iou"]
    except (OSError, ValueError, KeyError) as e:
        raise PlotError(f"{eval_json} is not a c2vkd evaluation file ({type(e).__name__}: {e})") from None
    names = _class_names(run_dir, m, len(iou))
    fig, (ax,) = _figure(1, panel=(7.0, max(2.5, 0.32 * len(iou) + 1.2)))
    ys = list(range(len(iou)))
    vals = [100 * v if v is not None else 0.0 for v in iou]
    bars = ax.barh(ys, vals, color=["tab:blue" if v is not None else "lightgrey" for v in iou])
    for bar, v in zip(bars, iou):
        text = f"{100 * v:.1f}" if v is not None else "n/a"
        ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize="small")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU %")
    miou = m.get("miou")
    split = m.get("split", eval_json.stem.removeprefix("eval_"))
    ax.set_title(f"per-class IoU on {split}" + (f" (mIoU {100 * miou:.2f})" if miou is not None else ""))
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(out, dpi=100)
    return out


def read_grad_shares(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-term gradient records (``grad_share/<term>`` keys) of ``run_dir/metrics.jsonl``, by iteration."""
    recs: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "iter" in rec and any(k.startswith("grad_share/") for k in rec):
            recs[int(rec["iter"])] = rec
    return [recs[k] for k in sorted(recs)]


def plot_grad_shares(shares: list[dict], train: list[dict], out: Path) -> Path:
    """Share of the student gradient, weighted gradient norm and (if logged) live weight per term."""
    terms = [k.removeprefix("grad_share/") for k in shares[0] if k.startswith("grad_share/")]
    weights = [t for t in terms if any(f"weight/{t}" in r for r in train)]
    fig, axes = _figure(3 if weights else 2)
    panels = [("grad_share/", shares, "share of the student's gradient"),
              ("grad_norm/", shares, "weighted gradient norm on the student")]
    if weights:
        panels.append(("weight/", train, "live term weight (balancing)"))
    for ax, (prefix, recs, title) in zip(axes, panels):
        for t in terms:
            xs, ys = _series(recs, prefix + t)
            pts = [(x, y) for x, y in zip(xs, ys) if y > 0]  # log scale: a zero-weight term has nothing to draw
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=t)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize="small")
        _iteration_axis(ax)
    fig.suptitle("which loss terms train the student")
    fig.savefig(out, dpi=100)
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every figure the run supports; returns their paths (see the module docstring)."""
    run_dir = Path(run_dir)
    train, val, final = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        written += [plot_losses(train, out / "losses.png"), plot_lr(train, out / "lr.png")]
    if val or final:
        written.append(plot_val(val, final, out / "val_miou.png"))
    for ej in sorted(run_dir.glob("eval_*.json")):
        written.append(plot_class_iou(run_dir, ej, out / f"iou_{ej.stem.removeprefix('eval_')}.png"))
    shares = read_grad_shares(run_dir)
    if shares:
        written.append(plot_grad_shares(shares, train, out / "grad_share.png"))
    return written
