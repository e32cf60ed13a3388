"""Dilated ResNet-18/34/50/101/152 backbone with torchvision parameter names.

Why not torchvision.models.resnet directly: its BasicBlock refuses dilation, so a ResNet-18 teacher at
output stride 8/16 (common in segmentation KD tables) cannot be built. Why not timm features_only: it
renames the stem and wraps stages, which complicates importing torchvision/CIRKD/mmseg checkpoints.
This file keeps exactly torchvision's parameter names (``conv1, bn1, layer1..layer4``, blocks with
``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/1``), which are also timm's ``resnet*`` names, so
an ImageNet state dict from either loads after dropping ``fc.*`` (see
``_ResNetSegModel.adapt_state_dict`` in models.cnn_seg).

Dilation follows torchvision (``replace_stride_with_dilation``) and timm (``output_stride``): in a stage
whose stride is replaced by dilation, the first block keeps the previous dilation and later blocks use the
new one. For BasicBlock, conv1 uses the previous dilation and conv2 the new one, as in timm. Tests compare
layer outputs with torchvision/timm for identical weights.

Options for teachers trained in other toolkits (all off by default, which is the layout above, unchanged):

* ``deep_stem=True``: the ResNetV1c / "v1s" stem, three 3x3 conv + BN + ReLU (3 -> w/2 -> w/2 -> w, the
  first with stride 2) as ``stem.0..8`` instead of ``conv1/bn1``; ``stem_channels`` = w, which is also
  layer1's input width (mmsegmentation: 64; CIRKD: 128).
* ``dilate_basic_conv2=False``: BasicBlock's second 3x3 conv is never dilated (mmsegmentation's BasicBlock).
* ``multi_grid=(1, 2, 4)``: the dilations of layer4's blocks, given as they are (mmsegmentation's
  ``multi_grid``, used by its ``-d16-mg124`` configs), instead of the stage dilation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

Norm = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None, downsample: nn.Module | None = None,
                 norm_layer: Norm = nn.BatchNorm2d, dilate_conv2: bool = True) -> None:
        super().__init__()
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=first_dilation, dilation=first_dilation,
                               bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        d2 = dilation if dilate_conv2 else 1  # mmsegmentation's BasicBlock never dilates conv2
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=d2, dilation=d2, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet V1.5 bottleneck (stride on the 3x3 conv), as torchvision and timm ``resnet50/101``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None, downsample: nn.Module | None = None,
                 norm_layer: Norm = nn.BatchNorm2d, dilate_conv2: bool = True) -> None:
        super().__init__()  # dilate_conv2: BasicBlock's option, accepted so both blocks share one signature
        first_dilation = first_dilation or dilation
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        # dilation of the 3x3 conv: the previous one in the first block of a dilated stage (see module doc)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=first_dilation, dilation=first_dilation,
                               bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        # one ReLU module reused three times (torchvision layout; no parameters). A forward hook on it sees
        # the block output last, which is what FeatureTaps keeps.
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class DilatedResNet(nn.Module):
    """ResNet encoder returning the four stage outputs [c1 (1/4), c2 (1/8), c3, c4].

    output_stride: 32 (plain), 16 (layer4 dilated x2) or 8 (layer3 x2, layer4 x4).
    deep_stem / stem_channels / dilate_basic_conv2 / multi_grid: see the module doc (other toolkits' ResNets).
    No ``avgpool``/``fc``: segmentation never uses them, and keeping them would make every full-model
    checkpoint carry an unused ImageNet classifier.
    """

    def __init__(self, depth: int = 101, output_stride: int = 16, norm_layer: Norm = nn.BatchNorm2d, *,
                 deep_stem: bool = False, stem_channels: int = 64, dilate_basic_conv2: bool = True,
                 multi_grid: Sequence[int] | None = None) -> None:
        super().__init__()
        if depth not in _SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(_SPECS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, layers = _SPECS[depth]
        if multi_grid is not None and len(multi_grid) != layers[3]:
            raise ValueError(f"multi_grid needs one dilation per layer4 block ({layers[3]}), got {list(multi_grid)}")
        if not deep_stem and stem_channels != 64:
            raise ValueError("stem_channels applies to deep_stem=True only (the 7x7 stem is 64 channels)")
        self.depth = depth
        self.output_stride = output_stride
        self.deep_stem = deep_stem
        self._norm = norm_layer
        self._dilate_basic_conv2 = dilate_basic_conv2
        self.inplanes = stem_channels
        self._dilation = 1
        self._stride = 4  # after the stem (stride 2) + maxpool (stride 2)
        if deep_stem:
            self.stem = _deep_stem(stem_channels, norm_layer)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = norm_layer(64)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, multi_grid=multi_grid)
        #: channels of c1..c4, used by the heads
        self.channels: tuple[int, int, int, int] = (64 * block.expansion, 128 * block.expansion,
                                                     256 * block.expansion, 512 * block.expansion)
        self._init_weights()

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int, multi_grid: Sequence[int] | None = None) -> nn.Sequential:
        prev_dilation = self._dilation
        if stride > 1 and self._stride * stride > self.output_stride:
            # replace this stage's stride by dilation so the feature map keeps its resolution
            self._dilation *= stride
            stride = 1
        else:
            self._stride *= stride
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                self._norm(planes * block.expansion),
            )
        # (first_dilation, dilation) per block; multi-grid gives each block its own, as they are
        dilations = ([(d, d) for d in multi_grid] if multi_grid is not None else
                     [(prev_dilation, self._dilation)] + [(self._dilation, self._dilation)] * (blocks - 1))
        mods = [block(self.inplanes, planes, stride, dilation=dilations[0][1], first_dilation=dilations[0][0],
                      downsample=downsample, norm_layer=self._norm, dilate_conv2=self._dilate_basic_conv2)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, dilation=d, first_dilation=first, norm_layer=self._norm,
                       dilate_conv2=self._dilate_basic_conv2) for first, d in dilations[1:]]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        # torchvision's init; only matters for from-scratch runs and tests (real runs load ImageNet weights)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def _deep_stem(width: int, norm_layer: Norm) -> nn.Sequential:
    """Three 3x3 conv + norm + ReLU, 3 -> width/2 (stride 2) -> width/2 -> width: indices 0..8 are those of
    mmsegmentation's ``stem`` Sequential, so its keys load unchanged."""
    half = width // 2
    mods: list[nn.Module] = []
    for cin, cout, stride in ((3, half, 2), (half, half, 1), (half, width, 1)):
        mods += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*mods)
