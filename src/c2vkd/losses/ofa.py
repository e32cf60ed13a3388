"""OFA-KD: one-for-all knowledge distillation between heterogeneous architectures, per pixel.

Reference: Z. Hao, J. Guo, K. Han, Y. Tang, H. Hu, Y. Wang, C. Xu, "One-for-All: Bridge the Gap Between
Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023. Reference code: Hao840/OFAKD
(classification only), ``distillers/ofa.py`` ``ofa_loss`` and ``OFA.__init__`` / ``OFA.forward`` (file last
changed in commit 12eeba86d9f1049a01ded3f5912914ed40448692; repository HEAD f7bb896cac9879040800bde08a8cc2057a904c52),
defaults from ``train.py`` (``--ofa-eps 1``, ``--ofa-temperature 1``, ``--ofa-stage 1 2 3 4``,
``--gt-loss-weight 1``, ``--kd-loss-weight 1``, ``--ofa-loss-weight 1``).

Loss (the reference's ``ofa_loss``, per sample; here per pixel): with p_s = softmax(z_S / T), p_t = softmax(z_T / T)
(both over the class dim) and y the ground-truth one-hot,

    L = -sum_k [(p_t + y)^eps - y]_k * log p_s,k

i.e. the target class is weighted (1 + p_t,y)^eps - 1 and every other class p_t,k^eps. As in the reference:
the temperature divides both logits and there is **no T^2 factor**; the teacher is not differentiated (the
reference runs it under no_grad); the reduction is a plain mean. With eps = 1 the labels cancel ((p_t + y) - y =
p_t): the loss is the soft cross-entropy -sum_k p_t,k log p_s,k = KL(p_t || p_s) + H(p_t), i.e. pixel KD (without
the T^2 factor) plus the teacher's entropy, a constant for the student (tests/test_ofa.py shows the identity).

The objective (``OFA.forward``): ``gt_w * CE(z_s, y) + kd_w * OFA(z_s, z_t; eps[-1])
+ ofa_w * sum_{stage} OFA(branch_stage(F_stage), z_t; eps[stage])`` where each branch ("projector") maps a
student stage's feature to class logits. Here CE is the separate ``ce`` loss; this module returns one term for
the final logits (``ofa_final``, weight ``weight * final_weight`` = kd_w) and one per chosen stage
(``ofa_<tap>``, weight ``weight * stage_weight`` = ofa_w), so ``c2vkd report`` shows each.

Our dense adaptation (not in the reference, which only classifies; hetero_kd.md section 2.5):
  * **per pixel**: the formula is applied at every pixel of the logits grid ([B, K, h, w], class dim 1) and
    averaged over the valid pixels; pixels labelled ``ignore_index`` are excluded (classification has no
    ignore label). The logits grid is the teacher's logits at its output stride (``at: stride``, the
    ``logits`` taps; the student's logits are resized bilinearly to it, labels nearest-downsampled, as every
    logits loss here does) or the input size (``at: input``).
  * ``log_softmax`` instead of the reference's ``torch.log(softmax(...))``: equal wherever the reference is
    finite; the reference gives inf / NaN once p_s underflows to 0 (its issue #36 reports NaN).
  * **dense branches** (:class:`OFABranch`), replacing the reference's pooled classification projectors: for a
    stage tap ``stage<i>`` / ``layer<i>`` the reference's CNN branch has ``4 - i`` stride-2 ``SepConv`` blocks
    (depthwise 3x3 -> 1x1 -> BN -> ReLU -> depthwise 3x3 -> 1x1 -> BN -> ReLU; channels doubling, the last block
    at the head width) or a 1x1 conv for stage 4, then global pooling and a linear classifier. We keep the
    depth (``4 - i``, or ``depths``) and the blocks but keep the pixels: only as many blocks stride by 2 as are
    needed to go down to the logits grid (a stage finer than the grid), the others have stride 1, then a
    1x1 conv to K classes (the per-pixel linear classifier), then a bilinear resize to the grid (a stage
    coarser than the grid is upsampled, as segmentation heads upsample their logits). The head width is the
    student's last-stage width (``feat`` tap; the reference's ViT branch width; its CNN branch uses
    max(student, teacher final width), which at 2048 channels per pixel we do not), or ``head_channels``.
    Initialisation as the reference's ``init_weights`` (Kaiming-normal fan_out convs, BN 1 / 0, the classifier
    like its Linear: trunc-normal std 0.02, bias 0). The branches are trainable alignment heads: optimizer
    ``align`` group, training checkpoints, never the exported student.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from c2vkd.losses._common import check_logits_at, check_same_shape, logits_grid, logits_pair, logits_taps, no_autocast, \
    resize_to
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs, masked_mean

DEFAULT_STAGES = ("stage1", "stage2", "stage3", "stage4")


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
             temperature: float = 1.0, ignore_index: int = 255) -> torch.Tensor:
    """OFA's target-enhanced loss per pixel: mean over valid pixels of ``-sum_k [(p_t + y)^eps - y]_k log p_s,k``.

    student_logits, teacher_logits: [B, K, h, w] per-pixel logits at the same h, w (class dim 1; any float dtype,
    computed in float32, float64 kept); target: [B, h, w] long, ``ignore_index`` pixels excluded. p = softmax(z / T)
    on both sides, no T^2 factor, teacher detached (Hao840/OFAKD ``distillers/ofa.py`` ``ofa_loss``, whose
    ``loss.mean()`` over samples becomes the mean over valid pixels). Returns a scalar; 0 (with a gradient path,
    never NaN) when every pixel is ignored."""
    check_same_shape(student_logits, teacher_logits, "ofa_loss")
    if target.shape != student_logits.shape[:1] + student_logits.shape[2:]:
        raise ValueError(f"ofa_loss: target {tuple(target.shape)} does not match the logits "
                         f"{tuple(student_logits.shape)} (expected [B, h, w])")
    k = student_logits.shape[1]
    with no_autocast(student_logits):
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        log_ps = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
        pt = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
        valid = target != ignore_index
        y = F.one_hot(torch.where(valid, target, torch.zeros_like(target)), k).permute(0, 3, 1, 2).to(dtype)
        w = (pt + y).pow(eps) - y
        return masked_mean(-(w * log_ps).sum(dim=1), valid)


def _sep_conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    """The reference's SepConv block structure (depthwise 3x3 with ``stride`` -> 1x1 -> BN -> ReLU -> depthwise
    3x3 -> 1x1 -> BN -> ReLU, convs without bias)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.Conv2d(cin, cin, 1, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(),
        nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU())


