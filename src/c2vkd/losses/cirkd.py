"""Cross-image relational knowledge distillation (CIRKD), mini-batch form, with bounded memory.

Reference: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge
Distillation for Semantic Segmentation", CVPR 2022 (arXiv:2204.06986); authors' code
winycg/CIRKD (``CriterionMiniBatchCrossImagePair``, ``StudentSegContrast``).

Terms (raw values returned under these names):

``cirkd_p2p`` -- pixel-to-pixel relations across the whole mini-batch. Features are max-pooled
(``pool_size`` x ``pool_size``, ceil mode; the reference code uses 2), L2-normalised over channels
and flattened to N = B*h*w rows. With S = F F^T / tau (N x N, cross-image pairs included) the loss is
a KL(teacher row distribution || student row distribution) averaged over rows. ``scope`` picks the
row softmax:
  * ``"pair"`` (default, as in the paper and the reference code): each row is split into the B
    image blocks; the softmax runs inside each (anchor image i, contrast image j) block and the loss
    is (1/B^2) sum_{i,j} (1/A) sum_a KL_{ij,a} (A = h*w);
  * ``"batch"``: one softmax over all N columns of a row; the loss is the mean over the N rows.
Memory: S is never materialised. Rows are processed in chunks of ``r`` rows with
``r = min(max_rows_per_chunk, max_elements // N)`` (at least 1), so every intermediate is r x N
(<= ``max_elements``, default 2**25 elements = 128 MiB in float32). Each row's softmax is complete
inside its chunk, so the chunked value is exactly the unchunked one. Under autograd each chunk is
wrapped in activation checkpointing (non-reentrant) so the backward pass also holds one chunk of
intermediates at a time instead of all of them (i.e. N x N in total).

``cirkd_p2r`` -- pixel-to-region relations. Region embeddings are class-region means of the
L2-normalised TEACHER features per image (labels nearest-downsampled to the feature size; regions
of classes absent from an image are masked out), re-normalised, as CIRKD builds its region memory.
Every valid pixel's similarity to all B*K region slots (/ ``region_temperature``) gives teacher and
student logits; the loss is kd_T^2 * mean over valid pixels of KL(softmax(t / kd_T) || softmax(s / kd_T))
(CIRKD's ``contrast_sim_kd``). ``region_source="own"`` instead compares each network's pixels with its
own regions. Chunked like p2p (rows x B*K). CIRKD draws regions from a memory bank of past batches;
this in-batch variant is our adaptation.

``cirkd_mem_p2p`` / ``cirkd_mem_p2r`` -- optional memory-bank variant (off by default:
``memory_size: 0``). A simplified version of CIRKD's ``StudentSegContrast``: FIFO
queues of past L2-normalised TEACHER pixel embeddings (``pixels_per_image`` random valid pixels per
image per step, ``memory_size`` entries) and teacher class-region embeddings (one per class present
per image, ``region_memory_size`` entries). Each step first enqueues the current batch (as CIRKD
does), then every valid pixel's similarity to all filled queue entries (/ ``region_temperature``)
gives teacher and student logits and the same KL as ``cirkd_p2r`` (chunked, same budget).
Simplifications vs. the reference: one queue per kind instead of one per class, the whole filled
queue is the contrast set (no per-step subsampling), queues start empty (not random). The queues are
saved in training checkpoints (exact resume) and, under DDP, every rank enqueues the rows gathered from
all ranks, so the banks stay identical across processes.

Student adapter: 1x1 conv C_S -> C_T (sized from the loss context) then bilinear resize to the
teacher's h x w (``adapter: mlp`` = CIRKD's conv-BN-ReLU-conv projection head). It is used by both
terms (the reference code's mini-batch term uses the raw student feature; relations compare a network
with itself, so either works).

Defaults (CIRKD's training-script defaults, recalled offline): tau = 0.1 (``contrast_temperature``),
kd_T = 1.0 (``contrast_kd_temperature``), p2p weight 1.0 (``lambda_minibatch_pixel``), region weight
0.1 (the memory-region weight, applied here to the in-batch region term -- our choice).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from c2vkd.losses.adapters import AdaptedFeatureLoss, labels_to, no_autocast
from c2vkd.losses.base import LOSSES, LossContext, LossInputs, masked_mean
from c2vkd.utils.dist import all_gather_rows

log = logging.getLogger(__name__)
_LOGGED: set[tuple] = set()
DEFAULT_MAX_ELEMENTS = 2 ** 25
SCOPES = ("pair", "batch")
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
    """KL(softmax(t) || softmax(s)) per row for one chunk; rows [r, C], cols [M, C] -> [r].

    Logits are rows @ cols^T / temperature (+ col_bias) / kd_temperature; with groups > 1 the M
    columns are split into ``groups`` equal blocks, each with its own softmax, and the block KLs summed."""
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


def chunked_row_kl(s_rows: torch.Tensor, t_rows: torch.Tensor, s_cols: torch.Tensor, t_cols: torch.Tensor, *,
                   temperature: float, kd_temperature: float = 1.0, groups: int = 1,
                   col_bias: torch.Tensor | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   max_rows_per_chunk: int | None = None, use_checkpoint: bool = True) -> torch.Tensor:
    """Per-row relation KL [R] without materialising the R x M relation matrices (see module doc)."""
    n_rows, n_cols = s_rows.shape[0], s_cols.shape[0]
    rows = rows_per_chunk(n_cols, max_elements, max_rows_per_chunk)
    fn = functools.partial(_row_kl, temperature=temperature, kd_temperature=kd_temperature, groups=groups)
    grad = torch.is_grad_enabled() and (s_rows.requires_grad or s_cols.requires_grad)
    out = []
    for start in range(0, n_rows, rows):
        args = (s_rows[start:start + rows], t_rows[start:start + rows], s_cols, t_cols, col_bias)
        if grad and use_checkpoint and n_rows > rows:
            out.append(checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(fn(*args))
    return torch.cat(out) if len(out) > 1 else out[0]


def _pixels(feat: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B*h*w, C] rows (image-major, then row-major positions)."""
    return feat.flatten(2).transpose(1, 2).reshape(-1, feat.shape[1])


