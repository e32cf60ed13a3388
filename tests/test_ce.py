"""Supervised cross-entropy (`ce`): the pure function and the registered module against a plain-Python reference,
with non-default ignore value and class weights, so a dropped argument fails."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from _ref import softmax_list
from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses.ce import CELoss, ce_loss


def ref_ce(logits, target, *, ignore: int, weights: list[float] | None = None) -> float:
    """Weighted mean over valid pixels of -w_y log softmax(z)_y, divided by the summed weights (plain Python)."""
    B, K, H, W = logits.shape
    z, y = logits.double().tolist(), target.tolist()
    num = den = 0.0
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        t = y[b][i][j]
        if t == ignore:
            continue
        p = softmax_list([z[b][k][i][j] for k in range(K)])
        w = 1.0 if weights is None else weights[t]
        num += -w * math.log(p[t])
        den += w
    return num / den if den else 0.0


def _inputs(K=4, ignore=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, K, 3, 5, generator=g) * 3
    y = torch.randint(0, K, (2, 3, 5), generator=g)
    y[0, 0, :2] = ignore
    y[1, 2, 4] = ignore
    return logits, y


def test_pure_function_matches_reference():
    logits, y = _inputs(ignore=255)
    assert ce_loss(logits, y).item() == pytest.approx(ref_ce(logits, y, ignore=255), rel=1e-6)
    w = [0.5, 2.0, 1.0, 3.0]
    got = ce_loss(logits, y, class_weights=torch.tensor(w))
    assert got.item() == pytest.approx(ref_ce(logits, y, ignore=255, weights=w), rel=1e-6)
    # low precision logits are computed in float32
    assert ce_loss(logits.bfloat16(), y).dtype == torch.float32


def test_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    y = torch.full((1, 2, 2), 255)
    for w in (None, torch.ones(3)):
        loss = ce_loss(logits, y, class_weights=w)
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0, 3.0, 0.25]])
def test_module_uses_context_ignore_index_and_class_weights(weights):
    """ignore_index comes from the LossContext (here 4, a real class id otherwise), class weights from the args."""
    ign = 4
    logits, y = _inputs(K=5, ignore=ign, seed=2)
    assert LOSSES.get("ce") is CELoss
    m = LOSSES.get("ce")(LossContext(num_classes=5, ignore_index=ign), weight=0.7, class_weights=weights)
    assert m.weights == {"ce": 0.7}
    got = m(LossInputs(student_logits=logits, target=y))["ce"]
    ref = ref_ce(logits, y, ignore=ign, weights=weights)
    assert got.item() == pytest.approx(ref, rel=1e-6)
    # both settings matter: counting label 4 as a class, or dropping the weights, gives another value
    assert abs(ref_ce(logits, y, ignore=255, weights=weights) - ref) > 1e-3 * ref
    if weights is not None:
        assert abs(ref_ce(logits, y, ignore=ign) - ref) > 1e-3 * ref


def test_module_rejects_wrong_number_of_class_weights():
    with pytest.raises(ValueError, match="class_weights has 2 entries, but the dataset has 3 classes"):
        CELoss(LossContext(num_classes=3), class_weights=[1.0, 2.0])


def test_module_defaults_teacher_free_and_no_state():
    """Wiring a user relies on: `{name: ce}` weighs 1, needs no teacher (supervised training), integer class
    weights work, and the class weights are configuration, not checkpoint state."""
    from c2vkd.engine.loss_config import needs_teacher

    ctx = LossContext(num_classes=3, ignore_index=255)
    assert CELoss(ctx).weights == {"ce": 1.0}
    assert CELoss.requires_teacher is False and not needs_teacher([{"name": "ce", "weight": 1.0}])
    assert CELoss.taps({}) == ([], [])
    m = CELoss(ctx, class_weights=[1, 2, 3])  # ints, as YAML gives them
    assert m.class_weights.dtype == torch.float32 and m.state_dict() == {}
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 4, 5), generator=g)
    want = ref_ce(logits, target, ignore=255, weights=[1.0, 2.0, 3.0])
    got = m(LossInputs(student_logits=logits, target=target))["ce"]
    assert float(got) == pytest.approx(want, rel=1e-6)
