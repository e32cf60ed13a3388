"""CNN teachers: DeepLabV3+, DeepLabV3 and PSPNet on a dilated ResNet (torchvision parameter names).

Module layout (the paths feature taps and checkpoints use):

    backbone.{conv1,bn1,layer1..layer4}   DilatedResNet (models.resnet)
    aspp.{convs.0..4, project}            DeepLabV3/V3+ only; torchvision's ASPP naming
    ppm.stages.0..3                       PSPNet only
    decoder                               the last 256/512-ch feature before the classifier
    classifier                            1x1 conv -> K logits (at 1/4 for V3+, at 1/OS otherwise)

Teachers from other toolkits (``docs/models.md``, "Bring your own teacher"; key mapping in models.convert):
``layout="mmseg"`` reproduces mmsegmentation's heads (DeepLabV3+: depthwise-separable atrous branches and
decoder convs, a 3x3 ASPP bottleneck, the pooled branch first in the concatenation; DeepLabV3: the 3x3
bottleneck is the last feature, no separate decoder conv; PSPNet: pyramid branches ``channels`` wide) and its
BasicBlock; ``deep_stem`` / ``stem_channels`` / ``multi_grid`` go to the backbone (models.resnet). The
registered ``*_v1c`` names are mmseg's ResNetV1c ``-d8`` configs, ``deeplabv3_r*_cirkd`` CIRKD's DeepLabV3
(:data:`VARIANTS`). Dropout sits where ours does (teachers run in eval mode, where it is the identity).

Batch-1 training (the pooled BatchNorm pitfall): the ASPP image-pooling branch and PSPNet's 1x1 pyramid bin
see a single value per channel when the batch has one image, and ``nn.BatchNorm2d`` raises
"Expected more than 1 value per channel when training". Those layers are :class:`PooledBatchNorm2d`, a
BatchNorm2d (same parameters and buffers, so torchvision/mmseg checkpoints still load) that normalises
with its running statistics, without updating them, when a training batch has only one value per channel.
With two or more images it is plain BatchNorm.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from c2vkd.models.base import MODELS, AdaptedStateDict, SegmentationModel
from c2vkd.models.resnet import DilatedResNet

log = logging.getLogger("c2vkd")
LAYOUTS = ("c2vkd", "mmseg")


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that falls back to running statistics when batch statistics are undefined (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] <= 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1,
                  norm: type[nn.BatchNorm2d] = nn.BatchNorm2d, groups: int = 1) -> nn.Sequential:
    pad = 0 if k == 1 else dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, groups=groups, bias=False),
                         norm(cout), nn.ReLU(inplace=True))


def _sep_conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    """Depthwise k x k conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU (mmcv's
    DepthwiseSeparableConvModule, with a norm and an activation in both halves)."""
    return nn.Sequential(_conv_bn_relu(cin, cin, k, dilation, groups=cin), _conv_bn_relu(cin, cout, 1))


def _aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLab's atrous rates: (6, 12, 18) at output stride 16, doubled at 8."""
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


