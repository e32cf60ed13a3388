"""HMKD*: heterogeneous model KD via dual alignment (GLA attention maps + HFA learned-offset feature warping).

A ``*`` reconstruction: the reference code does not run as committed, and the paper body is not available, so
every choice below that the code does not fix is ours and is listed.

Reference: "Heterogeneous Model Knowledge Distillation via Dual Alignment for Semantic Segmentation", ICMR 2025
(DOI 10.1145/3731715.3733354). Reference code: xumingzhu989/HMKD-ICMR @ 0158bad423250d17b8bdf007298011cc1662fe61
(identical code in iLearn-Lab/ICMR25-HMKD @ 172f744f), the CNN -> ViT script ``codes/train_resnet101_b0.py``
(call sites L354-371: ``gla_model(t_outputs[1], s_outputs[2][-2])``, ``hfa_model(t_outputs[3], ...)``,
``losses = task_loss + lambda_gla[0] * gla_loss + hfa_loss`` with ``lambda_gla = [1., 1.]``),
``models/GLA_model.py`` ``GLA_model.forward`` (only the ``*_04`` sub-modules), ``models/HFA_model.py``
``HFA_model.forward``, ``RRB``, ``compute_weighted_attention_map``, ``bilinear_interpolate_torch_gridsample``.
The repository does not import as committed (missing ``models.cross_attention_map_5_model``, ``dataset.*``,
several ``losses`` modules; ../shared/docs/hetero_kd.md section 1.2), so nothing here was run against it: the
arithmetic is transcribed from the files (tests/test_hmkd.py checks ours against a float64 transcription).

GLA (``hmkd_gla``), teacher early tap T1 (``layer1``) <-> student stage-1 map S1 (``stage1``):
    Xt = conv1x1(C_T1 -> C_S1, bias)(T1)            (resized bilinearly, align_corners=True, to S1's grid if the
                                                     two grids differ: ours; the reference's coincide)
    P  = LayerNorm(flatten(conv kxk stride k (C -> C, bias)(X)))   per side, separate weights   [B, N, C]
    M  = softmax(q(P) k(P)^T / sqrt(C))             single head, q / k Linear(C, C), per side   [B, N, N]
    L_GLA = sum_{b,i,j} (M_t - M_s)^2               (``reduction: sum``, the reference's; ``mean`` = / (B N^2))
HFA (``hmkd_hfa``), teacher mid tap T3 (``layer3``) <-> student stage-3 map S3 (``stage3``):
    Yt0 = SA(T3): F = T3 as [B, C, n]; A = softmax(F^T F) (no 1/sqrt(d), Q6); Yt0 = (A F^T)^T    (optional)
    Yt  = RRB_t(conv1x1(C_T3 -> C_S3, bias)(resize(Yt0, S3 grid, bilinear, align_corners=True)))
    Ys  = RRB_s(S3);  RRB(c) = BN(u + conv3x3(c -> c/4) -> BN -> conv3x3(c/4 -> c)), u = conv1x1(c -> c), no
          biases, no ReLU
    h = Ys * Yt;  delta = conv1x1(2c -> c) -> BN -> conv3x3(c -> 2) [zero-initialised: identity warp at start]
          applied to cat[CBR_1(h), CBR_2(h)] (CBR = conv3x3 with bias -> BN -> ReLU)
    L_HFA = mean((warp(Yt, delta) - Ys)^2)   warp = grid_sample at the [-1, 1] linspace grid + delta / [W, H]
          (only the teacher branch is warped, as in the reference)
Total (the reference): CE + 1 * L_GLA + 1 * L_HFA; no logit term (``--lambda-kd`` is parsed but unused there).

Inferred choices and deviations (hetero_kd.md section 1.6 quirks Q1-Q6 and ours):
  * **taps (Q5)**: the reference's student taps are the output of a *second* run of each block's attention branch
    (its modified ``Block.forward``): stage-1 block 0 for GLA, the mean of the stage-3 blocks for HFA. Our
    students are not modified: we read the stage outputs ``stage1`` / ``stage3`` (for a CNN student
    ``layer1`` / ``layer3``; options ``gla_student_tap`` / ``hfa_student_tap``). No doubled attention compute.
  * **layout (Q1) fixed**: the reference reshapes the stage-1 token tensor [B, N, C] straight to [B, C, H, W]
    (no transpose), scrambling channels and positions. Our taps are already [B, C, h, w] maps (SegFormer /
    PVTv2 stage hooks), which is the correct token -> map layout (``tokens_to_map``); ``layout: scrambled``
    reproduces the reference's scramble from the map for comparison only.
  * **grids from the input (Q2)**: no hard-coded B = 4, 90 x 120 or 23 x 30; every size is the run-time tensor's.
  * **patch size**: the reference embeds a 90 x 120 stage-1 grid (360 x 480 crops) with 8 x 8 patches: 11 x 15 =
    165 tokens (floor division, as its stride-8 conv). ``patch: auto`` (default) picks, at the training crop's
    stage-1 grid (the loss context's dummy forward), the patch k whose token count floor(h/k) floor(w/k) is
    closest to those 165 (ties: the larger k): k = 8 at the reference's geometry, k = 3 (10 x 10 = 100 tokens)
    at a 128 x 128 crop's 32 x 32 grid, where k = 8 would leave 4 x 4 = 16 tokens. ``patch: <int>`` fixes k.
  * **reduction (Q4)**: L_GLA is a sum over B N^2 entries (the reference's); ``reduction: mean`` divides by
    B N^2. The reference summed over its per-GPU batch of 4 and averaged gradients over 2 GPUs; with batch 8 in
    one process the sum is twice its per-step scale.
  * **teacher self-attention (Q6)**: kept (``teacher_attention: true``); with raw 1024-d dot products A is
    nearly the identity, so ``teacher_attention: false`` (Yt0 = T3) is offered.
  * **anchoring (Q3), a deviation**: in the reference every adapter on both sides is trained by the loss, so
    both terms can reach 0 without the student learning anything (both attention maps uniform; both RRB
    outputs 0 through their affine BNs, or a warp off the grid into zero padding). ``anchor: frozen``
    (default, ours): the teacher-side heads are fixed at their initialisation and never trained (GLA: the 1x1
    conv, patch embedding, LayerNorm, and q / k set to the identity so that M_t is the teacher tokens' own
    scaled dot-product attention, not a near-uniform map of random projections; HFA: the 1x1 conv and RRB_t),
    so each target is a fixed function of the teacher's features; and the student RRB_s ends in a BN without
    affine parameters (unit variance per channel), so it cannot shrink to meet a zero target. The student-side
    heads and the offset generator train as in the reference. ``anchor: none`` = the reference (everything
    trainable, default initialisations). Third, the warp: with the reference's zero padding the offset
    generator can move the teacher map off the grid, where it samples zeros (hiding the teacher lowers an
    unaligned MSE of about 2, unit-variance Yt vs Ys, to about 1); ``warp_padding: border`` (default, ours)
    samples the nearest border value there instead; ``zeros`` is the reference.
  * **warp alignment (quirk, ours to fix)**: the reference samples its linspace(-1, 1) grid with
    ``grid_sample``'s default ``align_corners=False``, so even a zero offset is not the identity (a half-pixel
    shrink, border pixels half-faded into the zero padding). ``warp_align_corners: true`` (default) makes the
    zero-initialised offsets an exact identity warp, which is what the zero init is for; ``false`` is the
    reference. The offset scale delta / [W, H] is the reference's in both cases.
  * the reference's unused ``value`` projection of GLA's self-attention and the unused student-offset head of
    HFA are not built (no gradient would reach them); the reference's default (PyTorch) initialisation
    otherwise.
  * losses and heads compute in float32 with autocast off (``no_autocast``); the teacher's features are
    detached. The heads are trainable alignment heads (optimizer ``align`` group, checkpoints, never the
    exported student); frozen ones have ``requires_grad = False`` (kept in checkpoints, out of the optimizer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from c2vkd.losses._common import map_shape, no_autocast
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs

REFERENCE_TOKENS = 11 * 15  # the reference's GLA token count: 90 x 120 stage-1 grid, 8 x 8 patches
ANCHORS = ("frozen", "none")
LAYOUTS = ("map", "scrambled")
REDUCTIONS = ("sum", "mean")
PADDINGS = ("border", "zeros")


# ------------------------------------------------------------------------------------------- pure functions
def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The correct token -> map layout: [B, N = h*w, C] (row-major tokens) -> [B, C, h, w]."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"tokens_to_map: {n} tokens do not fill a {h} x {w} grid")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def scrambled_map(x: torch.Tensor) -> torch.Tensor:
    """The reference's GLA student layout (quirk Q1), from a correct map [B, C, h, w]: its tokens [B, N, C]
    reshaped straight to [B, C, h, w] with no transpose. For comparison only (``layout: scrambled``)."""
    return x.flatten(2).transpose(1, 2).reshape(x.shape)


def attention_map(tokens: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor | None,
                  k_weight: torch.Tensor, k_bias: torch.Tensor | None) -> torch.Tensor:
    """Single-head attention map softmax(Q K^T / sqrt(d)) of tokens [B, N, C]; q / k weights [d, C] -> [B, N, N]
    (rows sum to 1; GLA_model.py ``SelfAttention.forward``'s ``attention_weights``, d = Q.size(-1))."""
    q = F.linear(tokens, q_weight, q_bias)
    k = F.linear(tokens, k_weight, k_bias)
    return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)


