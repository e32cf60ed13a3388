"""Cross-image relational knowledge distillation (CIRKD): mini-batch and memory relations, bounded memory.

Reference: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge
Distillation for Semantic Segmentation", CVPR 2022 (arXiv:2204.06986); authors' code winycg/CIRKD:
``train_cirkd.py`` (commit 351400e^; the training loop and defaults), ``losses/cirkd_mini_batch.py``
(``CriterionMiniBatchCrossImagePair.forward``), ``losses/cirkd_memory.py`` (``StudentSegContrast``:
``_dequeue_and_enqueue``, ``_sample_negative``, ``contrast_sim_kd``, ``forward``). Its defaults:
``--lambda-kd 1`` (pixel KD, the ``kd`` loss), ``--lambda-minibatch-pixel 1``, ``--lambda-memory-pixel
0.1``, ``--lambda-memory-region 0.1``, ``--contrast-temperature 0.1``, ``--contrast-kd-temperature 1``,
``--pixel-memory-size 20000``, ``--region-memory-size 2000``, ``--pixel-contrast-size 4096``,
``--region-contrast-size 1024``; all terms read ``outputs[-1]``, the head's feature before the classifier
(our ``decoder`` taps in ``methods/cirkd.yaml``).

Terms (raw values returned under these names):

``cirkd_p2p`` (weight ``weight * p2p_weight``) -- pixel-to-pixel relations across the mini-batch, on the
*raw* student feature (``p2p_student: raw``, as the reference: a relation compares a network with itself,
so channel counts need not agree; the student map is resized bilinearly to the teacher's h x w when the
strides differ) or on the projected one (``p2p_student: adapted``). Pooling: ``pool_mode`` / ``pool_size``
/ ``pool_min_size``; the default (``avg``, 4, 256) is the reference's rule (4 x 4 average pooling, ceil
mode, only when h and w are both >= 256; the DeepLab script's ``pooling=False`` never pools at these
sizes either). Features are L2-normalised over channels and flattened to N = B*h*w rows. With
S = F F^T / tau the loss is KL(teacher row distribution || student row distribution); ``scope``:
  * ``"pair"`` (default, the reference): each row is split into the B image blocks, the softmax runs
    inside each (anchor image i, contrast image j) block and the loss is (1/B^2) sum_{i,j} (1/A) sum_a
    KL_{ij,a} (A = h*w; ``F.kl_div(..., reduction="batchmean")`` per block);
  * ``"batch"``: one softmax over all N columns of a row; the loss is the mean over the N rows.
Memory: S is never materialised. Rows are processed in chunks of ``r = min(max_rows_per_chunk,
max_elements // N)`` rows (at least 1), so every intermediate is r x N (<= ``max_elements``, default 2**25
elements = 128 MiB in float32); each row's softmax is complete inside its chunk, so the value is exact.
The backward is closed-form (``_RowKL``: d KL / d logits_S = p_S - p_T per row and softmax block, recomputed
one chunk at a time), so between forward and backward only the inputs and two log-sum-exps per row are kept,
and the backward also holds one chunk of intermediates at a time.

``cirkd_mem_p2p`` / ``cirkd_mem_p2r`` (weights ``weight * mem_p2p_weight`` / ``weight * mem_p2r_weight``,
0.1 / 0.1; ``memory: true``, the default) -- the reference's memory terms. The student feature goes
through the projection head (``adapter: mlp`` = the reference's conv1x1-BN-ReLU-conv1x1 ``project_head``,
C_S -> C_T), is L2-normalised and resized to the teacher's h x w; the teacher feature is L2-normalised.
Per-class FIFO queues of teacher embeddings (:class:`ClassQueues`, buffers [K, M, C_T], initialised with
random unit vectors as the reference): per image and present class, ``pixels_per_class`` (16, the
reference's ``pixel_update_freq``) random pixels of that class go to the pixel queue (``memory_size``
slots per class, 20000) and the normalised class mean to the region queue (``region_memory_size`` per class,
2000), with the reference's pointer rules (a pixel block that would run past the end overwrites the last
slots and resets the pointer). Each step first enqueues the current batch, then draws one random index set
of ``pixel_contrast_size // K + 1`` (resp. ``region_contrast_size // K + 1``) slots, the same for every
class, and contrasts every valid pixel with the K x n sampled embeddings: logits f . m / tau for the
teacher and the student pixel, loss = kd_T^2 * mean over valid pixels of KL(softmax(t / kd_T) ||
softmax(s / kd_T)) (``contrast_sim_kd``). Chunked like p2p.
Deviations: the reference's pixel enqueue indexes the image's first positions with a permutation of the
class's pixel *count* (``this_feat[:, perm[:K]]``), so its "class-c pixels" are arbitrary pixels of the
image; we enqueue pixels of the class (``pixel_sampling: class``; ``pixel_sampling: reference`` reproduces
the reference's indexing). Under DDP the reference wraps the criterion in DDP, which broadcasts rank 0's
queues every step; here each rank samples its own pixels and every rank enqueues the rows gathered from all
ranks (``utils.dist.all_gather_rows``), so the queues are identical everywhere. BatchNorm instead of
SyncBatchNorm in the projection head (``student.sync_bn`` converts the student only). The queues are
buffers, so they are saved in training checkpoints (exact resume). At the reference sizes they are large
(K x 22000 x C_T floats: 225 MB for K = 11, C_T = 256); CPU recipes shrink ``memory_size`` /
``region_memory_size`` explicitly.

``cirkd_p2r`` (weight ``weight * p2r_weight``, default 0 = off) -- our in-batch pixel-to-region variant
(region embeddings from the current batch instead of the memory; ``region_source`` teacher | own), kept
as an option; the reference has no such term.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from c2vkd.losses._common import labels_to, no_autocast, resize_to, tap_shapes
from c2vkd.losses.adapters import AdaptedFeatureLoss
from c2vkd.losses.base import LOSSES, LossContext, LossInputs, masked_mean
from c2vkd.utils import dist as dist_utils
from c2vkd.utils.dist import all_gather_rows

log = logging.getLogger(__name__)
_LOGGED: set[tuple] = set()
DEFAULT_MAX_ELEMENTS = 2 ** 25
SCOPES = ("pair", "batch")
POOL_MODES = ("max", "avg")
PIXEL_SAMPLING = ("class", "reference")
_ABSENT = -1e9  # logit bias for masked region slots: exp() underflows to exactly 0 in float32


def rows_per_chunk(n_cols: int, max_elements: int = DEFAULT_MAX_ELEMENTS, max_rows_per_chunk: int | None = None) -> int:
    """Rows per chunk so that a (rows x n_cols) block stays within ``max_elements`` (at least 1 row)."""
    rows = max(1, int(max_elements) // max(1, int(n_cols)))
    if max_rows_per_chunk is not None:
        rows = max(1, min(rows, int(max_rows_per_chunk)))
    if n_cols > max_elements:
        key = ("row", n_cols, max_elements)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning("cirkd: one relation row has %d entries > max_elements=%d; using 1-row chunks",
                        n_cols, max_elements)
    return rows


def _row_kl(s_rows: torch.Tensor, t_rows: torch.Tensor, s_cols: torch.Tensor, t_cols: torch.Tensor,
            col_bias: torch.Tensor | None, temperature: float, kd_temperature: float, groups: int) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) per row for one chunk, in plain autograd; rows [r, C], cols [M, C] -> [r].

    Logits are rows @ cols^T / temperature (+ col_bias) / kd_temperature; with groups > 1 the M
    columns are split into ``groups`` equal blocks, each with its own softmax, and the block KLs summed.
    The formula as written: the reference for :class:`_RowKL` (``closed_form=False``)."""
    s = s_rows @ s_cols.T / temperature
    t = t_rows @ t_cols.T / temperature
    if col_bias is not None:
        s = s + col_bias
        t = t + col_bias
    if kd_temperature != 1.0:
        s = s / kd_temperature
        t = t / kd_temperature
    r = s.shape[0]
    s = s.view(r, groups, -1)
    t = t.view(r, groups, -1)
    ls = F.log_softmax(s, dim=-1)
    lt = F.log_softmax(t, dim=-1)
    return (lt.exp() * (lt - ls)).sum(dim=(1, 2))


