"""Image sizes, the one place they are read: the config's ``eval.window: 512`` or ``[512, 1024]``, a function
argument ``input_hw=512`` / ``(512, 1024)``, or a command line's ``--input 512x1024`` -> ``(H, W)`` tuples."""
from __future__ import annotations

from typing import Any


def as_hw(v: Any) -> tuple[int, int] | None:
    """None -> None; an int -> a square; ``[H, W]`` -> ``(H, W)`` (no validation: sizes the config checked)."""
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def checked_hw(v: Any, what: str = "size") -> tuple[int, int]:
    """Like :func:`as_hw` for a required size, validated: an int or two ints, all positive, else a ValueError
    naming ``what``."""
    bad = ValueError(f"{what} must be a positive int or [H, W], got {v!r}")
    if isinstance(v, bool):
        raise bad
    if isinstance(v, int):
        v = (v, v)
    try:
        h, w = (int(x) for x in v)
    except (TypeError, ValueError):
        raise bad from None
    if h <= 0 or w <= 0:
        raise bad
    return h, w


def parse_hw(text: str) -> tuple[int, int]:
    """``"512x1024"`` (a command line's ``--input``) -> ``(512, 1024)``; a ValueError otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size must look like 512x512, got {text!r}") from None
    return h, w