def gla_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L_GLA = sum (or mean) over b, i, j of (M_t - M_s)^2; both maps [B, N, N] (float32 or float64 kept).

    The teacher map is *not* detached: it comes from the teacher-side heads, which the reference trains
    through this loss (``anchor: none``); the teacher's features themselves are detached upstream."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(f"gla_loss: student map {tuple(student_map.shape)} and teacher map "
                         f"{tuple(teacher_map.shape)} differ")
    if reduction not in REDUCTIONS:
        raise ValueError(f"gla_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    with no_autocast(student_map):
        dtype = torch.promote_types(student_map.dtype, torch.float32)
        d2 = (teacher_map.to(dtype) - student_map.to(dtype)).pow(2)
        return d2.sum() if reduction == "sum" else d2.mean()


def teacher_self_attention(f: torch.Tensor) -> torch.Tensor:
    """HFA's non-parametric self-attention of a map [B, C, h, w] -> [B, C, h, w]: F = [B, C, n], A =
    softmax(F^T F) over the last dim with **no** 1/sqrt(d) scaling, output (A F^T)^T (HFA_model.py
    ``compute_weighted_attention_map``)."""
    b, c, h, w = f.shape
    flat = f.reshape(b, c, h * w)
    a = torch.softmax(flat.transpose(1, 2) @ flat, dim=-1)
    return (a @ flat.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def warp(x: torch.Tensor, delta: torch.Tensor, align_corners: bool = True, padding: str = "zeros") -> torch.Tensor:
    """Sample x [B, C, h, w] at the [-1, 1] linspace grid plus offsets delta [B, 2, h, w] / [w, h]
    (channel 0 = x, 1 = y; HFA_model.py ``bilinear_interpolate_torch_gridsample`` with out size = x's size).
    Bilinear. ``align_corners=True``: zero offsets are the exact identity; ``False`` is the reference's
    (grid_sample's default), a half-pixel resampling even at zero offset. ``padding``: "zeros" (the reference's)
    or "border" (off-grid samples take the nearest border value)."""
    b, _, h, w = x.shape
    if delta.shape != (b, 2, h, w):
        raise ValueError(f"warp: offsets {tuple(delta.shape)} do not match the map {tuple(x.shape)}")
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(-1, 1).expand(h, w)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, -1).expand(h, w)
    grid = torch.stack((xs, ys), dim=-1).unsqueeze(0)
    norm = torch.tensor([w, h], dtype=x.dtype, device=x.device)
    grid = grid + delta.to(x.dtype).permute(0, 2, 3, 1) / norm
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=align_corners)


