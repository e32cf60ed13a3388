"""Teacher checkpoints from other toolkits: their state dict -> ours, and the registered model that takes it.

Pure functions (no I/O, no model): :func:`convert_foreign` recognises the toolkit from the key names,
renames every key it knows to ours and says which registered name (plus kwargs) builds the network:

* **mmsegmentation** (``{"meta": ..., "state_dict": {backbone.*, decode_head.*, auxiliary_head.*}}``): ResNetV1c
  (deep stem ``backbone.stem.*``) or ResNetV1b (``backbone.conv1``) with DepthwiseSeparableASPPHead
  (DeepLabV3+), ASPPHead (DeepLabV3) or PSPHead (PSPNet) -> ``layout="mmseg"`` models (``*_v1c`` for the
  ``-d8`` configs). The backbone keys are already ours; the heads' mmcv ConvModules (``conv`` / ``bn``) and
  DepthwiseSeparableConvModules (``depthwise_conv`` / ``pointwise_conv``) become our Sequential indices.
* **CIRKD** (``torch.save(model.state_dict())``: ``pretrained.*``, ``head.*``, ``auxlayer.*``): its DeepLabV3 on
  the "v1s" deep-stem ResNet -> ``deeplabv3_r*_cirkd``.

Auxiliary heads (``auxiliary_head.*``, ``auxlayer.*``) are training-only and listed in ``dropped``. Keys no
rule knows are passed on unchanged, so the strict loader (models.weights) names them as unexpected, and
:meth:`ForeignCheckpoint.hint` says which model to build, or how to wrap the network with ``--import``.
What the weights cannot tell is assumed: output stride 8 (mmseg ``-d8``; give ``output_stride=16,
multi_grid=[1, 2, 4]`` for ``-d16-mg124``) and PSPNet bins (1, 2, 3, 6).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from c2vkd.models.cnn_seg import DEPTHS, FAMILIES, registered_name

Rules = list[tuple[str, str]]  # (their key prefix, our key prefix); the first matching prefix wins

#: how a network c2vkd cannot build is used anyway (also in the load error of any foreign checkpoint)
WRAP_HINT = ("To use a network c2vkd does not build as it is, wrap it: a .py file that registers a builder with "
             "@MODELS.register('my_teacher') and keeps the checkpoint's module names, named in experiment.imports "
             "(--import my_teacher.py for taps / info / models; --set experiment.imports=[my_teacher.py] on "
             "train / distill). docs/models.md, 'Bring your own teacher', has a worked example.")

#: (bottleneck blocks?, blocks per stage) -> ResNet depth
_RESNET_DEPTHS = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
                  (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}
_FAMILY_TITLES = {"deeplabv3plus": "DeepLabV3+", "deeplabv3": "DeepLabV3", "pspnet": "PSPNet"}


@dataclass
class ForeignCheckpoint:
    """A checkpoint of another toolkit with our key names.

    ``arch`` / ``kwargs``: the registered model (and constructor kwargs beyond its own) that takes it, or
    None with ``problem`` saying why c2vkd has none. ``dropped``: training-only keys removed (auxiliary heads).
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    arch: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    problem: str = ""

    def hint(self) -> str:
        """What to do when this checkpoint does not fit the configured model (appended to the load error)."""
        if self.arch is None:
            return f"c2vkd has no model for this {self.source} checkpoint: {self.problem}. {WRAP_HINT}"
        if not self.kwargs:
            use = f"--teacher {self.arch}=PATH, or in YAML teacher: {{name: {self.arch}, checkpoint: PATH}}"
        else:
            kw = "{" + ", ".join(f"{k}: {v}" for k, v in self.kwargs.items()) + "}"
            use = (f"in YAML teacher: {{name: {self.arch}, checkpoint: PATH, kwargs: {kw}}} (on the command line "
                   f"--teacher {self.arch}=PATH --set 'teacher.kwargs={kw}')")
        return f"This {self.source} checkpoint is built by {self.arch}: {use}. {WRAP_HINT}"


