"""Plain-torch stand-ins for other toolkits' segmentation networks, for tests/test_teacher_import.py.

Written for these tests from reading the reference code (no mmcv / mmseg / CIRKD import): module names, and
so state-dict keys, tensor shapes and the forward computation follow

* mmsegmentation: ``mmseg/models/backbones/resnet.py`` (ResNet, ResNetV1c = ``deep_stem=True``; ResLayer with
  ``contract_dilation`` and ``multi_grid``), ``decode_heads/aspp_head.py`` (ASPPHead), ``sep_aspp_head.py``
  (DepthwiseSeparableASPPHead), ``psp_head.py`` (PSPHead), ``fcn_head.py`` (the auxiliary FCNHead) and mmcv's
  ConvModule (``conv`` without bias, ``bn``, ReLU) / DepthwiseSeparableConvModule; the EncoderDecoder resizes
  the logits to the input (bilinear, align_corners=False, as the standard configs).
* CIRKD (winycg/CIRKD): ``models/base_models/resnetv1b.py`` (ResNetV1b; "v1s" = deep stem 64-64-128),
  ``models/deeplabv3.py`` (DeepLabV3 with ``pretrained`` / ``head`` / ``auxlayer``), returning logits at 1/8.

:func:`randomize` gives every parameter and BatchNorm statistic random values, so a swapped or misplaced
tensor changes the outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

LAYERS = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv weights (scaled by fan-in), BN affine and running statistics; returns ``model`` in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def up(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


# ------------------------------------------------------------------------------------------ mmsegmentation

class ConvModule(nn.Module):
    """mmcv ConvModule with a BN norm and ReLU: ``conv`` (no bias), ``bn``."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SepConvModule(nn.Module):
    """mmcv DepthwiseSeparableConvModule: depthwise ConvModule (groups = cin) then pointwise 1x1 ConvModule."""

    def __init__(self, cin: int, cout: int, k: int, padding: int, dilation: int = 1):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, k, padding, dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class MMBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)  # never dilated in mmseg
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MMBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MMResNet(nn.Module):
    """mmseg ResNet, style pytorch, contract_dilation=True; ``deep_stem`` = ResNetV1c. Returns (c1, c2, c3, c4)."""

    def __init__(self, depth: int, deep_stem: bool = True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                 multi_grid: Sequence[int] | None = None, stem_channels: int = 64):
        super().__init__()
        bottleneck, blocks = LAYERS[depth]
        block = MMBottleneck if bottleneck else MMBasicBlock
        self.deep_stem = deep_stem
        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                nn.Conv2d(half, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU())
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem_channels
        for i, n in enumerate(blocks):
            planes, stride, dil = 64 * 2 ** i, strides[i], dilations[i]
            grid = multi_grid if i == 3 else None
            down = None
            if stride != 1 or cin != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            first = grid[0] if grid else (dil // 2 if dil > 1 else dil)
            mods = [block(cin, planes, stride, first, down)]
            cin = planes * block.expansion
            mods += [block(cin, planes, 1, grid[j] if grid else dil) for j in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*mods))

    def forward(self, x):
        x = self.stem(x) if self.deep_stem else F.relu(self.bn1(self.conv1(x)))
        outs, x = [], self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class MMASPPHead(nn.Module):
    """ASPPHead (``separable=False``) or DepthwiseSeparableASPPHead (``c1_in`` > 0): image_pool, aspp_modules,
    bottleneck [, c1_bottleneck, sep_bottleneck], conv_seg (dropout before it: identity in eval)."""

    def __init__(self, cin, channels, num_classes, dilations=(1, 12, 24, 36), c1_in=0, c1_channels=48):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(cin, channels, 1) if d == 1 else
            (SepConvModule(cin, channels, 3, d, d) if c1_in else ConvModule(cin, channels, 3, d, d))
            for d in dilations)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)
        self.c1_in = c1_in
        if c1_in:
            self.c1_bottleneck = ConvModule(c1_in, c1_channels, 1)
            self.sep_bottleneck = nn.Sequential(SepConvModule(channels + c1_channels, channels, 3, 1),
                                                SepConvModule(channels, channels, 3, 1))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        x = feats[3]
        outs = [up(self.image_pool(x), x.shape[-2:])] + [m(x) for m in self.aspp_modules]
        out = self.bottleneck(torch.cat(outs, 1))
        if self.c1_in:
            c1 = self.c1_bottleneck(feats[0])
            out = self.sep_bottleneck(torch.cat([up(out, c1.shape[-2:]), c1], 1))
        return self.conv_seg(out)


