"""VLFD: visual-linguistic feature distillation (method.md 3.1-3.2): three terms on one feature tap.

* global visual term  -- per-pixel channel-softmax KL between the aligned student feature F_S and F_T;
* patch-wise (graph) term -- pixel-affinity matrices over ALL pixels of the local batch;
* linguistic term     -- KL between softmax(e_T), e_T = frozen CLIP attention pool(F_T), and softmax(e_S),
  e_S = linguistic head(s4) (or the same frozen pool applied to F_S: the released-code variant).

Reductions (``reduction``):

* ``'element'`` (default; the released code): every KL is summed and divided by the number of *elements*
  (B*h*w*C, B*D) -- PyTorch's ``kl_div(reduction='mean')`` -- not by the number of distributions, so the
  values are C (resp. D) times smaller than a per-pixel KL, and the patch term, an average of squared
  differences of cosine-like affinities divided by (C - 1), is bounded by 4 / (C - 1)^2. With C = 512..2048
  the three terms then reach the student with 1e-5..1e-9 of PDD's gradient (measure it: `c2vkd report`).
* ``'distribution'``: a KL per distribution, averaged over distributions -- the global term is the per-pixel
  channel KL averaged over the B*h*w pixels (= element x C), the linguistic term the per-sample KL averaged
  over the B samples (= element x D) -- and the patch term without G's 1 / (C - 1) normalisation
  (= element x (C - 1)^2, bounded by 4). The terms then have the scale of a KD loss, so their weights mean
  what they say and do not underflow in fp16.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs
from c2vkd.models.clip_pool import ARCH_SPECS, AttentionPool2d, load_clip_attnpool
from c2vkd.registry import suggest

logger = logging.getLogger("c2vkd")

_RANDOM_POOL_SEED = 20231011  # the random stand-in pool is the same in every run (and after resume)


def _check_direction(direction: str, what: str) -> bool:
    """True for reverse."""
    if direction not in ("forward", "reverse"):
        raise ValueError(f"vlfd {what}: direction must be 'forward' or 'reverse', got {direction!r}")
    return direction == "reverse"


REDUCTIONS = ("element", "distribution")


def _check_reduction(reduction: str, what: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"vlfd {what}: reduction must be 'element' or 'distribution', got {reduction!r}")


def _softmax_kl(student: torch.Tensor, teacher: torch.Tensor, dim: int, direction: str, what: str,
                reduction: str = "element") -> torch.Tensor:
    """sum KL(softmax_dim(target) || softmax_dim(other)) / numel ('element') or / (numel / size(dim))
    ('distribution': the mean KL per distribution), float32 (float64 stays float64).

    forward: target = teacher (KL(P_T || P_S)); reverse: KL(P_S || P_T). log_softmax keeps every log finite,
    so there is no 0 * log 0 case to guard. The teacher is detached."""
    reverse = _check_direction(direction, what)
    _check_reduction(reduction, what)
    if student.shape != teacher.shape:
        raise ValueError(f"vlfd {what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
    ls = F.log_softmax(student.to(cdt), dim=dim)
    lt = F.log_softmax(teacher.detach().to(cdt), dim=dim)
    if reverse:
        kl = ls.exp() * (ls - lt)
    else:
        kl = lt.exp() * (lt - ls)
    count = student.numel() if reduction == "element" else student.numel() // student.shape[dim]
    return kl.sum() / count


def vlfd_global_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                     direction: str = "forward", reduction: str = "element") -> torch.Tensor:
    """Global visual term: per-pixel softmax over channels, KL averaged over all B*h*w*C elements
    (reduction 'element') or over the B*h*w pixels ('distribution', C times larger).

    student_feat (aligned F_S), teacher_feat (F_T): [B, C, h, w] -> scalar. direction 'forward' is
    KL(P_T || P_S) (released code, default), 'reverse' is KL(P_S || P_T) (the paper's formula)."""
    if student_feat.ndim != 4:
        raise ValueError(f"vlfd global: expected [B, C, h, w] features, got {tuple(student_feat.shape)}")
    return _softmax_kl(student_feat, teacher_feat, 1, direction, "global", reduction)


def linguistic_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor, *,
                    direction: str = "forward", reduction: str = "element") -> torch.Tensor:
    """Linguistic term: KL(softmax(e_T) || softmax(e_S)) averaged over B*D ('reverse': KL(S || T)), or over
    the B samples (reduction 'distribution', D times larger).

    student_embed, teacher_embed: [B, D] -> scalar."""
    if student_embed.ndim != 2:
        raise ValueError(f"vlfd linguistic: expected [B, D] embeddings, got {tuple(student_embed.shape)}")
    return _softmax_kl(student_embed, teacher_embed, 1, direction, "linguistic", reduction)