def detect_toolkit(sd: Mapping[str, Any]) -> str | None:
    """"mmseg", "cirkd" or None (not a checkpoint of a toolkit we map), from the key names alone."""
    keys = list(sd)
    if any(k.startswith("decode_head.") for k in keys) and any(k.startswith("backbone.") for k in keys):
        return "mmseg"
    if any(k.startswith("pretrained.") for k in keys) and any(k.startswith("head.") for k in keys):
        return "cirkd"
    return None


def convert_foreign(sd: Mapping[str, torch.Tensor]) -> ForeignCheckpoint | None:
    """Our version of an mmsegmentation / CIRKD state dict (see the module doc); None for any other."""
    toolkit = detect_toolkit(sd)
    if toolkit == "mmseg":
        return convert_mmseg(sd)
    if toolkit == "cirkd":
        return convert_cirkd(sd)
    return None


# ----------------------------------------------------------------------------------------------- helpers

def rename(sd: Mapping[str, torch.Tensor], rules: Rules) -> dict[str, torch.Tensor]:
    """Keys renamed by the first rule whose prefix they start with; keys no rule matches are kept as they are
    (the strict loader reports them as unexpected)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = next((ours + key[len(theirs):] for theirs, ours in rules if key.startswith(theirs)), key)
        out[new] = value
    return out


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    """How many numbered children ``{prefix}{i}.`` the keys have (0, 1, ... without gaps assumed)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def resnet_depth(sd: Mapping[str, Any], prefix: str) -> int | None:
    """Depth of the ResNet whose stages are ``{prefix}layer1..4`` (block type and block counts), or None."""
    blocks = tuple(_count(sd, f"{prefix}layer{i}.") for i in range(1, 5))
    return _RESNET_DEPTHS.get((f"{prefix}layer1.0.conv3.weight" in sd, blocks))


def _resnet_title(variant: str, depth: int | None) -> str:
    return f"{variant}-{depth}" if depth else f"{variant} (unknown depth)"


def _implied(source: str, family: str, depth: int | None, kwargs: dict[str, Any], sd: dict[str, torch.Tensor],
             dropped: list[str], problem: str = "") -> ForeignCheckpoint:
    """The ForeignCheckpoint of a recognised network: its registered name when c2vkd builds it."""
    if not problem and depth is None:
        problem = "its ResNet has a block layout of no ResNet-18/34/50/101/152"
    elif not problem and depth not in DEPTHS:
        cls = FAMILIES[family].__name__
        problem = (f"no registered name has ResNet-{depth} (depths {list(DEPTHS)}); register "
                   f"c2vkd.models.{cls}(num_classes, depth={depth}, **{kwargs}) under a name of your own")
    if problem:
        return ForeignCheckpoint(sd, source, None, dropped=dropped, problem=problem)
    arch, extra = registered_name(family, depth, kwargs)
    return ForeignCheckpoint(sd, source, arch, extra, dropped)