def _logits(rows: torch.Tensor, cols: torch.Tensor, col_bias: torch.Tensor | None, scale: float,
            bias_scale: float, groups: int) -> torch.Tensor:
    """(rows @ cols^T) * scale (+ col_bias * bias_scale) as [r, groups, M / groups]; a fresh tensor."""
    z = rows @ cols.T
    z.mul_(scale)
    if col_bias is not None:
        z.add_(col_bias, alpha=bias_scale)
    return z.view(z.shape[0], groups, -1)


class _RowKL(torch.autograd.Function):
    """Per-row relation KL [R], chunked over rows, with a closed-form backward.

    Forward keeps only the inputs and two log-sum-exps per (row, group) ([R, groups]); backward recomputes
    one chunk of logits at a time and writes d KL / d z_s = p_s - p_t (per group; sum p_t = 1) straight into
    two matmuls: d rows = G @ cols, d cols = G^T @ rows (G scaled by 1 / (temperature * kd_temperature)).
    Same matmuls as checkpointing the plain formula, a third of its elementwise passes and no autograd graph.
    The teacher side (t_rows, t_cols) and ``col_bias`` are constants (no gradient)."""

    @staticmethod
    def forward(ctx, s_rows, t_rows, s_cols, t_cols, col_bias, scale: float, bias_scale: float, groups: int,
                rows: int) -> torch.Tensor:
        n = s_rows.shape[0]
        out = s_rows.new_empty(n)
        lse_s = s_rows.new_empty(n, groups)
        lse_t = s_rows.new_empty(n, groups)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            zs = _logits(s_rows[sl], s_cols, col_bias, scale, bias_scale, groups)
            zt = _logits(t_rows[sl], t_cols, col_bias, scale, bias_scale, groups)
            # both sides max-shifted, so KL = sum e_t (z't - z's) / sum e_t - log sum e_t + log sum e_s has no
            # large cancelling terms (a masked -1e9 column has e_t = 0 exactly)
            ms = zs.amax(dim=-1, keepdim=True)
            mt = zt.amax(dim=-1, keepdim=True)
            zs.sub_(ms)
            zt.sub_(mt)
            log_ss = zs.exp().sum(dim=-1).log()                          # [r, g]
            et = zt.exp()
            st = et.sum(dim=-1)
            kl = zt.sub_(zs).mul_(et).sum(dim=-1) / st - st.log() + log_ss
            out[sl] = kl.sum(dim=-1)
            lse_s[sl] = ms.squeeze(-1) + log_ss
            lse_t[sl] = mt.squeeze(-1) + st.log()
        ctx.save_for_backward(s_rows, t_rows, s_cols, t_cols, col_bias, lse_s, lse_t)
        ctx.opts = (scale, bias_scale, groups, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        s_rows, t_rows, s_cols, t_cols, col_bias, lse_s, lse_t = ctx.saved_tensors
        scale, bias_scale, groups, rows = ctx.opts
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_rows = torch.empty_like(s_rows) if need_rows else None
        grad_cols = torch.zeros_like(s_cols) if need_cols else None
        if need_rows or need_cols:
            for start in range(0, s_rows.shape[0], rows):
                sl = slice(start, start + rows)
                ps = _logits(s_rows[sl], s_cols, col_bias, scale, bias_scale, groups)
                pt = _logits(t_rows[sl], t_cols, col_bias, scale, bias_scale, groups)
                ps.sub_(lse_s[sl, :, None]).exp_()
                pt.sub_(lse_t[sl, :, None]).exp_()
                g = ps.sub_(pt).mul_((grad_out[sl] * scale)[:, None, None]).view(ps.shape[0], -1)
                if need_rows:
                    grad_rows[sl] = g @ s_cols
                if need_cols:
                    grad_cols.addmm_(g.T, s_rows[sl])
        return grad_rows, None, grad_cols, None, None, None, None, None, None


def _kl_along(zs: torch.Tensor, zt: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax along ``dim`` of two [A, A'] logit blocks: (sum of the per-anchor KL(p_t || p_s), lse_s, lse_t)."""
    lse_s = zs.logsumexp(dim=dim, keepdim=True)
    lse_t = zt.logsumexp(dim=dim, keepdim=True)
    kl = ((zt - lse_t).exp() * (zt - zs)).sum(dim=dim, keepdim=True) - lse_t + lse_s
    return kl.sum(), lse_s.flatten(), lse_t.flatten()


class _PairRelationKL(torch.autograd.Function):
    """CIRKD's pair-scope pixel relations, summed: sum over ordered image pairs (i, j) and anchor pixels of i of
    KL(softmax_j(t_i . t_j * scale) || softmax_j(s_i . s_j * scale)). fs, ft: [B, A, C] (L2-normalised rows).

    Block (j, i) of a self-relation matrix is block (i, j) transposed, so each unordered pair's block is
    multiplied once and used twice: softmax along its rows (anchors in i) and along its columns (anchors in j).
    That halves the matmuls of the row-chunked form (B (B + 1) / 2 blocks instead of B^2), forward and
    backward. Closed-form backward as :class:`_RowKL`; saved: the inputs and [B, B, A] log-sum-exps.
    Intermediates are A x A, so this form is used when A^2 <= max_elements (else the row-chunked one)."""

    @staticmethod
    def forward(ctx, fs: torch.Tensor, ft: torch.Tensor, scale: float) -> torch.Tensor:
        b, a, _ = fs.shape
        lse_s = fs.new_empty(b, b, a)       # [anchor image, contrast image, anchor pixel]
        lse_t = fs.new_empty(b, b, a)
        total = fs.new_zeros(())
        for i in range(b):
            for j in range(i, b):
                zs = (fs[i] @ fs[j].T).mul_(scale)
                zt = (ft[i] @ ft[j].T).mul_(scale)
                kl, lse_s[i, j], lse_t[i, j] = _kl_along(zs, zt, 1)
                total += kl
                if j != i:
                    kl, lse_s[j, i], lse_t[j, i] = _kl_along(zs, zt, 0)
                    total += kl
        ctx.save_for_backward(fs, ft, lse_s, lse_t)
        ctx.scale = scale
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        fs, ft, lse_s, lse_t = ctx.saved_tensors
        b = fs.shape[0]
        w = grad_out * ctx.scale
        grad = torch.zeros_like(fs)
        for i in range(b):
            for j in range(i, b):
                zs = (fs[i] @ fs[j].T).mul_(ctx.scale)
                zt = (ft[i] @ ft[j].T).mul_(ctx.scale)
                # d/dz of the row-direction KLs (anchors in i): p_s - p_t along rows
                g = (zs - lse_s[i, j][:, None]).exp_().sub_((zt - lse_t[i, j][:, None]).exp_())
                if j != i:   # and of the column-direction ones (anchors in j), on the same block
                    g += (zs - lse_s[j, i][None, :]).exp_().sub_((zt - lse_t[j, i][None, :]).exp_())
                g.mul_(w)
                grad[i].addmm_(g, fs[j])
                grad[j].addmm_(g.T, fs[i])
        return grad, None, None


def chunked_row_kl(s_rows: torch.Tensor, t_rows: torch.Tensor, s_cols: torch.Tensor, t_cols: torch.Tensor, *,
                   temperature: float, kd_temperature: float = 1.0, groups: int = 1,
                   col_bias: torch.Tensor | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   max_rows_per_chunk: int | None = None, closed_form: bool = True) -> torch.Tensor:
    """Per-row relation KL [R] without materialising the R x M relation matrices (see module doc).

    ``closed_form`` (default): :class:`_RowKL`, which keeps O((R + M) C) for backward. False: the plain
    formula per chunk under autograd (every chunk's r x M intermediates are kept; for cross-checks)."""
    n_rows, n_cols = s_rows.shape[0], s_cols.shape[0]
    rows = rows_per_chunk(n_cols, max_elements, max_rows_per_chunk)
    if closed_form:
        bias = None if col_bias is None else col_bias.detach()
        return _RowKL.apply(s_rows, t_rows.detach(), s_cols, t_cols.detach(), bias,
                            1.0 / (temperature * kd_temperature), 1.0 / kd_temperature, groups, rows)
    out = [_row_kl(s_rows[a:a + rows], t_rows[a:a + rows], s_cols, t_cols, col_bias, temperature, kd_temperature,
                   groups) for a in range(0, n_rows, rows)]
    return torch.cat(out) if len(out) > 1 else out[0]


def _pixels(feat: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B*h*w, C] rows (image-major, then row-major positions)."""
    return feat.flatten(2).transpose(1, 2).reshape(-1, feat.shape[1])


def relation_pool(x: torch.Tensor, mode: str, size: int, min_size: int = 0) -> torch.Tensor:
    """Pool [B, C, h, w] with kernel = stride = ``size`` (ceil mode; ``mode`` "max" or "avg") when
    ``size > 1`` and both h and w are >= ``min_size``; otherwise return ``x``."""
    if mode not in POOL_MODES:
        raise ValueError(f"cirkd: pool_mode must be one of {POOL_MODES}, got {mode!r}")
    if not size or size <= 1 or min(x.shape[-2:]) < int(min_size):
        return x
    if mode == "max":
        return F.max_pool2d(x, size, size, ceil_mode=True)
    return F.avg_pool2d(x, size, size, ceil_mode=True)


def cirkd_pixel_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, temperature: float = 0.1,
                     scope: str = "pair", pool_size: int = 4, max_elements: int = DEFAULT_MAX_ELEMENTS,
                     max_rows_per_chunk: int | None = None, closed_form: bool = True,
                     pool_mode: str = "avg", pool_min_size: int = 256) -> torch.Tensor:
    """CIRKD pixel-to-pixel cross-image relation distillation over the mini-batch.

    student_feat: [B, Cs, h, w]; teacher_feat: [B, Ct, h, w] (same B, h, w). Peak intermediate size is
    rows_per_chunk x N (N = B*h'*w' after pooling) <= max_elements. Float32, teacher detached. Scalar."""
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"cirkd: student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} must share batch and spatial size")
    if scope not in SCOPES:
        raise ValueError(f"cirkd: scope must be one of {SCOPES}, got {scope!r}")
    with no_autocast(student_feat):
        s = student_feat.float()
        t = teacher_feat.detach().float()
        s = relation_pool(s, pool_mode, pool_size, pool_min_size)
        t = relation_pool(t, pool_mode, pool_size, pool_min_size)
        b = t.shape[0]
        fs = _pixels(F.normalize(s, dim=1))
        ft = _pixels(F.normalize(t, dim=1))
        n = fs.shape[0]
        groups = b if scope == "pair" else 1
        a = n // b
        if (scope == "pair" and closed_form and a * a <= max_elements
                and (max_rows_per_chunk is None or max_rows_per_chunk >= a)):
            return _PairRelationKL.apply(fs.view(b, a, -1), ft.view(b, a, -1), 1.0 / temperature) / (n * groups)
        kl = chunked_row_kl(fs, ft, fs, ft, temperature=temperature, groups=groups, max_elements=max_elements,
                            max_rows_per_chunk=max_rows_per_chunk, closed_form=closed_form)
        return kl.sum() / (n * groups)


def region_embeddings(feat_n: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-region embeddings per image. feat_n: [B, C, n] (normalised); onehot: [B, K, n] float.

    Returns (regions [B*K, C] L2-normalised, present [B*K] bool)."""
    count = onehot.sum(dim=2)                                             # [B, K]
    mean = torch.bmm(onehot, feat_n.transpose(1, 2)) / count.clamp_min(1.0)[..., None]
    return F.normalize(mean, dim=2).reshape(-1, feat_n.shape[1]), (count > 0).reshape(-1)


def cirkd_region_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, target: torch.Tensor, *,
                      num_classes: int, temperature: float = 0.1, kd_temperature: float = 1.0,
                      region_source: str = "teacher", ignore_index: int = 255,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, max_rows_per_chunk: int | None = None,
                      closed_form: bool = True) -> torch.Tensor:
    """CIRKD pixel-to-region relation distillation with in-batch class-region embeddings.

    student_feat, teacher_feat: [B, C, h, w] (same shape when region_source="teacher"); target
    [B, H, W] long (nearest-downsampled to h x w). Scalar: kd_T^2 * mean over valid pixels of the
    KL between teacher and student pixel-to-region distributions; 0 with a gradient path when no
    pixel is valid. Float32, teacher detached."""
    if region_source not in ("teacher", "own"):
        raise ValueError(f"cirkd: region_source must be 'teacher' or 'own', got {region_source!r}")
    if region_source == "teacher" and student_feat.shape != teacher_feat.shape:
        raise ValueError(f"cirkd: region_source 'teacher' needs equal shapes, got student "
                         f"{tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)}")
    with no_autocast(student_feat):
        b, _, h, w = teacher_feat.shape
        lab = labels_to(target, (h, w))
        valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
        onehot = F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), num_classes) * valid[..., None]
        onehot = onehot.reshape(b, h * w, num_classes).transpose(1, 2).float()   # [B, K, n]
        fs = F.normalize(student_feat.float(), dim=1).flatten(2)                  # [B, C, n]
        ft = F.normalize(teacher_feat.detach().float(), dim=1).flatten(2)
        reg_t, present = region_embeddings(ft, onehot)
        reg_s = reg_t if region_source == "teacher" else region_embeddings(fs, onehot)[0]
        bias = torch.zeros(present.shape, device=fs.device, dtype=fs.dtype).masked_fill(~present, _ABSENT)
        kl = chunked_row_kl(fs.transpose(1, 2).reshape(b * h * w, -1), ft.transpose(1, 2).reshape(b * h * w, -1),
                            reg_s, reg_t, temperature=temperature, kd_temperature=kd_temperature, col_bias=bias,
                            max_elements=max_elements, max_rows_per_chunk=max_rows_per_chunk,
                            closed_form=closed_form)
        return (kd_temperature ** 2) * masked_mean(kl, valid.reshape(-1))


