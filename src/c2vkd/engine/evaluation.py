"""Evaluation wiring: a model (the training student, or a saved export / training / foreign checkpoint) on a
dataset split with the config's eval settings (parameters and latency: :mod:`c2vkd.models.report`).

Shared by training-time validation and the final evaluation (Trainer), `c2vkd eval`, `c2vkd compare` (the
teacher row) and the demo, so they all measure identically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from c2vkd.data import build_dataloader, build_dataset
from c2vkd.engine.weights import build_for_eval
from c2vkd.eval.inference import evaluate
from c2vkd.eval.metrics import SegMetrics
from c2vkd.utils.device import pick_device
from c2vkd.utils.sizes import as_hw


def evaluate_split(model: nn.Module, cfg: dict[str, Any], split: str, *, device: torch.device, rank: int = 0,
                   world: int = 1, progress: bool = False, max_batches: int | None = None,
                   ) -> tuple[SegMetrics, list[str]]:
    """``model`` on ``split`` with the config's eval settings (``eval.mode`` / window / stride / scales / flip,
    ``train.amp``), the split sharded over ``world`` processes (confusion matrices summed); returns
    (metrics, class names). The one evaluation wiring of training-time validation, `c2vkd eval`, compare
    and the demo."""
    d, e = cfg["data"], cfg["eval"]
    dataset = build_dataset(d, split, train=False)
    loader = build_dataloader(dataset, batch_size=d["eval_batch_size"], train=False, num_workers=d["num_workers"],
                              rank=rank, world_size=world)
    m = evaluate(model, loader, num_classes=dataset.num_classes, device=device, mode=e["mode"],
                 window=as_hw(e["window"]), stride=as_hw(e["stride"]), scales=e["scales"], flip=e["flip"],
                 amp=cfg["train"]["amp"], progress=progress, max_batches=max_batches)
    return m, list(dataset.classes)


def evaluate_model(model: nn.Module, cfg: dict[str, Any], split: str, *, device: torch.device | None = None,
                   progress: bool | None = None) -> tuple[SegMetrics, list[str]]:
    """Evaluate `model` (left in eval mode) on `split` with the config's eval settings; returns (metrics,
    class names)."""
    device = device or next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        return evaluate_split(model, cfg, split, device=device,
                              progress=cfg["train"]["progress"] if progress is None else progress)


def evaluate_checkpoint(path: str | Path, cfg: dict[str, Any], split: str, *,
                        progress: bool | None = None) -> tuple[SegMetrics, list[str], str, nn.Module]:
    """Load a checkpoint (architecture from its metadata, else the config's student) and evaluate it.

    Returns (metrics, class names, model name, model)."""
    dataset = build_dataset(cfg["data"], split, train=False)
    device = pick_device(cfg["train"]["device"])
    model, name = build_for_eval(path, cfg, dataset.num_classes, device)
    m, classes = evaluate_model(model, cfg, split, device=device, progress=progress)
    return m, classes, name, model