def _split_aux(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state dict without the auxiliary head ``prefix``, the dropped keys, sorted)."""
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}, sorted(k for k in sd if k.startswith(prefix))


# ------------------------------------------------------------------------------------------ mmsegmentation

def _mm_conv(theirs: str, ours: str, first: int = 0) -> Rules:
    """mmcv ConvModule (``conv``, ``bn``) -> our conv-BN-ReLU Sequential with the conv at index ``first``."""
    return [(f"{theirs}.conv.", f"{ours}.{first}."), (f"{theirs}.bn.", f"{ours}.{first + 1}.")]


def _mm_sep(theirs: str, ours: str) -> Rules:
    """mmcv DepthwiseSeparableConvModule -> our (depthwise, pointwise) Sequential."""
    return _mm_conv(f"{theirs}.depthwise_conv", f"{ours}.0") + _mm_conv(f"{theirs}.pointwise_conv", f"{ours}.1")


def mmseg_head_rules(family: str, branches: int = 4, fuse_convs: int = 2) -> Rules:
    """Key rules of mmseg's decode head of ``family`` (``branches``: ASPP modules or pyramid bins; ``fuse_convs``:
    DeepLabV3+'s sep_bottleneck convs). mmseg's image pool is our ASPP's last branch (after its avg-pool);
    its pyramid branches are (avg-pool, ConvModule), like our ``ppm.stages``."""
    h = "decode_head"
    rules: Rules = [(f"{h}.conv_seg.", "classifier.")]
    if family == "pspnet":
        for i in range(branches):
            rules += _mm_conv(f"{h}.psp_modules.{i}.1", f"ppm.stages.{i}", first=1)
        return rules + _mm_conv(f"{h}.bottleneck", "decoder")
    atrous = _mm_sep if family == "deeplabv3plus" else _mm_conv
    rules += _mm_conv(f"{h}.image_pool.1", f"aspp.convs.{branches}", first=1)
    rules += _mm_conv(f"{h}.aspp_modules.0", "aspp.convs.0")
    for i in range(1, branches):
        rules += atrous(f"{h}.aspp_modules.{i}", f"aspp.convs.{i}")
    rules += _mm_conv(f"{h}.bottleneck", "aspp.project")
    if family == "deeplabv3plus":
        rules += _mm_conv(f"{h}.c1_bottleneck", "decoder.low_level")
        for j in range(fuse_convs):
            rules += _mm_sep(f"{h}.sep_bottleneck.{j}", f"decoder.fuse.{j}")
    return rules


def _mmseg_family(sd: Mapping[str, Any]) -> str | None:
    """deeplabv3plus (DepthwiseSeparableASPPHead with its c1 decoder), deeplabv3 (ASPPHead), pspnet (PSPHead)."""
    separable = "decode_head.aspp_modules.1.depthwise_conv.conv.weight" in sd
    if separable and "decode_head.c1_bottleneck.conv.weight" in sd:
        return "deeplabv3plus"
    if "decode_head.image_pool.1.conv.weight" in sd and not separable:
        return "deeplabv3"
    if "decode_head.psp_modules.0.1.conv.weight" in sd:
        return "pspnet"
    return None


def _mmseg_kwargs(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    """Constructor kwargs the weights imply (widths from tensor shapes); output stride 8 (the -d8 configs)."""
    kw: dict[str, Any] = {"layout": "mmseg", "output_stride": 8, "deep_stem": "backbone.stem.0.weight" in sd}
    if kw["deep_stem"]:
        kw["stem_channels"] = sd["backbone.stem.6.weight"].shape[0]
    width = sd["decode_head.conv_seg.weight"].shape[1]
    if family == "deeplabv3plus":
        kw.update(aspp_channels=sd["decode_head.bottleneck.conv.weight"].shape[0], decoder_channels=width,
                  low_level_channels=sd["decode_head.c1_bottleneck.conv.weight"].shape[0],
                  decoder_convs=_count(sd, "decode_head.sep_bottleneck."))
    else:
        kw["aspp_channels" if family == "deeplabv3" else "channels"] = width
    return kw


def convert_mmseg(sd: Mapping[str, torch.Tensor]) -> ForeignCheckpoint:
    """An mmsegmentation EncoderDecoder state dict (ResNetV1c/V1b + ASPP / separable ASPP / PSP head) -> ours."""
    sd, dropped = _split_aux(sd, "auxiliary_head.")
    family = _mmseg_family(sd)
    depth = resnet_depth(sd, "backbone.")
    stem = _resnet_title("ResNetV1c" if "backbone.stem.0.weight" in sd else "ResNetV1b", depth)
    if family is None:
        head = sorted({".".join(k.split(".")[:2]) for k in sd if k.startswith("decode_head.")})
        return ForeignCheckpoint(sd, f"mmsegmentation {stem}", None, dropped=dropped,
                                 problem=f"its decode head ({', '.join(head)}) is none of DepthwiseSeparableASPPHead, "
                                         "ASPPHead, PSPHead")
    source = f"mmsegmentation {_FAMILY_TITLES[family]} on {stem}"
    branch_key = "decode_head.psp_modules." if family == "pspnet" else "decode_head.aspp_modules."
    branches = _count(sd, branch_key)
    problem = ""
    if branches != 4:  # our ASPP: 1x1 + 3 atrous rates; our pyramid: the bins' count (1, 2, 3, 6)
        problem = f"its head has {branches} {branch_key[len('decode_head.'):-1]} (c2vkd's has 4)"
    elif any(re.search(r"\.downsample\.2\.", k) for k in sd):
        problem = "its backbone downsamples with an average pool (ResNetV1d, avg_down=True)"
    rules = mmseg_head_rules(family, branches, _count(sd, "decode_head.sep_bottleneck."))
    return _implied(source, family, depth, _mmseg_kwargs(sd, family), rename(sd, rules), dropped, problem)


# ---------------------------------------------------------------------------------------------------- CIRKD

#: CIRKD's DeepLabV3 head (models/deeplabv3.py: head.aspp.b0..b4, project; head.block = conv, BN, ReLU,
#: dropout, classifier) -> our DeepLabV3 (torchvision's layout, which it shares)
_CIRKD_DEEPLABV3: Rules = [("head.aspp.b0.", "aspp.convs.0."), ("head.aspp.b1.block.", "aspp.convs.1."),
                           ("head.aspp.b2.block.", "aspp.convs.2."), ("head.aspp.b3.block.", "aspp.convs.3."),
                           ("head.aspp.b4.gap.", "aspp.convs.4."), ("head.aspp.project.", "aspp.project."),
                           ("head.block.0.", "decoder.0."), ("head.block.1.", "decoder.1."),
                           ("head.block.4.", "classifier.")]


def cirkd_backbone_rules(deep_stem: bool) -> Rules:
    """CIRKD's ResNetV1b (``pretrained.*``; "v1s" = deep stem conv1/bn1..conv3/bn3) -> our ``backbone.*``."""
    if not deep_stem:
        return [("pretrained.", "backbone.")]
    stem = [(f"pretrained.{name}{i}.", f"backbone.stem.{3 * (i - 1) + offset}.")
            for i in (1, 2, 3) for name, offset in (("conv", 0), ("bn", 1))]
    return stem + [("pretrained.layer", "backbone.layer")]


