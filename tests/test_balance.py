"""engine/balance.py: per-term gradient norms (against an independent .backward() computation), the closed-form
balancing weights (golden values), the balancer's schedule, EMA, state and config errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from c2vkd.engine.balance import TermBalancer, validate_balance, weights_for_targets
from c2vkd.engine.grad_probe import measure_term_gradients, shares, student_parts


class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 6)
        self.decode_head = nn.Linear(6, 3)

    def decode_head_parameters(self):
        return self.decode_head.parameters()

    def forward(self, x):
        h = torch.tanh(self.backbone(x))
        return h, self.decode_head(h)


class _Loss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual_head = nn.Linear(6, 5, bias=False)


def _terms(student: _Student, head: _Loss, x: torch.Tensor) -> dict[str, torch.Tensor]:
    h, y = student(x)
    return {"ce": y.pow(2).mean(), "feat": 1e-6 * head.visual_head(h).pow(2).mean(), "logit": (y - 1).abs().mean()}


def test_measured_norms_equal_separate_backward_passes() -> None:
    torch.manual_seed(0)
    student, head = _Student(), _Loss()
    x = torch.randn(8, 4)
    weights = {"ce": 1.0, "feat": 300.0, "logit": 0.5}
    parts = student_parts(student, [("vlfd", head)])
    assert [n for n in parts.heads] == ["vlfd.visual_head"]
    assert len(parts.backbone) == 2 and len(parts.decode_head) == 2
    got = measure_term_gradients(_terms(student, head, x), weights, parts)

    total_head = torch.zeros_like(head.visual_head.weight)
    for term in weights:
        student.zero_grad()
        head.zero_grad()
        (weights[term] * _terms(student, head, x)[term]).backward()   # independent: one forward + backward per term
        b = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in student.backbone.parameters()))
        d = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in student.decode_head.parameters()
                          if p.grad is not None))
        w = weights[term]
        assert got.raw_norm[term]["backbone"] * w == pytest.approx(b, rel=1e-5)
        assert got.raw_norm[term]["decode_head"] * w == pytest.approx(d, rel=1e-5, abs=1e-12)
        assert got.raw_norm[term]["student"] * w == pytest.approx(math.hypot(b, d), rel=1e-5)
        if head.visual_head.weight.grad is not None:
            total_head += head.visual_head.weight.grad
    rms = float(total_head.pow(2).mean().sqrt())
    assert got.head_rms["vlfd.visual_head"] == pytest.approx(rms, rel=1e-5)
    # 'feat' does not reach the decode head at all
    assert got.raw_norm["feat"]["decode_head"] == 0.0 and got.raw_norm["feat"]["backbone"] > 0
    # shares sum to 1 over non-zero weights, and a zero-weight term has none
    norm_w, share = shares(got.raw_norm, {**weights, "logit": 0.0})
    assert sum(share.values()) == pytest.approx(1.0) and share["logit"] == 0.0
    assert norm_w["ce"] == pytest.approx(got.raw_norm["ce"]["student"])


def test_fp16_scale_is_divided_out() -> None:
    torch.manual_seed(0)
    student, head = _Student(), _Loss()
    x = torch.randn(8, 4)
    parts = student_parts(student, [("vlfd", head)])
    a = measure_term_gradients(_terms(student, head, x), {"ce": 1.0, "feat": 1.0, "logit": 1.0}, parts)
    b = measure_term_gradients(_terms(student, head, x), {"ce": 1.0, "feat": 1.0, "logit": 1.0}, parts, scale=1024.0)
    for t in a.raw_norm:
        assert b.raw_norm[t]["student"] == pytest.approx(a.raw_norm[t]["student"], rel=1e-5)


def test_closed_form_weights_golden() -> None:
    norms = {"a": 2.0, "b": 0.001, "c": 1.0}
    # a and c keep their weights (sum of weighted norms 2.5 = 80%), b gets 20%: S = 2.5 / 0.8, w_b = 0.2 S / 0.001
    w = weights_for_targets(norms, {"a": 1.0, "b": 1.0, "c": 0.5}, {"b": 0.2})
    assert w == pytest.approx({"a": 1.0, "b": 625.0, "c": 0.5})
    _, share = shares({t: {"student": g} for t, g in norms.items()}, w)
    assert share["b"] == pytest.approx(0.2)
    # every term targeted: the summed weighted norm (2 + 0.001 + 0.5) is kept and split by the targets
    w = weights_for_targets(norms, {"a": 1.0, "b": 1.0, "c": 0.5}, {"a": 0.5, "b": 0.25, "c": 0.25})
    total = 2.501
    assert w == pytest.approx({"a": 0.5 * total / 2.0, "b": 0.25 * total / 0.001, "c": 0.25 * total / 1.0})
    # clamping, and a zero norm keeps the weight
    w = weights_for_targets({"a": 1.0, "b": 1e-9}, {"a": 1.0, "b": 1.0}, {"b": 0.5}, max_weight=1e6)
    assert w["b"] == 1e6
    assert weights_for_targets({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 3.0}, {"b": 0.5})["b"] == 3.0


def _cfg(**kw):
    base = {"mode": "grad_norm", "targets": {"b": 0.2}, "interval": 5, "warmup": 3, "ema": 0.5, "trend": 0.0,
            "min_weight": 0.0, "max_weight": 1e8}
    base.update(kw)
    return base


def test_balancer_schedule_ema_and_state() -> None:
    bal = TermBalancer(_cfg(), {"a": 1.0, "b": 1.0, "ce0": 0.0})
    assert [s for s in range(16) if bal.due(s)] == [0, 1, 2, 5, 10, 15]
    assert bal.horizon(0) == 0.5 and bal.horizon(2) == 1.5 and bal.horizon(5) == 2.5
    # anchor = the untargeted non-zero-weight terms' weighted norm (a: 1 x 2.0); b's ratio 0.01 / 2.0
    w1 = bal.observe({"a": 2.0, "b": 0.01, "ce0": 5.0}, step=0)
    assert w1["b"] == pytest.approx(0.2 / 0.8 * 2.0 / 0.01) and w1["ce0"] == 0.0 and w1["a"] == 1.0
    # the share it gives at those norms is exactly the target
    assert w1["b"] * 0.01 / (2.0 + w1["b"] * 0.01) == pytest.approx(0.2)
    # a batch where every norm triples leaves the ratio, so the weight, where it was
    w2 = dict(bal.observe({"a": 6.0, "b": 0.03, "ce0": 5.0}, step=1))
    assert w2["b"] == pytest.approx(w1["b"])
    w3 = bal.observe({"a": 2.0, "b": 0.04, "ce0": 5.0}, step=2)   # ratio 0.02: log-mean with 0.005 -> 0.01
    assert bal.level["b"] == pytest.approx(0.5 * math.log(0.005) + 0.5 * math.log(0.02))
    # residual log 4 (0.02 predicted as 0.005): variance 0.2 x (log 4)^2, and 0.25 of it lowers the weight
    var = 0.2 * math.log(4.0) ** 2
    assert bal.var["b"] == pytest.approx(var)
    assert w3["b"] == pytest.approx(0.25 / 0.01 * math.exp(-0.25 * var))
    assert bal.updates == 3
    other = TermBalancer(_cfg(), {"a": 1.0, "b": 1.0, "ce0": 0.0})
    other.load_state_dict(bal.state_dict())
    assert other.state_dict() == bal.state_dict() and other.weights == w3
    with pytest.raises(KeyError, match="other losses"):
        TermBalancer(_cfg(), {"a": 1.0, "b": 1.0, "zz": 1.0}).load_state_dict(bal.state_dict())


def test_trend_removes_the_lag_on_a_falling_ratio() -> None:
    """log(g_b / g_a) falls by 0.05 per step: a plain moving average ends far behind, Holt's trend does not."""
    def final_error(trend: float) -> float:
        bal = TermBalancer(_cfg(ema=0.5, trend=trend, warmup=20, interval=10), {"a": 1.0, "b": 1.0})
        for step in [s for s in range(300) if bal.due(s)]:
            w = bal.observe({"a": 1.0, "b": math.exp(-0.05 * step)}, step=step)
        # the weight is meant for the middle of the next interval (step 290 + 5): the exact ratio there
        exact = 0.2 / 0.8 / math.exp(-0.05 * 295)
        return abs(math.log(w["b"] / exact))

    assert final_error(0.05) < 0.1   # 7% off after 28 measurements (the trend is learnt gradually)
    assert final_error(0.0) > 0.7  # the plain EMA lags 0.5 nats, plus 0.25 to the mid-interval


