"""PDD: pixel-wise decoupled distillation (method.md 3.3).

Decoupled KD (Zhao et al., CVPR 2022) applied per pixel, with the target class t taken from the ground
truth and the binary supervision mixing the teacher with the label. For each valid pixel, p = softmax(z/T):

    b    = [p_t, 1 - p_t]                               binary target / non-target probabilities
    p^   = softmax over k != t                          non-target distribution
    q    = normalise((1 - w) * b_T + w * [1, 0])        w = gt_mix
    TC   = KL(q || b_S)   (forward, default)   or   KL(b_S || q)   (reverse, the paper's Eq. 9 as written)
    NC   = KL(p^_T || p^_S)
    PDD  = T^2 * mean over valid pixels of (alpha * TC + beta * NC)

Numerics. Everything is done in log space, in float32 (float64 inputs stay float64): log b uses logsumexp
over the *masked* logits (target set to -inf), so log(1 - p_t) is accurate even when p_t rounds to 1 --
with logits of 1e4 the plain ``1 - p_t`` is exactly 0 and its log -inf. log q is formed with logaddexp,
so q_2 > 0 whenever w < 1. KL terms with a zero weight (0 * log 0) are 0, never NaN. The only infinite
case is reverse TC with gt_mix = 1 (q_2 = 0 while b_S,2 > 0): KL(b_S || q) is +inf there, so it is rejected.

Memory. The logits [B, K, H, W] (19 x 512 x 512 x 8 = 160 MB each in fp32) are the hot spot. The default
path is a custom autograd function that works on blocks of images (a few MB each): the forward keeps only
per-pixel statistics ([B, 1, H, W]: two logsumexps and one coefficient) instead of full-size log-probs,
and the backward writes the closed-form gradient

    dPDD/dz_t = -d,     dPDD/dz_k = (d + beta) p^_S,k - beta p^_T,k   (k != t),     times T^2/n/T
    d = alpha (b_S,2 - q_2)                    (forward TC)
    d = -alpha b_S,1 b_S,2 [(log b_S,1 - log q_1) - (log b_S,2 - log q_2)]     (reverse TC)

straight into the gradient buffer. ``memory_efficient=False`` is the plain-autograd formulation (kept
for cross-checking and double backward); benchmarks/bench_losses.py measures both.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.autograd.function import once_differentiable

from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs
from c2vkd.losses._common import check_logits_at, logits_pair, logits_taps

#: "default": teacher-as-target TC plus NC (method.md defaults). "paper": the paper's Eq. 9 as written.
PDD_PRESETS: dict[str, dict[str, object]] = {
    "default": dict(alpha=0.5, beta=0.5, temperature=1.0, gt_mix=0.5, direction="forward", use_nckd=True),
    "paper": dict(alpha=0.5, beta=0.5, temperature=1.0, gt_mix=0.5, direction="reverse", use_nckd=False),
}

# Elements of one block of [B, K, H, W] processed at a time by the memory-efficient path (16 MB in fp32).
_BLOCK_ELEMS = 1 << 22


def _check_args(temperature: float, gt_mix: float, direction: str) -> None:
    if direction not in ("forward", "reverse"):
        raise ValueError(f"pdd: direction must be 'forward' or 'reverse', got {direction!r}")
    if not 0.0 <= gt_mix <= 1.0:
        raise ValueError(f"pdd: gt_mix must be in [0, 1], got {gt_mix}")
    if not temperature > 0:
        raise ValueError(f"pdd: temperature must be > 0, got {temperature}")
    if direction == "reverse" and gt_mix == 1.0:
        raise ValueError("pdd: direction='reverse' with gt_mix=1 is infinite: q = [1, 0] has no non-target "
                         "mass, so KL(b_S || q) = +inf wherever the student puts any on it. Use gt_mix < 1 "
                         "or direction='forward' (then TC is the cross-entropy on the label).")


def _log_q(lbt1: torch.Tensor, lbt2: torch.Tensor, gt_mix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log q, q = normalise((1 - w) b_T + w [1, 0]), from log b_T. Inputs/outputs: [.., 1, H, W].

    The sum is 1 analytically; normalising in log space only removes rounding (and keeps the spec literal)."""
    log1mw = math.log1p(-gt_mix) if gt_mix < 1.0 else -math.inf
    logw = math.log(gt_mix) if gt_mix > 0.0 else -math.inf
    lq1 = torch.logaddexp(lbt1 + log1mw, torch.full_like(lbt1, logw))
    lq2 = lbt2 + log1mw
    lz = torch.logaddexp(lq1, lq2)
    return lq1 - lz, lq2 - lz


