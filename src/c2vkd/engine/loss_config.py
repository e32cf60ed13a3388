"""What the configured losses ask of a run, answered once from the loss registry.

* :func:`validate_loss_args`: every ``losses`` entry names a registered loss and passes only arguments its
  constructor accepts (config.py checks structure only, so the config layer never imports the losses);
  called by the CLI, ``compare`` and the Trainer.
* :func:`teacher_losses` / :func:`needs_teacher`: "does this config need a teacher?" for cli, compare, the
  Trainer, the Distiller, the teacher weights check (engine/weights.py) and the exported model card.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from c2vkd.config import ConfigError
from c2vkd.losses import LOSSES
from c2vkd.registry import suggest


def _entries(cfg_or_losses: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return cfg_or_losses["losses"] if isinstance(cfg_or_losses, dict) else cfg_or_losses


_TAG = re.compile(r"[A-Za-z0-9]{1,16}")


def validate_loss_args(cfg_or_losses: dict[str, Any] | list[dict[str, Any]], source: str = "config") -> None:
    """Raise :class:`ConfigError` naming ``source`` for an unknown loss or an argument its constructor lacks.

    Takes a whole config or its ``losses`` list; plugin losses must be imported first (``load_config`` imports
    ``experiment.imports``)."""
    entries = _entries(cfg_or_losses)
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: losses must be a list of {{name: ..., weight: ...}} entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{source}: losses[{i}] must be a mapping with a 'name' key, got {entry!r}")
        name = entry["name"]
        try:
            cls = LOSSES.get(name)
        except KeyError as e:
            raise ConfigError(f"{source}: losses[{i}]: {e.args[0]}") from None
        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p not in ("self", "ctx")]
        if "tag" in entry:
            tag = entry["tag"]
            if not isinstance(tag, str) or not _TAG.fullmatch(tag):
                raise ConfigError(f"{source}: losses[{i}] ({name}): tag must be a short name of letters and digits "
                                  f"(it is appended to the loss's term names: {name}_TAG), got {tag!r}")
        for key in entry:
            if key not in ("name", "tag") and key not in accepted:
                raise ConfigError(f"{source}: losses[{i}] ({name}): unknown argument {key!r}."
                                  f"{suggest(key, accepted)} Accepted: {', '.join(accepted)}")


def loss_args(entry: dict[str, Any]) -> dict[str, Any]:
    """A ``losses`` entry's constructor arguments: everything but ``name`` and ``tag``."""
    return {k: v for k, v in entry.items() if k not in ("name", "tag")}


def term_suffix(entry: dict[str, Any]) -> str:
    """What a ``losses`` entry's ``tag`` appends to each of its term names (``vlfd_global`` -> ``vlfd_global_s3``):
    the same loss twice in one run (e.g. VLFD on two stages) gets distinct terms for logging, weights and balancing."""
    return f"_{entry['tag']}" if entry.get("tag") else ""


def loss_label(entry: dict[str, Any]) -> str:
    """The name a ``losses`` entry goes by in gradient reports (``vlfd``, or ``vlfd_s3`` with ``tag: s3``)."""
    return f"{entry['name']}{term_suffix(entry)}"


def teacher_losses(cfg_or_losses: dict[str, Any] | list[dict[str, Any]]) -> list[str]:
    """Names of the configured losses that read a teacher (in config order)."""
    return [e["name"] for e in _entries(cfg_or_losses) if LOSSES.get(e["name"]).requires_teacher]


def needs_teacher(cfg_or_losses: dict[str, Any] | list[dict[str, Any]]) -> bool:
    """True when at least one configured loss reads the teacher (distillation), False for supervised runs."""
    return bool(teacher_losses(cfg_or_losses))
