"""CNN teachers: DeepLabV3+, DeepLabV3 and PSPNet on a dilated ResNet (torchvision parameter names).

Module layout (the paths feature taps and checkpoints use):

    backbone.{conv1,bn1,layer1..layer4}   DilatedResNet (models.resnet)
    aspp.{convs.0..4, project}            DeepLabV3/V3+ only; torchvision's ASPP naming
    ppm.stages.0..3                       PSPNet only
    decoder                               the last 256/512-ch feature before the classifier
    classifier                            1x1 conv -> K logits (at 1/4 for V3+, at 1/OS otherwise)

Batch-1 training (the pooled BatchNorm pitfall): the ASPP image-pooling branch and PSPNet's 1x1 pyramid bin
see a single value per channel when the batch has one image, and ``nn.BatchNorm2d`` raises
"Expected more than 1 value per channel when training". Those layers are :class:`PooledBatchNorm2d`, a
BatchNorm2d (same parameters and buffers, so torchvision/mmseg checkpoints still load) that normalises
with its running statistics, without updating them, when a training batch has only one value per channel.
With two or more images it is plain BatchNorm.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from c2vkd.models.base import MODELS, AdaptedStateDict, SegmentationModel
from c2vkd.models.resnet import DilatedResNet


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that falls back to running statistics when batch statistics are undefined (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] <= 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1,
                  norm: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> nn.Sequential:
    pad = 0 if k == 1 else dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         norm(cout), nn.ReLU(inplace=True))


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
    """

    def __init__(self, cin: int, cout: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(cin, cout, 1)]
        branches += [_conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """layer1 -> 1x1 conv 48; concat with the ASPP output upsampled to 1/4 (256 + 48 = 304 ch);
    ``num_convs`` 3x3 conv 256 + BN + ReLU. Two convs as in the DeepLabV3+ reference implementation
    (method.md writes one; ``decoder_convs=1`` gives that)."""

    def __init__(self, low_channels: int, high_channels: int = 256, low_proj: int = 48, out_channels: int = 256,
                 num_convs: int = 2) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"decoder_convs must be >= 1, got {num_convs}")
        self.low_level = _conv_bn_relu(low_channels, low_proj, 1)
        convs = [_conv_bn_relu(high_channels + low_proj, out_channels, 3)]
        convs += [_conv_bn_relu(out_channels, out_channels, 3) for _ in range(num_convs - 1)]
        self.fuse = nn.Sequential(*convs)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, self.low_level(low)], dim=1))


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling: for each bin b, adaptive-avg-pool to b x b -> 1x1 conv (C/len(bins)) -> BN
    -> ReLU -> upsample; output = concat(input, all bins) (2C channels for 4 bins)."""

    def __init__(self, cin: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        cout = cin // len(bins)
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
    """Shared pieces of the ResNet teachers: backbone, tap aliases and checkpoint-format detection."""

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

    def __init__(self, num_classes: int, depth: int, output_stride: int) -> None:
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16 for a segmentation teacher, got {output_stride}")
        super().__init__(num_classes, output_stride)
        self.backbone = DilatedResNet(depth, output_stride)

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> AdaptedStateDict:
        """Full-model checkpoint (``backbone.*`` + head keys) or an ImageNet ResNet state dict with
        torchvision/timm names (``conv1.weight``, ``layer1.0.conv1.weight``..., ``fc.*``): the latter is
        prefixed with ``backbone.``, its ``fc.*`` classifier is dropped, and only the backbone must match."""
        sd = dict(state_dict)
        is_full = any(k.startswith(("backbone.", "aspp.", "ppm.", "decoder.", "classifier.")) for k in sd)
        looks_resnet = "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)
        if is_full or not looks_resnet:
            return AdaptedStateDict(sd, format="full model state dict")
        dropped = sorted(k for k in sd if k.startswith("fc."))
        mapped = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
        scope = {k for k in self.state_dict() if k.startswith("backbone.")}
        return AdaptedStateDict(mapped, format="ImageNet ResNet backbone (torchvision/timm names)", scope=scope,
                                dropped=dropped)


class DeepLabV3Plus(_ResNetSegModel):
    """DeepLabV3+ (Chen et al. 2018) with a dilated ResNet: the C2VKD teacher (ResNet-101, OS 16).

    ASPP rates are (6, 12, 18) at output stride 16 and doubled (12, 24, 36) at 8. Logits come out at 1/4
    and are bilinearly upsampled to the input size.
    """

    default_taps: ClassVar[dict[str, str]] = {**_ResNetSegModel.default_taps, "aspp": "aspp"}

    def __init__(self, num_classes: int, depth: int = 101, output_stride: int = 16, decoder_convs: int = 2,
                 aspp_channels: int = 256) -> None:
        super().__init__(num_classes, depth, output_stride)
        c1, _, _, c4 = self.backbone.channels
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(c4, aspp_channels, rates)
        self.decoder = DeepLabV3PlusDecoder(c1, aspp_channels, 48, 256, decoder_convs)
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        c1, _, _, c4 = self.backbone(x)
        feat = self.decoder(c1, self.aspp(c4))
        return self._resize_logits(self.classifier(feat), x.shape[-2:])


class DeepLabV3(_ResNetSegModel):
    """DeepLabV3 (Chen et al. 2017), torchvision's DeepLabHead: ASPP -> 3x3 conv 256 + BN + ReLU -> 1x1 conv.

    Logits at 1/OS, upsampled to the input size. (No auxiliary FCN head: teachers are trained elsewhere.)
    """

    default_taps: ClassVar[dict[str, str]] = {**_ResNetSegModel.default_taps, "aspp": "aspp"}

    def __init__(self, num_classes: int, depth: int = 101, output_stride: int = 16) -> None:
        super().__init__(num_classes, depth, output_stride)
        c4 = self.backbone.channels[3]
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(c4, 256, rates)
        self.decoder = _conv_bn_relu(256, 256, 3)
        self.classifier = nn.Conv2d(256, num_classes, 1)

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
    pyramid pooling with bins 1/2/3/6, 3x3 conv 512 + BN + ReLU, dropout 0.1, 1x1 conv -> K.
    (No auxiliary layer3 head.)"""

    default_taps: ClassVar[dict[str, str]] = {**_ResNetSegModel.default_taps, "ppm": "ppm"}

    def __init__(self, num_classes: int, depth: int = 101, output_stride: int = 8,
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(num_classes, depth, output_stride)
        c4 = self.backbone.channels[3]
        self.ppm = PyramidPooling(c4, bins)
        mid = 512  # PSPNet's bottleneck width, whatever the depth
        self.decoder = _conv_bn_relu(self.ppm.out_channels, mid, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        c4 = self.backbone(x)[3]
        feat = self.decoder(self.ppm(c4))
        return self._resize_logits(self.classifier(self.dropout(feat)), x.shape[-2:])


def _register() -> None:
    def make(cls: type[_ResNetSegModel], depth: int):
        def factory(num_classes: int, **kwargs: Any) -> _ResNetSegModel:
            return cls(num_classes, depth=depth, **kwargs)

        factory.__doc__ = f"{cls.__name__} with ResNet-{depth}. {cls.__doc__ or ''}"
        return factory

    for prefix, cls in (("deeplabv3plus", DeepLabV3Plus), ("deeplabv3", DeepLabV3), ("pspnet", PSPNet)):
        for depth in (18, 50, 101):
            MODELS.add(f"{prefix}_r{depth}", make(cls, depth))


_register()
