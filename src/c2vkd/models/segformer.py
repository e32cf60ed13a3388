"""SegFormer students (Xie et al. 2021): Mix Transformer encoder (MiT-B0/B1/B2) + all-MLP decoder.

Built from HuggingFace ``transformers`` (SegformerConfig -> SegformerForSemanticSegmentation, random init,
no hub access), then re-wrapped so that:

* the four encoder stage outputs pass through ``nn.Identity`` taps ``stage1..stage4`` as spatial
  [B, C_i, H/s_i, W/s_i] tensors (s = 4, 8, 16, 32) that forward hooks can read;
* the encoder runs once: we iterate ``segformer.stages`` ourselves (what SegformerModel.forward does,
  minus the output-recording decorators) and feed the tapped tensors to the HF decode head;
* parameter names are exactly HF's ``segformer.*`` / ``decode_head.*`` (the Identity taps own no
  parameters), so HF checkpoints load without a prefix map.

SegFormer has no positional embeddings, so any input size >= the minimum works (97x131 included); inputs
smaller than the sequence-reduction kernels allow raise a ValueError naming the minimum.

Checkpoint formats understood by :meth:`SegFormer.adapt_state_dict` (all explicit, no guessing beyond key
prefixes): HF transformers >= 5 names, HF 4.x names (``encoder.block.*``; what ``save_pretrained`` still
writes and what the hub's ``nvidia/mit-b*`` / ``nvidia/segformer-*`` files use), bare ``SegformerModel``
encoders, ``SegformerForImageClassification`` (ImageNet MiT; its ``classifier.*`` is dropped and the decode
head stays random), and the original NVlabs ``mit_b*.pth`` files (``patch_embed1``, ``block1``, fused ``kv``).
"""
from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from c2vkd.models.base import MODELS, AdaptedStateDict, SegmentationModel, min_side_for_reductions

#: MiT variants (SegFormer paper Table 6 / hub configs nvidia/mit-b*). decoder_hidden_size: 256 for B0/B1,
#: 768 for B2 and larger.
MIT_CONFIGS: dict[str, dict[str, Any]] = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=768),
}

# transformers 4.x -> 5.x parameter names (mirrors transformers' conversion_mapping for SegformerModel and
# SegformerForSemanticSegmentation, written out here so loading never depends on from_pretrained).
_HF4_RENAMES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"attention\.self\.query\.", "attention.q_proj."),
    (r"attention\.self\.key\.", "attention.k_proj."),
    (r"attention\.self\.value\.", "attention.v_proj."),
    (r"attention\.self\.sr\.", "attention.sequence_reduction.sequence_reduction."),
    (r"attention\.self\.layer_norm\.", "attention.sequence_reduction.layer_norm."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"mlp\.dense1\.", "mlp.fc1."),
    (r"mlp\.dense2\.", "mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
    (r"^decode_head\.linear_c\.", "decode_head.linear_projections."),
]]

# original NVlabs MixVisionTransformer names (mit_b*.pth) -> HF 5.x names (the fused ``attn.kv`` is split
# separately). Stage index i in NVlabs names is 1-based.
_NVLABS_RENAMES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^patch_embed(\d)\.proj\.", r"stages.{\1}.patch_embeddings.proj."),
    (r"^patch_embed(\d)\.norm\.", r"stages.{\1}.patch_embeddings.layer_norm."),
    (r"^block(\d)\.(\d+)\.norm1\.", r"stages.{\1}.blocks.\2.layernorm_before."),
    (r"^block(\d)\.(\d+)\.norm2\.", r"stages.{\1}.blocks.\2.layernorm_after."),
    (r"^block(\d)\.(\d+)\.attn\.q\.", r"stages.{\1}.blocks.\2.attention.q_proj."),
    (r"^block(\d)\.(\d+)\.attn\.proj\.", r"stages.{\1}.blocks.\2.attention.o_proj."),
    (r"^block(\d)\.(\d+)\.attn\.sr\.", r"stages.{\1}.blocks.\2.attention.sequence_reduction.sequence_reduction."),
    (r"^block(\d)\.(\d+)\.attn\.norm\.", r"stages.{\1}.blocks.\2.attention.sequence_reduction.layer_norm."),
    (r"^block(\d)\.(\d+)\.mlp\.", r"stages.{\1}.blocks.\2.mlp."),  # fc1, dwconv.dwconv, fc2: same names
    (r"^norm(\d)\.", r"stages.{\1}.layer_norm."),
]]


