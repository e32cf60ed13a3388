"""FSKD*: global (spatial Linear + channel conv) alignment, patch relations and a soft-rank attention term.

A ``*`` reconstruction: FSKD (SSRN 5385770, 2025 preprint; Neural Networks 2026, ScienceDirect pii
S0893608026000638) released classification code only (TouchNow/FSKD @ 969dddf278b2c9f2dadde504326fa9d704c5a5aa:
CIFAR PiT-Ti / ImageNet DeiT-Ti), which is not in any index we can read; its segmentation pairing, weights and
attention definition are unpublished. Everything below is known only from a third-party reconstruction spec for
a SegFormer MiT-B0 student, read (not run, not copied) at
  bapedragon/iBKD_Seg @ d585015d844bc88388f402fd01f911cede266a07:
    phase4/Cityscapes_SegFormer-B0/configs/fskd_method_protocol_v1.json  (the machine-readable spec)
    phase4/Cityscapes_SegFormer-B0/BASELINE_METHOD_PROTOCOLS.md          (section 2: "FSKD", its reasons)
    phase4/Cityscapes_SegFormer-B0/OFFICIAL_BASELINE_AUDIT.md            (what FSKD's code does release)
which cites FSKD's ``distillers/simi.py`` (SimiKD, FeatureAlignment, attention loss L90-114), ``distillers/utils.py``
(KD, init) and ``README.md`` / ``train.py`` L104-124 (weights). ../shared/docs/hetero_kd.md section 4 summarises it.

The spec's objective (CE 1 + logit KD 1 at T 1 are the preset's separate ``ce`` and ``kd`` losses):

    global   G = sum_{pairs j} MSEmean(Align_j(S_j), T_j) / B
             Align = GELU(conv3x3(C_s -> C_t, bias, pad 1)(reshape_{h_t x w_t}(GELU(Linear(N_s -> N_t, bias)(S_j
                     flattened to [B, C_s, N_s])))))        (the spatial Linear acts on the token axis)
    patch    P = sum_{pairs j} mean_{b, p, q} (R_s - R_t)^2,   R_x[b] = X^T X per image, X = the map's per-position
                 channel vectors L2-normalised (eps 1e-8); the teacher resized (bilinear, align_corners=False)
                 to the student's grid; the student unprojected (R: [B, N_s, N_s] cosine Gram matrices)
    attention A = mean_b 6 sum_p (r_s - r_t)^2 / (N (N^2 - 1)),  r = soft_rank(importance, l2, strength 1)
                 (torchsort's; ascending), teacher importance = softmax over positions of mean_c resize(T)^2
                 (resized to the student's grid), i.e. 1 - Spearman's rho of the soft ranks
    L = CE + KD + 1 * G + 1 * P + 40000 * A

Terms (one per name so ``c2vkd report`` shows each one's gradient share): ``fskd_global`` (weight ``weight *
global_weight`` = 1), ``fskd_patch`` (``patch_weight`` = 1), ``fskd_attn`` (``attn_weight`` = 40000).

Every inferred choice ([3P] = the iBKD_Seg spec's, itself a reconstruction; [INF] = ours):
  * **pairs** [3P]: student stage 3 <-> teacher layer3, stage 4 <-> layer4 (FSKD README's CIFAR PiT-Ti setting,
    "stages 3-4"); taps ``stage3`` / ``layer3`` and ``stage4`` / ``feat`` (our teachers' ``feat`` is
    ``backbone.layer4``). ``pairs`` is an option (a CNN student: ``[[layer3, layer3], [layer4, feat]]``).
  * **weights** [3P]: global / patch / attention = 1 / 1 / 40000 (README CIFAR-100 PiT-Ti; ImageNet used
    100 / 1 / 1e6 at stages 1-2); CE 1, KD 1 at T 1 (the code's parser defaults).
  * **global alignment** [3P]: Linear before conv (FSKD ``patch-align=lg`` then ``channel-align=cg``), both with
    bias, GELU after each; no BatchNorm; Linear weight trunc-normal std 0.02, bias 0; conv weight Kaiming-normal
    (fan_out, relu), conv bias PyTorch's default. The heads are trainable alignment heads (optimizer ``align``
    group, checkpoints, never the exported student), initialised from the run's RNG after the student like
    every head here (the spec seeds them separately with 100000 + seed [3P]; not done).
  * **token counts from the crop** [INF]: N_s = h_s w_s and N_t = h_t w_t are the student's / teacher's tap grids
    at the training crop (the loss context's dummy forward), so the spatial Linear depends on the crop. A step
    whose grid differs (another crop size or aspect) is a clear error, not a silent resize: FSKD needs a fixed
    crop (every training crop here is fixed; losses never run at evaluation).
  * **/ B** [3P]: the extra division of the MSE by the batch (FSKD's ``get_mse_loss``: ``MSELoss()(s, t) /
    s.size(0)``). ``global_divisor: batch`` (default) divides by the step's (per-process) batch, the code's
    behaviour; a number fixes it (the spec fixes 16, its global batch).
  * **patch** [3P]: per-image Gram matrices (no cross-image pairs), teacher resized to the student's grid, the
    student before any projection, no ignore mask; the mean over B N_s^2 entries per pair, summed over pairs.
  * **attention, the student side** [INF, a deviation from the spec]: FSKD reads the CLS token's attention
    (``attn[:, :, 0, extra_token:]``), which SegFormer has none of; the spec averages the last stage-4 block's
    softmax(QK^T) over heads and queries (the attention each key position receives), which our taps do not
    expose (they are stage outputs [B, C, h, w]; the student models are not modified). We use the student
    stage's own **spatial energy**, the same operator as the teacher side: softmax over positions of the
    channel mean of squares of ``attn_student_tap`` (``stage4``). Both are per-position "how much this
    position stands out" maps; ours ranks the student's activation energy, not its attention.
  * **attention, the teacher side** [3P]: ``attn_teacher_tap`` (``feat`` = layer4) resized bilinearly
    (align_corners=False) to the student's grid, squared, channel-mean, spatial softmax.
  * **soft rank** [INF, torchsort not a dependency]: :func:`soft_rank` is torchsort's ``soft_rank(x,
    regularization="l2", regularization_strength=eps)`` (Blondel et al. 2020): the Euclidean projection of x /
    eps onto the permutahedron of (1, ..., n), computed exactly by sorting and a pool-adjacent-violators
    isotonic regression (block ids found without gradient on the CPU, the block means differentiated by autograd:
    the same almost-everywhere Jacobian as torchsort's). eps -> 0 gives the hard ranks. **Note**: whenever no
    two sorted neighbours differ by more than eps, the isotonic fit pools everything and r = (n + 1)/2 + (x -
    mean(x)) / eps exactly. Spatial-softmax importances are probabilities (all gaps < 1), so at the spec's eps = 1
    the attention term is *exactly* 6 ||p_s - p_t||^2 / (N (N^2 - 1)): a scaled MSE of the two importance maps,
    not a rank correlation, and tiny (about 5e-6 after the 40000 for random 16 x 16 maps). ``rank_strength``
    (default 1, the spec's) reaches true ranks at eps << the importance gaps. The spec's closed form 6
    sum (r_s - r_t)^2 / (N (N^2 - 1)) equals the code's 1 - mean(...) algebraically.
  * **teacher**: every teacher tensor is detached (FSKD runs the teacher under no_grad); the losses and the
    heads compute in float32 with autocast off (float64 inputs stay float64).
  * **teacher cache**: the preset reads the teacher's ``logits`` (KD), ``layer3`` and ``feat``; the protocol
    caches (``--taps logits,decoder,feat``) lack ``layer3``: build one with ``--taps logits,decoder,feat,layer3``
    (or ``auto``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from c2vkd.losses._common import map_shape, no_autocast, resize_to
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs

DEFAULT_PAIRS = (("stage3", "layer3"), ("stage4", "feat"))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ------------------------------------------------------------------------------------------ soft rank
def _pav_blocks(y: np.ndarray) -> np.ndarray:
    """Block ids [R, n] (0, 1, ... left to right per row) of the NON-INCREASING isotonic regression of each row
    of y [R, n] (pool adjacent violators: a block is merged with its left neighbour while its mean is >= the
    neighbour's)."""
    out = np.empty(y.shape, dtype=np.int64)
    for r, row in enumerate(y):
        sums: list[float] = []
        counts: list[int] = []
        for v in row.tolist():
            sums.append(v)
            counts.append(1)
            while len(sums) > 1 and sums[-2] * counts[-1] <= sums[-1] * counts[-2]:
                s, c = sums.pop(), counts.pop()
                sums[-1] += s
                counts[-1] += c
        out[r] = np.repeat(np.arange(len(counts)), counts)
    return out


def soft_rank(values: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Differentiable ascending ranks of each row: torchsort's ``soft_rank(values, regularization="l2",
    regularization_strength=strength)`` without torchsort.

    values: [R, n] (any float dtype; computed in float32 or float64 as given). The projection of values / strength
    onto the permutahedron of (1, ..., n): sort descending (s), fit the non-increasing isotonic regression v of
    s - (n, ..., 1) (block means, :func:`_pav_blocks`), rank = s - v, scattered back. Each row's ranks sum to
    n (n + 1) / 2; strength -> 0 gives the hard ranks 1..n (ties aside); large strength gives
    (n + 1)/2 + (x - mean x) / strength. Gradients flow through the sort and the block means (the blocks are
    piecewise constant in the input)."""
    if values.dim() != 2:
        raise ValueError(f"soft_rank: values must be [R, n], got {tuple(values.shape)}")
    if not strength > 0:
        raise ValueError(f"soft_rank: strength must be > 0, got {strength}")
    r, n = values.shape
    z = _f32(values) / strength
    s, perm = z.sort(dim=1, descending=True)
    w = torch.arange(n, 0, -1, dtype=z.dtype, device=z.device)
    y = s - w
    blocks = torch.from_numpy(_pav_blocks(y.detach().cpu().double().numpy())).to(z.device)
    gid = (blocks + n * torch.arange(r, device=z.device)[:, None]).flatten()
    sums = torch.zeros(r * n, dtype=z.dtype, device=z.device).index_add(0, gid, y.flatten())
    counts = torch.bincount(gid, minlength=r * n).to(z.dtype)
    v = (sums / counts.clamp_min(1))[gid].view(r, n)
    return torch.empty_like(s).scatter(1, perm, s - v)


def spearman_loss(student: torch.Tensor, teacher: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """mean_b 6 sum_p (r_s - r_t)^2 / (n (n^2 - 1)) with r = :func:`soft_rank` (l2, ``strength``) of each row of
    student / teacher [B, n] (the teacher detached): 1 - Spearman's rho of the soft ranks, per image, averaged.
    Float32 with autocast off (float64 kept)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"spearman_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
                         "both be [B, n]")
    n = student.shape[1]
    if n < 2:
        raise ValueError("spearman_loss: needs at least 2 positions")
    with no_autocast(student):
        rs = soft_rank(_f32(student), strength)
        rt = soft_rank(_f32(teacher.detach()).to(rs.dtype), strength)
        return (6.0 * (rs - rt).pow(2).sum(dim=1) / (n * (n * n - 1.0))).mean()