class OFABranch(nn.Module):
    """Dense OFA branch (our adaptation, see the module docstring): a student stage feature [B, C, hs, ws] ->
    class logits [B, K, h, w] at the run-time grid size.

    ``depth`` blocks (0: one 1x1 conv with bias, the reference's stage-4 branch); the first ``down`` of them
    stride 2 (``depth`` is raised to ``down`` if smaller); channels double per block from ``in_channels`` and
    the last block outputs ``width``; then a 1x1 conv to ``num_classes`` and a bilinear resize."""

    def __init__(self, in_channels: int, width: int, num_classes: int, depth: int, down: int,
                 default_size: tuple[int, int]) -> None:
        super().__init__()
        self.in_channels, self.width, self.depth, self.down = int(in_channels), int(width), int(depth), int(down)
        self.default_size = (int(default_size[0]), int(default_size[1]))
        n = max(self.depth, self.down)
        if n == 0:
            self.blocks: nn.Module = nn.Conv2d(self.in_channels, self.width, 1)
        else:
            blocks, c = [], self.in_channels
            for j in range(n):
                out = self.width if j == n - 1 else min(2 * c, self.width)
                blocks.append(_sep_conv(c, out, 2 if j < self.down else 1))
                c = out
            self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(self.width, int(num_classes), 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"OFA branch expects a [B, {self.in_channels}, h, w] student feature, got "
                             f"{tuple(x.shape)}; the loss context's student shape is out of date")
        p = self.classifier.weight
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(p.dtype)  # e.g. a bf16 student tap without autocast
        return resize_to(self.classifier(self.blocks(x)), size if size is not None else self.default_size)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.width}, depth={self.depth}, down={self.down}"


def stage_depth(tap: str) -> int:
    """The reference's branch depth ``4 - i`` for a tap named ``stage<i>`` / ``layer<i>`` (i in 1..4)."""
    m = re.fullmatch(r"(?:stage|layer)([1-4])", tap.rsplit(".", 1)[-1])
    if m is None:
        raise ValueError(f"loss ofa: cannot tell the stage index of tap {tap!r} (expected stage1..stage4 or "
                         "layer1..layer4); give the branch depths explicitly with `depths`")
    return 4 - int(m.group(1))


def _term(tap: str) -> str:
    return "ofa_" + re.sub(r"[^0-9A-Za-z]+", "_", tap).strip("_")