class MMPSPHead(nn.Module):
    def __init__(self, cin, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(cin, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvModule(cin + len(pool_scales) * channels, channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        x = feats[3]
        pyramid = [x] + [up(m(x), x.shape[-2:]) for m in self.psp_modules]
        return self.conv_seg(self.bottleneck(torch.cat(pyramid, 1)))


class MMFCNHead(nn.Module):
    """The auxiliary FCNHead on layer3 (num_convs=1, concat_input=False): ``convs.0``, ``conv_seg``."""

    def __init__(self, cin, channels, num_classes):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, channels, 3, padding=1))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        return self.conv_seg(self.convs(feats[2]))


class MMEncoderDecoder(nn.Module):
    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.decode_head = backbone, decode_head
        if auxiliary_head is not None:
            self.auxiliary_head = auxiliary_head

    def forward(self, x):
        return up(self.decode_head(self.backbone(x)), x.shape[-2:])


def mmseg_model(family: str, depth: int, num_classes: int, *, channels: int, c1_channels: int = 48,
                deep_stem: bool = True, d16_mg124: bool = False) -> MMEncoderDecoder:
    """An mmseg ``{family}_r{depth}-d8`` (or ``-d16-mg124``) model with its auxiliary FCN head, random weights."""
    bottleneck, _ = LAYERS[depth]
    c1, c3, c4 = (256, 1024, 2048) if bottleneck else (64, 256, 512)
    if d16_mg124:
        backbone = MMResNet(depth, deep_stem, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), multi_grid=(1, 2, 4))
        dilations = (1, 6, 12, 18)
    else:
        backbone, dilations = MMResNet(depth, deep_stem), (1, 12, 24, 36)
    if family == "pspnet":
        head: nn.Module = MMPSPHead(c4, channels, num_classes)
    else:
        head = MMASPPHead(c4, channels, num_classes, dilations, c1_in=c1 if family == "deeplabv3plus" else 0,
                          c1_channels=c1_channels)
    return randomize(MMEncoderDecoder(backbone, head, MMFCNHead(c3, channels // 2, num_classes)))


# ---------------------------------------------------------------------------------------------------- CIRKD

class CirkdBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None, previous_dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, previous_dilation, previous_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CirkdBottleneck(MMBottleneck):
    """Same tensors and forward as mmseg's pytorch-style bottleneck (stride and dilation on conv2)."""

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None, previous_dilation=1):
        super().__init__(cin, planes, stride, dilation, downsample)


class CirkdResNet(nn.Module):
    """CIRKD's ResNetV1b, dilated (layer3 x2, layer4 x4); ``deep_stem``: the "v1s" stem 64-64-128."""

    def __init__(self, depth: int, deep_stem: bool = True):
        super().__init__()
        bottleneck, blocks = LAYERS[depth]
        block = CirkdBottleneck if bottleneck else CirkdBasicBlock
        self.deep_stem = deep_stem
        if deep_stem:
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
            self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
            self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
        else:
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 128 if deep_stem else 64
        for i, (n, stride, dil) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
            planes = 64 * 2 ** i
            down = None
            if stride != 1 or cin != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            mods = [block(cin, planes, stride, 1 if dil in (1, 2) else 2, down, previous_dilation=dil)]
            cin = planes * block.expansion
            mods += [block(cin, planes, 1, dil, previous_dilation=dil) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*mods))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))))
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def _cbr(cin: int, cout: int, k: int = 1, d: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=0 if k == 1 else d, dilation=d, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class _AtrousBranch(nn.Module):
    def __init__(self, cin, cout, rate):
        super().__init__()
        self.block = _cbr(cin, cout, 3, rate)

    def forward(self, x):
        return self.block(x)


class _PoolBranch(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_cbr(cin, cout))

    def forward(self, x):
        return up(self.gap(x), x.shape[-2:], align_corners=True)


class CirkdASPP(nn.Module):
    def __init__(self, cin, cout=512, rates=(12, 24, 36)):
        super().__init__()
        self.b0 = _cbr(cin, cout)
        self.b1, self.b2, self.b3 = (_AtrousBranch(cin, cout, r) for r in rates)
        self.b4 = _PoolBranch(cin, cout)
        self.project = nn.Sequential(*_cbr(5 * cout, cout), nn.Dropout(0.5))

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in (self.b0, self.b1, self.b2, self.b3, self.b4)], 1))


class CirkdHead(nn.Module):
    def __init__(self, cin, num_classes, width=512):
        super().__init__()
        self.aspp = CirkdASPP(cin, width)
        self.block = nn.Sequential(*_cbr(width, width, 3), nn.Dropout(0.1), nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        return self.block(self.aspp(x))


class CirkdDeepLabV3(nn.Module):
    """CIRKD's DeepLabV3 with its auxiliary FCN head; ``forward`` returns the logits at 1/8 (CIRKD upsamples
    them afterwards, with align_corners=True)."""

    def __init__(self, depth: int, num_classes: int, deep_stem: bool = True):
        super().__init__()
        c4 = 2048 if LAYERS[depth][0] else 512
        self.pretrained = CirkdResNet(depth, deep_stem)
        self.head = CirkdHead(c4, num_classes)
        self.auxlayer = nn.Sequential()
        self.auxlayer.block = nn.Sequential(*_cbr(c4 // 2, c4 // 8, 3), nn.Dropout(0.1),
                                            nn.Conv2d(c4 // 8, num_classes, 1))

    def forward(self, x):
        return self.head(self.pretrained(x))


def cirkd_deeplabv3(depth: int, num_classes: int, deep_stem: bool = True) -> CirkdDeepLabV3:
    return randomize(CirkdDeepLabV3(depth, num_classes, deep_stem))