class ASPPPooling(nn.Sequential):
    """Image-level pooling branch: global average -> 1x1 conv -> BN (batch-1 safe) -> ReLU -> broadcast."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), PooledBatchNorm2d(cout),
                         nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017), torchvision's layout and parameter names.

    Branches: 1x1 conv, three 3x3 atrous convs (``rates``), image pooling; concat (5*C) -> 1x1 conv C.
    Dropout after the projection is 0.1 (DeepLabV3+ reference code; torchvision uses 0.5).
    mmsegmentation's heads: ``separable`` atrous branches (DeepLabV3+), a 3x3 projection
    (``project_kernel=3``, its ``bottleneck``) and the pooled branch first in the concatenation (``pool_first``).
    """

    def __init__(self, cin: int, cout: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1, *,
                 separable: bool = False, project_kernel: int = 1, pool_first: bool = False) -> None:
        super().__init__()
        atrous = _sep_conv_bn_relu if separable else _conv_bn_relu
        branches: list[nn.Module] = [_conv_bn_relu(cin, cout, 1)]
        branches += [atrous(cin, cout, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.pool_first = pool_first
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * cout, cout, project_kernel, padding=project_kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.convs]
        if self.pool_first:  # mmseg concatenates [image pool, 1x1, atrous...]; the order is in its weights
            outs = outs[-1:] + outs[:-1]
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """layer1 -> 1x1 conv 48; concat with the ASPP output upsampled to 1/4 (256 + 48 = 304 ch);
    ``num_convs`` 3x3 conv 256 + BN + ReLU. Two convs as in the DeepLabV3+ reference implementation
    (method.md writes one; ``decoder_convs=1`` gives that). ``separable``: depthwise-separable 3x3 convs
    (mmsegmentation's ``sep_bottleneck``)."""

    def __init__(self, low_channels: int, high_channels: int = 256, low_proj: int = 48, out_channels: int = 256,
                 num_convs: int = 2, separable: bool = False) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"decoder_convs must be >= 1, got {num_convs}")
        conv = _sep_conv_bn_relu if separable else _conv_bn_relu
        self.low_level = _conv_bn_relu(low_channels, low_proj, 1)
        convs = [conv(high_channels + low_proj, out_channels, 3)]
        convs += [conv(out_channels, out_channels, 3) for _ in range(num_convs - 1)]
        self.fuse = nn.Sequential(*convs)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, self.low_level(low)], dim=1))


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling: for each bin b, adaptive-avg-pool to b x b -> 1x1 conv (``width``, by default
    C/len(bins)) -> BN -> ReLU -> upsample; output = concat(input, all bins) (2C channels for 4 bins)."""

    def __init__(self, cin: int, bins: Sequence[int] = (1, 2, 3, 6), width: int | None = None) -> None:
        super().__init__()
        cout = width or cin // len(bins)
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(cin, cout, 1, norm=PooledBatchNorm2d))
            for b in self.bins)
        self.out_channels = cin + cout * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return torch.cat([x, *pooled], dim=1)


class _ResNetSegModel(SegmentationModel):
    """Shared pieces of the ResNet teachers: backbone, tap aliases and checkpoint-format detection.

    layout: "c2vkd" (ours) or "mmseg" (mmsegmentation's heads and BasicBlock, see the module doc);
    deep_stem, stem_channels, multi_grid: the backbone's (models.resnet.DilatedResNet).
    """

    family: ClassVar[str] = "cnn"
    default_taps: ClassVar[dict[str, str]] = {
        "feat": "backbone.layer4",  # the C2VKD teacher tap (last encoder stage)
        "layer1": "backbone.layer1",
        "layer2": "backbone.layer2",
        "layer3": "backbone.layer3",
        "layer4": "backbone.layer4",
        "decoder": "decoder",
        # logits at the model's output stride (the classifier, before the final upsample): KD/CWD/DIST at: stride
        "logits": "classifier",
    }

    def __init__(self, num_classes: int, depth: int, output_stride: int, *, layout: str = "c2vkd",
                 deep_stem: bool = False, stem_channels: int = 64, multi_grid: Sequence[int] | None = None) -> None:
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16 for a segmentation teacher, got {output_stride}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        super().__init__(num_classes, output_stride)
        self.layout = layout
        self.backbone = DilatedResNet(depth, output_stride, deep_stem=deep_stem, stem_channels=stem_channels,
                                      dilate_basic_conv2=layout != "mmseg", multi_grid=multi_grid)

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> AdaptedStateDict:
        """Full-model checkpoint (``backbone.*`` + head keys), an mmsegmentation / CIRKD checkpoint (renamed by
        models.convert; their auxiliary heads are dropped, with a warning) or an ImageNet ResNet state dict
        with torchvision/timm/mmcv names (``conv1.weight`` or ``stem.0.weight``, ``layer1.0.conv1.weight``...,
        ``fc.*``): the latter is prefixed with ``backbone.``, its ``fc.*`` classifier is dropped, and only the
        backbone must match."""
        from c2vkd.models.convert import convert_foreign  # local import: convert imports this module

        sd = dict(state_dict)
        foreign = convert_foreign(sd)
        if foreign is not None:
            if foreign.dropped:
                log.warning("%s: dropping %d tensors of its training-only auxiliary head (%s, ...); the teacher "
                            "is the main head", foreign.source, len(foreign.dropped), foreign.dropped[0])
            return AdaptedStateDict(foreign.state_dict, format=foreign.source, dropped=foreign.dropped,
                                    hint=foreign.hint())
        is_full = any(k.startswith(("backbone.", "aspp.", "ppm.", "decoder.", "classifier.")) for k in sd)
        # a 7x7 stem (torchvision / timm) or a deep stem (mmcv's ImageNet ResNetV1c, open-mmlab://resnet*_v1c)
        looks_resnet = ("conv1.weight" in sd or "stem.0.weight" in sd) and any(k.startswith("layer1.") for k in sd)
        if is_full or not looks_resnet:
            return AdaptedStateDict(sd, format="full model state dict")
        dropped = sorted(k for k in sd if k.startswith("fc."))
        mapped = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
        scope = {k for k in self.state_dict() if k.startswith("backbone.")}
        return AdaptedStateDict(mapped, format="ImageNet ResNet backbone (torchvision/timm/mmcv names)", scope=scope,
                                dropped=dropped)


class DeepLabV3Plus(_ResNetSegModel):
    """DeepLabV3+ (Chen et al. 2018) with a dilated ResNet: the C2VKD teacher (ResNet-101, OS 16).

    ASPP rates are (6, 12, 18) at output stride 16 and doubled (12, 24, 36) at 8. Logits come out at 1/4
    and are bilinearly upsampled to the input size. ``layout="mmseg"``: mmsegmentation's
    DepthwiseSeparableASPPHead (module doc); ``backbone_kw``: see _ResNetSegModel.
    """

    default_taps: ClassVar[dict[str, str]] = {**_ResNetSegModel.default_taps, "aspp": "aspp"}

    def __init__(self, num_classes: int, depth: int = 101, output_stride: int = 16, decoder_convs: int = 2,
                 aspp_channels: int = 256, decoder_channels: int = 256, low_level_channels: int = 48,
                 **backbone_kw: Any) -> None:
        super().__init__(num_classes, depth, output_stride, **backbone_kw)
        c1, _, _, c4 = self.backbone.channels
        mm = self.layout == "mmseg"  # mmseg has no dropout after its bottleneck (it has one before conv_seg)
        self.aspp = ASPP(c4, aspp_channels, _aspp_rates(output_stride), dropout=0.0 if mm else 0.1, separable=mm,
                         project_kernel=3 if mm else 1, pool_first=mm)
        self.decoder = DeepLabV3PlusDecoder(c1, aspp_channels, low_level_channels, decoder_channels, decoder_convs,
                                            separable=mm)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        c1, _, _, c4 = self.backbone(x)
        feat = self.decoder(c1, self.aspp(c4))
        return self._resize_logits(self.classifier(feat), x.shape[-2:])


class DeepLabV3(_ResNetSegModel):
    """DeepLabV3 (Chen et al. 2017), torchvision's DeepLabHead: ASPP -> 3x3 conv 256 + BN + ReLU -> 1x1 conv.

    Logits at 1/OS, upsampled to the input size. (No auxiliary FCN head: teachers are trained elsewhere.)
    ``layout="mmseg"``: mmsegmentation's ASPPHead, whose 3x3 bottleneck is the ASPP projection and the last
    feature (``decoder`` is then an identity); ``backbone_kw``: see _ResNetSegModel.
    """

    default_taps: ClassVar[dict[str, str]] = {**_ResNetSegModel.default_taps, "aspp": "aspp"}

    def __init__(self, num_classes: int, depth: int = 101, output_stride: int = 16, aspp_channels: int = 256,
                 **backbone_kw: Any) -> None:
        super().__init__(num_classes, depth, output_stride, **backbone_kw)
        c4 = self.backbone.channels[3]
        mm = self.layout == "mmseg"
        self.aspp = ASPP(c4, aspp_channels, _aspp_rates(output_stride), project_kernel=3 if mm else 1,
                         pool_first=mm)
        self.decoder = nn.Identity() if mm else _conv_bn_relu(aspp_channels, aspp_channels, 3)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        c4 = self.backbone(x)[3]
        return self._resize_logits(self.classifier(self.decoder(self.aspp(c4))), x.shape[-2:])

    # torchvision.models.segmentation.deeplabv3_resnet* head -> our names (backbone names already agree)
    _TV_HEAD = {"classifier.0.": "aspp.", "classifier.1.": "decoder.0.", "classifier.2.": "decoder.1.",
                "classifier.4.": "classifier."}

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> AdaptedStateDict:
        """Also accepts torchvision ``deeplabv3_resnet50/101`` checkpoints (their ``aux_classifier.*`` FCN
        head is dropped). Those were trained at output stride 8: build with ``output_stride=8`` to get
        torchvision's outputs."""
        sd = dict(state_dict)
        if "classifier.0.convs.0.0.weight" not in sd:
            return super().adapt_state_dict(sd)
        out: dict[str, torch.Tensor] = {}
        dropped: list[str] = []
        for k, v in sd.items():
            if k.startswith("aux_classifier."):
                dropped.append(k)
                continue
            for old, new in self._TV_HEAD.items():
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        return AdaptedStateDict(out, format="torchvision DeepLabV3 (trained at output stride 8)", dropped=dropped)


class PSPNet(_ResNetSegModel):
    """PSPNet (Zhao et al. 2017): full dilated ResNet at output stride 8 (not a truncated encoder),
    pyramid pooling with bins 1/2/3/6, 3x3 conv ``channels`` (512) + BN + ReLU, dropout 0.1, 1x1 conv -> K.
    (No auxiliary layer3 head.) ``layout="mmseg"``: mmsegmentation's PSPHead, whose pyramid branches are
    ``channels`` wide (ours: C4 / len(bins)); ``backbone_kw``: see _ResNetSegModel."""

    default_taps: ClassVar[dict[str, str]] = {**_ResNetSegModel.default_taps, "ppm": "ppm"}

    def __init__(self, num_classes: int, depth: int = 101, output_stride: int = 8,
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, channels: int = 512,
                 **backbone_kw: Any) -> None:
        super().__init__(num_classes, depth, output_stride, **backbone_kw)
        c4 = self.backbone.channels[3]
        self.ppm = PyramidPooling(c4, bins, width=channels if self.layout == "mmseg" else None)
        self.decoder = _conv_bn_relu(self.ppm.out_channels, channels, 3)  # PSPNet's bottleneck, 512 at any depth
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        c4 = self.backbone(x)[3]
        feat = self.decoder(self.ppm(c4))
        return self._resize_logits(self.classifier(self.dropout(feat)), x.shape[-2:])


FAMILIES: dict[str, type[_ResNetSegModel]] = {"deeplabv3plus": DeepLabV3Plus, "deeplabv3": DeepLabV3,
                                              "pspnet": PSPNet}
DEPTHS = (18, 50, 101)


def _mmseg_v1c(family: str, depth: int) -> dict[str, Any]:
    """mmsegmentation's ``{family}_r{depth}-d8`` configs: ResNetV1c (deep stem 32-32-64), output stride 8,
    heads 512 wide on R50/R101 and 128 on R18 (whose DeepLabV3+ projects layer1 to 12 channels, not 48)."""
    width = 128 if depth < 50 else 512
    kw: dict[str, Any] = {"layout": "mmseg", "deep_stem": True, "output_stride": 8}
    if family == "deeplabv3plus":
        kw.update(aspp_channels=width, decoder_channels=width, low_level_channels=12 if depth < 50 else 48)
    else:
        kw["aspp_channels" if family == "deeplabv3" else "channels"] = width
    return kw


def _cirkd(family: str, depth: int) -> dict[str, Any]:
    """CIRKD's DeepLabV3 (winycg/CIRKD models/deeplabv3.py): "v1s" deep stem 64-64-128, output stride 8,
    ASPP and head 512 wide at every depth; otherwise our (torchvision's) DeepLabV3 layout."""
    return {"deep_stem": True, "stem_channels": 128, "output_stride": 8, "aspp_channels": 512}


#: registered-name suffix -> (families it exists for, kwargs it fixes for (family, depth))
VARIANTS: dict[str, tuple[tuple[str, ...], Callable[[str, int], dict[str, Any]]]] = {
    "": (tuple(FAMILIES), lambda family, depth: {}),
    "_v1c": (tuple(FAMILIES), _mmseg_v1c),
    "_cirkd": (("deeplabv3",), _cirkd),
}


def _defaults(cls: type[_ResNetSegModel]) -> dict[str, Any]:
    """Constructor defaults of a teacher class, its backbone keywords (_ResNetSegModel's) included."""
    out: dict[str, Any] = {}
    for c in (_ResNetSegModel, cls):
        for p in inspect.signature(c.__init__).parameters.values():
            if p.default is not inspect.Parameter.empty:
                out[p.name] = p.default
    return out


def registered_name(family: str, depth: int, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered name that builds ``family`` at ``depth`` with constructor ``kwargs`` (keys left out
    mean their defaults), and the kwargs it still needs: among the names with that stem (a name says which
    backbone it is, so its stem is never overridden), the one needing the fewest (ties: ours first)."""
    defaults = _defaults(FAMILIES[family])
    wanted = {**defaults, **kwargs}
    best: tuple[str, dict[str, Any]] | None = None
    for suffix, (families, fixed) in VARIANTS.items():
        built = {**defaults, **fixed(family, depth)}
        extra = {k: v for k, v in wanted.items() if built.get(k) != v}
        if family not in families or {"deep_stem", "stem_channels"} & set(extra):
            continue
        if best is None or len(extra) < len(best[1]):
            best = (f"{family}_r{depth}{suffix}", extra)
    if best is None:  # a stem no name has: ours, with the stem as kwargs
        best = (f"{family}_r{depth}", {k: v for k, v in wanted.items() if defaults.get(k) != v})
    return best


def _register() -> None:
    def make(family: str, depth: int, fixed: dict[str, Any]):
        cls = FAMILIES[family]

        def factory(num_classes: int, **kwargs: Any) -> _ResNetSegModel:
            return cls(num_classes, depth=depth, **{**fixed, **kwargs})

        extra = f" Fixed kwargs: {fixed}." if fixed else ""
        factory.__doc__ = f"{cls.__name__} with ResNet-{depth}.{extra} {cls.__doc__ or ''}"
        return factory

    for suffix, (families, fixed) in VARIANTS.items():
        for family in families:
            for depth in DEPTHS:
                MODELS.add(f"{family}_r{depth}{suffix}", make(family, depth, fixed(family, depth)))


_register()