def hfa_loss(teacher_map: torch.Tensor, student_map: torch.Tensor, delta: torch.Tensor,
             align_corners: bool = True, padding: str = "zeros") -> torch.Tensor:
    """L_HFA = mean((warp(Yt, delta) - Ys)^2): Yt, Ys [B, C, h, w] (the RRB outputs), delta [B, 2, h, w]. Only the
    teacher branch is warped (the reference); ``align_corners`` / ``padding`` as :func:`warp`. Float32 (float64
    kept). Returns a scalar."""
    if teacher_map.shape != student_map.shape:
        raise ValueError(f"hfa_loss: teacher {tuple(teacher_map.shape)} and student {tuple(student_map.shape)} "
                         "maps differ")
    with no_autocast(student_map):
        dtype = torch.promote_types(student_map.dtype, torch.float32)
        warped = warp(teacher_map.to(dtype), delta.to(dtype), align_corners, padding)
        return (warped - student_map.to(dtype)).pow(2).mean()


# ------------------------------------------------------------------------------------------------ heads
class PatchEmbed(nn.Module):
    """conv k x k stride k (C -> C, bias, no padding) -> flatten -> LayerNorm(C): [B, C, h, w] -> [B, N, C]
    with N = floor(h/k) floor(w/k) (GLA_model.py ``PatchEmbed``)."""

    def __init__(self, channels: int, patch: int) -> None:
        super().__init__()
        self.patch = int(patch)
        self.proj = nn.Conv2d(channels, channels, self.patch, self.patch)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.patch:
            raise ValueError(f"loss hmkd: a {tuple(x.shape[-2:])} stage-1 grid is smaller than the GLA patch "
                             f"{self.patch}; set a smaller `patch`")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class QK(nn.Module):
    """The q / k projections of GLA's single-head self-attention (its unused ``value`` is not built)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return attention_map(tokens, self.query.weight, self.query.bias, self.key.weight, self.key.bias)


class RRB(nn.Module):
    """HFA_model.py ``RRB(c, c)``: BN(u + conv3x3(c -> c/4) -> BN -> conv3x3(c/4 -> c)), u = conv1x1(c -> c), no
    biases, no ReLU. ``affine_out=False``: the final BN has no affine parameters (the anchored student side)."""

    def __init__(self, channels: int, affine_out: bool = True) -> None:
        super().__init__()
        mid = max(channels // 4, 1)
        self.unify = nn.Conv2d(channels, channels, 1, bias=False)
        self.residual = nn.Sequential(nn.Conv2d(channels, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
                                      nn.Conv2d(mid, channels, 3, padding=1, bias=False))
        self.norm = nn.BatchNorm2d(channels, affine=affine_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.unify(x)
        return self.norm(u + self.residual(u))


def _cbr(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


class GLAHead(nn.Module):
    """GLA's heads: the teacher's 1x1 conv (C_T -> C_S), one patch embedding + q / k per side.
    forward(student map [B, C_S, h, w], teacher map [B, C_T, h', w']) -> (M_s, M_t), each [B, N, N]."""

    def __init__(self, s_channels: int, t_channels: int, patch: int, layout: str = "map") -> None:
        super().__init__()
        self.layout = layout
        self.t_proj = nn.Conv2d(t_channels, s_channels, 1)
        self.s_embed, self.t_embed = PatchEmbed(s_channels, patch), PatchEmbed(s_channels, patch)
        self.s_attn, self.t_attn = QK(s_channels), QK(s_channels)

    def teacher_side(self) -> list[nn.Module]:
        return [self.t_proj, self.t_embed, self.t_attn]

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout == "scrambled":
            s = scrambled_map(s)
        xt = self.t_proj(t)
        if xt.shape[-2:] != s.shape[-2:]:
            xt = F.interpolate(xt, size=s.shape[-2:], mode="bilinear", align_corners=True)
        return self.s_attn(self.s_embed(s)), self.t_attn(self.t_embed(xt))


class HFAHead(nn.Module):
    """HFA's heads: the teacher's 1x1 conv (C_T -> C_S), RRB_t, RRB_s and the offset generator.
    forward(student map [B, C, h, w], teacher map [B, C_T, h', w']) -> (Yt, Ys, delta) at the student's h x w."""

    def __init__(self, s_channels: int, t_channels: int, teacher_attention: bool = True,
                 student_affine: bool = True) -> None:
        super().__init__()
        c = s_channels
        self.teacher_attention = teacher_attention
        self.t_proj = nn.Conv2d(t_channels, c, 1)
        self.rrb_t, self.rrb_s = RRB(c), RRB(c, affine_out=student_affine)
        self.cbr_t, self.cbr_s = _cbr(c), _cbr(c)
        self.delta_gen = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c),
                                       nn.Conv2d(c, 2, 3, padding=1, bias=False))
        nn.init.zeros_(self.delta_gen[2].weight)  # identity warp at the start (the reference)

    def teacher_side(self) -> list[nn.Module]:
        return [self.t_proj, self.rrb_t]

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.teacher_attention:
            t = teacher_self_attention(t)
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=True)
        yt = self.rrb_t(self.t_proj(t))
        ys = self.rrb_s(s)
        h = ys * yt
        delta = self.delta_gen(torch.cat((self.cbr_t(h), self.cbr_s(h)), dim=1))
        return yt, ys, delta