def spatial_energy(x: torch.Tensor) -> torch.Tensor:
    """Spatial importance of a map x [B, C, h, w] -> [B, h*w]: softmax over positions of the channel mean of x^2
    (the spec's teacher importance; ours for the student too)."""
    with no_autocast(x):
        return _f32(x).pow(2).mean(dim=1).flatten(1).softmax(dim=1)


# --------------------------------------------------------------------------------------- global, patch
def global_loss(aligned: torch.Tensor, teacher: torch.Tensor, divisor: float) -> torch.Tensor:
    """One pair's global term MSEmean(aligned, teacher) / divisor; aligned and teacher [B, C_t, h_t, w_t] (the
    teacher detached). Float32 with autocast off (float64 kept)."""
    if aligned.shape != teacher.shape:
        raise ValueError(f"global_loss: aligned student {tuple(aligned.shape)} and teacher {tuple(teacher.shape)} "
                         "differ")
    with no_autocast(aligned):
        a = _f32(aligned)
        return (a - teacher.detach().to(a.dtype)).pow(2).mean() / divisor


def cosine_gram(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image cosine Gram matrix of a map x [B, C, h, w] -> [B, N, N] (N = h w): each position's channel
    vector divided by max(||.||_2, eps), then X^T X."""
    f = F.normalize(x.flatten(2), dim=1, eps=eps)
    return f.transpose(1, 2) @ f


def patch_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """One pair's patch term mean_{b,p,q} (R_s - R_t)^2 of the per-image cosine Gram matrices; student [B, C_s, h,
    w], teacher [B, C_t, h', w'] (resized bilinearly, align_corners=False, to h x w; detached). Float32 with
    autocast off (float64 kept)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"patch_loss: batch sizes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    with no_autocast(student):
        s = _f32(student)
        t = resize_to(teacher.detach().to(s.dtype), s.shape[-2:])
        return (cosine_gram(s, eps) - cosine_gram(t, eps)).pow(2).mean()


