"""Adversarial (holistic) distillation: a discriminator tells teacher logit maps from student ones.

References:
  * SKD's holistic term: Y. Liu et al., "Structured Knowledge Distillation for Semantic Segmentation",
    CVPR 2019; irfanICMLL/structure_knowledge_distillation ``networks/kd_model.py``
    (``student_backward`` / ``discriminator_backward``), ``utils/criterion.py`` (``CriterionAdv``,
    ``CriterionAdvForG``, ``CriterionAdditionalGP``), ``networks/sagan_models.py`` (``Discriminator``):
    Wasserstein loss with gradient penalty (``--adv-loss-type wgan-gp``, ``--lambda-gp 10``,
    ``--lambda-d 0.1`` on both the generator and the discriminator loss).
  * CIRKD's segmentation benchmark: winycg/CIRKD ``train_kd.py`` (``D_model``, ``D_optimizer``,
    ``criterion_adv`` / ``criterion_adv_for_G`` with ``'hinge'``), ``losses/adv.py``, ``utils/sagan.py``
    (``Discriminator(preprocess_GAN_mode=1, input_channel=num_class)``); ``scripts/train_kd/train_{skd,ifvd,
    cwd}.sh`` use ``--lambda-adv 0.001 --lambda-d 0.1``; D optimiser Adam(lr 4e-4, betas (0.9, 0.99)).

Terms (registered loss ``adv``):
  * ``adv_g`` (weight = ``weight``, the generator weight, CIRKD's lambda_adv): ``-mean D(z_S)`` for both
    modes (``CriterionAdvForG``); the gradient reaches the student through the frozen-for-this-pass
    discriminator.
  * ``adv_d`` (weight 0: logged only): the discriminator loss of the last discriminator update,
    ``d_weight * (L_adv + gp_weight * GP)`` with L_adv = ``-mean D(z_T) + mean D(z_S)`` ("wgan-gp") or
    ``mean relu(1 - D(z_T)) + mean relu(1 + D(z_S))`` ("hinge"), and GP (wgan-gp only) =
    ``mean_b (||grad_x D(x_b)||_2 - 1)^2`` at ``x = a z_T + (1 - a) z_S``, ``a ~ U(0, 1)`` per image.
The inputs are the logit maps at the output stride (``at: stride``, the reference's ``outputs[0]``; the
student's map is resized to the teacher's size when the strides differ, see
:func:`~c2vkd.losses._common.logits_pair`).

Design (why the engine is untouched). The discriminator is trained to *maximise* what the student
minimises, so it must not be in the trainer's optimizer:
  * its parameters are created with ``requires_grad=False``. The engine's optimizer, its parameter groups
    and DDP only take parameters that require grad, so none of them sees the discriminator; the student's
    gradient still flows *through* it to the student logits (``adv_g``).
  * this module owns the discriminator's optimizer and updates it inside its own training-mode forward, on
    detached logits, with ``torch.autograd.grad`` (the gradients never touch ``.grad`` of anything else),
    with autocast off (float32), parameters switched to ``requires_grad=True`` only for that update.
  * order: the reference computes the generator loss with D_t, steps the student, then steps D_t -> D_t+1 on
    the same (detached) batch. Updating D in place inside step t's forward would modify tensors that step
    t's backward still needs, so the update is *deferred*: step t stores its detached (z_S, z_T), and step
    t+1's forward first applies that update, then computes its generator loss with D_t+1. The sequence of
    discriminator states and generator losses is exactly the reference's (the last step's update is never
    needed). With gradient accumulation every micro-batch forward makes one discriminator step.
  * under DDP the discriminator gradients are averaged over ranks (all-reduce, ``utils/dist.py``) before
    the step, so every rank holds the same discriminator (its BatchNorm and spectral-norm vectors are
    buffers, which DDP broadcasts from rank 0 anyway).
  * checkpoints: the discriminator's weights and buffers are in ``state_dict()``; its optimizer state and
    the pending (z_S, z_T) travel through ``get_extra_state`` / ``set_extra_state``, so a training
    checkpoint (which saves ``losses.state_dict()``) resumes exactly. All of it is plain tensors / dicts,
    loadable with ``weights_only=True``.
  * eval mode (``module.eval()``): ``adv_g`` is computed, nothing is updated or stored.

Discriminator: CIRKD's ``utils/sagan.py`` ``Discriminator`` (SAGAN, the same family as SKD's
``sagan_models.py``): BatchNorm on the K input channels (``preprocess_GAN_mode=1``), four spectral-normalised
4x4 stride-2 convs (K -> 64 -> 128 -> 256 -> 512) with LeakyReLU(0.1), self-attention after the third and
fourth, and a 4x4 conv to one channel. Spectral norm is PyTorch's parametrisation (one power iteration per
training forward, as the reference's ``SpectralNorm``). Deviation: the reference's last 4x4 valid conv needs
maps of at least 64 x 64 (crop 512 at stride 8); smaller maps (tiny CPU crops) are bilinearly upsampled so
that their short side is ``min_input`` (64) before the discriminator, logged once.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from c2vkd.losses._common import check_logits_at, logits_pair, logits_taps, no_autocast
from c2vkd.losses.base import LOSSES, DistillLoss, LossContext, LossInputs
from c2vkd.utils import dist as dist_utils

log = logging.getLogger(__name__)
_LOGGED: set[tuple] = set()
MODES = ("wgan-gp", "hinge")
OPTIMIZERS = ("adam", "sgd")


class SelfAttention(nn.Module):
    """SAGAN self-attention (CIRKD ``utils/sagan.py`` ``Self_Attn``): out = gamma * attn(x) + x, gamma = 0 at
    init. x [B, C, h, w] -> [B, C, h, w]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(dim, dim // 8, 1)
        self.key = nn.Conv2d(dim, dim // 8, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)              # [B, N, C/8]
        k = self.key(x).flatten(2)                                # [B, C/8, N]
        attn = torch.softmax(torch.bmm(q, k), dim=-1)             # [B, N, N]
        v = self.value(x).flatten(2)                              # [B, C, N]
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class Discriminator(nn.Module):
    """CIRKD's SAGAN discriminator on K-channel logit maps. x [B, K, h, w] (h, w >= 64) -> [B, 1, h/16 - 3,
    w/16 - 3] scores."""

    def __init__(self, in_channels: int, conv_dim: int = 64) -> None:
        super().__init__()
        self.preprocess = nn.BatchNorm2d(in_channels)
        d = int(conv_dim)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.1))

        self.l1, self.l2, self.l3 = block(in_channels, d), block(d, 2 * d), block(2 * d, 4 * d)
        self.attn1 = SelfAttention(4 * d)
        self.l4 = block(4 * d, 8 * d)
        self.attn2 = SelfAttention(8 * d)
        self.last = nn.Conv2d(8 * d, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.l3(self.l2(self.l1(self.preprocess(x))))
        return self.last(self.attn2(self.l4(self.attn1(x))))


def discriminator_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, mode: str) -> torch.Tensor:
    """The discriminator's adversarial loss (teacher = real, student = fake) from its scores."""
    if mode == "wgan-gp":
        return -d_teacher.mean() + d_student.mean()
    return F.relu(1.0 - d_teacher).mean() + F.relu(1.0 + d_student).mean()