def _graph_rows(feat: torch.Tensor, eps: float, cdt: torch.dtype) -> torch.Tensor:
    """[B, C, h, w] -> X [N = B*h*w, C]: rows L2-normalised (norm clamped at eps), then row-mean removed."""
    x = feat.to(cdt).permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
    x = F.normalize(x, p=2.0, dim=1, eps=eps)
    return x - x.mean(dim=1, keepdim=True)


def patch_graph_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, eps: float = 1e-8,
                     exact_mode: str = "gram", across_ranks: bool = False,
                     reduction: str = "element") -> torch.Tensor:
    """Patch-wise graph term: mean((G_T - G_S)^2) over the N x N pixel-affinity matrix G = X X^T / (C - 1).

    reduction 'distribution' drops G's 1 / (C - 1) (the value is (C - 1)^2 times larger, bounded by 4 since
    every row of X has norm <= 1); 'element' (default) is the released code's value, bounded by 4 / (C - 1)^2.

    student_feat, teacher_feat: [B, C, h, w] (same shape) -> scalar. N = B*h*w counts every pixel of the
    batch, cross-image pairs included. float32 compute (float64 stays float64); teacher detached.

    exact_mode 'naive' builds both N x N matrices (O(N^2) memory). 'gram' (default) computes the same value
    in O(C^2) memory, using A = X_T, B = X_S, P = A + B, D = A - B and
        A A^T - B B^T = (P D^T + D P^T) / 2
        ||A A^T - B B^T||_F^2 = ( <P^T P, D^T D> + <D^T P, (D^T P)^T> ) / 2     (C x C products),
    or, when N^2 <= 3 C^2 (few pixels, wide features: camvid-p2's N = C = 512), through M = P D^T directly:
    ||(M + M^T) / 2||_F^2 = (||M||^2 + <M, M^T>) / 2 -- one N x N product instead of three C x C ones.
    This is algebraically equal to the textbook ||A^T A||^2 - 2 ||A^T B||^2 + ||B^T B||^2, but every product
    carries the factor D, so it does not cancel catastrophically when student and teacher are close (the
    three-term form loses all float32 digits there; see tests/test_vlfd.py and benchmarks/bench_losses.py).

    across_ranks=True (gram mode, under torch.distributed): the graph spans the rows of ALL processes, i.e.
    the loss equals the single-process loss on the concatenated batch, cross-process pairs included. The
    three C x C products are sums over rows, so they are all-reduced (one [3, C, C] collective, autograd-
    aware) instead of gathering any N x C features. Each rank's local gradient is then world_size times its
    share of the exact gradient, which DDP's gradient averaging turns into exactly the gradient of the
    global loss. Without an initialised process group it is the plain loss.
    """
    if exact_mode not in ("gram", "naive"):
        raise ValueError(f"patch_graph_loss: exact_mode must be 'gram' or 'naive', got {exact_mode!r}")
    _check_reduction(reduction, "patch")
    if student_feat.shape != teacher_feat.shape or student_feat.ndim != 4:
        raise ValueError(f"patch_graph_loss: student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} must be one [B, C, h, w] shape")
    c = student_feat.shape[1]
    if c < 2:
        raise ValueError("patch_graph_loss: needs C >= 2 (G is divided by C - 1)")
    norm = float(c - 1) if reduction == "element" else 1.0  # G's normalisation
    cdt = torch.float64 if student_feat.dtype == torch.float64 else torch.float32
    a = _graph_rows(teacher_feat.detach(), eps, cdt)
    b = _graph_rows(student_feat, eps, cdt)
    n = a.shape[0]
    distributed = across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    if exact_mode == "naive":
        if distributed:
            raise ValueError("patch_graph_loss: across_ranks needs exact_mode='gram' (naive would gather N x C "
                             "features and build the global N x N matrices)")
        return ((a @ a.T - b @ b.T) / norm).pow(2).mean()
    p, d = a + b, a - b
    if not distributed and n * n <= 3 * c * c:
        # Few rows: the same identity in row space is cheaper (one N x N product, N^2 C multiply-adds, vs the
        # three C x C ones, 3 N C^2) and no larger than them ([N, N] <= [3, C, C]). It keeps the factor D too:
        # A A^T - B B^T = (M + M^T) / 2 with M = P D^T, and ||(M + M^T) / 2||_F^2 = (||M||^2 + <M, M^T>) / 2.
        m = p @ d.T
        sq_norm = 0.5 * (m * m).sum() + 0.5 * (m * m.T).sum()
        return sq_norm / norm ** 2 / n / n
    prods = torch.stack([p.T @ p, d.T @ d, d.T @ p])            # [3, C, C], each a sum over rows
    if distributed:
        from torch.distributed.nn.functional import all_reduce

        prods = all_reduce(prods)
        n_t = torch.tensor([float(n)], device=prods.device, dtype=prods.dtype)
        torch.distributed.all_reduce(n_t)
        n = int(n_t.item())
    pp, dd, m = prods[0], prods[1], prods[2]
    sq_norm = 0.5 * (pp * dd).sum() + 0.5 * (m * m.T).sum()
    # divide by the N*N entries and by (C - 1)^2 from G's normalisation, in two steps (no overflow of N^2)
    return sq_norm / norm ** 2 / n / n