# ------------------------------------------------------------------------------------------------ heads
class GlobalAlign(nn.Module):
    """FSKD's "lg" + "cg" alignment of a student map [B, C_s, h_s, w_s] to a teacher map's shape [B, C_t, h_t,
    w_t]: GELU(Linear(N_s -> N_t)) over the token axis, reshape to h_t x w_t, GELU(conv3x3(C_s -> C_t))."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__()
        (_, cs, hs, ws), (_, ct, ht, wt) = s_shape, t_shape
        self.s_grid, self.t_grid = (int(hs), int(ws)), (int(ht), int(wt))
        self.spatial = nn.Linear(hs * ws, ht * wt)
        self.channel = nn.Conv2d(cs, ct, 3, padding=1)
        nn.init.trunc_normal_(self.spatial.weight, std=0.02)
        nn.init.zeros_(self.spatial.bias)
        nn.init.kaiming_normal_(self.channel.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.s_grid:
            raise ValueError(f"loss fskd: the global alignment's spatial Linear was sized for a {self.s_grid[0]} x "
                             f"{self.s_grid[1]} student grid (the training crop's) but got {tuple(x.shape[-2:])}: "
                             "FSKD needs a fixed crop size")
        b, c = x.shape[:2]
        y = F.gelu(self.spatial(x.flatten(2))).view(b, c, *self.t_grid)
        return F.gelu(self.channel(y))


def _pairs(pairs) -> tuple[tuple[str, str], ...]:
    out = []
    for p in pairs:
        if isinstance(p, str) or len(p) != 2:
            raise ValueError(f"loss fskd: pairs must be [student_tap, teacher_tap] pairs, got {p!r}")
        out.append((str(p[0]), str(p[1])))
    if not out:
        raise ValueError("loss fskd: pairs must name at least one [student_tap, teacher_tap] pair")
    return tuple(out)


@LOSSES.register("fskd")
class FSKDLoss(DistillLoss):
    """FSKD* (reconstruction). Args: ``weight`` (1.0, multiplies every term), ``global_weight`` (1.0),
    ``patch_weight`` (1.0), ``attn_weight`` (40000.0), ``pairs`` ([[stage3, layer3], [stage4, feat]]: student /
    teacher taps of the global and patch terms), ``attn_student_tap`` ("stage4"), ``attn_teacher_tap``
    ("feat"), ``rank_strength`` (1.0, the soft rank's l2 regularisation), ``global_divisor`` ("batch" or a
    number), ``eps`` (1e-8, the patch term's L2 norm). Terms ``fskd_global``, ``fskd_patch``, ``fskd_attn``.
    See the module docstring for every choice."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, global_weight: float = 1.0, patch_weight: float = 1.0,
                 attn_weight: float = 40000.0, pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS,
                 attn_student_tap: str = "stage4", attn_teacher_tap: str = "feat", rank_strength: float = 1.0,
                 global_divisor: str | float = "batch", eps: float = 1e-8) -> None:
        super().__init__(ctx, weight)
        self.pairs = _pairs(pairs)
        self.attn_taps = (str(attn_student_tap), str(attn_teacher_tap))
        if not (isinstance(rank_strength, (int, float)) and rank_strength > 0):
            raise ValueError(f"loss fskd: rank_strength must be > 0, got {rank_strength!r}")
        if global_divisor != "batch" and not (isinstance(global_divisor, (int, float))
                                              and not isinstance(global_divisor, bool) and global_divisor > 0):
            raise ValueError(f"loss fskd: global_divisor must be 'batch' or a number > 0, got {global_divisor!r}")
        if not eps > 0:
            raise ValueError(f"loss fskd: eps must be > 0, got {eps!r}")
        self.rank_strength, self.global_divisor, self.eps = float(rank_strength), global_divisor, float(eps)
        w = float(weight)
        self.weights = {"fskd_global": w * float(global_weight), "fskd_patch": w * float(patch_weight),
                        "fskd_attn": w * float(attn_weight)}
        self.align = nn.ModuleList(
            GlobalAlign(map_shape(ctx.student_shapes, s, "student", "fskd"),
                        map_shape(ctx.teacher_shapes, t, "teacher", "fskd"))
            for s, t in self.pairs)
        map_shape(ctx.student_shapes, self.attn_taps[0], "student", "fskd")
        map_shape(ctx.teacher_shapes, self.attn_taps[1], "teacher", "fskd")

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        pairs = _pairs(args.get("pairs", DEFAULT_PAIRS))
        s = [p[0] for p in pairs] + [str(args.get("attn_student_tap", "stage4"))]
        t = [p[1] for p in pairs] + [str(args.get("attn_teacher_tap", "feat"))]
        return list(dict.fromkeys(s)), list(dict.fromkeys(t))

    def _teacher(self, inputs: LossInputs, tap: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
        t = inputs.teacher_feats[tap].detach()
        if t.dim() != 4:
            raise ValueError(f"loss fskd: the teacher tap {tap!r} is not a [B, C, h, w] map: {tuple(t.shape)}")
        if grid is not None and tuple(t.shape[-2:]) != grid:
            raise ValueError(f"loss fskd: the global alignment's spatial Linear was sized for a {grid[0]} x {grid[1]} "
                             f"teacher {tap!r} grid (the training crop's) but got {tuple(t.shape[-2:])}: FSKD needs "
                             "a fixed crop size")
        return t

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """The three raw terms plus the intermediates (``aligned``: one map per pair; ``imp_s`` / ``imp_t``)."""
        any_s = inputs.student_feats[self.pairs[0][0]]
        with no_autocast(any_s):
            g, p, aligned = [], [], []
            for (sn, tn), head in zip(self.pairs, self.align):
                s = _f32(inputs.student_feats[sn])
                t = self._teacher(inputs, tn, head.t_grid)
                a = head(s)
                div = float(s.shape[0]) if self.global_divisor == "batch" else float(self.global_divisor)
                g.append(global_loss(a, t, div))
                p.append(patch_loss(s, t, self.eps))
                aligned.append(a)
            sa = _f32(inputs.student_feats[self.attn_taps[0]])
            ta = resize_to(_f32(self._teacher(inputs, self.attn_taps[1])), sa.shape[-2:])
            imp_s, imp_t = spatial_energy(sa), spatial_energy(ta)
            return {"fskd_global": sum(g), "fskd_patch": sum(p),
                    "fskd_attn": spearman_loss(imp_s, imp_t, self.rank_strength),
                    "aligned": aligned, "imp_s": imp_s, "imp_t": imp_t}

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        out = self.terms(inputs)
        return {k: out[k] for k in ("fskd_global", "fskd_patch", "fskd_attn")}

    def extra_repr(self) -> str:
        return (f"pairs={[list(p) for p in self.pairs]}, attn_taps={list(self.attn_taps)}, "
                f"rank_strength={self.rank_strength}, global_divisor={self.global_divisor}, eps={self.eps}")
