"""Input sizes as the config writes them (``eval.window: 512`` or ``[512, 1024]``) -> ``(H, W)`` tuples."""
from __future__ import annotations

from typing import Any


def as_hw(v: Any) -> tuple[int, int] | None:
    """None -> None; an int -> a square; ``[H, W]`` -> ``(H, W)``."""
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))