def test_all_targeted_terms_keep_the_total_scale() -> None:
    bal = TermBalancer(_cfg(targets={"a": 0.75, "b": 0.25}, ema=0.0), {"a": 1.0, "b": 1.0})
    w = bal.observe({"a": 3.0, "b": 1.0}, step=0)                 # anchor = 1 x 3 + 1 x 1 = 4
    assert w == pytest.approx({"a": 0.75 * 4 / 3.0, "b": 0.25 * 4 / 1.0})
    assert w["a"] * 3.0 + w["b"] * 1.0 == pytest.approx(4.0)


def test_balance_config_errors() -> None:
    w = {"pdd": 1.0, "vlfd_global": 0.1, "ce": 0.0}
    with pytest.raises(KeyError, match="vlfd_global"):          # suggests the closest term
        validate_balance(_cfg(targets={"vlfd_globl": 0.2}), w)
    with pytest.raises(ValueError, match="weight 0"):
        validate_balance(_cfg(targets={"ce": 0.2}), w)
    with pytest.raises(ValueError, match="less than 1"):
        validate_balance(_cfg(targets={"vlfd_global": 0.6, "pdd": 0.5}, ), {**w, "x": 1.0})
    with pytest.raises(ValueError, match="must sum to 1"):
        validate_balance(_cfg(targets={"pdd": 0.5, "vlfd_global": 0.3}), w)
    with pytest.raises(ValueError, match="needs balance.targets"):
        validate_balance(_cfg(targets={}), w)
    with pytest.raises(ValueError, match="balance.mode"):
        validate_balance(_cfg(mode="gradnorm"), w)
    with pytest.raises(ValueError, match="balance.trend"):
        validate_balance(_cfg(targets={"vlfd_global": 0.3}, trend=1.5), w)
    with pytest.raises(ValueError, match="interval"):
        validate_balance(_cfg(targets={"vlfd_global": 0.3}, interval=0), w)
    validate_balance(_cfg(mode="off", targets={}), w)
    validate_balance(_cfg(targets={"vlfd_global": 0.3}), w)