@LOSSES.register("ofa")
class OFALoss(DistillLoss):
    """OFA-KD per pixel. Args: ``weight`` (1.0, multiplies every term), ``final_weight`` (1.0, the reference's
    kd_loss_weight), ``stage_weight`` (1.0, ofa_loss_weight), ``eps`` (1.0, or a list: one per stage then one
    for the final logits, as ``--ofa-eps``), ``temperature`` (1.0), ``stages`` (student tap names, default
    stage1..stage4; [] = final term only), ``depths`` (branch depths per stage, default ``4 - i``),
    ``head_channels`` (branch width, default the student's ``feat`` width), ``at`` ("stride" | "input")."""

    def __init__(self, ctx: LossContext, weight: float = 1.0, final_weight: float = 1.0, stage_weight: float = 1.0,
                 eps: float | Sequence[float] = 1.0, temperature: float = 1.0,
                 stages: Sequence[str] = DEFAULT_STAGES, depths: Sequence[int] | None = None,
                 head_channels: int | None = None, at: str = "stride") -> None:
        super().__init__(ctx, weight)
        if isinstance(stages, str):
            raise ValueError(f"loss ofa: stages must be a list of tap names, got the string {stages!r}")
        self.stages = [str(s) for s in stages]
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"loss ofa: stages {self.stages} name a tap twice")
        eps_list = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else [float(eps)] * (len(self.stages) + 1)
        if len(eps_list) == 1:
            eps_list = eps_list * (len(self.stages) + 1)  # the reference broadcasts a single --ofa-eps
        if len(eps_list) != len(self.stages) + 1:
            raise ValueError(f"loss ofa: eps needs one value per stage plus one for the final logits "
                             f"({len(self.stages) + 1}), got {len(eps_list)}")
        if any(not (e > 0 and math.isfinite(e)) for e in eps_list):
            raise ValueError(f"loss ofa: eps must be > 0, got {eps_list}")
        if not temperature > 0:
            raise ValueError(f"loss ofa: temperature must be > 0, got {temperature}")
        self.eps = eps_list
        self.temperature = float(temperature)
        self.at = check_logits_at(at, "ofa")
        if depths is None:
            depth_list = [stage_depth(s) for s in self.stages]
        else:
            depth_list = [int(d) for d in depths]
            if len(depth_list) != len(self.stages) or any(d < 0 for d in depth_list):
                raise ValueError(f"loss ofa: depths must give one depth >= 0 per stage ({len(self.stages)}), "
                                 f"got {list(depths)}")
        self.depths = depth_list
        self.stage_terms = [_term(s) for s in self.stages]
        if len(set(self.stage_terms)) != len(self.stage_terms) or "ofa_final" in self.stage_terms:
            raise ValueError(f"loss ofa: the stage taps {self.stages} give clashing term names {self.stage_terms}")
        self.weights = {"ofa_final": float(weight) * float(final_weight),
                        **{t: float(weight) * float(stage_weight) for t in self.stage_terms}}

        self.branches = nn.ModuleDict()
        if self.stages:
            shapes = ctx.student_shapes
            missing = [s for s in (*self.stages, *([] if head_channels else ["feat"])) if s not in shapes]
            if missing:
                raise KeyError(f"loss ofa: student taps {missing} have no measured shape in the loss context "
                               f"(available: {', '.join(sorted(shapes)) or 'none'})")
            width = int(head_channels) if head_channels else int(shapes["feat"][1])
            grid = logits_grid(ctx, self.at, "ofa")
            for tap, term, depth in zip(self.stages, self.stage_terms, self.depths):
                shape = shapes[tap]
                if len(shape) != 4:
                    raise ValueError(f"loss ofa: student tap {tap!r} is not a [B, C, h, w] map: {tuple(shape)}")
                down = max(int(round(math.log2(shape[2] / grid[0]))), 0) if shape[2] > grid[0] else 0
                self.branches[term] = OFABranch(shape[1], width, ctx.num_classes, depth, down, grid)

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        s, t = logits_taps(str(args.get("at", "stride")))
        raw = args.get("stages", DEFAULT_STAGES)
        stages = [raw] if isinstance(raw, str) else [str(x) for x in raw]  # a string: the constructor's error
        extra = [] if (args.get("head_channels") or not stages) else ["feat"]
        return [*s, *[n for n in [*stages, *extra] if n not in s]], t

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t, target = logits_pair(inputs, self.at)
        if target is None:
            raise ValueError("loss ofa needs ground-truth labels")
        kw = dict(temperature=self.temperature, ignore_index=self.ignore_index)
        out = {"ofa_final": ofa_loss(s, t, target, self.eps[-1], **kw)}
        for tap, term, eps in zip(self.stages, self.stage_terms, self.eps):
            out[term] = ofa_loss(self.branches[term](inputs.student_feats[tap], t.shape[-2:]), t, target, eps, **kw)
        return out
