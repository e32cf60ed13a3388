"""Loading local weights into zoo models: strict by default, explicit about every key, never unpickling.

Flow of :func:`load_checkpoint_weights`:

1. read a state dict (:func:`read_state_dict`): ``.safetensors``, or ``.pt/.pth/.bin`` through
   ``torch.load(weights_only=True)`` (c2vkd.utils.io.safe_load, checksum-verified when a sidecar exists),
   or an HF ``save_pretrained`` directory (single or sharded). Training checkpoints are unwrapped
   (``state_dict`` / ``model`` / ``model_state_dict`` / ``module`` / ``student`` / ``ema``) and DDP /
   torch.compile prefixes (``module.``, ``_orig_mod.``) are stripped (:func:`unwrap_state_dict`; the CLIP
   pool loader in ``clip_pool.py`` reads and unwraps its files with the same two functions);
2. let the model remap keys for the formats it understands (``model.adapt_state_dict``: e.g. an ImageNet
   ResNet, an mmsegmentation or CIRKD checkpoint (models.convert) for a teacher, HF 4.x / NVlabs names for
   SegFormer). The adapter also says which model keys the checkpoint is meant to cover (``scope``), which
   checkpoint keys it discards on purpose and what to do when the file does not fit (``hint``, appended to
   the error);
3. compare against ``model.state_dict()``: missing (in scope, not provided), unexpected (provided, not in
   the model) and shape-mismatched keys. Any of them raises :class:`WeightLoadError` listing them, unless
   ``allow_partial=True``, in which case only matching tensors are copied and the report says what was
   skipped. A load that matches nothing always fails (wrong file or wrong architecture).

BatchNorm ``num_batches_tracked`` buffers are never reported missing: older torchvision files lack them and
they do not affect outputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from c2vkd.utils.io import CheckpointError, safe_load

#: wrapper keys of training checkpoints, tried in this order
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "student", "ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 12  # keys listed per category in error messages


class WeightLoadError(CheckpointError):
    """A weight file does not fit the model; the message lists missing / unexpected / mismatched keys."""


@dataclass
class LoadReport:
    """What a weight load did. ``complete`` is True when nothing in scope was skipped."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # discarded on purpose by the format adapter
    not_in_scope: list[str] = field(default_factory=list)  # model keys left at init (e.g. a random decoder)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source} [{self.format}]"]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} by design ({_short(self.dropped)})")
        if self.not_in_scope:
            parts.append(f"{len(self.not_in_scope)} model tensors not covered by this checkpoint keep their init")
        if not self.complete:
            parts.append(self.describe_problems())
        return "; ".join(parts)

    def describe_problems(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected)}): {_short(self.unexpected)}")
        if self.mismatched:
            shown = ", ".join(f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:_SHOW])
            more = f" ... (+{len(self.mismatched) - _SHOW} more)" if len(self.mismatched) > _SHOW else ""
            lines.append(f"shape mismatch ({len(self.mismatched)}): {shown}{more}")
        return "\n  ".join(lines)


def _short(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def read_weights_file(path: str | Path) -> Any:
    """The object stored in one weight file, read safely (:func:`c2vkd.utils.io.safe_load`: safetensors, or
    ``torch.load(weights_only=True)``, checksum-verified when a sidecar exists). Raises WeightLoadError."""
    try:
        return safe_load(path, map_location="cpu")
    except CheckpointError as e:
        raise WeightLoadError(str(e)) from e


def _read_directory(path: Path) -> dict[str, torch.Tensor]:
    """HF ``save_pretrained`` layout: model.safetensors, pytorch_model.bin, or their sharded indexes."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_weights_file(path / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(read_weights_file(path / shard))
            return merged
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "(empty)"
    raise WeightLoadError(f"{path} is a directory without model.safetensors / pytorch_model.bin "
                          f"(or a sharded index); it holds: {found}")


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a file, a directory, or an in-memory (possibly wrapped) dict."""
    if isinstance(source, Mapping):
        obj: Any = source
        where = "<state dict>"
    else:
        path = Path(source).expanduser()
        where = str(path)
        if not path.exists():
            raise WeightLoadError(f"weights not found: {path} (only local files are supported; nothing is "
                                  "downloaded)")
        obj = _read_directory(path) if path.is_dir() else read_weights_file(path)
    return unwrap_state_dict(obj, where)


def unwrap_state_dict(obj: Any, where: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a (possibly wrapped) checkpoint object: containers of training
    checkpoints (``{"model": {...}, "epoch": 3}``, see ``_CONTAINER_KEYS``) are unwrapped, non-tensor entries
    dropped, and a DDP / torch.compile prefix stripped when every key carries it. ``where`` names the source in
    the WeightLoadError raised when no tensors are found."""
    # unwrap training checkpoints {"model": {...}, "epoch": 3, ...}
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise WeightLoadError(f"{where}: no tensors found; top-level keys: {sorted(map(str, obj))[:20]}")
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{where}: expected a state dict, got {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _STRIP_PREFIXES:  # DDP / torch.compile wrappers, only when every key carries them
        while sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _unwrap(model: nn.Module) -> nn.Module:
    from c2vkd.models.taps import unwrap_model

    return unwrap_model(model)


def load_checkpoint_weights(model: nn.Module, source: str | Path | Mapping[str, Any], *,
                            allow_partial: bool = False) -> LoadReport:
    """Load local weights into ``model`` (see the module doc). Returns a :class:`LoadReport`.

    Raises WeightLoadError on any missing / unexpected / shape-mismatched key unless ``allow_partial``,
    and always when no tensor matches.
    """
    target = _unwrap(model)
    raw = read_state_dict(source)
    src = "<state dict>" if isinstance(source, Mapping) else str(source)
    adapt = getattr(target, "adapt_state_dict", None)
    hint = ""
    if callable(adapt):
        adapted = adapt(raw)
        sd, fmt, scope, dropped = adapted.state_dict, adapted.format, adapted.scope, adapted.dropped
        hint = f"\n  {adapted.hint}" if adapted.hint else ""
    else:
        sd, fmt, scope, dropped = raw, "state dict", None, []
    own = target.state_dict()
    scope = set(own) if scope is None else set(scope)
    report = LoadReport(source=src, format=fmt, dropped=list(dropped))
    report.not_in_scope = sorted(k for k in own if k not in scope)
    report.missing = [k for k in own if k in scope and k not in sd and not k.endswith("num_batches_tracked")]
    report.unexpected = [k for k in sd if k not in own]
    to_load: dict[str, torch.Tensor] = {}
    for k, ref in own.items():  # model order: the first mismatches listed are the earliest layers
        if k not in sd:
            continue
        if tuple(sd[k].shape) != tuple(ref.shape):
            report.mismatched.append((k, tuple(sd[k].shape), tuple(ref.shape)))
        else:
            to_load[k] = sd[k]
    report.loaded = sorted(to_load)
    arch = getattr(target, "arch", type(target).__name__)
    if not to_load:
        raise WeightLoadError(f"{src}: no tensor matches {arch} [{fmt}] (a checkpoint of another architecture?)"
                              f"\n  {report.describe_problems()}{hint}")
    if not report.complete and not allow_partial:
        raise WeightLoadError(f"{src} does not fit {arch} [{fmt}]; pass allow_partial=True to load only the "
                              f"matching tensors.\n  {report.describe_problems()}{hint}")
    target.load_state_dict(to_load, strict=False)
    return report