def convert_cirkd(sd: Mapping[str, torch.Tensor]) -> ForeignCheckpoint:
    """A CIRKD segmentation model state dict -> ours (its DeepLabV3; its PSPNet has no c2vkd counterpart)."""
    sd, dropped = _split_aux(sd, "auxlayer.")
    depth = resnet_depth(sd, "pretrained.")
    deep = "pretrained.conv2.weight" in sd  # the "v1s" stem's second conv; the 7x7 stem has one conv
    stem = _resnet_title("ResNetV1s" if deep else "ResNetV1b", depth)
    if "head.aspp.b0.0.weight" not in sd:
        what = "PSPNet (its pyramid is upsampled with align_corners=True, its head is narrower than ours)" \
            if any(k.startswith("head.psp.") for k in sd) else "head"
        return ForeignCheckpoint(sd, f"CIRKD {stem}", None, dropped=dropped,
                                 problem=f"c2vkd maps CIRKD's DeepLabV3 only, not its {what}")
    kw: dict[str, Any] = {"deep_stem": deep, "output_stride": 8, "aspp_channels": sd["head.aspp.b0.0.weight"].shape[0]}
    if deep:
        kw["stem_channels"] = sd["pretrained.conv3.weight"].shape[0]
    renamed = rename(sd, cirkd_backbone_rules(deep) + _CIRKD_DEEPLABV3)
    return _implied(f"CIRKD DeepLabV3 on {stem}", "deeplabv3", depth, kw, renamed, dropped)
