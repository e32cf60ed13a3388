"""More ViT students on timm encoders: PVTv2-B0/B1 and Swin-T with a Semantic-FPN head, DeiT-Tiny/Small
(plain ViT, patch 16) with a progressive-upsampling head.

Every encoder is built with ``timm.create_model(..., pretrained=False, num_classes=0)``: random init, no hub
access, no classifier. ImageNet weights come from a local file (``build_model(name, K, pretrained=path)``)
through :meth:`adapt_state_dict` (explicit key mapping, see each class).

Shared layout (the paths feature taps and checkpoints use)::

    encoder.*              the timm model (parameter names = timm's, under ``encoder.``)
    stage1..stage4         nn.Identity taps: spatial [B, C_i, h_i, w_i] encoder outputs
    decode_head.*          SemanticFPNHead / ProgressiveUpsamplingHead
    decode_head.fused      nn.Identity tap: the decoder feature before dropout + classifier (alias "decoder")
    decode_head.classifier the 1x1 classifier: logits at the head's stride on the padded grid (alias "logits")

``feat`` (the C2VKD student tap) is always ``stage4``. Every parameter is used in every forward (no dead
classifier / norm), so the models train under DDP without ``find_unused_parameters``.

Input sizes: PVTv2 takes any size above a small minimum (its convolutions pad). Swin-T and DeiT need sides
that are multiples of 32 / 16: other inputs are zero-padded at the bottom/right (0 = the mean colour after
normalisation), the network runs on the padded image and the logits are cropped back, so 97x131 works and
logits always come out at the input size. Taps then have the padded grid (``ceil(H/s)``).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from c2vkd.models.base import MODELS, AdaptedStateDict, SegmentationModel, min_side_for_reductions

log = logging.getLogger(__name__)

_STAGE_TAPS: dict[str, str] = {
    "feat": "stage4",
    "stage1": "stage1",
    "stage2": "stage2",
    "stage3": "stage3",
    "stage4": "stage4",
    "decoder": "decode_head.fused",
    "logits": "decode_head.classifier",  # logits at the head's stride, before the final upsample / crop
}


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad [B, C, H, W] at the bottom/right so that H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


# ----------------------------------------------------------------------------------------------- heads
class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al. 2019, the semantic branch of Panoptic FPN; mmseg ``FPN`` + ``FPNHead``).

    Input: four features [B, C_i, H_i, W_i] at strides 4, 8, 16, 32 (sizes may be odd: every upsampling goes
    to the exact size of the next finer level).

    * neck: lateral 1x1 conv C_i -> ``fpn_channels``; top-down ``p_i = l_i + nearest_up(p_{i+1})``; a 3x3
      conv per level (no norm, as in FPN);
    * scale heads: level i (stride 4 * 2**i) runs ``max(1, i)`` blocks [3x3 conv -> ``head_channels`` + BN +
      ReLU, then 2x bilinear upsampling for i >= 1], ending at stride 4;
    * the four stride-4 maps are summed (tap ``fused``: [B, head_channels, H_0, W_0]), dropout, 1x1 conv
      -> K logits at stride 4.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 head_channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in in_channels)
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(_conv_bn_relu(fpn_channels if j == 0 else head_channels, head_channels)
                          for j in range(max(1, i)))
            for i in range(len(in_channels)))
        self.fused = nn.Identity()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        pyramid = [conv(p) for conv, p in zip(self.fpn_convs, lat)]
        sizes = [p.shape[-2:] for p in pyramid]
        out: torch.Tensor | None = None
        for i, (blocks, h) in enumerate(zip(self.scale_heads, pyramid)):
            for j, block in enumerate(blocks):
                h = block(h)
                if i - j >= 1:  # not yet at stride 4: up to the next finer level's size
                    h = F.interpolate(h, size=sizes[i - j - 1], mode="bilinear", align_corners=False)
            out = h if out is None else out + h
        assert out is not None
        return self.classifier(self.dropout(self.fused(out)))


class ProgressiveUpsamplingHead(nn.Module):
    """Progressive upsampling head in the style of SETR-PUP (Zheng et al. 2021), stopping at stride 4.

    Input [B, C, H/16, W/16]. For each width in ``channels``: 3x3 conv -> width + BN + ReLU, then 2x
    bilinear upsampling (two blocks by default: 1/16 -> 1/8 -> 1/4). Tap ``fused`` = [B, channels[-1],
    H/4, W/4]; dropout; 1x1 conv -> K logits at stride 16 / 2**len(channels).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (256, 128),
                 dropout: float = 0.1) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(_conv_bn_relu(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.fused = nn.Identity()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.interpolate(block(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(self.fused(x)))


# ------------------------------------------------------------------------------------------- base class
class _TimmSegModel(SegmentationModel):
    """Shared pieces: stage taps, decode-head parameter group, ImageNet-encoder checkpoint detection."""

    family: ClassVar[str] = "vit"
    default_taps: ClassVar[dict[str, str]] = dict(_STAGE_TAPS)
    #: key prefixes of a bare timm encoder checkpoint of this family (ImageNet classification weights)
    _encoder_prefixes: ClassVar[tuple[str, ...]] = ()

    encoder: nn.Module
    decode_head: nn.Module

    def _make_taps(self) -> None:
        self.stage1 = nn.Identity()
        self.stage2 = nn.Identity()
        self.stage3 = nn.Identity()
        self.stage4 = nn.Identity()

    def _taps(self) -> tuple[nn.Module, ...]:
        return self.stage1, self.stage2, self.stage3, self.stage4

    def decode_head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that ``optim.head_lr_mult`` applies to (the randomly initialised decoder)."""
        return self.decode_head.parameters()

    def _convert_encoder_keys(self, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """Hook: rename a foreign encoder checkpoint to timm names (default: already timm names)."""
        return sd, "timm names"

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> AdaptedStateDict:
        """Full-model checkpoint (``encoder.*`` / ``decode_head.*``...), or an ImageNet encoder checkpoint in
        timm (or the original repository's) names: its classifier ``head*`` keys are dropped, the rest is
        prefixed with ``encoder.`` and only the encoder must match (the decoder keeps its init)."""
        sd = dict(state_dict)
        if any(k.startswith(("encoder.", "decode_head.")) for k in sd) or not any(
                k.startswith(self._encoder_prefixes) for k in sd):
            return AdaptedStateDict(sd, format="full model state dict")
        sd, names = self._convert_encoder_keys(sd)
        dropped = sorted(k for k in sd if k.startswith("head"))
        mapped = {f"encoder.{k}": v for k, v in sd.items() if not k.startswith("head")}
        scope = {k for k in self.state_dict() if k.startswith("encoder.")}
        return AdaptedStateDict(mapped, format=f"ImageNet {self.arch} encoder ({names})", scope=scope,
                                dropped=dropped)


def _create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``. timm is imported here, when a timm student is built: with the
    torchvision it pulls in it takes seconds, which every process (CLI, DDP workers) paid on
    ``import c2vkd.models`` otherwise."""
    import timm

    return timm.create_model(name, **kwargs)


def _timm_kwargs(drop_path_rate: float | None) -> dict[str, Any]:
    return {} if drop_path_rate is None else {"drop_path_rate": float(drop_path_rate)}


# ------------------------------------------------------------------------------------------------ PVTv2
PVT_CHANNELS = {"b0": (32, 64, 160, 256), "b1": (64, 128, 320, 512)}


class PVTv2Seg(_TimmSegModel):
    """PVTv2-B0/B1 encoder (Wang et al. 2022; timm ``pvt_v2_b*``) + Semantic-FPN head (:class:`SemanticFPNHead`).

    Taps (any input H x W above :meth:`min_input_size`; strides by the overlapping patch-embedding convs,
    so odd sizes round up, e.g. 97x131 -> 25x33 at stride 4):

    ========  ==============================  ==========================
    alias     shape                           B0 / B1 channels
    ========  ==============================  ==========================
    stage1    [B, C1, H/4, W/4]               32 / 64
    stage2    [B, C2, H/8, W/8]               64 / 128
    stage3    [B, C3, H/16, W/16]             160 / 320
    stage4    [B, C4, H/32, W/32]  (= feat)   256 / 512
    decoder   [B, 128, H/4, W/4]              128
    ========  ==============================  ==========================

    Logits at 1/4, bilinearly upsampled to the input size. ``pretrained``: a timm ``pvt_v2_b*`` ImageNet
    file (timm names, or the original whai362/PVT names via timm's documented key map) or a full checkpoint.
    """

    _encoder_prefixes: ClassVar[tuple[str, ...]] = ("patch_embed", "stages.", "block1.")

    def __init__(self, num_classes: int, variant: str = "b0", fpn_channels: int = 256, head_channels: int = 128,
                 dropout: float = 0.1, drop_path_rate: float | None = None) -> None:
        if variant not in PVT_CHANNELS:
            raise ValueError(f"unknown PVTv2 variant {variant!r}; choose from {sorted(PVT_CHANNELS)}")
        super().__init__(num_classes, output_stride=32)
        self.variant = variant
        self.encoder = _create_encoder(f"pvt_v2_{variant}", pretrained=False, num_classes=0,
                                       **_timm_kwargs(drop_path_rate))
        self.channels = tuple(int(f["num_chs"]) for f in self.encoder.feature_info)
        self._make_taps()
        self.decode_head = SemanticFPNHead(self.channels, num_classes, fpn_channels, head_channels, dropout)
        self._min_side = self.min_input_size()

    def min_input_size(self) -> int:
        """Smallest side for which every stage's spatial-reduction conv (kernel = stride = sr) has an output."""
        convs = [(7, 4, 3)] + [(3, 2, 1)] * 3  # overlapping patch embeddings (kernel, stride, padding)
        srs = [1 if stage.blocks[0].attn.sr is None else stage.blocks[0].attn.sr.stride[0]
               for stage in self.encoder.stages]
        return min_side_for_reductions(convs, srs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if min(x.shape[-2:]) < self._min_side:
            raise ValueError(f"{self.arch}: input {tuple(x.shape[-2:])} is too small; PVTv2 needs at least "
                             f"{self._min_side} px per side (stage spatial-reduction convs)")
        h = self.encoder.patch_embed(x)  # [B, H/4, W/4, C0] (NHWC); each stage returns NCHW
        feats = []
        for stage, tap in zip(self.encoder.stages, self._taps()):
            h = tap(stage(h))
            feats.append(h)
        return self._resize_logits(self.decode_head(feats), x.shape[-2:])

    def _convert_encoder_keys(self, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        if "patch_embed.proj.weight" in sd:
            return sd, "timm names"
        from timm.models.pvt_v2 import checkpoint_filter_fn  # original PVT names -> timm names

        return checkpoint_filter_fn(sd, None), "original PVT names"


# ---------------------------------------------------------------------------------------------- Swin-T
@functools.lru_cache(maxsize=None)
def _pad_then_shift_swin_block() -> type:
    """:class:`PadThenShiftSwinBlock`, defined on first use (it subclasses timm's block; see _create_encoder)."""
    from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

    class PadThenShiftSwinBlock(SwinTransformerBlock):
        """timm's Swin block with the segmentation ordering of the shifted-window attention (as in the
        Swin-Transformer-Semantic-Segmentation / mmseg code): pad the map to whole windows *first*, then roll,
        and build the shift mask for the padded map. timm rolls first and pads after, so when a stage's map is
        not a multiple of the window (7) its mask does not separate the wrapped-around rows/columns from their
        new neighbours. Same parameters and buffers as the timm block (instances are converted in place)."""

        def _attn(self, x: torch.Tensor) -> torch.Tensor:
            _, h, w, c = x.shape
            wh, ww = self.window_size
            x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
            hp, wp = x.shape[1], x.shape[2]
            shift = any(self.shift_size)
            if shift:
                x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = self.get_attn_mask(x) if shift else None  # regions of the padded, rolled map
            windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
            windows = self.attn(windows, mask=mask).view(-1, wh, ww, c)
            x = window_reverse(windows, self.window_size, hp, wp)
            if shift:
                x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
            return x[:, :h, :w, :].contiguous()

    PadThenShiftSwinBlock.__qualname__ = "PadThenShiftSwinBlock"  # c2vkd.models.vit.PadThenShiftSwinBlock
    return PadThenShiftSwinBlock


def __getattr__(name: str) -> Any:
    if name == "PadThenShiftSwinBlock":  # defined lazily, see _pad_then_shift_swin_block
        return _pad_then_shift_swin_block()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SwinSeg(_TimmSegModel):
    """Swin-T encoder (Liu et al. 2021; timm ``swin_tiny_patch4_window7_224``) + Semantic-FPN head.

    The encoder is built with ``strict_img_size=False`` (attention masks computed per input) and
    ``always_partition=True`` (window 7 and shift 3 in every stage whatever the input size, as in Swin's
    segmentation code); its blocks use the pad-then-shift ordering (:class:`PadThenShiftSwinBlock`). Inputs
    are zero-padded to a multiple of 32 and the logits cropped back. Each stage output gets a LayerNorm
    (stages 1-3: ``out_norms``; stage 4: timm's final ``encoder.norm``), as Swin's segmentation backbone does.

    Taps (H' = ceil(H/32)*32, W' likewise):

    ========  ==================================  ========
    alias     shape                               channels
    ========  ==================================  ========
    stage1    [B, 96, H'/4, W'/4]                 96
    stage2    [B, 192, H'/8, W'/8]                192
    stage3    [B, 384, H'/16, W'/16]              384
    stage4    [B, 768, H'/32, W'/32]  (= feat)    768
    decoder   [B, 128, H'/4, W'/4]                128
    ========  ==================================  ========

    ``pretrained``: a timm (or original microsoft/Swin-Transformer) ImageNet ``swin_tiny`` file, converted
    with timm's documented ``checkpoint_filter_fn``; or a full checkpoint.
    """

    _encoder_prefixes: ClassVar[tuple[str, ...]] = ("patch_embed.", "layers.")
    pad_multiple: ClassVar[int] = 32

    def __init__(self, num_classes: int, fpn_channels: int = 256, head_channels: int = 128, dropout: float = 0.1,
                 drop_path_rate: float | None = None) -> None:
        super().__init__(num_classes, output_stride=32)
        self.encoder = _create_encoder("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                                       strict_img_size=False, always_partition=True,
                                       **_timm_kwargs(drop_path_rate))
        for layer in self.encoder.layers:
            for blk in layer.blocks:
                blk.__class__ = _pad_then_shift_swin_block()  # method override only: parameters/buffers/names unchanged
        self.channels = tuple(int(f["num_chs"]) for f in self.encoder.feature_info)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels[:-1])
        self._make_taps()
        self.decode_head = SemanticFPNHead(self.channels, num_classes, fpn_channels, head_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        size = x.shape[-2:]
        xp = _pad_to_multiple(x, self.pad_multiple)
        h = self.encoder.patch_embed(xp)  # [B, H'/4, W'/4, 96] (NHWC, as are the stages)
        norms = [*self.out_norms, self.encoder.norm]
        feats = []
        for layer, norm, tap in zip(self.encoder.layers, norms, self._taps()):
            h = layer(h)
            feats.append(tap(norm(h).permute(0, 3, 1, 2).contiguous()))
        logits = self._resize_logits(self.decode_head(feats), xp.shape[-2:])
        return logits[..., :size[0], :size[1]]

    def _convert_encoder_keys(self, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        from timm.models.swin_transformer import checkpoint_filter_fn

        names = ("original Swin names" if "layers.0.downsample.reduction.weight" in sd else "timm names")
        return checkpoint_filter_fn(sd, self.encoder), names


# ------------------------------------------------------------------------------------------------- DeiT
DEIT_DIMS = {"tiny": 192, "small": 384}


class DeiTSeg(_TimmSegModel):
    """DeiT-Tiny/Small (Touvron et al. 2021; timm ``deit_*_patch16_224``, a plain ViT with patch 16) +
    progressive-upsampling head (:class:`ProgressiveUpsamplingHead`, 1/16 -> 1/4).

    Any input size: timm's ``dynamic_img_size=True`` bicubically interpolates the 14x14 positional
    embedding to the token grid of each input (logged once per model when the grid differs from 14x14), and
    inputs whose sides are not multiples of 16 are zero-padded at the bottom/right, the logits cropped back.

    A plain ViT has no stages: ``stage1..stage3`` are the token maps after blocks depth/4, depth/2 and
    3*depth/4 (blocks 3, 6, 9 of 12), ``stage4`` (= ``feat``) the output of the last block after the final
    LayerNorm; all are the patch tokens (class token dropped) reshaped to a grid. Taps (H' = ceil(H/16)*16):

    ================  ================================  ===========================
    alias             shape                             Tiny / Small channels
    ================  ================================  ===========================
    stage1..stage4    [B, D, H'/16, W'/16]              192 / 384
    decoder           [B, 128, H'/4, W'/4]              128
    ================  ================================  ===========================

    ``pretrained``: a timm / facebookresearch DeiT ImageNet file (same names; ``pos_embed`` must be the
    224-px 197-token table) or a full checkpoint.
    """

    _encoder_prefixes: ClassVar[tuple[str, ...]] = ("cls_token", "pos_embed", "patch_embed.", "blocks.")

    def __init__(self, num_classes: int, variant: str = "tiny", decoder_channels: Sequence[int] = (256, 128),
                 dropout: float = 0.1, drop_path_rate: float | None = None) -> None:
        if variant not in DEIT_DIMS:
            raise ValueError(f"unknown DeiT variant {variant!r}; choose from {sorted(DEIT_DIMS)}")
        if len(decoder_channels) != 2:
            raise ValueError("decoder_channels must hold two widths (1/16 -> 1/8 -> 1/4)")
        super().__init__(num_classes, output_stride=16)
        self.variant = variant
        self.encoder = _create_encoder(f"deit_{variant}_patch16_224", pretrained=False, num_classes=0,
                                       dynamic_img_size=True, **_timm_kwargs(drop_path_rate))
        self.patch_size = int(self.encoder.patch_embed.patch_size[0])
        self.trained_grid = tuple(int(g) for g in self.encoder.patch_embed.grid_size)
        depth = len(self.encoder.blocks)
        self.stage_blocks = (depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1)
        self._make_taps()
        self.decode_head = ProgressiveUpsamplingHead(DEIT_DIMS[variant], num_classes, decoder_channels, dropout)
        self._logged_grid = False
        self._logged_pad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        size = x.shape[-2:]
        xp = _pad_to_multiple(x, self.patch_size)
        grid = (xp.shape[-2] // self.patch_size, xp.shape[-1] // self.patch_size)
        if not self._logged_pad and tuple(xp.shape[-2:]) != tuple(size):
            self._logged_pad = True
            log.info("%s: input %s zero-padded to %s (a multiple of the patch size %d), logits cropped back "
                     "(logged once)", self.arch, tuple(size), tuple(xp.shape[-2:]), self.patch_size)
        if not self._logged_grid and grid != self.trained_grid:
            self._logged_grid = True
            log.info("%s: positional embedding (%dx%d grid) bicubically interpolated to the %dx%d token grid "
                     "of a %dx%d input (logged once; other sizes are interpolated too)", self.arch,
                     *self.trained_grid, *grid, *xp.shape[-2:])
        last, inter = self.encoder.forward_intermediates(xp, indices=list(self.stage_blocks), norm=False,
                                                         output_fmt="NCHW")
        # last: [B, prefix + h*w, D] after the final LayerNorm -> grid, like the intermediates
        last = last[:, self.encoder.num_prefix_tokens:]
        last = last.reshape(last.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        taps = self._taps()
        feats = [tap(f) for tap, f in zip(taps, [*inter, last])]
        logits = self._resize_logits(self.decode_head(feats[-1]), xp.shape[-2:])
        return logits[..., :size[0], :size[1]]

    def specialize_for_export(self, input_hw: Sequence[int]) -> None:
        """Precompute the positional embedding for one input size, IN PLACE (call it on a copy).

        The ONNX exporter has no antialiased bicubic resize (timm's interpolation), so for a fixed-size export
        the table is resampled once here (timm ``set_input_size``, the same computation a forward does) and
        the graph adds it directly. Afterwards other sizes would interpolate from the resampled table, so
        this copy is only meant for that one size (c2vkd.runners.export verifies the outputs against the original).
        """
        h, w = (int(v) for v in input_hw)
        p = self.patch_size
        self.encoder.set_input_size(img_size=(math.ceil(h / p) * p, math.ceil(w / p) * p))
        self.trained_grid = tuple(int(g) for g in self.encoder.patch_embed.grid_size)


# -------------------------------------------------------------------------------------------- registry
def _register() -> None:
    def make(cls: type[_TimmSegModel], **fixed: Any):
        def factory(num_classes: int, **kwargs: Any) -> _TimmSegModel:
            return cls(num_classes, **fixed, **kwargs)

        factory.__doc__ = cls.__doc__
        return factory

    for name, cls, fixed in (("pvtv2_b0", PVTv2Seg, {"variant": "b0"}), ("pvtv2_b1", PVTv2Seg, {"variant": "b1"}),
                             ("deit_tiny", DeiTSeg, {"variant": "tiny"}),
                             ("deit_small", DeiTSeg, {"variant": "small"}), ("swin_t", SwinSeg, {})):
        MODELS.add(name, make(cls, **fixed))


_register()

__all__ = ["PVTv2Seg", "SwinSeg", "DeiTSeg", "SemanticFPNHead", "ProgressiveUpsamplingHead",
           "PadThenShiftSwinBlock"]
