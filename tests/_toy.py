"""Tiny registered models for fast engine tests (a CNN 'teacher' and a patch 'student').

Also a plugin for subprocess tests: ``--set experiment.imports=[_toy]`` with ``tests/`` on PYTHONPATH
registers these models and the ``toy_sleep`` loss in the child process.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.nn import functional as F

from c2vkd.losses.base import LOSSES, DistillLoss, LossInputs
from c2vkd.models import MODELS
from c2vkd.models.base import SegmentationModel


class ToyCNN(SegmentationModel):
    family = "cnn"
    default_taps = {"feat": "layer2", "layer1": "layer1", "logits": "head"}

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__(num_classes, output_stride=4)
        self.layer1 = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.layer2(self.layer1(x))), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


class ToyViT(SegmentationModel):
    family = "vit"
    default_taps = {"feat": "stage", "logits": "head"}

    def __init__(self, num_classes: int, dim: int = 12, drop: float = 0.1) -> None:
        super().__init__(num_classes, output_stride=8)
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.mix = nn.Sequential(nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Dropout(drop))
        self.stage = nn.Identity()
        self.head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stage(self.patch(x) + self.mix(self.patch(x)))
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ToySleep(DistillLoss):
    """A zero term that sleeps ``$C2VKD_TOY_SLEEP`` seconds per call from call ``$C2VKD_TOY_SLEEP_FROM``
    (1-based, default 1) of this process on: makes a subprocess run pause at a known step, so that a test can
    signal it there, without changing its numbers (the config stays identical to the fast runs)."""

    requires_teacher = False

    def __init__(self, ctx, weight: float = 1.0) -> None:
        super().__init__(ctx, weight)
        self.calls = 0

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls >= int(os.environ.get("C2VKD_TOY_SLEEP_FROM", "1")):
            time.sleep(float(os.environ.get("C2VKD_TOY_SLEEP", "0")))
        return {"toy_sleep": inputs.student_logits.detach().sum() * 0}


for _name, _cls in (("toy_cnn", ToyCNN), ("toy_vit", ToyViT)):
    if _name not in MODELS:
        MODELS.add(_name, _cls)
if "toy_sleep" not in LOSSES:
    LOSSES.add("toy_sleep", ToySleep)


def write_compare_experiment(root, *, iters: int, val_interval: int):
    """A toy compare experiment under ``root`` (a 6/2/2-image folder dataset, a saved toy_cnn teacher, a
    toy_vit student); returns the experiment YAML's path. The teacher's weights are seeded (torch seed 1)."""
    from pathlib import Path

    from c2vkd.data.synthetic import write_folder
    from c2vkd.engine.weights import save_student
    from c2vkd.models import build_model

    root = Path(root)
    data = write_folder(root / "ds", {"train": 6, "val": 2, "test": 2}, size_hw=(32, 40))
    torch.manual_seed(1)
    save_student(root / "teacher.safetensors", build_model("toy_cnn", 3), "toy_cnn", 3, {}, ["a", "b", "c"])
    cfg = root / "exp.yaml"
    cfg.write_text(f"""
experiment: {{name: toy, output_dir: {root / 'runs'}}}
data: {{root: {data}, batch_size: 2, num_workers: 0,
        train_transform: {{crop_size: [32, 32], base_size: 40}}}}
student: {{name: toy_vit}}
teacher: {{name: toy_cnn, checkpoint: {root / 'teacher.safetensors'}}}
optim: {{lr: 0.01}}
schedule: {{iters: {iters}, warmup_iters: 0}}
train: {{progress: false, device: cpu, log_interval: 1, val_interval: {val_interval}}}
""")
    return cfg


def write_toy_data(folder):
    """A 3-class folder dataset of 32x40 frames (train 6, val 2, test 2) for engine tests."""
    from c2vkd.data.synthetic import write_folder

    return write_folder(folder, {"train": 6, "val": 2, "test": 2}, size_hw=(32, 40))


def write_toy_teacher(folder):
    """A seeded ToyCNN teacher saved as ``folder/teacher.safetensors`` (c2vkd's student format)."""
    from c2vkd.engine.weights import save_student

    torch.manual_seed(1)
    path = folder / "teacher.safetensors"
    save_student(path, ToyCNN(3), "toy_cnn", 3, {}, ["a", "b", "c"])
    return path
