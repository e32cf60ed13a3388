"""Semantic-segmentation metrics from one accumulated confusion matrix.

Definitions (``C`` is the ``K x K`` confusion matrix, ``C[t, p]`` = number of *valid* pixels whose
label is ``t`` and prediction is ``p``; pixels whose label equals ``ignore_index`` never enter ``C``):

* ``TP_k = C[k, k]``, ``GT_k = sum_p C[k, p]`` (label pixels of class k),
  ``PRED_k = sum_t C[t, k]`` (predicted pixels of class k), ``N = sum C``.
* ``IoU_k = TP_k / (GT_k + PRED_k - TP_k)``.  A class with ``GT_k + PRED_k == 0`` (absent from both
  labels and predictions over the whole evaluation) is *excluded*: its IoU is ``nan`` and it is listed
  in ``SegMetrics.absent``.  A class that is predicted but never labelled (``GT_k == 0 < PRED_k``) is
  *included* with IoU 0 -- this matches mmsegmentation and torchmetrics' ``average="macro"``.
* ``mIoU = mean_k IoU_k`` over the included classes (``SegMetrics.present``).
* ``aAcc = sum_k TP_k / N`` (pixel accuracy).
* ``Acc_k = TP_k / GT_k`` for classes with ``GT_k > 0`` (``nan`` otherwise);
  ``mAcc = mean_k Acc_k`` over classes present in the labels (``SegMetrics.label_present``).
* ``fwIoU = sum_k (GT_k / N) * IoU_k`` over the included classes (frequency weighted IoU).

All ratios are reported as fractions in [0, 1] (``format_table`` prints percentages).  With no valid
pixel at all every summary is ``nan``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from c2vkd import IGNORE_INDEX

__all__ = ["ConfusionMatrix", "SegMetrics", "format_table"]


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


@dataclass
class SegMetrics:
    """Result of :meth:`ConfusionMatrix.compute`. See the module docstring for exact definitions.

    Attributes:
        num_classes: K.
        miou: mean IoU over ``present`` classes (fraction).
        iou: per-class IoU, ``nan`` for classes in ``absent``.
        acc: pixel accuracy (aAcc) over all valid pixels.
        macc: mean of ``class_acc`` over ``label_present`` classes.
        class_acc: per-class accuracy (recall) ``TP/GT``, ``nan`` where the class has no label pixel.
        fwiou: frequency-weighted IoU.
        present: classes in the labels OR the predictions (those averaged by ``miou``).
        absent: classes in neither (excluded from ``miou``).
        label_present: classes with at least one label pixel (those averaged by ``macc``).
        pixel_share: per-class fraction of valid label pixels ``GT_k / N``.
        num_pixels: number of valid (non-ignored) pixels ``N``.
        confusion: the ``[K, K]`` int64 CPU confusion matrix (rows = label, cols = prediction).
    """

    num_classes: int
    miou: float
    iou: list[float]
    acc: float
    macc: float
    class_acc: list[float]
    fwiou: float
    present: list[int]
    absent: list[int]
    label_present: list[int]
    pixel_share: list[float]
    num_pixels: int
    confusion: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``nan`` -> ``None``, confusion matrix as nested int lists)."""
        return {
            "num_classes": self.num_classes,
            "miou": _json_float(self.miou),
            "iou": [_json_float(v) for v in self.iou],
            "acc": _json_float(self.acc),
            "macc": _json_float(self.macc),
            "class_acc": [_json_float(v) for v in self.class_acc],
            "fwiou": _json_float(self.fwiou),
            "present": list(self.present),
            "absent": list(self.absent),
            "label_present": list(self.label_present),
            "pixel_share": [_json_float(v) for v in self.pixel_share],
            "num_pixels": int(self.num_pixels),
            "confusion": self.confusion.tolist(),
        }

    def format_table(self, class_names: Sequence[str] | None = None) -> str:
        """Same as the module-level :func:`format_table`."""
        return format_table(self, class_names)