def cirkd_pixel_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, temperature: float = 0.1,
                     scope: str = "pair", pool_size: int = 2, max_elements: int = DEFAULT_MAX_ELEMENTS,
                     max_rows_per_chunk: int | None = None, use_checkpoint: bool = True) -> torch.Tensor:
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
        if pool_size and pool_size > 1:
            s = F.max_pool2d(s, pool_size, pool_size, ceil_mode=True)
            t = F.max_pool2d(t, pool_size, pool_size, ceil_mode=True)
        b = t.shape[0]
        fs = _pixels(F.normalize(s, dim=1))
        ft = _pixels(F.normalize(t, dim=1))
        n = fs.shape[0]
        groups = b if scope == "pair" else 1
        kl = chunked_row_kl(fs, ft, fs, ft, temperature=temperature, groups=groups, max_elements=max_elements,
                            max_rows_per_chunk=max_rows_per_chunk, use_checkpoint=use_checkpoint)
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
                      use_checkpoint: bool = True) -> torch.Tensor:
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
                            use_checkpoint=use_checkpoint)
        return (kd_temperature ** 2) * masked_mean(kl, valid.reshape(-1))


def cirkd_memory_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, target: torch.Tensor,
                      memory: torch.Tensor, *, num_classes: int, temperature: float = 0.1,
                      kd_temperature: float = 1.0, ignore_index: int = 255,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, max_rows_per_chunk: int | None = None,
                      use_checkpoint: bool = True) -> torch.Tensor:
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
                            use_checkpoint=use_checkpoint)
        return (kd_temperature ** 2) * masked_mean(kl, valid)