def cirkd_memory_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, target: torch.Tensor,
                      memory: torch.Tensor, *, num_classes: int, temperature: float = 0.1,
                      kd_temperature: float = 1.0, ignore_index: int = 255,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, max_rows_per_chunk: int | None = None,
                      closed_form: bool = True) -> torch.Tensor:
    """Relation KD of every valid pixel against a bank of teacher embeddings.

    student_feat, teacher_feat: [B, C, h, w]; target [B, H, W]; memory [M, C] (L2-normalised teacher
    embeddings, treated as constants). Scalar: kd_T^2 * mean over valid pixels of
    KL(softmax(f_T . m / tau / kd_T) || softmax(f_S . m / tau / kd_T)); 0 with a gradient path when the
    memory is empty or no pixel is valid."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"cirkd: memory terms need equal shapes, got student {tuple(student_feat.shape)} "
                         f"and teacher {tuple(teacher_feat.shape)}")
    with no_autocast(student_feat):
        b, c, h, w = teacher_feat.shape
        fs = _pixels(F.normalize(student_feat.float(), dim=1))
        if memory.shape[0] == 0:
            return fs.sum() * 0.0
        ft = _pixels(F.normalize(teacher_feat.detach().float(), dim=1))
        lab = labels_to(target, (h, w))
        valid = ((lab != ignore_index) & (lab >= 0) & (lab < num_classes)).reshape(-1)
        mem = memory.detach().float()
        kl = chunked_row_kl(fs, ft, mem, mem, temperature=temperature, kd_temperature=kd_temperature,
                            max_elements=max_elements, max_rows_per_chunk=max_rows_per_chunk,
                            closed_form=closed_form)
        return (kd_temperature ** 2) * masked_mean(kl, valid)


class ClassQueues(nn.Module):
    """Per-class FIFO queues of unit embeddings: ``bank`` [K, size, dim] and ``ptr`` [K] (buffers, so they
    are checkpointed), initialised with random unit vectors as CIRKD's ``StudentSegContrast``."""

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("bank", F.normalize(torch.randn(int(num_classes), self.size, int(dim)), dim=2))
        self.register_buffer("ptr", torch.zeros(int(num_classes), dtype=torch.long))

    @torch.no_grad()
    def push_block(self, cls: int, rows: torch.Tensor, *, wrap: str = "block") -> None:
        """Write ``rows`` [n, dim] into class ``cls``'s queue at its pointer.

        ``wrap="block"`` (CIRKD's pixel queue): if ptr + n >= size the rows go to the last n slots and the
        pointer resets to 0, else to ptr..ptr+n and ptr += n. ``wrap="ring"`` (the region queue, n = 1 per
        call in CIRKD): slot (ptr + i) % size, ptr = (ptr + n) % size."""
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows[-self.size:].to(self.bank.dtype)
        n = rows.shape[0]
        p = int(self.ptr[cls])
        if wrap == "ring":
            idx = (p + torch.arange(n, device=self.bank.device)) % self.size
            self.bank[cls, idx] = rows
            self.ptr[cls] = (p + n) % self.size
        elif p + n >= self.size:
            self.bank[cls, self.size - n:] = rows
            self.ptr[cls] = 0
        else:
            self.bank[cls, p:p + n] = rows
            self.ptr[cls] = (p + n) % self.size

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """The embeddings at slot ``index`` [n] of every class, class-major: [K * n, dim] (``_sample_negative``)."""
        return self.bank[:, index.to(self.bank.device)].reshape(-1, self.bank.shape[2])


