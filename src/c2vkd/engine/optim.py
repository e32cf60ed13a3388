"""Optimizer and learning-rate schedule of a run: parameter groups, AdamW / SGD, warm-up + poly decay.

Parameter groups (:func:`param_groups`), in this order (the order is part of the optimizer state a
checkpoint stores, so it must not change between a run and its resume):

1. ``base``: every trainable parameter of the Distiller that is not in a head group, at ``optim.lr``;
2. ``heads`` (only when non-empty): the student's decode head (``decode_head_parameters()`` when the model
   defines it), at ``optim.lr * optim.head_lr_mult``;
3. ``align`` (only when non-empty): the losses' alignment heads (VLFD's visual / linguistic heads, feature
   adapters), at ``optim.lr * optim.align_lr_mult`` (null: ``head_lr_mult``) and with AdamW eps
   ``optim.align_eps`` (null: the optimizer's default 1e-8). They have their own group because a head fed
   1e-9 gradients (VLFD with the released reductions, see ``c2vkd report``) is frozen by eps 1e-8. With both
   null the group trains exactly like the ``heads`` group did before it existed (same lr, same eps).

Each group dict carries a ``name`` key for logs and for code that adds groups; the schedule scales every
group's own initial lr by the same factor (:func:`c2vkd.engine.schedule.lr_factor`).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from c2vkd.engine.schedule import lr_factor

log = logging.getLogger("c2vkd")


def param_groups(model: nn.Module, *, head_params: Iterable[nn.Parameter], lr: float,
                 head_lr_mult: float) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters (in ``model.parameters()`` order) into the base group and the
    head group (``head_params``: decode head + alignment heads), see the module docstring."""
    head_ids = {id(p) for p in head_params}
    base, heads = [], []
    for p in model.parameters():
        if p.requires_grad:
            (heads if id(p) in head_ids else base).append(p)
    groups = [{"name": "base", "params": base, "lr": lr}]
    if heads:
        groups.append({"name": "heads", "params": heads, "lr": lr * head_lr_mult})
    return groups


def distiller_param_groups(distiller: nn.Module, student: nn.Module, optim_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The groups of a training run (see the module docstring): base, the student's decode head (if the
    student names it with ``decode_head_parameters()``) and the Distiller's alignment heads."""
    o = optim_cfg
    align = list(distiller.head_parameters())  # type: ignore[operator]
    align_ids = {id(p) for p in align}
    decode = getattr(student, "decode_head_parameters", None)
    heads = [p for p in decode() if id(p) not in align_ids] if callable(decode) else []
    groups = param_groups(distiller, head_params=heads + align, lr=o["lr"], head_lr_mult=o["head_lr_mult"])
    if align:
        head_group = groups[-1]
        head_group["params"] = [p for p in head_group["params"] if id(p) not in align_ids]
        mult = o["head_lr_mult"] if o.get("align_lr_mult") is None else o["align_lr_mult"]
        align_group: dict[str, Any] = {"name": "align", "params": [p for p in distiller.parameters()
                                                                   if id(p) in align_ids], "lr": o["lr"] * mult}
        if o.get("align_eps") is not None:
            if o["name"] != "adamw":
                raise ValueError(f"optim.align_eps is an AdamW setting, but optim.name is {o['name']!r}")
            align_group["eps"] = float(o["align_eps"])
        if not head_group["params"]:
            groups.pop()
        groups.append(align_group)
    return groups


def group_eps(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    """The eps of the named parameter group (AdamW: the group's own or the optimizer's default), None for
    optimizers without one or a missing group."""
    for g in optimizer.param_groups:
        if g.get("name") == name:
            return float(g["eps"]) if "eps" in g else None
    return None


OPTIM_IMPLS = ("auto", "fused", "foreach")


def build_optimizer(groups: list[dict[str, Any]], optim_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """``optim.name``: ``adamw`` (betas, weight_decay) or ``sgd`` (momentum, weight_decay); ``optim.impl``:
    the kernel (``auto``: fused when torch supports it for every parameter's device and dtype, else foreach;
    the choice is logged)."""
    o = optim_cfg
    impl = o.get("impl", "auto")
    if impl not in OPTIM_IMPLS:
        raise ValueError(f"optim.impl must be one of {', '.join(OPTIM_IMPLS)}, got {impl!r}")
    if o["name"] == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    elif o["name"] == "sgd":
        cls, kw = torch.optim.SGD, dict(lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    else:
        raise ValueError(f"optim.name must be adamw or sgd, got {o['name']!r}")
    if impl == "foreach":
        return cls(groups, **kw)
    try:
        opt = cls(groups, fused=True, **kw)
    except RuntimeError as e:  # torch: "`fused=True` requires all the params to be floating point Tensors of
        if impl == "fused":    # supported devices: [...]"
            raise ValueError(f"optim.impl=fused: torch has no fused {o['name']} for these parameters ({e}); "
                             f"use optim.impl=auto or foreach") from e
        log.info("optim.impl=auto: no fused %s kernel for these parameters (%s); using foreach", o["name"], e)
        return cls(groups, **kw)
    log.info("optimizer: %s, fused kernel", o["name"])
    return opt


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: dict[str, Any], base_lr: float,
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + poly decay over ``schedule.iters`` optimizer steps (one ``step()`` per iteration)."""
    sch = schedule_cfg
    total = int(sch["iters"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, iters=total, warmup_iters=sch["warmup_iters"],
                                       warmup_ratio=sch["warmup_ratio"], power=sch["power"],
                                       base_lr=base_lr, min_lr=sch["min_lr"]))
