"""How much each loss term really trains the student: per-term gradient norms inside the training step.

Used by ``balance`` (engine/balance.py), ``train.grad_share_interval`` and ``c2vkd report``. Definitions:

* ``grad_norm[i] = || d (w_i * raw_i) / d theta ||_2`` over the student's parameters ``theta`` (alignment
  heads excluded: they are not part of the deployed model), measured with one extra backward per term;
* ``grad_share[i] = grad_norm[i] / sum_j grad_norm[j]`` over the terms with non-zero weight (sums to 1);
* the same split over the student's backbone and its decode head, and the RMS of the *total* gradient that
  reaches each alignment head (compare it with the optimizer's eps: an AdamW head whose gradient RMS is far
  below eps does not move).

:class:`GradientProbe` is what the Trainer holds: it decides at which steps to measure, measures on the first
micro-batch of such a step (before the training backward, through the graph the Distiller kept), averages the
numbers over DDP ranks (so every rank holds the same), feeds the balancer, and keeps the records that
``c2vkd report`` and the run log read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from c2vkd.engine.balance import TermBalancer
from c2vkd.utils import dist

PARTS = ("student", "backbone", "decode_head")


@dataclass
class StudentParts:
    """The parameters whose gradients are measured: the student split into backbone / decode head, and the
    trainable alignment heads of every loss module (``"vlfd.visual_head"``, ...)."""

    backbone: list[nn.Parameter]
    decode_head: list[nn.Parameter]
    heads: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    @property
    def student(self) -> list[nn.Parameter]:
        return self.backbone + self.decode_head

    def all(self) -> list[nn.Parameter]:
        return self.student + [p for ps in self.heads.values() for p in ps]


_ENCODER_NAMES = ("backbone", "encoder", "segformer")


def _decode_head_ids(student: nn.Module) -> set[int]:
    """ids of the decode-head parameters: what ``decode_head_parameters()`` names when the model defines it,
    else every parameter outside its encoder child (``backbone`` / ``encoder`` / ``segformer``); a model with
    neither counts as all backbone."""
    decode_fn = getattr(student, "decode_head_parameters", None)
    if callable(decode_fn):
        return {id(p) for p in decode_fn()}
    for name in _ENCODER_NAMES:
        enc = getattr(student, name, None)
        if isinstance(enc, nn.Module):
            enc_ids = {id(p) for p in enc.parameters()}
            return {id(p) for p in student.parameters() if id(p) not in enc_ids}
    return set()


def student_parts(student: nn.Module, loss_modules: Iterable[tuple[str, nn.Module]]) -> StudentParts:
    """Split the trainable parameters into backbone and decode head (see :func:`_decode_head_ids`). Alignment
    heads are named ``<loss>.<child>`` per trainable child module of each loss (``vlfd.visual_head``)."""
    decode_ids = _decode_head_ids(student)
    backbone, decode = [], []
    for p in student.parameters():
        if p.requires_grad:
            (decode if id(p) in decode_ids else backbone).append(p)
    heads: dict[str, list[nn.Parameter]] = {}
    for loss_name, module in loss_modules:
        for child_name, child in module.named_children():
            ps = [p for p in child.parameters() if p.requires_grad]
            if ps:
                heads[f"{loss_name}.{child_name}"] = ps
        direct = [p for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if direct:
            heads[loss_name] = direct
    return StudentParts(backbone, decode, heads)


def _norm(grads: list[torch.Tensor | None]) -> float:
    gs = [g for g in grads if g is not None]
    if not gs:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in gs])))


@dataclass
class TermGradients:
    """One measurement: per term, the L2 norm of the *raw* term's gradient (multiply by |weight| for the
    weighted term), split by part; and the RMS of the weighted total gradient on each alignment head."""

    raw_norm: dict[str, dict[str, float]]    # term -> {"student", "backbone", "decode_head"}
    head_rms: dict[str, float]               # head name -> RMS of sum_i w_i d raw_i / d head


def measure_term_gradients(raw_terms: dict[str, torch.Tensor], weights: dict[str, float], parts: StudentParts,
                           *, scale: float = 1.0) -> TermGradients:
    """Gradient norms of each raw term (graph-attached scalars) with respect to the student's parameters, by
    one ``torch.autograd.grad`` per term (the graph is retained for the training backward that follows; no
    ``.grad`` is touched, so DDP's reducer and the optimizer see nothing of it).

    ``scale`` multiplies each term before differentiation and is divided out of the norms (pass the fp16
    GradScaler's scale so that what is measured is what the scaled training backward sees)."""
    params = parts.all()
    n_b, n_d = len(parts.backbone), len(parts.decode_head)
    raw_norm: dict[str, dict[str, float]] = {}
    head_sum: dict[str, list[torch.Tensor | None]] = {h: [None] * len(ps) for h, ps in parts.heads.items()}
    for term, value in raw_terms.items():
        if not value.requires_grad:
            raw_norm[term] = {"student": 0.0, "backbone": 0.0, "decode_head": 0.0}
            continue
        grads = torch.autograd.grad(value * scale, params, retain_graph=True, allow_unused=True)
        b = _norm(list(grads[:n_b])) / scale
        d = _norm(list(grads[n_b:n_b + n_d])) / scale
        raw_norm[term] = {"student": math.hypot(b, d), "backbone": b, "decode_head": d}
        w = float(weights.get(term, 0.0))
        if w == 0.0:
            continue
        k = n_b + n_d
        for h, ps in parts.heads.items():
            acc = head_sum[h]
            for i in range(len(ps)):
                g = grads[k + i]
                if g is not None:
                    g = g.detach().float() * (w / scale)
                    acc[i] = g if acc[i] is None else acc[i] + g
            k += len(ps)
    head_rms = {}
    for h, acc in head_sum.items():
        numel = sum(p.numel() for p in parts.heads[h])
        sq = sum(float(g.pow(2).sum()) for g in acc if g is not None)
        head_rms[h] = math.sqrt(sq / max(numel, 1))
    return TermGradients(raw_norm, head_rms)


def shares(raw_norm: dict[str, dict[str, float]], weights: dict[str, float], part: str = "student",
           ) -> tuple[dict[str, float], dict[str, float]]:
    """(weighted grad norm, share of the sum over non-zero-weight terms) per term, for one part."""
    weighted = {t: abs(float(weights.get(t, 0.0))) * n[part] for t, n in raw_norm.items()}
    total = sum(v for t, v in weighted.items() if weights.get(t, 0.0) != 0.0)
    share = {t: (v / total if total > 0 and weights.get(t, 0.0) != 0.0 else 0.0) for t, v in weighted.items()}
    return weighted, share




class GradientProbe:
    """Per-term gradient measurement of one training run, and its balancer (``balance.mode != off``)."""

    def __init__(self, student: nn.Module, loss_modules: Iterable[tuple[str, nn.Module]], *, term_weights: dict[str, float],
                 balance_cfg: dict[str, Any], share_interval: int, world: int = 1,
                 device: torch.device | None = None) -> None:
        self.parts = student_parts(student, loss_modules)
        self.balancer = TermBalancer(balance_cfg, term_weights) if balance_cfg["mode"] != "off" else None
        self.share_interval = int(share_interval)
        self.world, self.device = world, device
        self.measurements: list[dict[str, Any]] = []   # one record per measured step (read by `c2vkd report`)
        self.share_record: dict[str, Any] | None = None  # for the run log, at grad_share_interval steps

    def due(self, step: int) -> bool:
        """Measure at 0-based training step ``step``?"""
        if self.balancer is not None and self.balancer.due(step):
            return True
        return self.share_interval > 0 and (step + 1) % self.share_interval == 0

    def measure(self, step: int, raw_terms: dict[str, torch.Tensor], logged: dict[str, torch.Tensor],
                weights: dict[str, float], *, scale: float = 1.0) -> dict[str, float] | None:
        """Measure the graph-attached ``raw_terms`` of 0-based step ``step``; returns the balancer's new weights
        (None when not balancing at this step)."""
        tg = measure_term_gradients(raw_terms, weights, self.parts, scale=scale)
        raw_norm = {t: tg.raw_norm.get(t, dict.fromkeys(PARTS, 0.0)) for t in weights}
        head_rms = dict(tg.head_rms)
        if self.world > 1:
            flat = [raw_norm[t][p] for t in weights for p in PARTS] + list(head_rms.values())
            vec = torch.tensor(flat, dtype=torch.float64, device=self.device)
            dist.all_reduce_(vec, "sum")
            vals = (vec / self.world).tolist()
            raw_norm = {t: {p: vals[i * len(PARTS) + j] for j, p in enumerate(PARTS)} for i, t in enumerate(weights)}
            head_rms = dict(zip(head_rms, vals[len(weights) * len(PARTS):]))
        self.measurements.append({"iter": step + 1, "weights": dict(weights), "raw_norm": raw_norm,
                                  "head_rms": head_rms, "raw": {t: float(logged[t]) for t in weights}})
        if self.share_interval > 0 and (step + 1) % self.share_interval == 0:
            weighted, share = shares(raw_norm, weights)
            rec: dict[str, Any] = {"iter": step + 1}
            rec.update({f"grad_share/{t}": v for t, v in share.items()})
            rec.update({f"grad_norm/{t}": v for t, v in weighted.items()})
            rec.update({f"head_grad_rms/{h}": v for h, v in head_rms.items()})
            self.share_record = rec
        if self.balancer is not None and self.balancer.due(step):
            return dict(self.balancer.observe({t: n["student"] for t, n in raw_norm.items()}, step=step))
        return None

    def pop_share_record(self) -> dict[str, Any] | None:
        rec, self.share_record = self.share_record, None
        return rec