@torch.no_grad()
def memory_entries(teacher_feat_n: torch.Tensor, labels: torch.Tensor, *, num_classes: int, pixels_per_class: int,
                   pixel_sampling: str = "class") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one step enqueues, per image and present class (ascending class id, as ``torch.unique``).

    teacher_feat_n: [B, C, h, w] L2-normalised teacher features; labels [B, h, w] long (invalid = outside
    [0, K)). Returns (pixel_meta [P, 2] long (class, block id), pixel_rows [P, C], region_meta [R, 2] long
    (class, block id), region_rows [R, C]). A pixel block holds up to ``pixels_per_class`` random pixels of the
    class (``pixel_sampling="reference"``: positions ``perm[:k]`` of the whole image, see the module doc),
    normalised again; a region row is the normalised mean of the class's normalised features. Uses the
    global (CPU) RNG for the permutations, as the reference."""
    b, c = teacher_feat_n.shape[:2]
    feats = teacher_feat_n.flatten(2)                                        # [B, C, n]
    lab = labels.reshape(b, -1)
    p_meta, p_rows, r_meta, r_rows = [], [], [], []
    for i in range(b):
        for cls in torch.unique(lab[i]).tolist():
            if cls < 0 or cls >= num_classes:
                continue
            idx = (lab[i] == cls).nonzero().squeeze(1)
            block = i * num_classes + cls
            r_rows.append(F.normalize(feats[i][:, idx].mean(dim=1), dim=0)[None])
            r_meta.append((cls, block))
            perm = torch.randperm(idx.numel())[:pixels_per_class].to(idx.device)
            pick = idx[perm] if pixel_sampling == "class" else perm
            p_rows.append(F.normalize(feats[i][:, pick].T, dim=1))
            p_meta += [(cls, block)] * pick.numel()
    dev = teacher_feat_n.device

    def pack(meta, rows):
        if not rows:
            return torch.zeros(0, 2, dtype=torch.long, device=dev), teacher_feat_n.new_zeros(0, c)
        return torch.tensor(meta, dtype=torch.long, device=dev), torch.cat(rows).float()

    return (*pack(p_meta, p_rows), *pack(r_meta, r_rows))


def _push_gathered(queue: ClassQueues, meta: torch.Tensor, rows: torch.Tensor, wrap: str) -> None:
    """Gather (meta, rows) from every rank (rank order; block ids made unique per rank) and push block by
    block, so every rank's queue receives the same writes in the same order."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    if world > 1:
        meta = meta.clone()
        meta[:, 1] += rank * 10 ** 9
        meta = all_gather_rows(meta)
        rows = all_gather_rows(rows)
    if meta.shape[0] == 0:
        return
    starts = [0] + [j for j in range(1, meta.shape[0]) if int(meta[j, 1]) != int(meta[j - 1, 1])] + [meta.shape[0]]
    for a, z in zip(starts[:-1], starts[1:]):
        queue.push_block(int(meta[a, 0]), rows[a:z], wrap=wrap)