def auto_patch(h: int, w: int, tokens: int = REFERENCE_TOKENS) -> int:
    """The patch k whose token count floor(h/k) * floor(w/k) is closest to ``tokens`` (ties: the larger k)."""
    best = min(range(1, max(min(h, w), 1) + 1), key=lambda k: (abs((h // k) * (w // k) - tokens), -k))
    return int(best)


def _as_map(x: torch.Tensor, tap: str, side: str) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"loss hmkd: the {side} tap {tap!r} is not a [B, C, h, w] map: {tuple(x.shape)}")
    return x.float()


@LOSSES.register("hmkd")
class HMKDLoss(DistillLoss):
    """HMKD* (GLA + HFA). Args: ``weight`` (1.0, multiplies both terms), ``gla_weight`` / ``hfa_weight`` (1.0,
    the reference's lambda_gla[0] and HFA's implicit 1), ``patch`` ("auto" | int), ``reduction`` ("sum" |
    "mean", GLA), ``teacher_attention`` (true), ``anchor`` ("frozen" | "none"), ``layout`` ("map" |
    "scrambled"), ``warp_align_corners`` (true), ``warp_padding`` ("border" | "zeros"), taps ``gla_student_tap`` ("stage1"), ``gla_teacher_tap``
    ("layer1"), ``hfa_student_tap`` ("stage3"), ``hfa_teacher_tap`` ("layer3"). Terms ``hmkd_gla``,
    ``hmkd_hfa``. See the module docstring for every choice."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, gla_weight: float = 1.0, hfa_weight: float = 1.0,
                 patch: int | str = "auto", reduction: str = "sum", teacher_attention: bool = True,
                 anchor: str = "frozen", layout: str = "map", warp_align_corners: bool = True,
                 warp_padding: str = "border",
                 gla_student_tap: str = "stage1", gla_teacher_tap: str = "layer1",
                 hfa_student_tap: str = "stage3", hfa_teacher_tap: str = "layer3") -> None:
        super().__init__(ctx, weight)
        for name, value, allowed in (("anchor", anchor, ANCHORS), ("layout", layout, LAYOUTS),
                                     ("reduction", reduction, REDUCTIONS), ("warp_padding", warp_padding, PADDINGS)):
            if value not in allowed:
                raise ValueError(f"loss hmkd: {name} must be one of {', '.join(allowed)}, got {value!r}")
        self.anchor, self.layout, self.reduction, self.warp_padding = anchor, layout, reduction, warp_padding
        self.teacher_attention, self.warp_align_corners = bool(teacher_attention), bool(warp_align_corners)
        self.gla_taps = (str(gla_student_tap), str(gla_teacher_tap))
        self.hfa_taps = (str(hfa_student_tap), str(hfa_teacher_tap))
        self.weights = {"hmkd_gla": float(weight) * float(gla_weight),
                        "hmkd_hfa": float(weight) * float(hfa_weight)}

        s1 = map_shape(ctx.student_shapes, self.gla_taps[0], "student", "hmkd")
        t1 = map_shape(ctx.teacher_shapes, self.gla_taps[1], "teacher", "hmkd")
        s3 = map_shape(ctx.student_shapes, self.hfa_taps[0], "student", "hmkd")
        t3 = map_shape(ctx.teacher_shapes, self.hfa_taps[1], "teacher", "hmkd")
        if patch == "auto":
            self.patch = auto_patch(s1[2], s1[3])
        elif isinstance(patch, int) and not isinstance(patch, bool) and patch >= 1:
            self.patch = patch
        else:
            raise ValueError(f"loss hmkd: patch must be 'auto' or an integer >= 1, got {patch!r}")
        if self.patch > min(s1[2], s1[3]):
            raise ValueError(f"loss hmkd: patch {self.patch} is larger than the student's {s1[2]} x {s1[3]} "
                             f"{self.gla_taps[0]!r} grid")
        self.gla = GLAHead(s1[1], t1[1], self.patch, layout)
        self.hfa = HFAHead(s3[1], t3[1], self.teacher_attention, student_affine=(anchor == "none"))
        if anchor == "frozen":
            with torch.no_grad():
                for lin in (self.gla.t_attn.query, self.gla.t_attn.key):
                    lin.weight.copy_(torch.eye(lin.weight.shape[0]))
                    lin.bias.zero_()
            for m in (*self.gla.teacher_side(), *self.hfa.teacher_side()):
                m.requires_grad_(False)

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        s = [str(args.get("gla_student_tap", "stage1")), str(args.get("hfa_student_tap", "stage3"))]
        t = [str(args.get("gla_teacher_tap", "layer1")), str(args.get("hfa_teacher_tap", "layer3"))]
        return list(dict.fromkeys(s)), list(dict.fromkeys(t))

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """Both raw terms plus the intermediate tensors (for tests and diagnostics)."""
        (s1n, t1n), (s3n, t3n) = self.gla_taps, self.hfa_taps
        s1 = _as_map(inputs.student_feats[s1n], s1n, "student")
        t1 = _as_map(inputs.teacher_feats[t1n], t1n, "teacher").detach()
        s3 = _as_map(inputs.student_feats[s3n], s3n, "student")
        t3 = _as_map(inputs.teacher_feats[t3n], t3n, "teacher").detach()
        with no_autocast(s1):
            m_s, m_t = self.gla(s1, t1)
            yt, ys, delta = self.hfa(s3, t3)
            return {"hmkd_gla": gla_loss(m_s, m_t, self.reduction),
                    "hmkd_hfa": hfa_loss(yt, ys, delta, self.warp_align_corners, self.warp_padding),
                    "m_s": m_s, "m_t": m_t, "yt": yt, "ys": ys, "delta": delta}

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        out = self.terms(inputs)
        return {"hmkd_gla": out["hmkd_gla"], "hmkd_hfa": out["hmkd_hfa"]}

    def extra_repr(self) -> str:
        return (f"patch={self.patch}, reduction={self.reduction}, anchor={self.anchor}, layout={self.layout}, "
                f"teacher_attention={self.teacher_attention}, warp_align_corners={self.warp_align_corners}, "
                f"warp_padding={self.warp_padding}")
