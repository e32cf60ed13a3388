"""``build_dataset``: the ``data:`` config section -> a ready :class:`SegDataset`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from c2vkd.data.base import DatasetError, SegDataset, SplitIndex
from c2vkd.data.formats import DATASETS
from c2vkd.data.sampler import check_augment_pool
from c2vkd.data.transforms import EvalTransform, TrainTransform
from c2vkd.config import DEFAULTS
from c2vkd.registry import suggest

# The one schema of the ``data:`` section (keys, defaults, comments) is config.DEFAULTS["data"]; this module only
# fills it in for callers that pass a bare ``data`` dict (predict, export, tests) and checks the values.
DEFAULT_DATA_CFG: dict[str, Any] = DEFAULTS["data"]


def _merge(cfg: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Defaults overlaid with ``cfg``; unknown keys are an error (a typo must not be silently ignored)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(cfg).__name__}")
    unknown = [k for k in cfg if k not in defaults]
    if unknown:
        k = unknown[0]
        raise ValueError(f"unknown key {where}.{k}.{suggest(k, list(defaults))} Allowed: {', '.join(defaults)}")
    out = copy.deepcopy(dict(defaults))
    for k, v in cfg.items():
        if isinstance(defaults[k], Mapping) and k != "splits":
            out[k] = _merge(v if v is not None else {}, defaults[k], f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


#: ``data.label_check``: the pre-flight label-value scan (data/preflight.py)
LABEL_CHECK_MODES = ("auto", "full", "off")


def resolve_data_cfg(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate keys of a ``data:`` section (returns a new dict)."""
    cfg = _merge(data_cfg, DEFAULT_DATA_CFG, "data")
    if cfg["splits"] is None:
        cfg["splits"] = {}
    if not isinstance(cfg["splits"], Mapping):
        raise ValueError(f"data.splits must map logical split names to on-disk names, got {cfg['splits']!r}")
    check_augment_pool(cfg["augment_pool"])
    if cfg["label_check"] not in LABEL_CHECK_MODES:
        raise ValueError(f"data.label_check must be one of {', '.join(LABEL_CHECK_MODES)}, "
                         f"got {cfg['label_check']!r}")
    ps = cfg["augment_pool_seed"]
    if ps is not None and (isinstance(ps, bool) or not isinstance(ps, int)):
        raise ValueError(f"data.augment_pool_seed must be an integer or null, got {ps!r}")
    return cfg


def resolve_split(cfg: Mapping[str, Any], split: str) -> str:
    """Logical split (train/val/test) -> on-disk name via ``data.splits``; unknown names pass through."""
    splits = cfg.get("splits") or {}
    if split in splits:
        name = splits[split]
        if not name:
            raise DatasetError(f"split {split!r} is disabled (data.splits.{split} is empty)")
        return str(name)
    return split


def build_transform(cfg: Mapping[str, Any], train: bool) -> TrainTransform | EvalTransform:
    """The transform a ``data:`` section asks for (``cfg`` already resolved)."""
    if train:
        t = cfg["train_transform"]
        return TrainTransform(
            crop_size=t["crop_size"], scale_range=t["scale_range"], base_size=t["base_size"],
            flip=t["flip"], jitter=t["jitter"], mean=cfg["mean"], std=cfg["std"],
        )
    t = cfg["eval_transform"]
    return EvalTransform(mode=t["mode"], size=t["size"], mean=cfg["mean"], std=cfg["std"])


def raise_problems(index: SplitIndex, limit: int = 10) -> None:
    """Raise one DatasetError listing an index's structural problems (``path`` = the first file)."""
    problems = index.problems
    if not problems:
        return
    first = problems[0]
    if len(problems) == 1:
        raise DatasetError(first.message, first.path)
    lines = [f"{len(problems)} problems in split {index.split!r} of {index.root}:"]
    lines += [f"  {p.path}: {p.message}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (run `c2vkd data check {index.root}` for all)")
    raise DatasetError("\n".join(lines), first.path, prefix_path=False)


def index_split(
    fmt_name: str, root: str | Path, split: str, ignore_index: int | None
) -> SplitIndex:
    """Run a registered format's indexer (no pixel is read)."""
    try:
        fmt = DATASETS.get(fmt_name)
    except KeyError as e:
        raise DatasetError(str(e.args[0])) from None
    if ignore_index is not None and fmt.fixed_mapping:
        raise DatasetError(
            f"format {fmt_name!r} maps raw label ids with a fixed table; data.ignore_index must be null "
            f"(got {ignore_index})"
        )
    return fmt.index(Path(root).expanduser(), split, ignore_index)


def build_dataset(data_cfg: Mapping[str, Any], split: str, train: bool) -> SegDataset:
    """Build the dataset for a logical ``split`` (train/val/test, resolved through ``data.splits``).

    Construction checks the cheap things: root, classes.json, split exists and is not empty, every
    image has a label and every listed name has its files, class count vs ``data.num_classes``. Pixels
    (decodability, sizes, label values) are checked as each sample is loaded.
    """
    cfg = resolve_data_cfg(data_cfg)
    if not cfg["root"]:
        raise DatasetError("data.root is not set")
    disk_split = resolve_split(cfg, split)
    index = index_split(cfg["format"], cfg["root"], disk_split, cfg["ignore_index"])
    raise_problems(index)
    want = cfg["num_classes"]
    if want is not None and int(want) != len(index.classes):
        raise DatasetError(
            f"data.num_classes is {want} but the {cfg['format']} dataset at {cfg['root']} has "
            f"{len(index.classes)} classes ({', '.join(index.classes[:5])}{', ...' if len(index.classes) > 5 else ''})",
            index.root,
        )
    return SegDataset(
        index.samples,
        classes=index.classes,
        lut=index.lut,
        transform=build_transform(cfg, train),
        palette=index.palette,
        names=index.names,
        root=index.root,
        split=index.split,
        train=train,
    )