# ----------------------------------------------------------------------------------------------- module
def _tap_shape(shapes: dict[str, tuple[int, ...]], tap: str, side: str) -> tuple[int, ...]:
    if tap not in shapes:
        raise KeyError(f"loss vlfd: the {side} has no measured feature tap {tap!r}.{suggest(tap, list(shapes))} "
                       f"Measured taps: {', '.join(sorted(shapes)) or '(none)'}")
    shape = tuple(shapes[tap])
    if len(shape) != 4:
        raise ValueError(f"loss vlfd: {side} tap {tap!r} must be a [B, C, h, w] feature map, got {shape}")
    return shape


@LOSSES.register("vlfd")
class VLFDLoss(DistillLoss):
    """VLFD terms 'vlfd_global', 'vlfd_patch', 'vlfd_linguistic' on one student / teacher tap pair.

    Trainable (student side, dropped at inference): ``visual_head`` (1x1 conv C4 -> C_T, no bias) and
    ``linguistic_head`` (GAP -> Linear(C4 -> D)); D is the pool's output dim (RN101 512, RN50 1024).
    Frozen: ``pool``, CLIP's attention pool (requires_grad False, always in eval mode). Without
    ``clip_checkpoint`` the pool is a seeded random stand-in and a WARNING says the term is not CLIP-grounded.

    Args: weight (multiplies the three term weights), global_weight=0.1, patch_weight=0.1,
    linguistic_weight=0.5, global_direction / linguistic_direction ('forward': teacher is the KL target),
    graph_mode 'gram' | 'naive', graph_eps, student_tap / teacher_tap (default alias 'feat'),
    clip_checkpoint (path or None), clip_arch 'RN101' | 'RN50' | None (None: inferred from the checkpoint,
    RN101 without one), allow_torchscript (for OpenAI's TorchScript .pt files; trusted files only),
    student_through_pool (released-code variant: e_S = pool(F_S) instead of the linguistic head),
    graph_across_ranks (DDP: the patch graph spans the whole multi-process batch, see patch_graph_loss),
    reduction 'element' (released code, default) | 'distribution' (see the module docstring).
    """

    requires_teacher = True

    def __init__(self, ctx: LossContext, weight: float = 1.0, global_weight: float = 0.1,
                 patch_weight: float = 0.1, linguistic_weight: float = 0.5, global_direction: str = "forward",
                 linguistic_direction: str = "forward", graph_mode: str = "gram", graph_eps: float = 1e-8,
                 student_tap: str = "feat", teacher_tap: str = "feat", clip_checkpoint: str | None = None,
                 clip_arch: str | None = None, allow_torchscript: bool = False,
                 student_through_pool: bool = False, graph_across_ranks: bool = False,
                 reduction: str = "element") -> None:
        super().__init__(ctx, weight)
        _check_reduction(reduction, "loss")
        self.reduction = reduction
        self.weights = {"vlfd_global": float(weight) * float(global_weight),
                        "vlfd_patch": float(weight) * float(patch_weight),
                        "vlfd_linguistic": float(weight) * float(linguistic_weight)}
        _check_direction(global_direction, "global")
        _check_direction(linguistic_direction, "linguistic")
        if graph_mode not in ("gram", "naive"):
            raise ValueError(f"loss vlfd: graph_mode must be 'gram' or 'naive', got {graph_mode!r}")
        if clip_arch is not None and clip_arch not in ARCH_SPECS:
            raise ValueError(f"loss vlfd: clip_arch must be one of {', '.join(ARCH_SPECS)} or None, got {clip_arch!r}")
        self.global_direction = global_direction
        self.linguistic_direction = linguistic_direction
        self.graph_mode = graph_mode
        self.graph_eps = float(graph_eps)
        if graph_across_ranks and graph_mode != "gram":
            raise ValueError("loss vlfd: graph_across_ranks needs graph_mode 'gram'")
        self.graph_across_ranks = bool(graph_across_ranks)
        self.student_tap = student_tap
        self.teacher_tap = teacher_tap
        self.student_through_pool = bool(student_through_pool)

        c4 = _tap_shape(ctx.student_shapes, student_tap, "student")[1]
        c_t = _tap_shape(ctx.teacher_shapes, teacher_tap, "teacher")[1]

        if clip_checkpoint:
            pool = load_clip_attnpool(clip_checkpoint, clip_arch, allow_torchscript=allow_torchscript)
            if pool.embed_dim != c_t:
                raise ValueError(f"loss vlfd: the CLIP pool from {clip_checkpoint} takes {pool.embed_dim}-channel "
                                 f"features, but teacher tap {teacher_tap!r} has {c_t} channels (CLIP's pool "
                                 "expects a ResNet-50/101 layer4)")
            self.clip_grounded = True
        else:
            arch = clip_arch or "RN101"
            spec = dict(ARCH_SPECS[arch])
            # sized to the teacher so any CNN works; CLIP's own shape (2048, 32 heads) when C_T = 2048
            spec.update(embed_dim=c_t, num_heads=math.gcd(c_t, spec["num_heads"]))
            with torch.random.fork_rng(devices=[]):  # seeded, and leaves the global RNG stream untouched
                torch.manual_seed(_RANDOM_POOL_SEED)
                pool = AttentionPool2d(**spec)
            logger.warning(
                "loss vlfd: no clip_checkpoint given, so the linguistic term uses a frozen RANDOM attention pool "
                "(%s-shaped, seeded) as a stand-in: it is NOT CLIP-grounded and does not reproduce the paper's "
                "linguistic term. Pass clip_checkpoint=<CLIP %s weights> (OpenAI/open_clip/timm) for that.",
                arch, arch)
            self.clip_grounded = False
        pool.requires_grad_(False)
        self.pool = pool.eval()
        self.linguistic_dim = pool.output_dim  # D: the linguistic embedding size follows the pool

        self.visual_head = nn.Conv2d(c4, c_t, kernel_size=1, bias=False)
        self.linguistic_head: nn.Module | None = None
        if not self.student_through_pool:
            self.linguistic_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                                 nn.Linear(c4, pool.output_dim))

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return [str(args.get("student_tap", "feat"))], [str(args.get("teacher_tap", "feat"))]

    def train(self, mode: bool = True) -> "VLFDLoss":
        super().train(mode)
        self.pool.eval()  # frozen CLIP head: never in training mode (no dropout / stat updates by design)
        return self

    def align(self, s4: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Visual head: [B, C4, h_s, w_s] -> F_S [B, C_T, h, w] (1x1 conv, then bilinear resize to size)."""
        f = self.visual_head(s4)
        if tuple(f.shape[-2:]) != tuple(size):
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        return f

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s4 = inputs.student_feats[self.student_tap]
        f_t = inputs.teacher_feats[self.teacher_tap].detach()
        f_s = self.align(s4, tuple(f_t.shape[-2:]))
        pool_dtype = self.pool.positional_embedding.dtype
        with torch.no_grad():
            e_t = self.pool(f_t.to(pool_dtype))
        if self.student_through_pool:
            e_s = self.pool(f_s.to(pool_dtype))  # gradients reach f_s through the frozen pool
        else:
            assert self.linguistic_head is not None
            e_s = self.linguistic_head(s4)
        return {
            "vlfd_global": vlfd_global_loss(f_s, f_t, direction=self.global_direction, reduction=self.reduction),
            "vlfd_patch": patch_graph_loss(f_s, f_t, eps=self.graph_eps, exact_mode=self.graph_mode,
                                           across_ranks=self.graph_across_ranks, reduction=self.reduction),
            "vlfd_linguistic": linguistic_loss(e_s, e_t, direction=self.linguistic_direction,
                                               reduction=self.reduction),
        }