#: The name our SegFormers give transformers' attention registry (``config._attn_implementation``): PyTorch's SDPA,
#: except that under CPU bf16 autocast the attention itself runs in fp32. Why: on CPU the flash kernel's bf16
#: backward is about 6x slower than its fp32 one (torch 2.14, AVX512-BF16; benchmarks/bench_student_step.py form
#: ``bf16`` vs ``bf16_attn32``), while the projections around it (bf16 matmuls, where the CPU gains) stay in bf16.
#: fp32 runs, CUDA runs and fp16 are exactly transformers' ``sdpa``.
ATTENTION_IMPL = "c2vkd_sdpa"


def sdpa_fp32_on_cpu_bf16(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' ``sdpa_attention_forward`` with [B, heads, N, d] bf16 CPU inputs upcast to fp32 (autocast
    off inside) and the [B, N, heads, d] output cast back to bf16; any other input goes through unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                  attention_mask, **kwargs)
        return out.to(torch.bfloat16), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPL, sdpa_fp32_on_cpu_bf16)


def _zero_based(key: str) -> str:
    # "{3}" placeholders written by _NVLABS_RENAMES hold 1-based stage numbers
    return re.sub(r"\{(\d)\}", lambda m: str(int(m.group(1)) - 1), key)


def _convert_nvlabs(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in sd.items():
        m = re.match(r"^block(\d)\.(\d+)\.attn\.kv\.(weight|bias)$", key)
        if m:
            # NVlabs projects keys and values with one Linear(C, 2C): first half keys, second half values
            k, v = value.chunk(2, dim=0)
            base = f"segformer.stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.attention"
            out[f"{base}.k_proj.{m.group(3)}"] = k
            out[f"{base}.v_proj.{m.group(3)}"] = v
            continue
        if key.startswith("head."):  # ImageNet classifier
            dropped.append(key)
            continue
        new = key
        for pat, rep in _NVLABS_RENAMES:
            new = pat.sub(rep, new)
        out["segformer." + _zero_based(new) if new != key else key] = value
    return out, dropped


class SegFormer(SegmentationModel):
    """SegFormer MiT-B* wrapper (see module doc). Logits at 1/4, bilinearly upsampled to the input size."""

    family: ClassVar[str] = "vit"
    default_taps: ClassVar[dict[str, str]] = {
        "feat": "stage4",  # the C2VKD student tap (last stage, [B, C4, H/32, W/32])
        "stage1": "stage1",
        "stage2": "stage2",
        "stage3": "stage3",
        "stage4": "stage4",
        "decoder": "decode_head.activation",  # fused all-MLP feature before dropout + classifier
        "logits": "decode_head.classifier",  # logits at 1/4, before the final upsample (KD at: stride)
    }

    def __init__(self, num_classes: int, variant: str = "b0", **config_overrides: Any) -> None:
        # imported here: transformers takes seconds to import, which every process (CLI, DDP workers) paid
        # on `import c2vkd.models` whether or not it built a SegFormer
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        if variant not in MIT_CONFIGS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose from {sorted(MIT_CONFIGS)}")
        known = set(SegformerConfig().to_dict())
        bad = sorted(set(config_overrides) - known)
        if bad:
            raise TypeError(f"unknown SegformerConfig option(s) {bad}")
        if config_overrides.get("reshape_last_stage") is False:
            raise ValueError("reshape_last_stage=False is not supported: the taps need spatial stage outputs")
        cfg = SegformerConfig(**{**MIT_CONFIGS[variant], "num_labels": int(num_classes), **config_overrides})
        super().__init__(num_classes, output_stride=math.prod(cfg.strides))
        hf = SegformerForSemanticSegmentation(cfg)  # random init (post_init), nothing downloaded
        if cfg._attn_implementation == "sdpa":  # transformers' default; an explicit choice is kept
            _register_attention()
            cfg._attn_implementation = ATTENTION_IMPL  # see sdpa_fp32_on_cpu_bf16
        self.config = cfg
        self.variant = variant
        # take HF's submodules so parameter names stay "segformer.*" / "decode_head.*"
        self.segformer = hf.segformer
        self.decode_head = hf.decode_head
        self.stage1 = nn.Identity()
        self.stage2 = nn.Identity()
        self.stage3 = nn.Identity()
        self.stage4 = nn.Identity()
        self._min_side = self.min_input_size()

    def min_input_size(self) -> int:
        """Smallest side length for which every stage's sequence-reduction conv (kernel = stride = sr
        ratio) still has at least one output position."""
        convs = [(k, s, k // 2) for k, s in zip(self.config.patch_sizes, self.config.strides)]  # overlapping
        return min_side_for_reductions(convs, list(self.config.sr_ratios))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if min(x.shape[-2:]) < self._min_side:
            raise ValueError(f"{self.arch}: input {tuple(x.shape[-2:])} is too small; SegFormer needs at least "
                             f"{self._min_side} px per side (stage sequence-reduction convs)")
        feats: list[torch.Tensor] = []
        h = x
        taps = (self.stage1, self.stage2, self.stage3, self.stage4)
        for stage, tap in zip(self.segformer.stages, taps):
            h = tap(stage(h))  # [B, C_i, H_i, W_i]; the tap's output is what the next stage consumes
            feats.append(h)
        logits = self.decode_head(feats)  # [B, K, H/4, W/4]
        return self._resize_logits(logits, x.shape[-2:])

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> AdaptedStateDict:
        sd = dict(state_dict)
        notes: list[str] = []
        dropped: list[str] = []
        if any(re.match(r"^(patch_embed\d|block\d)\.", k) for k in sd):
            sd, dropped = _convert_nvlabs(sd)
            notes.append("NVlabs MiT names")
        elif any(re.search(r"(^|\.)encoder\.(block|patch_embeddings)\.", k) or k.startswith("decode_head.linear_c.")
                 for k in sd):
            renamed = {}
            for key, value in sd.items():
                for pat, rep in _HF4_RENAMES:
                    key = pat.sub(rep, key)
                renamed[key] = value
            sd = renamed
            notes.append("transformers 4.x names")
        if not any(k.startswith("segformer.") for k in sd) and any(k.startswith("stages.") for k in sd):
            sd = {("segformer." + k if k.startswith("stages.") else k): v for k, v in sd.items()}
            notes.append("bare SegformerModel")
        has_encoder = any(k.startswith("segformer.") for k in sd)
        has_head = any(k.startswith("decode_head.") for k in sd)
        if has_encoder and not has_head:
            # ImageNet MiT (SegformerForImageClassification): drop its classifier, keep the decoder random
            dropped += sorted(k for k in sd if k.startswith("classifier."))
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
            scope = {k for k in self.state_dict() if k.startswith("segformer.")}
            fmt = "SegFormer encoder only" + (f" ({', '.join(notes)})" if notes else "")
            return AdaptedStateDict(sd, format=fmt, scope=scope, dropped=dropped)
        fmt = "SegFormer full model" + (f" ({', '.join(notes)})" if notes else "")
        return AdaptedStateDict(sd, format=fmt, dropped=dropped)


def _register() -> None:
    def make(variant: str):
        def factory(num_classes: int, **kwargs: Any) -> SegFormer:
            return SegFormer(num_classes, variant=variant, **kwargs)

        factory.__doc__ = f"SegFormer MiT-{variant.upper()} (HF transformers, random init). {SegFormer.__doc__}"
        return factory

    for variant in MIT_CONFIGS:
        MODELS.add(f"segformer_{variant}", make(variant))


_register()
