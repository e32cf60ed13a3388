"""Pair-wise similarity distillation from Structured Knowledge Distillation (SKD).

Reference: Y. Liu, K. Chen, C. Liu, Z. Qin, Z. Luo, J. Wang, "Structured Knowledge Distillation for
Semantic Segmentation", CVPR 2019 (arXiv:1903.04197). Reference code followed by the defaults: winycg/CIRKD
``losses/skd.py`` ``CriterionStructuralKD.forward`` (the segmentation benchmark whose scripts the presets
follow: ``scripts/train_kd/train_skd.sh``, ``--lambda-skd 10`` plus pixel KD 1 and the adversarial term);
the authors' own code is irfanICMLL/structure_knowledge_distillation
(``CriterionPairWiseforWholeFeatAfterPool`` / ``sim_dis_compute`` in ``utils/criterion.py``).
This file is the pair-wise term; pixel-wise KD is the ``kd`` loss and the holistic (adversarial) term is the
``adv`` loss (losses/adversarial.py); ``methods/skd.yaml`` combines the three.

As in CIRKD's ``CriterionStructuralKD``:
  1. both feature maps are max-pooled with a fixed 2 x 2 kernel = stride (``pool_kernel: 2``, ceil mode),
     i.e. an (h/2) x (w/2) grid of nodes. The authors' code instead uses kernel = ``int(size * pool_scale)``
     per side with ``--pool-scale 0.5`` (about a 2 x 2 grid of nodes): ``pool_kernel: null, pool_scale:
     0.5``; ``pool_kernel: null, pool_scale: null`` keeps every position;
  2. per image, each node's feature is L2-normalised over channels (``F.normalize``: gradient through the
     norm, as CIRKD; the authors' code divides by a *detached* norm + 1e-8: ``detach_norm: true``) and the
     [N, N] cosine similarity matrix over the N nodes is formed;
  3. loss = mean over B*N*N of (S_T - S_S)^2.
Pair-wise similarity needs no channel agreement, so by default there is no learnable adapter: the
student map is only resized (bilinear) to the teacher's h x w (module option ``adapter``).
Taps: CIRKD reads ``outputs[-1]``, the head's feature before the classifier; the preset uses our
``decoder`` alias (the same place in DeepLabV3+ and SegFormer).

Bounded memory (our addition): the per-batch similarity tensor has B*N*N elements. If that exceeds
``max_pairs`` (default 2**24, i.e. 64 MiB per float32 matrix), both maps are further reduced with
adaptive max pooling to the largest grid with B*N*N <= max_pairs (aspect ratio kept); this is logged
once per distinct shape (a deviation from the reference at large feature maps; raise ``max_pairs`` on a
large GPU).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from c2vkd.losses._common import no_autocast
from c2vkd.losses.adapters import AdaptedFeatureLoss
from c2vkd.losses.base import LOSSES, LossContext, LossInputs

log = logging.getLogger(__name__)
_LOGGED: set[tuple] = set()
DEFAULT_MAX_PAIRS = 2 ** 24


def skd_pool(x: torch.Tensor, pool_scale: float | None, pool_kernel: int | None = None) -> torch.Tensor:
    """Node pooling: max-pool [B, C, h, w] with kernel = stride = ``pool_kernel`` (CIRKD, 2) or, without
    it, int(size * pool_scale) per side (the authors' code); ceil mode."""
    if pool_kernel:
        kh = kw = int(pool_kernel)
    elif pool_scale:
        kh, kw = max(1, int(x.shape[2] * pool_scale)), max(1, int(x.shape[3] * pool_scale))
    else:
        return x
    if kh == 1 and kw == 1:
        return x
    return F.max_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw), padding=0, ceil_mode=True)


