"""Model zoo: CNN teachers (DeepLabV3+/DeepLabV3/PSPNet on dilated ResNet-18/50/101), SegFormer
students (MiT-B0/B1/B2) and timm ViT students (PVTv2-B0/B1, DeiT-Tiny/Small, Swin-T), plus feature taps
(forward hooks), strict local weight loading, and CLIP's attention-pooling head (``clip_pool``: the frozen
pretrained head VLFD's linguistic term runs the teacher feature through).

Importing this package registers every built-in model in ``MODELS``; build one with
``build_model(name, num_classes, pretrained=None, **kwargs)``. See base.py for the model contract.
"""
from c2vkd.models.base import MODELS, AdaptedStateDict, SegmentationModel, build_model
from c2vkd.models import cnn_seg as _cnn_seg  # noqa: F401  (registers the teachers)
from c2vkd.models import segformer as _segformer  # noqa: F401  (registers the students)
from c2vkd.models import vit as _vit  # noqa: F401  (registers the timm ViT students)
from c2vkd.models.clip_pool import AttentionPool2d, load_clip_attnpool
from c2vkd.models.cnn_seg import DeepLabV3, DeepLabV3Plus, PooledBatchNorm2d, PSPNet
from c2vkd.models.resnet import DilatedResNet
from c2vkd.models.segformer import SegFormer
from c2vkd.models.vit import DeiTSeg, PVTv2Seg, SwinSeg
from c2vkd.models.taps import (FeatureTaps, TapInfo, format_taps, list_taps, probe_shapes, resolve_tap,
                               unwrap_model)
from c2vkd.models.weights import LoadReport, WeightLoadError, load_checkpoint_weights, read_state_dict

__all__ = [
    "MODELS", "build_model", "SegmentationModel", "AdaptedStateDict",
    "DeepLabV3Plus", "DeepLabV3", "PSPNet", "DilatedResNet", "PooledBatchNorm2d", "SegFormer",
    "PVTv2Seg", "DeiTSeg", "SwinSeg",
    "FeatureTaps", "TapInfo", "list_taps", "format_taps", "probe_shapes", "resolve_tap", "unwrap_model",
    "load_checkpoint_weights", "read_state_dict", "LoadReport", "WeightLoadError",
    "AttentionPool2d", "load_clip_attnpool",
]
