import pytest

from c2vkd.engine.schedule import lr_factor


def test_warmup_then_poly_golden() -> None:
    kw = dict(iters=100, warmup_iters=10, warmup_ratio=0.1, power=1.0, base_lr=1.0)
    assert abs(lr_factor(0, **kw) - 0.1) < 1e-12
    # step 5: warm-up factor 0.1 + 0.9*0.5 = 0.55, poly (1 - 0.05) = 0.95
    assert abs(lr_factor(5, **kw) - 0.55 * 0.95) < 1e-12
    assert abs(lr_factor(10, **kw) - 0.9) < 1e-12
    assert abs(lr_factor(100, **kw)) < 1e-12
    assert abs(lr_factor(150, **kw)) < 1e-12  # clamped past the end


def test_min_lr_and_power() -> None:
    f = lr_factor(50, iters=100, power=2.0, base_lr=2.0, min_lr=0.2)
    assert abs(f * 2.0 - ((2.0 - 0.2) * 0.25 + 0.2)) < 1e-12
    vals = [lr_factor(s, iters=100, warmup_iters=0, power=0.9, base_lr=1.0) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_boundaries_one_warmup_step_and_zero_lr():
    """Mutation survivors: a one-step warm-up still scales step 0, and a zero base lr gives 0 (no division)."""
    assert lr_factor(0, iters=10, warmup_iters=1, warmup_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(1, iters=10, warmup_iters=1, warmup_ratio=0.1) == pytest.approx(0.9)
    assert lr_factor(5, iters=10, base_lr=0.0) == 0.0