class EmbeddingQueue(nn.Module):
    """A FIFO ring buffer of ``size`` embeddings of dimension ``dim``.

    The bank and its pointers are persistent buffers, so they are saved in training checkpoints and a
    resumed run continues with the same memory (exact resume). Under DDP every rank enqueues the rows of
    all ranks (gathered), so all banks stay identical, as in CIRKD's distributed queue."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("bank", torch.zeros(self.size, int(dim)))
        self.register_buffer("ptr_filled", torch.zeros(2, dtype=torch.long))

    @property
    def ptr(self) -> int:
        return int(self.ptr_filled[0])

    @property
    def filled(self) -> int:
        return int(self.ptr_filled[1])

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Append rows [n, dim] (the newest ``size`` of them when n > size), overwriting the oldest."""
        rows = all_gather_rows(rows.detach().to(self.bank.dtype))[-self.size:]
        n = rows.shape[0]
        if n == 0:
            return
        ptr = self.ptr
        idx = (ptr + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[idx] = rows.to(self.bank.device)
        self.ptr_filled[0] = (ptr + n) % self.size
        self.ptr_filled[1] = min(self.size, self.filled + n)

    def contents(self) -> torch.Tensor:
        return self.bank[: self.filled]


@torch.no_grad()
def teacher_memory_rows(teacher_feat: torch.Tensor, target: torch.Tensor, *, num_classes: int,
                        pixels_per_image: int, ignore_index: int = 255,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What one step enqueues: (pixel rows [<= B*pixels_per_image, C], region rows [#present, C]).

    Pixel rows: L2-normalised teacher features at ``pixels_per_image`` random valid pixels per image
    (fewer if an image has fewer). Region rows: per image and present class, the normalised mean of
    the normalised teacher features (as :func:`region_embeddings`)."""
    b, c, h, w = teacher_feat.shape
    ft = F.normalize(teacher_feat.detach().float(), dim=1).flatten(2)          # [B, C, n]
    lab = labels_to(target, (h, w)).reshape(b, -1)
    valid = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
    pix = []
    for i in range(b):
        idx = valid[i].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        pick = torch.randperm(idx.numel(), generator=generator, device="cpu")[:pixels_per_image]
        pix.append(ft[i][:, idx[pick.to(idx.device)]].T)
    pixels = torch.cat(pix) if pix else ft.new_zeros(0, c)
    onehot = (F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), num_classes) * valid[..., None])
    regions, present = region_embeddings(ft, onehot.transpose(1, 2).float())
    return pixels, regions[present]


@LOSSES.register("cirkd")
class CIRKDLoss(AdaptedFeatureLoss):
    """CIRKD. Terms ``cirkd_p2p`` (weight * p2p_weight), ``cirkd_p2r`` (weight * p2r_weight) and, with
    ``memory_size > 0``, ``cirkd_mem_p2p`` / ``cirkd_mem_p2r`` (weight * mem_p2p_weight /
    weight * mem_p2r_weight); a term with weight 0 is not computed (its queue is still filled).

    Args: ``weight`` (1.0), ``p2p_weight`` (1.0), ``p2r_weight`` (0.1), ``temperature`` (0.1),
    ``scope`` ("pair"), ``pool_size`` (2), ``region_temperature`` (0.1), ``region_kd_temperature``
    (1.0), ``region_source`` ("teacher"), ``max_elements`` (2**25), ``max_rows_per_chunk`` (None),
    ``adapter`` ("conv1x1"), ``student_tap`` / ``teacher_tap`` ("feat"); memory bank: ``memory_size``
    (0 = off), ``region_memory_size`` (2000), ``pixels_per_image`` (64), ``mem_p2p_weight`` (0.1),
    ``mem_p2r_weight`` (0.1)."""

    registry_name = "cirkd"

    def __init__(self, ctx: LossContext, weight: float = 1.0, p2p_weight: float = 1.0, p2r_weight: float = 0.1,
                 temperature: float = 0.1, scope: str = "pair", pool_size: int = 2,
                 region_temperature: float = 0.1, region_kd_temperature: float = 1.0,
                 region_source: str = "teacher", max_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_rows_per_chunk: int | None = None, adapter: str = "conv1x1",
                 student_tap: str = "feat", teacher_tap: str = "feat", memory_size: int = 0,
                 region_memory_size: int = 2000, pixels_per_image: int = 64, mem_p2p_weight: float = 0.1,
                 mem_p2r_weight: float = 0.1) -> None:
        super().__init__(ctx, weight)
        if scope not in SCOPES:
            raise ValueError(f"loss cirkd: scope must be one of {SCOPES}, got {scope!r}")
        if region_source not in ("teacher", "own"):
            raise ValueError(f"loss cirkd: region_source must be 'teacher' or 'own', got {region_source!r}")
        if region_source == "teacher" and adapter == "none" and p2r_weight:
            raise ValueError("loss cirkd: region_source 'teacher' compares student pixels with teacher "
                             "regions, so it needs a channel adapter")
        for name, v in (("temperature", temperature), ("region_temperature", region_temperature),
                        ("region_kd_temperature", region_kd_temperature)):
            if v <= 0:
                raise ValueError(f"loss cirkd: {name} must be > 0, got {v}")
        if int(max_elements) < 1:
            raise ValueError(f"loss cirkd: max_elements must be >= 1, got {max_elements}")
        if int(memory_size) < 0 or (int(memory_size) > 0 and (int(region_memory_size) < 1
                                                               or int(pixels_per_image) < 1)):
            raise ValueError("loss cirkd: memory_size must be >= 0; with a memory, region_memory_size and "
                             "pixels_per_image must be >= 1")
        if int(memory_size) > 0 and adapter == "none":
            raise ValueError("loss cirkd: the memory terms compare student pixels with teacher embeddings, "
                             "so they need a channel adapter")
        self.weights = {"cirkd_p2p": float(weight) * float(p2p_weight),
                        "cirkd_p2r": float(weight) * float(p2r_weight)}
        self.pixel_queue: EmbeddingQueue | None = None
        self.region_queue: EmbeddingQueue | None = None
        self.temperature, self.scope, self.pool_size = float(temperature), scope, int(pool_size)
        self.region_temperature = float(region_temperature)
        self.region_kd_temperature = float(region_kd_temperature)
        self.region_source = region_source
        self.max_elements = int(max_elements)
        self.max_rows_per_chunk = None if max_rows_per_chunk is None else int(max_rows_per_chunk)
        s_shape, t_shape = self._init_taps(ctx, student_tap, teacher_tap, adapter, "cirkd")
        self.pixels_per_image = int(pixels_per_image)
        if int(memory_size) > 0:
            self.weights["cirkd_mem_p2p"] = float(weight) * float(mem_p2p_weight)
            self.weights["cirkd_mem_p2r"] = float(weight) * float(mem_p2r_weight)
            self.pixel_queue = EmbeddingQueue(int(memory_size), t_shape[1])
            self.region_queue = EmbeddingQueue(int(region_memory_size), t_shape[1])

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t = self.aligned(inputs)
        out: dict[str, torch.Tensor] = {}
        if self.weights["cirkd_p2p"] != 0:
            out["cirkd_p2p"] = cirkd_pixel_loss(s, t, temperature=self.temperature, scope=self.scope,
                                                pool_size=self.pool_size, max_elements=self.max_elements,
                                                max_rows_per_chunk=self.max_rows_per_chunk)
        if self.weights["cirkd_p2r"] != 0:
            out["cirkd_p2r"] = cirkd_region_loss(s, t, inputs.target, num_classes=self.ctx.num_classes,
                                                 temperature=self.region_temperature,
                                                 kd_temperature=self.region_kd_temperature,
                                                 region_source=self.region_source, ignore_index=self.ignore_index,
                                                 max_elements=self.max_elements,
                                                 max_rows_per_chunk=self.max_rows_per_chunk)
        if self.pixel_queue is not None and self.region_queue is not None:
            pixels, regions = teacher_memory_rows(t, inputs.target, num_classes=self.ctx.num_classes,
                                                  pixels_per_image=self.pixels_per_image,
                                                  ignore_index=self.ignore_index)
            self.pixel_queue.push(pixels)
            self.region_queue.push(regions)
            for term, queue in (("cirkd_mem_p2p", self.pixel_queue), ("cirkd_mem_p2r", self.region_queue)):
                if self.weights[term] != 0:
                    out[term] = cirkd_memory_loss(s, t, inputs.target, queue.contents(),
                                                  num_classes=self.ctx.num_classes,
                                                  temperature=self.region_temperature,
                                                  kd_temperature=self.region_kd_temperature,
                                                  ignore_index=self.ignore_index, max_elements=self.max_elements,
                                                  max_rows_per_chunk=self.max_rows_per_chunk)
        return out