def capped_grid(batch: int, h: int, w: int, max_pairs: int) -> tuple[int, int]:
    """Largest (h', w') <= (h, w), aspect kept approximately, with batch * (h'*w')^2 <= max_pairs."""
    n_max = math.isqrt(max(0, int(max_pairs)) // max(1, batch))
    if n_max < 1:
        raise ValueError(f"skd: max_pairs={max_pairs} is too small for a batch of {batch}")
    if h * w <= n_max:
        return h, w
    r = math.sqrt(n_max / (h * w))
    nh, nw = max(1, min(h, int(h * r))), max(1, min(w, int(w * r)))
    while nh * nw > n_max:
        if nh >= nw and nh > 1:
            nh -= 1
        else:
            nw -= 1
    return nh, nw


def pairwise_similarity(feat: torch.Tensor, detach_norm: bool = False) -> torch.Tensor:
    """[B, C, h, w] -> [B, N, N] cosine similarity between spatial positions (N = h*w), float32."""
    f = feat.float()
    if detach_norm:  # the authors' code: f / (||f|| + 1e-8).detach()
        f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8).detach()
    else:  # CIRKD: F.normalize, f / max(||f||, 1e-12)
        f = F.normalize(f, p=2, dim=1)
    f = f.flatten(2)                                   # [B, C, N]
    return torch.bmm(f.transpose(1, 2), f)


def skd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, pool_scale: float | None = 0.5,
             max_pairs: int = DEFAULT_MAX_PAIRS, detach_norm: bool = True,
             pool_kernel: int | None = None) -> torch.Tensor:
    """Pair-wise similarity distillation.

    student_feat: [B, Cs, h, w]; teacher_feat: [B, Ct, h, w] (same B, h, w; channels may differ).
    Returns mean((S_T - S_S)^2) over the [B, N, N] similarity matrices of the pooled maps (float32,
    teacher detached). The similarity tensors never exceed ``max_pairs`` elements (see module doc)."""
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"skd_loss: student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)} must share batch and spatial size")
    with no_autocast(student_feat):
        s = skd_pool(student_feat.float(), pool_scale, pool_kernel)
        t = skd_pool(teacher_feat.detach().float(), pool_scale, pool_kernel)
        b, _, h, w = t.shape
        nh, nw = capped_grid(b, h, w, max_pairs)
        if (nh, nw) != (h, w):
            key = (b, h, w, nh, nw, int(max_pairs))
            if key not in _LOGGED:
                _LOGGED.add(key)
                log.info("skd: %dx%d nodes at batch %d would need %d similarity entries > max_pairs=%d; "
                         "adaptive max pooling to %dx%d", h, w, b, b * (h * w) ** 2, max_pairs, nh, nw)
            s = F.adaptive_max_pool2d(s, (nh, nw))
            t = F.adaptive_max_pool2d(t, (nh, nw))
        sim_s = pairwise_similarity(s, detach_norm)
        sim_t = pairwise_similarity(t, detach_norm)
        return (sim_t - sim_s).pow(2).mean()


@LOSSES.register("skd")
class SKDLoss(AdaptedFeatureLoss):
    """SKD pair-wise term. Args: ``weight`` (1.0; CIRKD's script 10), ``pool_kernel`` (2, CIRKD),
    ``pool_scale`` (None; the authors' 0.5 when ``pool_kernel`` is null), ``max_pairs`` (2**24),
    ``detach_norm`` (False, CIRKD; True = the authors' code), ``adapter`` ("none": resize only),
    ``student_tap``/``teacher_tap`` ("feat")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, pool_scale: float | None = None,
                 max_pairs: int = DEFAULT_MAX_PAIRS, detach_norm: bool = False, adapter: str = "none",
                 student_tap: str = "feat", teacher_tap: str = "feat", pool_kernel: int | None = 2) -> None:
        super().__init__(ctx, weight)
        if pool_scale is not None and not (0 <= float(pool_scale) <= 1):
            raise ValueError(f"loss skd: pool_scale must be in [0, 1] (or null), got {pool_scale}")
        if pool_kernel is not None and int(pool_kernel) < 1:
            raise ValueError(f"loss skd: pool_kernel must be >= 1 (or null), got {pool_kernel}")
        if pool_kernel and pool_scale:
            raise ValueError("loss skd: give pool_kernel (CIRKD) or pool_scale (the authors' code), not both")
        self.pool_kernel = None if not pool_kernel else int(pool_kernel)
        self.pool_scale = None if not pool_scale else float(pool_scale)
        self.max_pairs = int(max_pairs)
        self.detach_norm = bool(detach_norm)
        self._init_taps(ctx, student_tap, teacher_tap, adapter, "skd")

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t = self.aligned(inputs)
        return {"skd": skd_loss(s, t, pool_scale=self.pool_scale, max_pairs=self.max_pairs,
                                detach_norm=self.detach_norm, pool_kernel=self.pool_kernel)}