def gradient_penalty(disc: nn.Module, student: torch.Tensor, teacher: torch.Tensor,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP penalty mean_b (||dD/dx (x_b)|| - 1)^2 at x = a t + (1 - a) s (a [B, 1, 1, 1], U(0, 1))."""
    if alpha is None:
        alpha = torch.rand(teacher.shape[0], 1, 1, 1, device=teacher.device, dtype=teacher.dtype)
    x = (alpha * teacher.detach() + (1 - alpha) * student.detach()).requires_grad_(True)
    out = disc(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@LOSSES.register("adv")
class AdversarialLoss(DistillLoss):
    """Holistic / adversarial term on logit maps. Args: ``weight`` (generator weight, 0.001), ``d_weight``
    (discriminator-loss scale, 0.1), ``mode`` ("hinge" | "wgan-gp"), ``gp_weight`` (10, wgan-gp only),
    ``d_optimizer`` ("adam" | "sgd"), ``d_lr`` (4e-4), ``d_betas`` ([0.9, 0.99], adam), ``d_momentum`` (0.9,
    sgd), ``d_weight_decay`` (0), ``conv_dim`` (64), ``at`` ("stride" | "input"), ``min_input`` (64)."""

    def __init__(self, ctx: LossContext, weight: float = 0.001, d_weight: float = 0.1, mode: str = "hinge",
                 gp_weight: float = 10.0, d_optimizer: str = "adam", d_lr: float = 4e-4,
                 d_betas: tuple[float, float] | list[float] = (0.9, 0.99), d_momentum: float = 0.9,
                 d_weight_decay: float = 0.0, conv_dim: int = 64, at: str = "stride", min_input: int = 64) -> None:
        super().__init__(ctx, weight)
        if mode not in MODES:
            raise ValueError(f"loss adv: mode must be one of {MODES}, got {mode!r}")
        if d_optimizer not in OPTIMIZERS:
            raise ValueError(f"loss adv: d_optimizer must be one of {OPTIMIZERS}, got {d_optimizer!r}")
        if d_lr <= 0 or int(conv_dim) < 8 or int(min_input) < 64:
            raise ValueError(f"loss adv: need d_lr > 0, conv_dim >= 8 and min_input >= 64 (got {d_lr}, "
                             f"{conv_dim}, {min_input})")
        self.weights = {"adv_g": float(weight), "adv_d": 0.0}
        self.mode, self.d_weight, self.gp_weight = mode, float(d_weight), float(gp_weight)
        self.at = check_logits_at(at, "adv")
        self.min_input = int(min_input)
        self.discriminator = Discriminator(ctx.num_classes, int(conv_dim))
        self.discriminator.requires_grad_(False)  # never in the trainer's optimizer / DDP (module doc)
        params = list(self.discriminator.parameters())
        if d_optimizer == "adam":
            betas = tuple(float(b) for b in d_betas)
            if len(betas) != 2:
                raise ValueError(f"loss adv: d_betas must be two numbers, got {d_betas!r}")
            self._d_opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=float(d_lr), betas=betas,
                                                                  weight_decay=float(d_weight_decay))
        else:
            self._d_opt = torch.optim.SGD(params, lr=float(d_lr), momentum=float(d_momentum),
                                          weight_decay=float(d_weight_decay))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_d_loss = torch.zeros(())

    @classmethod
    def taps(cls, args: dict) -> tuple[list[str], list[str]]:
        return logits_taps(str(args.get("at", "stride")))

    # ------------------------------------------------------------------ checkpoint state beyond parameters
    def get_extra_state(self) -> dict:
        pending = None if self._pending is None else [t.detach().cpu() for t in self._pending]
        return {"d_optimizer": self._d_opt.state_dict(), "pending": pending,
                "last_d_loss": self._last_d_loss.detach().cpu()}

    def set_extra_state(self, state: dict) -> None:
        self._d_opt.load_state_dict(state["d_optimizer"])
        device = next(self.discriminator.parameters()).device
        pending = state.get("pending")
        self._pending = None if pending is None else (pending[0].to(device), pending[1].to(device))
        self._last_d_loss = state.get("last_d_loss", torch.zeros(()))

    def _apply(self, fn, recurse: bool = True):  # .to(device) also moves the pending maps
        super()._apply(fn, recurse)
        if self._pending is not None:
            self._pending = (fn(self._pending[0]), fn(self._pending[1]))
        return self

    # ------------------------------------------------------------------ the two passes
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample maps whose short side is below ``min_input`` (the discriminator's minimum; module doc)."""
        h, w = x.shape[-2:]
        if min(h, w) >= self.min_input:
            return x
        scale = self.min_input / min(h, w)
        size = (max(self.min_input, math.ceil(h * scale)), max(self.min_input, math.ceil(w * scale)))
        key = (h, w, size)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning("adv: %dx%d logit maps are below the discriminator's %d-pixel minimum; upsampling "
                        "them bilinearly to %dx%d", h, w, self.min_input, *size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def update_discriminator(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """One discriminator step on detached maps [B, K, h, w] (already prepared). Returns its loss."""
        disc = self.discriminator
        params = list(disc.parameters())
        s, t = student.detach().float(), teacher.detach().float()
        with torch.enable_grad(), no_autocast(s):
            disc.requires_grad_(True)
            try:
                loss = discriminator_loss(disc(s), disc(t), self.mode)
                if self.mode == "wgan-gp" and self.gp_weight:
                    loss = loss + self.gp_weight * gradient_penalty(disc, s, t)
                loss = self.d_weight * loss
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            finally:
                disc.requires_grad_(False)
        world = dist_utils.world_size()
        for p, g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g.detach()
            if world > 1:  # identical discriminators on every rank
                g = dist_utils.all_reduce_(g.contiguous()) / world
            p.grad = g
        self._d_opt.step()
        for p in params:
            p.grad = None
        return loss.detach()

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t, _ = logits_pair(inputs, self.at)
        s, t = self.prepare(s), self.prepare(t)
        if self.training and self._pending is not None:
            self._last_d_loss = self.update_discriminator(*self._pending)
            self._pending = None
        g_loss = -self.discriminator(s).float().mean()  # CriterionAdvForG, both modes
        if self.training:
            self._pending = (s.detach().float(), t.detach().float())
        return {"adv_g": g_loss, "adv_d": self._last_d_loss.to(g_loss.device)}