class ConfusionMatrix:
    """Accumulates a ``[K, K]`` int64 confusion matrix (rows = label, cols = prediction).

    ``update`` runs on the inputs' device (one ``bincount`` of ``target * K + pred`` over the valid
    pixels) and adds the small ``K*K`` result into the stored matrix, so GPU label maps are never
    copied to the host.  The stored matrix lives on ``device`` (CPU when ``None``).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch. ``pred`` and ``target`` are integer tensors of identical shape (any rank).

        Pixels whose target equals ``ignore_index`` are skipped.  Raises ``ValueError`` if any other
        target value lies outside ``[0, K)`` or any counted prediction lies outside ``[0, K)``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer tensors (did you forget argmax?)")
        if pred.device != target.device:
            pred = pred.to(target.device)
        k = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long()
        valid = target != self.ignore_index
        t = target[valid]
        p = pred[valid]
        if t.numel() == 0:
            return
        bad_t = (t < 0) | (t >= k)
        if bool(bad_t.any()):
            bad = torch.unique(t[bad_t]).tolist()
            raise ValueError(
                f"target contains values {bad[:20]}{' ...' if len(bad) > 20 else ''} outside [0, {k}) "
                f"that are not ignore_index={self.ignore_index}; remap them in the dataset"
            )
        bad_p = (p < 0) | (p >= k)
        if bool(bad_p.any()):
            bad = torch.unique(p[bad_p]).tolist()
            raise ValueError(f"pred contains values {bad[:20]} outside [0, {k})")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.mat += counts.to(self.mat.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks when ``torch.distributed`` is initialised; no-op otherwise."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if dist.get_backend() == "nccl":
            buf = self.mat.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            buf = self.mat.cpu().clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.mat.copy_(buf.to(self.mat.device))

    def compute(self) -> SegMetrics:
        """Reduce the accumulated matrix into :class:`SegMetrics` (definitions in the module docstring)."""
        cm = self.mat.detach().cpu()
        c = cm.double()
        tp = torch.diag(c).tolist()
        gt = c.sum(1).tolist()
        pd = c.sum(0).tolist()
        k = self.num_classes
        union = [gt[i] + pd[i] - tp[i] for i in range(k)]
        n = float(sum(gt))
        nan = float("nan")
        present_mask = [u > 0 for u in union]
        label_mask = [g > 0 for g in gt]
        iou = [tp[i] / union[i] if present_mask[i] else nan for i in range(k)]
        class_acc = [tp[i] / gt[i] if label_mask[i] else nan for i in range(k)]
        share = [gt[i] / n if n > 0 else nan for i in range(k)]
        if n > 0:
            fwiou = float(sum(share[i] * iou[i] for i in range(k) if present_mask[i]))
            acc = float(sum(tp) / n)
        else:
            fwiou = acc = nan
        return SegMetrics(
            num_classes=self.num_classes,
            miou=_nanmean(iou),
            iou=iou,
            acc=acc,
            macc=_nanmean(class_acc),
            class_acc=class_acc,
            fwiou=fwiou,
            present=[i for i in range(k) if present_mask[i]],
            absent=[i for i in range(k) if not present_mask[i]],
            label_present=[i for i in range(k) if label_mask[i]],
            pixel_share=share,
            num_pixels=int(n),
            confusion=cm.clone(),
        )


def _pct(v: float) -> str:
    return "   n/a" if math.isnan(v) else f"{100.0 * v:6.2f}"


def format_table(metrics: SegMetrics, class_names: Sequence[str] | None = None) -> str:
    """Readable per-class table: class, IoU %, Acc %, share of valid label pixels %, then summary lines.

    Excluded classes (absent from labels and predictions) show ``n/a`` and are listed at the end.
    ``class_names`` defaults to the class indices.
    """
    k = metrics.num_classes
    if class_names is None:
        names = [str(i) for i in range(k)]
    else:
        if len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names for {k} classes")
        names = [str(n) for n in class_names]
    w = max([5, *(len(n) for n in names)])
    header = f"{'Class':<{w}} | {'IoU %':>6} | {'Acc %':>6} | {'Pixels %':>8}"
    lines = [header, "-" * len(header)]
    for i, name in enumerate(names):
        lines.append(
            f"{name:<{w}} | {_pct(metrics.iou[i])} | {_pct(metrics.class_acc[i])} | {_pct(metrics.pixel_share[i]):>8}"
        )
    lines.append("-" * len(header))
    lines.append(f"mIoU : {_pct(metrics.miou).strip()} (over {len(metrics.present)}/{k} classes)")
    lines.append(f"aAcc : {_pct(metrics.acc).strip()} ({metrics.num_pixels} valid pixels)")
    lines.append(f"mAcc : {_pct(metrics.macc).strip()} (over {len(metrics.label_present)} labelled classes)")
    lines.append(f"fwIoU: {_pct(metrics.fwiou).strip()}")
    if metrics.absent:
        lines.append("excluded (absent from labels and predictions): " + ", ".join(names[i] for i in metrics.absent))
    return "\n".join(lines)
