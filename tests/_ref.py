"""Plain-Python references shared by the loss tests: no torch, so they are independent of the code under test."""
from __future__ import annotations

import math


def softmax_list(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(a - m) for a in v]
    s = sum(e)
    return [a / s for a in e]


def kl_list(p: list[float], q: list[float]) -> float:
    """KL(p || q) with 0 log 0 = 0."""
    return sum(a * (math.log(a) - math.log(c)) for a, c in zip(p, q) if a > 0)
