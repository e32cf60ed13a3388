"""Segmentation datasets, joint transforms, deterministic sampling and dataset checking.

Every format maps its own void value to ``c2vkd.IGNORE_INDEX`` (255) and yields
``{"image": float [3, H, W] normalised, "label": int64 [H, W], "name": str}`` samples.
Training keys are ``(index, sample_seed)`` from :class:`TrainSampler`, so augmentation is a pure function
of the sample seed (exact resume, DDP == single process). See ``sampler.py`` for the ordering contract.
"""
from __future__ import annotations

from pathlib import Path

from c2vkd.data.base import DatasetError, Problem, SegDataset, SplitIndex, SplitNotFoundError, seg_collate
from c2vkd.data.build import DEFAULT_DATA_CFG, build_dataset, build_transform, resolve_data_cfg
from c2vkd.data.check import DataReport, SplitReport, check_dataset, format_report
from c2vkd.data.formats import DATASETS, DatasetFormat
from c2vkd.data.sampler import (
    ShardedEvalSampler,
    TrainSampler,
    build_dataloader,
    epoch_permutation,
    pool_choice,
    sample_seed,
    view_seed,
)
from c2vkd.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    adjust_color,
    center_crop,
    crop,
    denormalize,
    hflip,
    normalize,
    pad_to,
    random_crop,
    random_hflip,
    random_jitter,
    random_rescale,
    rescale_long_side,
    resize_image,
    resize_label,
    to_float,
)


def sample_root() -> Path:
    """Folder of the bundled CamVid sample (folder layout: use with ``format: camvid`` or ``folder``)."""
    root = Path(__file__).resolve().parent.parent / "assets" / "camvid_sample"
    if not (root / "classes.json").is_file():
        raise DatasetError("bundled CamVid sample is missing from this installation", root)
    return root


__all__ = [
    "DATASETS",
    "DEFAULT_DATA_CFG",
    "DataReport",
    "DatasetError",
    "DatasetFormat",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Problem",
    "SegDataset",
    "ShardedEvalSampler",
    "SplitIndex",
    "SplitNotFoundError",
    "SplitReport",
    "TrainSampler",
    "TrainTransform",
    "adjust_color",
    "build_dataloader",
    "build_dataset",
    "build_transform",
    "center_crop",
    "check_dataset",
    "crop",
    "denormalize",
    "epoch_permutation",
    "format_report",
    "hflip",
    "normalize",
    "pad_to",
    "pool_choice",
    "random_crop",
    "random_hflip",
    "random_jitter",
    "random_rescale",
    "rescale_long_side",
    "resize_image",
    "resize_label",
    "resolve_data_cfg",
    "sample_root",
    "sample_seed",
    "seg_collate",
    "to_float",
    "view_seed",
]