@LOSSES.register("cirkd")
class CIRKDLoss(AdaptedFeatureLoss):
    """CIRKD. Terms ``cirkd_p2p`` (weight * p2p_weight), with ``memory`` ``cirkd_mem_p2p`` / ``cirkd_mem_p2r``
    (weight * mem_p2p_weight / weight * mem_p2r_weight), and ``cirkd_p2r`` (weight * p2r_weight, our
    in-batch variant, off by default); a term with weight 0 is not computed (the queues are still filled).

    Args: ``weight`` (1.0), ``p2p_weight`` (1.0), ``temperature`` (0.1), ``scope`` ("pair"), ``pool_mode``
    ("avg"), ``pool_size`` (4), ``pool_min_size`` (256), ``p2p_student`` ("raw" | "adapted"), ``memory``
    (True), ``memory_size`` (20000 per class), ``region_memory_size`` (2000 per class),
    ``pixel_contrast_size`` (4096), ``region_contrast_size`` (1024), ``pixels_per_class`` (16),
    ``pixel_sampling`` ("class" | "reference"), ``mem_p2p_weight`` (0.1), ``mem_p2r_weight`` (0.1),
    ``region_temperature`` (0.1, the memory/region relations' tau), ``region_kd_temperature`` (1.0),
    ``p2r_weight`` (0), ``region_source`` ("teacher"), ``adapter`` ("mlp", the projection head),
    ``max_elements`` (2**25), ``max_rows_per_chunk`` (None), ``student_tap`` / ``teacher_tap`` ("feat")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, p2p_weight: float = 1.0, p2r_weight: float = 0.0,
                 temperature: float = 0.1, scope: str = "pair", pool_size: int = 4, pool_mode: str = "avg",
                 pool_min_size: int = 256, p2p_student: str = "raw",
                 region_temperature: float = 0.1, region_kd_temperature: float = 1.0,
                 region_source: str = "teacher", max_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_rows_per_chunk: int | None = None, adapter: str = "mlp",
                 student_tap: str = "feat", teacher_tap: str = "feat", memory: bool = True,
                 memory_size: int = 20000, region_memory_size: int = 2000, pixel_contrast_size: int = 4096,
                 region_contrast_size: int = 1024, pixels_per_class: int = 16, pixel_sampling: str = "class",
                 mem_p2p_weight: float = 0.1, mem_p2r_weight: float = 0.1) -> None:
        super().__init__(ctx, weight)
        if scope not in SCOPES:
            raise ValueError(f"loss cirkd: scope must be one of {SCOPES}, got {scope!r}")
        if pool_mode not in POOL_MODES:
            raise ValueError(f"loss cirkd: pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")
        if p2p_student not in ("raw", "adapted"):
            raise ValueError(f"loss cirkd: p2p_student must be 'raw' or 'adapted', got {p2p_student!r}")
        if pixel_sampling not in PIXEL_SAMPLING:
            raise ValueError(f"loss cirkd: pixel_sampling must be one of {PIXEL_SAMPLING}, got {pixel_sampling!r}")
        if region_source not in ("teacher", "own"):
            raise ValueError(f"loss cirkd: region_source must be 'teacher' or 'own', got {region_source!r}")
        for name, v in (("temperature", temperature), ("region_temperature", region_temperature),
                        ("region_kd_temperature", region_kd_temperature)):
            if v <= 0:
                raise ValueError(f"loss cirkd: {name} must be > 0, got {v}")
        if int(max_elements) < 1:
            raise ValueError(f"loss cirkd: max_elements must be >= 1, got {max_elements}")
        memory = bool(memory)
        if memory and min(int(memory_size), int(region_memory_size), int(pixel_contrast_size),
                          int(region_contrast_size), int(pixels_per_class)) < 1:
            raise ValueError("loss cirkd: with memory: true, memory_size, region_memory_size, pixel_contrast_size, "
                             "region_contrast_size and pixels_per_class must all be >= 1")
        s_shape, t_shape = tap_shapes(ctx, student_tap, teacher_tap, "cirkd")
        needs_head = memory or (p2r_weight and region_source == "teacher") or p2p_student == "adapted"
        if needs_head and adapter == "none" and s_shape[1] != t_shape[1]:
            raise ValueError(f"loss cirkd: the memory / region terms compare student pixels with teacher "
                             f"embeddings; student {s_shape[1]} and teacher {t_shape[1]} channels differ, so they "
                             "need a channel adapter (not 'none')")
        self.weights = {"cirkd_p2p": float(weight) * float(p2p_weight)}
        if p2r_weight:
            self.weights["cirkd_p2r"] = float(weight) * float(p2r_weight)
        self.temperature, self.scope = float(temperature), scope
        self.pool_mode, self.pool_size, self.pool_min_size = pool_mode, int(pool_size), int(pool_min_size)
        self.p2p_student = p2p_student
        self.region_temperature = float(region_temperature)
        self.region_kd_temperature = float(region_kd_temperature)
        self.region_source = region_source
        self.max_elements = int(max_elements)
        self.max_rows_per_chunk = None if max_rows_per_chunk is None else int(max_rows_per_chunk)
        # the projection head only exists when a term uses it (an unused head would break DDP)
        self._init_taps(ctx, student_tap, teacher_tap, adapter if needs_head else "none", "cirkd")
        self.pixels_per_class = int(pixels_per_class)
        self.pixel_sampling = pixel_sampling
        self.pixel_queue: ClassQueues | None = None
        self.region_queue: ClassQueues | None = None
        k = int(ctx.num_classes)
        self.pixel_contrast_per_class = int(pixel_contrast_size) // k + 1   # as train_cirkd.py passes it
        self.region_contrast_per_class = int(region_contrast_size) // k + 1
        if memory:
            self.weights["cirkd_mem_p2p"] = float(weight) * float(mem_p2p_weight)
            self.weights["cirkd_mem_p2r"] = float(weight) * float(mem_p2r_weight)
            self.pixel_queue = ClassQueues(k, int(memory_size), int(t_shape[1]))
            self.region_queue = ClassQueues(k, int(region_memory_size), int(t_shape[1]))

    def _contrast(self, s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return cirkd_memory_loss(s, t, target, bank, num_classes=self.ctx.num_classes,
                                 temperature=self.region_temperature, kd_temperature=self.region_kd_temperature,
                                 ignore_index=self.ignore_index, max_elements=self.max_elements,
                                 max_rows_per_chunk=self.max_rows_per_chunk)

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        t = inputs.teacher_feats[self.teacher_tap]
        raw = inputs.student_feats[self.student_tap]
        s = self.adapter(raw, t.shape[-2:])
        out: dict[str, torch.Tensor] = {}
        if self.weights["cirkd_p2p"] != 0:
            s_p2p = s if self.p2p_student == "adapted" else resize_to(raw, t.shape[-2:])
            out["cirkd_p2p"] = cirkd_pixel_loss(s_p2p, t, temperature=self.temperature, scope=self.scope,
                                                pool_size=self.pool_size, pool_mode=self.pool_mode,
                                                pool_min_size=self.pool_min_size, max_elements=self.max_elements,
                                                max_rows_per_chunk=self.max_rows_per_chunk)
        if self.weights.get("cirkd_p2r", 0) != 0:
            out["cirkd_p2r"] = cirkd_region_loss(s, t, inputs.target, num_classes=self.ctx.num_classes,
                                                 temperature=self.region_temperature,
                                                 kd_temperature=self.region_kd_temperature,
                                                 region_source=self.region_source, ignore_index=self.ignore_index,
                                                 max_elements=self.max_elements,
                                                 max_rows_per_chunk=self.max_rows_per_chunk)
        if self.pixel_queue is not None and self.region_queue is not None:
            lab = labels_to(inputs.target, t.shape[-2:])
            with torch.no_grad():
                t_n = F.normalize(t.detach().float(), dim=1)
                p_meta, p_rows, r_meta, r_rows = memory_entries(
                    t_n, lab, num_classes=self.ctx.num_classes, pixels_per_class=self.pixels_per_class,
                    pixel_sampling=self.pixel_sampling)
                _push_gathered(self.pixel_queue, p_meta, p_rows, "block")
                _push_gathered(self.region_queue, r_meta, r_rows, "ring")
                # one random slot set for all classes, as _sample_negative (global CPU RNG)
                pix_idx = torch.randperm(self.pixel_queue.size)[: self.pixel_contrast_per_class]
                reg_idx = torch.randperm(self.region_queue.size)[: self.region_contrast_per_class]
                pix_bank = self.pixel_queue.sample(pix_idx)
                reg_bank = self.region_queue.sample(reg_idx)
            if self.weights["cirkd_mem_p2p"] != 0:
                out["cirkd_mem_p2p"] = self._contrast(s, t, inputs.target, pix_bank)
            if self.weights["cirkd_mem_p2r"] != 0:
                out["cirkd_mem_p2r"] = self._contrast(s, t, inputs.target, reg_bank)
        return out
