"""Automatic loss-term balancing (config ``balance``): weights from measured per-term gradient norms.

The measurement itself (per-term gradient norms and shares on the student) is ``engine/grad_probe.py``.

Why: a term's weight says nothing about its effect. With method.md's reductions VLFD's three terms reach the
student with 1e-5..1e-9 of PDD's gradient, so "C2VKD" trains like PDD + CE and nothing tells the user. What
matters is each weighted term's gradient on the student's parameters, so that is what we measure and balance.

The shares are those of ``engine/grad_probe.py``: each weighted term's gradient norm on the student over the
sum of all non-zero-weight terms' norms.

Balancing (``balance.mode: grad_norm``): at each measured step the raw gradient norms ``g_i = ||d raw_i/d theta||``
give, for each targeted term, its norm relative to an anchor,

    r_i = g_i / A,   A = sum_{j fixed} w_j g_j   if some non-zero-weight term has no target (e.g. PDD, CE),
                     A = sum_j w_j g_j           otherwise (targets must then sum to 1),

whose logarithm is tracked by Holt's linear-trend smoothing (level smoothing ``1 - balance.ema``, trend
smoothing ``balance.trend``; ``trend: 0`` is a plain exponential moving average) and predicted at the middle
of the coming measurement interval; the term then gets

    w_i = clamp(t_i / (1 - sum_k t_k) / r_i, min_weight, max_weight)   (with fixed terms), or
    w_i = clamp(t_i / r_i, ...)                                         (all terms targeted),

the closed-form weight that gives the term exactly its target share ``t_i`` of the summed weighted norms
at the predicted ratios (the fixed terms keep their configured weights, and so the overall gradient scale).
Why ratios, logarithms and a trend: per-batch gradient norms are heavy-tailed (measured on the CamVid sample: one term's
norm spans 0.02..5.5 within 100 steps) and mostly move together across terms; the ratio to the anchor cancels
the batch-wide part and the log-domain average is the typical (geometric-mean) ratio. Early in training a
term's ratio also falls steadily (VLFD's patch term: about -0.04 nats per step on CamVid), and any moving
average lags such a trend: with a plain EMA of 0.9 the patch term got 1.7% of the gradient for a 10% target.
Holt's method has no steady-state lag on a linear trend. Finally, per-batch ratios are roughly log-normal with a
large spread (about 1-1.5 nats), so a weight set for the typical (median) ratio gives a *mean* share well above
the target (spike steps dominate it); the prediction adds 0.25 x the estimated residual variance of the log
ratio. With the defaults (ema 0.5, trend 0.05) the mean share of a 10% target over steps 50-100 stayed within
about 0.09-0.14 in a simulation over noise of 0.5-1.5 nats per measurement, flat or falling ratios (0 to -0.04
nats per step) and a fall that levels off at step 30, with 80% of runs within a factor of about 2.5 of the
target; a plain EMA of 0.9 got 0.016-0.19 (``benchmarks/balance_estimators.py``).

We prefer this closed form to GradNorm's gradient-descent update on the weights (Chen et al., ICML 2018): it
has no learning rate of its own, reaches the target in one step instead of drifting towards it, needs no
extra optimizer state, and its input (detached norms, averaged over DDP ranks) is identical on every rank, so
every rank computes bit-identical weights.

Schedule: norms are measured at every iteration of the first ``balance.warmup`` iterations (the EMA settles
while the student changes fastest), then every ``balance.interval`` iterations. Weights follow from the first
measurement on. The balancer's state (current weights, EMA, counter) is saved in training checkpoints, so a
resumed run continues bit-identically. Measured on the first micro-batch of a step when accumulating.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from c2vkd.registry import suggest

log = logging.getLogger("c2vkd")

BALANCE_MODES = ("off", "grad_norm")
# Estimator constants, chosen by simulation (benchmarks/balance_estimators.py, see the module docstring):
VARIANCE_CORRECTION = 0.25  # predicted log ratio + 0.25 x residual variance: spikes count towards the mean share
VARIANCE_EMA = 0.2         # weight of a new squared residual in the residual-variance estimate


def weights_for_targets(norms: dict[str, float], weights: dict[str, float], targets: dict[str, float], *,
                        min_weight: float = 0.0, max_weight: float = math.inf) -> dict[str, float]:
    """The closed form above: weights giving each targeted term its share of the summed weighted norms.

    norms: raw gradient norms G_i; weights: current weights (fixed terms keep theirs); targets: shares.
    Returns a new weight dict (untargeted terms unchanged; a targeted term with a zero norm keeps its
    weight, since no weight can give it a share)."""
    fixed = [t for t, w in weights.items() if w != 0.0 and t not in targets]
    t_sum = sum(targets.values())
    if fixed:
        scale = sum(abs(weights[t]) * norms.get(t, 0.0) for t in fixed) / max(1.0 - t_sum, 1e-12)
    else:
        scale = sum(abs(weights[t]) * norms.get(t, 0.0) for t in weights)
    out = dict(weights)
    for t, share in targets.items():
        g = norms.get(t, 0.0)
        if g > 0.0 and scale > 0.0:
            out[t] = min(max(share * scale / g, min_weight), max_weight)
    return out


# ---------------------------------------------------------------------------------------- balancer
def validate_balance(cfg: dict[str, Any], term_weights: dict[str, float]) -> None:
    """Check the ``balance`` section against the run's terms (names, non-zero weights, share sums)."""
    b = cfg
    mode = b["mode"]
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance.mode must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    targets = b.get("targets") or {}
    if mode == "off":
        return
    if not targets:
        raise ValueError("balance.mode=grad_norm needs balance.targets: {<term>: share, ...} (terms of this run: "
                         f"{', '.join(term_weights)})")
    for t, share in targets.items():
        if t not in term_weights:
            raise KeyError(f"balance.targets.{t}: no loss term {t!r} in this run.{suggest(t, list(term_weights))} "
                           f"Terms: {', '.join(term_weights)}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
            raise ValueError(f"balance.targets.{t}: a share strictly between 0 and 1, got {share!r}")
        if term_weights[t] == 0.0:
            raise ValueError(f"balance.targets.{t}: the term has weight 0 (computed and logged only); give it a "
                             "non-zero starting weight to balance it")
    total = sum(float(v) for v in targets.values())
    fixed = [t for t, w in term_weights.items() if w != 0.0 and t not in targets]
    if fixed and total >= 1.0:
        raise ValueError(f"balance.targets sum to {total:g}, but terms {fixed} keep their weights and need a "
                         "share too: the targets must sum to less than 1")
    if not fixed and abs(total - 1.0) > 1e-6:
        raise ValueError(f"balance.targets sum to {total:g}; every non-zero-weight term has a target, so they "
                         "must sum to 1")
    for key in ("interval", "warmup"):
        v = b[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "interval" else 0):
            raise ValueError(f"balance.{key} must be an integer >= {1 if key == 'interval' else 0}, got {v!r}")
    if not 0.0 <= float(b["ema"]) < 1.0:
        raise ValueError(f"balance.ema must be in [0, 1), got {b['ema']!r}")
    if not 0.0 <= float(b.get("trend", 0.0)) <= 1.0:
        raise ValueError(f"balance.trend must be in [0, 1], got {b['trend']!r}")
    if not 0.0 <= float(b["min_weight"]) <= float(b["max_weight"]):
        raise ValueError(f"balance: need 0 <= min_weight <= max_weight, got {b['min_weight']!r}, {b['max_weight']!r}")


class TermBalancer:
    """State of ``balance.mode: grad_norm`` (see the module docstring). ``weights`` is the live weight dict."""

    def __init__(self, cfg: dict[str, Any], term_weights: dict[str, float]) -> None:
        validate_balance(cfg, term_weights)
        self.targets = {t: float(v) for t, v in (cfg.get("targets") or {}).items()}
        self.interval, self.warmup = int(cfg["interval"]), int(cfg["warmup"])
        self.alpha = 1.0 - float(cfg["ema"])          # level smoothing
        self.beta = float(cfg.get("trend", 0.0))      # trend smoothing (0: plain EMA)
        self.min_weight, self.max_weight = float(cfg["min_weight"]), float(cfg["max_weight"])
        self.weights = {t: float(w) for t, w in term_weights.items()}
        self.fixed = [t for t, w in self.weights.items() if w != 0.0 and t not in self.targets]
        # per targeted term: level, per-step trend and residual variance of log(g_i / anchor), and the step
        # they refer to
        self.level: dict[str, float] = {}
        self.slope: dict[str, float] = {}
        self.var: dict[str, float] = {}
        self.step: dict[str, int] = {}
        self.updates = 0

    def due(self, step: int) -> bool:
        """Measure at 0-based training step ``step``?"""
        return step < self.warmup or step % self.interval == 0

    def horizon(self, step: int) -> float:
        """Steps from ``step`` to the middle of the interval until the next measurement."""
        nxt = step + 1
        while not self.due(nxt):
            nxt += 1
        return (nxt - step) / 2.0

    def anchor(self, raw_norms: dict[str, float]) -> float:
        terms = self.fixed if self.fixed else [t for t, w in self.weights.items() if w != 0.0]
        return sum(abs(self.weights[t]) * raw_norms.get(t, 0.0) for t in terms)

    def observe(self, raw_norms: dict[str, float], step: int | None = None) -> dict[str, float]:
        """Fold the measurement of 0-based step ``step`` (raw student gradient norm per term, identical on every
        rank) into the level/trend estimates and return the new weights."""
        step = self.updates if step is None else int(step)
        a = self.anchor(raw_norms)
        if a > 0.0:
            for t in self.targets:
                g = raw_norms.get(t, 0.0)
                if g <= 0.0:
                    continue  # no gradient this step (e.g. an all-ignored batch): nothing to learn from
                x = math.log(g / a)
                if t not in self.level:
                    self.level[t], self.slope[t], self.var[t] = x, 0.0, 0.0
                else:
                    dt = max(step - self.step[t], 1)
                    pred = self.level[t] + self.slope[t] * dt
                    err = x - pred
                    self.var[t] = (1.0 - VARIANCE_EMA) * self.var[t] + VARIANCE_EMA * err * err
                    self.level[t] = pred + self.alpha * err
                    self.slope[t] += self.alpha * self.beta * err / dt
                self.step[t] = step
        scale = 1.0 / (1.0 - sum(self.targets.values())) if self.fixed else 1.0
        h = self.horizon(step)
        for t, share in self.targets.items():
            if t in self.level:
                log_r = (self.level[t] + self.slope[t] * (step - self.step[t] + h)
                         + VARIANCE_CORRECTION * self.var[t])
                w = share * scale * math.exp(-log_r)
                self.weights[t] = min(max(w, self.min_weight), self.max_weight)
        self.updates += 1
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "level": dict(self.level), "slope": dict(self.slope),
                "var": dict(self.var), "step": dict(self.step), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.weights) - set(state["weights"])
        if missing:
            raise KeyError(f"balance state in the checkpoint lacks terms {sorted(missing)}: it was saved by a run "
                           "with other losses")
        self.weights = {t: float(state["weights"][t]) for t in self.weights}
        self.level = {t: float(v) for t, v in state["level"].items()}
        self.slope = {t: float(v) for t, v in state["slope"].items()}
        self.var = {t: float(v) for t, v in state["var"].items()}
        self.step = {t: int(v) for t, v in state["step"].items()}
        self.updates = int(state["updates"])