def _tc(lb1: torch.Tensor, lb2: torch.Tensor, lq1: torch.Tensor, lq2: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Binary KL per pixel from log-probabilities; a zero-probability side contributes 0 (xlogy semantics)."""
    if reverse:  # KL(b_S || q); lq finite because gt_mix < 1 is enforced for this direction
        return lb1.exp() * (lb1 - lq1) + lb2.exp() * (lb2 - lq2)
    q1, q2 = lq1.exp(), lq2.exp()
    zero = torch.zeros((), dtype=q1.dtype, device=q1.device)
    return (torch.where(q1 > 0, q1 * (lq1 - lb1), zero) + torch.where(q2 > 0, q2 * (lq2 - lb2), zero))


def _blocks(shape: torch.Size, max_elems: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, row slice) blocks of a [B, K, H, W] tensor with at most ~max_elems elements each."""
    b, k, h, w = shape
    per_img = k * h * w
    if per_img <= max_elems:
        step = max(1, max_elems // per_img)
        for b0 in range(0, b, step):
            yield slice(b0, b0 + step), slice(None)
    else:
        rows = max(1, max_elems // (k * w))
        for i in range(b):
            for h0 in range(0, h, rows):
                yield slice(i, i + 1), slice(h0, h0 + rows)


def _masked_stats(z: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """z [b, K, h, w] (owned: shifted in place to z' = z - m, m the per-pixel max over k != t, with the target
    logit set to -inf), idx [b, 1, h, w].

    Returns (lse_nt, log b_1, log b_2, e, s), the first three and s [b, 1, h, w]: logsumexp over k != t,
    log p_t, log(1 - p_t); e = exp(z') [b, K, h, w] (exactly 0 at t) and s = sum_k e, so p^ = e / s.
    One exp per tensor: e serves both the log-sum-exp and the teacher's p^ (torch.logsumexp would redo it)."""
    z_t = z.gather(1, idx)
    z.scatter_(1, idx, -math.inf)
    m = z.amax(dim=1, keepdim=True)            # over k != t: accurate log(1 - p_t) even when p_t rounds to 1
    z.sub_(m)
    e = z.exp()
    s = e.sum(dim=1, keepdim=True)             # >= 1 (the max term is exp(0))
    lse_nt = m + s.log()
    lse_all = torch.logaddexp(lse_nt, z_t)
    return lse_nt, z_t - lse_all, lse_nt - lse_all, e, s


class _PDDFunction(torch.autograd.Function):
    """Blocked forward (per-pixel statistics only) + closed-form backward. See the module docstring."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                temperature: float, alpha: float, beta: float, gt_mix: float, reverse: bool,
                block_elems: int) -> torch.Tensor:
        cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
        px = (s.shape[0], 1, s.shape[2], s.shape[3])
        lse_nt_s = torch.empty(px, dtype=cdt, device=s.device)
        lse_nt_t = torch.empty(px, dtype=cdt, device=s.device)
        coef_d = torch.empty(px, dtype=cdt, device=s.device)
        total = torch.zeros((), dtype=cdt, device=s.device)
        for bs, hs in _blocks(s.shape, block_elems):
            i, v = idx[bs, :, hs], valid[bs, :, hs]
            a = s[bs, :, hs].to(cdt, copy=True)
            b = t[bs, :, hs].to(cdt, copy=True)
            if temperature != 1.0:
                a.div_(temperature)
                b.div_(temperature)
            ls, lb1, lb2, _, sum_s = _masked_stats(a, i)      # a, b now hold z' = z - m (-inf at t)
            lt, lbt1, lbt2, e_t, sum_t = _masked_stats(b, i)
            lq1, lq2 = _log_q(lbt1, lbt2, gt_mix)
            pixel = alpha * _tc(lb1, lb2, lq1, lq2, reverse)
            if reverse:
                r = (lb1 - lq1) - (lb2 - lq2)
                d = -alpha * r * (lb1 + lb2).exp()
            else:
                d = alpha * (lb2.exp() - lq2.exp())
            if beta:
                # NC = sum_{k!=t} p^_T (log p^_T - log p^_S), log p^ = z' - log s, p^_T = e_t / s_T, sum p^_T = 1:
                # NC = sum_k e_t (z'_T - z'_S) / s_T + log s_S - log s_T  (in place on the block copy b)
                b.sub_(a).scatter_(1, i, 0.0)   # z'_T - z'_S; the target (-inf - -inf) is not part of p^
                nc = b.mul_(e_t).sum(dim=1, keepdim=True) / sum_t + (sum_s.log() - sum_t.log())
                pixel = pixel + beta * nc
            del a, b
            zero = torch.zeros((), dtype=cdt, device=s.device)
            total += torch.where(v, pixel, zero).sum()
            lse_nt_s[bs, :, hs] = ls
            lse_nt_t[bs, :, hs] = lt
            coef_d[bs, :, hs] = torch.where(v, d, zero)
        n = valid.sum().clamp_min(1).to(cdt)
        ctx.save_for_backward(s, t, idx, valid, lse_nt_s, lse_nt_t, coef_d, n)
        ctx.opts = (temperature, beta, block_elems, cdt)
        return total * (temperature ** 2) / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        s, t, idx, valid, lse_nt_s, lse_nt_t, coef_d, n = ctx.saved_tensors
        temperature, beta, block_elems, cdt = ctx.opts
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty_like(s)
            # d(T^2 * mean)/ds = T^2 / n * (1/T) * d/dz  (z = s / T); zero on ignored pixels
            scale = valid.to(cdt) * (grad_out.to(cdt) * temperature / n)
            for bs, hs in _blocks(s.shape, block_elems):
                i, d = idx[bs, :, hs], coef_d[bs, :, hs]
                e = s[bs, :, hs].to(cdt, copy=True)
                if temperature != 1.0:
                    e.div_(temperature)
                e.sub_(lse_nt_s[bs, :, hs]).exp_().mul_(d + beta)   # (d + beta) p^_S  (target slot: garbage)
                if beta:
                    f = t[bs, :, hs].to(cdt, copy=True)
                    if temperature != 1.0:
                        f.div_(temperature)
                    e.add_(f.sub_(lse_nt_t[bs, :, hs]).exp_(), alpha=-beta)  # - beta p^_T
                    del f
                e.scatter_(1, i, -d)            # overwrite (not add): the garbage / inf-inf slot is replaced
                grad[bs, :, hs] = e.mul_(scale[bs, :, hs])
        return grad, None, None, None, None, None, None, None, None, None


def _pdd_autograd(s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, temperature: float,
                  alpha: float, beta: float, gt_mix: float, reverse: bool) -> torch.Tensor:
    """Plain-autograd PDD (several full-size intermediates kept for backward; twice differentiable)."""
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    zs = s.to(cdt) / temperature
    zt = t.to(cdt) / temperature

    def stats(z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z_t = z.gather(1, idx)
        zm = z.scatter(1, idx, -math.inf)             # out of place: autograd-safe masking of the target
        lse_nt = torch.logsumexp(zm, dim=1, keepdim=True)
        lse_all = torch.logaddexp(lse_nt, z_t)
        return zm, lse_nt, z_t - lse_all, lse_nt - lse_all

    zms, lss, lb1, lb2 = stats(zs)
    zmt, lst, lbt1, lbt2 = stats(zt)
    lq1, lq2 = _log_q(lbt1, lbt2, gt_mix)
    pixel = alpha * _tc(lb1, lb2, lq1, lq2, reverse)
    if beta:
        lps, lpt = zms - lss, zmt - lst
        diff = (lpt - lps).scatter(1, idx, 0.0)      # target slot is -inf - -inf: not part of p^
        pixel = pixel + beta * (lpt.exp() * diff).sum(dim=1, keepdim=True)
    pixel = torch.where(valid, pixel, torch.zeros((), dtype=cdt, device=s.device))
    return pixel.sum() * (temperature ** 2) / valid.sum().clamp_min(1).to(cdt)


def pdd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0, gt_mix: float = 0.5,
             direction: str = "forward", use_nckd: bool = True, ignore_index: int = 255,
             memory_efficient: bool = True) -> torch.Tensor:
    """Pixel-wise decoupled distillation loss (scalar).

    student_logits, teacher_logits: [B, K, H, W], K >= 2, any float dtype (computed in float32; float64 stays
    float64). target: [B, H, W] long, ``ignore_index`` marks ignored pixels. The teacher is detached.
    direction: 'forward' TC = KL(q || b_S) or 'reverse' TC = KL(b_S || q). use_nckd=False drops NC (beta).
    Returns T^2 * mean over valid pixels of (alpha * TC + beta * NC); 0 (with a gradient path) if none is valid.
    memory_efficient: blocked custom-autograd path (default) or plain autograd (same value and gradient).
    """
    _check_args(temperature, gt_mix, direction)
    if student_logits.ndim != 4 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"pdd: student and teacher logits must both be [B, K, H, W] of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    b, k, h, w = student_logits.shape
    if target.shape != (b, h, w):
        raise ValueError(f"pdd: target must be [B, H, W] = {(b, h, w)}, got {tuple(target.shape)}")
    if k < 2:
        raise ValueError("pdd: needs at least 2 classes (the non-target distribution is empty otherwise)")
    valid = (target != ignore_index).unsqueeze(1)                                 # [B, 1, H, W] bool
    idx = target.unsqueeze(1).long()
    out_of_range = ((idx < 0) | (idx >= k)) & valid  # elementwise, not valid-mask indexing: no nonzero/gather
    if bool(out_of_range.any()):
        bad = torch.unique(idx[out_of_range])[:10].tolist()
        raise ValueError(f"pdd: labels {bad} are outside [0, {k}) and are not ignore_index={ignore_index}")
    idx = torch.where(valid, idx, torch.zeros_like(idx))      # any in-range class; those pixels are masked
    teacher = teacher_logits.detach()
    beta_eff = float(beta) if use_nckd else 0.0
    reverse = direction == "reverse"
    if memory_efficient:
        return _PDDFunction.apply(student_logits, teacher, idx, valid, float(temperature), float(alpha),
                                  beta_eff, float(gt_mix), reverse, _BLOCK_ELEMS)
    return _pdd_autograd(student_logits, teacher, idx, valid, float(temperature), float(alpha), beta_eff,
                         float(gt_mix), reverse)


@LOSSES.register("pdd")
class PDDLoss(DistillLoss):
    """PDD on the logits. Args: weight, preset ('default' | 'paper' = reverse KL, NC off), and any of alpha,
    beta, temperature, gt_mix, direction, use_nckd to override the preset; memory_efficient (default True);
    at ('input', the default: logits at the crop | 'stride': the ``logits`` taps at the teacher's stride)."""

    requires_teacher = True

    def __init__(self, ctx: LossContext, weight: float = 1.0, alpha: float | None = None,
                 beta: float | None = None, temperature: float | None = None, gt_mix: float | None = None,
                 direction: str | None = None, use_nckd: bool | None = None, preset: str = "default",
                 memory_efficient: bool = True, at: str = "input") -> None:
        super().__init__(ctx, weight)
        # where PDD reads the logits: "input" (the models' outputs upsampled to the crop; method.md, the default)
        # or "stride" (the classifiers' own grid, the teacher's output stride; labels nearest-downsampled, as
        # kd / cwd do with at: stride): (stride)^2 fewer pixels, e.g. 16x at SegFormer's 1/4 (issue 29)
        self.at = check_logits_at(at, "pdd")
        if preset not in PDD_PRESETS:
            raise ValueError(f"pdd: unknown preset {preset!r}; choose from {', '.join(PDD_PRESETS)}")
        opts = dict(PDD_PRESETS[preset])
        given = dict(alpha=alpha, beta=beta, temperature=temperature, gt_mix=gt_mix, direction=direction,
                     use_nckd=use_nckd)
        opts.update({k: v for k, v in given.items() if v is not None})
        _check_args(float(opts["temperature"]), float(opts["gt_mix"]), str(opts["direction"]))
        self.alpha = float(opts["alpha"])
        self.beta = float(opts["beta"])
        self.temperature = float(opts["temperature"])
        self.gt_mix = float(opts["gt_mix"])
        self.direction = str(opts["direction"])
        self.use_nckd = bool(opts["use_nckd"])
        self.memory_efficient = bool(memory_efficient)

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return logits_taps(str(args.get("at", "input")))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, T={self.temperature}, gt_mix={self.gt_mix}, "
                f"direction={self.direction}, use_nckd={self.use_nckd}, at={self.at}")

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        if inputs.teacher_logits is None:
            raise ValueError("loss pdd needs teacher logits (LossInputs.teacher_logits is None)")
        s, t, target = logits_pair(inputs, self.at)
        return {"pdd": pdd_loss(s, t, target, alpha=self.alpha,
                                beta=self.beta, temperature=self.temperature, gt_mix=self.gt_mix,
                                direction=self.direction, use_nckd=self.use_nckd,
                                ignore_index=self.ignore_index, memory_efficient=self.memory_efficient)}
