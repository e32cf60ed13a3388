"""CLIP's attention-pooling head (``visual.attnpool`` of the CLIP ResNets) and a strict checkpoint loader.

C2VKD's linguistic term (method.md 3.2.3) pushes the teacher feature F_T [B, 2048, h, w] through the frozen
attention pool of CLIP RN101 (or RN50) and uses the global token as a "language-grounded" embedding e_T.
The pool is a single multi-head attention layer whose only query is the mean token:

    tokens = [mean(F), F_1 .. F_hw] + positional_embedding      (hw + 1 tokens, C channels)
    e      = c_proj(MHA(query=tokens[0], keys=values=tokens))   [B, output_dim]

Parameter names and layout are OpenAI CLIP's / open_clip's (``positional_embedding`` [s*s + 1, C],
``q_proj``/``k_proj``/``v_proj``/``c_proj`` Linear), so OpenAI and open_clip state dicts load without
renaming; timm's ``resnet*_clip`` heads are mapped by an explicit table (see :data:`TIMM_TO_CLIP`).

Positional-embedding resizing: CLIP's own pool has a fixed 7x7 grid (224 px input) and never resizes.
A segmentation teacher's layer4 is larger (32x32 at 512 px, output stride 16), so the 7x7 spatial part is
resampled to the feature's h x w with **bicubic, align_corners=False, antialias=True, in float32** --
exactly what timm's ``AttentionPool2d`` (``resample_abs_pos_embed``) and open_clip's ``resize_pos_embed``
do, so a timm ``resnet101_clip`` head and this module agree at every size, not just 7x7.
The resize is logged once per new size (it changes what the pretrained pool sees).
"""
from __future__ import annotations

import logging
import math
import os
import zipfile
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from c2vkd.models.weights import WeightLoadError, read_weights_file, unwrap_state_dict

logger = logging.getLogger("c2vkd")

#: Architecture of the attention pools C2VKD accepts (CLIP ModifiedResNet: heads = embed_dim // 64).
ARCH_SPECS: dict[str, dict[str, int]] = {
    "RN101": dict(spacial_dim=7, embed_dim=2048, num_heads=32, output_dim=512),
    "RN50": dict(spacial_dim=7, embed_dim=2048, num_heads=32, output_dim=1024),
}

#: Our (= OpenAI / open_clip) parameter names of the pool.
POOL_KEYS: tuple[str, ...] = (
    "positional_embedding",
    "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
    "v_proj.weight", "v_proj.bias", "c_proj.weight", "c_proj.bias",
)

#: timm ``resnet50_clip`` / ``resnet101_clip`` (byobnet, ``AttentionPool2d(qkv_separate=True)``) -> ours.
#: Taken from timm 1.0.31 ``byobnet._convert_openai_clip`` (the inverse of this table) and
#: ``layers/attention_pool2d.AttentionPool2d`` (q/k/v/proj Linear, pos_embed [s*s + 1, C]).
TIMM_TO_CLIP: dict[str, str] = {
    "pos_embed": "positional_embedding",
    "q.weight": "q_proj.weight", "q.bias": "q_proj.bias",
    "k.weight": "k_proj.weight", "k.bias": "k_proj.bias",
    "v.weight": "v_proj.weight", "v.bias": "v_proj.bias",
    "proj.weight": "c_proj.weight", "proj.bias": "c_proj.bias",
}
#: timm's fused-qkv variant (``qkv_separate=False``): rows are [q; k; v], split explicitly.
TIMM_FUSED_QKV: tuple[str, str] = ("qkv.weight", "qkv.bias")

# Prefixes under which each naming stores the pool; the order only matters for error messages.
_CLIP_PREFIXES: tuple[str, ...] = ("visual.attnpool.", "attnpool.")  # OpenAI / open_clip / ModifiedResNet
_TIMM_PREFIX = "head."


class AttentionPool2d(nn.Module):
    """CLIP ResNet attention pool: [B, C, h, w] -> [B, output_dim] (the global, mean-query token).

    Args: spacial_dim s (the checkpoint's native grid, 7 for CLIP at 224 px), embed_dim C, num_heads,
    output_dim (defaults to C). Any h x w is accepted; the s x s grid is resized as the module docstring says.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"AttentionPool2d: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.spacial_dim = spacial_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.output_dim = output_dim or embed_dim
        # same initialisation as CLIP (positional: randn / sqrt(C); projections: default Linear init)
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, self.output_dim)
        self._logged_sizes: set[tuple[int, int]] = set()
        self._pe_cache: dict[tuple, tuple[tuple[int, int], torch.Tensor]] = {}

    @classmethod
    def from_arch(cls, arch: str) -> "AttentionPool2d":
        if arch not in ARCH_SPECS:
            raise ValueError(f"unknown CLIP arch {arch!r}; supported: {', '.join(ARCH_SPECS)}")
        return cls(**ARCH_SPECS[arch])

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding for an h x w grid: [h*w + 1, C] (class/mean slot first, then row-major)."""
        s = self.spacial_dim
        pe = self.positional_embedding
        if (h, w) == (s, s):
            return pe
        # The resize is a pure function of the (frozen, in VLFD) table: reuse it while the table is unchanged
        # (same storage, same in-place version). Not cached while it is being trained (autograd needs the op).
        cacheable = not (pe.requires_grad and torch.is_grad_enabled())
        key = (h, w, pe.device, pe.dtype)
        hit = self._pe_cache.get(key) if cacheable else None
        if hit is not None and hit[0] == (pe.data_ptr(), pe._version):
            return hit[1]
        if (h, w) not in self._logged_sizes:
            self._logged_sizes.add((h, w))
            logger.info("CLIP attention pool: resizing the %dx%d positional grid to %dx%d "
                        "(bicubic, antialias, as timm/open_clip)", s, s, h, w)
        grid = pe[1:].float().reshape(1, s, s, -1).permute(0, 3, 1, 2)  # [1, C, s, s]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pe.dtype)
        out = torch.cat([pe[:1], grid], dim=0)
        if cacheable:
            self._pe_cache[key] = ((pe.data_ptr(), pe._version), out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, output_dim]."""
        b, c, h, w = x.shape
        if c != self.embed_dim:
            raise ValueError(f"AttentionPool2d expects {self.embed_dim} channels, got {c} (input {tuple(x.shape)})")
        # tokens in channel-first layout [B, C, L = hw + 1] (mean token first), written in one pass: no transpose
        pe = self.pos_embed(h, w).to(x.dtype).T                                 # [C, L]
        flat = x.flatten(2)
        first = (flat.mean(dim=2) + pe[:, 0]).unsqueeze(2)
        if torch.is_grad_enabled() and (x.requires_grad or pe.requires_grad):
            tokens = torch.cat([first, flat + pe[:, 1:]], dim=2)                 # autograd: no out=
        else:
            tokens = torch.empty(b, c, h * w + 1, dtype=x.dtype, device=x.device)
            torch.add(flat, pe[:, 1:], out=tokens[:, :, 1:])
            tokens[:, :, :1] = first
        nh, hd = self.num_heads, c // self.num_heads
        # Only the first (mean) token's output is used, so it is the only query (attention rows are independent:
        # this equals CLIP's full self-attention followed by x[0]). With one query per head the key and value
        # projections fold into it exactly, so no token is projected through W_k or W_v:
        #   score_j = q_h . (W_k,h x_j + b_k,h) / sqrt(hd) = (W_k,h^T q_h) . x_j / sqrt(hd) + const_h
        #   (the constant cancels in the softmax), and  sum_j a_j (W_v,h x_j + b_v,h) = W_v,h (sum_j a_j x_j) + b_v,h
        # since the weights sum to 1. Cost per image: ~4 L C nh + 2 C^2 multiply-adds instead of 2 L C^2 + C^2
        # (L = hw + 1 tokens): C / (2 nh) = 8x (RN101-shaped on a 512-channel teacher) to 32x (CLIP RN101) less.
        q = self.q_proj(tokens[:, :, 0]).reshape(b, nh, hd)                         # [B, nh, hd]
        w_k = self.k_proj.weight.reshape(nh, hd, c)
        w_v = self.v_proj.weight.reshape(nh, hd, c)
        u = torch.einsum("bhd,hdc->bhc", q, w_k) * hd ** -0.5                      # [B, nh, C]
        attn = torch.bmm(u, tokens).softmax(dim=-1)                                # [B, nh, L]
        pooled = torch.bmm(attn, tokens.transpose(1, 2))                           # [B, nh, C]
        out = torch.einsum("bhc,hdc->bhd", pooled, w_v) + self.v_proj.bias.reshape(nh, hd)
        return self.c_proj(out.reshape(b, c))


# ----------------------------------------------------------------------------------------------- loading
def _read_state_dict(path: str, allow_torchscript: bool) -> Mapping[str, object]:
    """Read a checkpoint object with :func:`c2vkd.models.weights.read_weights_file` (safetensors, or a torch.save
    file with ``weights_only=True``); a TorchScript archive only if allowed. Errors are ValueErrors naming the
    file as truncated or corrupt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    corrupt = (f"could not read CLIP checkpoint {path!r}: the file looks truncated or corrupt "
               f"(size {os.path.getsize(path)} bytes); re-download or re-export it")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04" and not path.endswith(".safetensors"):  # torch.save / TorchScript zip archive
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{corrupt}: {exc}") from exc
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            # OpenAI's released RN50.pt / RN101.pt are TorchScript archives. torch.jit.load runs the
            # archive's serialized TorchScript program and unpickles its constants: only do it for a file
            # you trust, and explicitly.
            if not allow_torchscript:
                raise ValueError(
                    f"{path!r} is a TorchScript archive (e.g. OpenAI's original RN101.pt). Loading one executes "
                    "code stored in the file, so it is refused by default. Either pass allow_torchscript=True "
                    "(only for a file from a trusted source), or convert it once to a state dict:\n"
                    "  python -c \"import torch; m = torch.jit.load('RN101.pt', map_location='cpu'); "
                    "torch.save(m.state_dict(), 'RN101_state_dict.pt')\"")
            try:
                return dict(torch.jit.load(path, map_location="cpu").state_dict())
            except RuntimeError as exc:
                raise ValueError(f"{corrupt}: {exc}") from exc
    try:
        obj = read_weights_file(path)
    except WeightLoadError as exc:
        raise ValueError(f"{corrupt} (or not a weights-only torch checkpoint): {exc}") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"CLIP checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def extract_attnpool_state(sd: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], str]:
    """Find the attention pool in a state dict of any supported naming.

    Returns (tensors under our names, the naming found: 'openai/open_clip', 'timm' or 'bare').
    Keys outside the pool (the rest of the visual tower, the text tower) are ignored; keys *under* the
    pool's prefix that we do not know are kept, so the strict check reports them as unexpected."""
    try:  # wrapper containers and DDP / torch.compile prefixes, as every weight file c2vkd reads
        flat = unwrap_state_dict(sd)
    except WeightLoadError:  # no tensors at all: reported below as "no CLIP attention pool found"
        flat = {}
    found: list[tuple[str, dict[str, torch.Tensor]]] = []
    for prefix in _CLIP_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if sub:
            found.append((f"openai/open_clip ({prefix}*)", sub))
    timm_sub = {k[len(_TIMM_PREFIX):]: v for k, v in flat.items() if k.startswith(_TIMM_PREFIX)}
    if "pos_embed" in timm_sub:
        mapped: dict[str, torch.Tensor] = {}
        for k, v in timm_sub.items():
            if k in TIMM_TO_CLIP:
                mapped[TIMM_TO_CLIP[k]] = v
            elif k in TIMM_FUSED_QKV:  # [3C, ...] rows are q, k, v in that order (timm's reshape)
                kind = k.split(".")[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    mapped[f"{name}.{kind}"] = part
            else:
                mapped["head." + k] = v  # unknown: reported as unexpected
        found.append(("timm (head.*)", mapped))
    # bare pool dict: a lone 'positional_embedding' is also the text tower's, so require a projection too
    if not found and "positional_embedding" in flat and any(k in flat for k in POOL_KEYS[1:]):
        found.append(("bare", dict(flat)))
    if not found:
        sample = ", ".join(sorted(flat)[:8])
        raise ValueError("no CLIP attention pool found in the checkpoint: expected keys 'visual.attnpool.*' "
                         "(OpenAI/open_clip), 'head.pos_embed' + 'head.q.*' (timm resnet*_clip) or bare "
                         f"'positional_embedding', 'q_proj.weight', ... ; first keys present: {sample}")
    if len(found) > 1:
        raise ValueError(f"ambiguous checkpoint: it holds an attention pool in several namings "
                         f"({', '.join(n for n, _ in found)}); pass a state dict with one")
    naming, sub = found[0]
    return sub, naming


def _infer_arch(sd: Mapping[str, torch.Tensor]) -> str | None:
    pe, cw = sd.get("positional_embedding"), sd.get("c_proj.weight")
    if pe is None or cw is None or pe.ndim != 2 or cw.ndim != 2:
        return None
    s = math.isqrt(max(pe.shape[0] - 1, 0))
    for arch, spec in ARCH_SPECS.items():
        if (s * s + 1 == pe.shape[0] and s == spec["spacial_dim"] and pe.shape[1] == spec["embed_dim"]
                and tuple(cw.shape) == (spec["output_dim"], spec["embed_dim"])):
            return arch
    return None


def load_clip_attnpool(path: str, arch: str | None = None, *, allow_torchscript: bool = False) -> AttentionPool2d:
    """Build an :class:`AttentionPool2d` from a CLIP checkpoint, strictly.

    path: ``.safetensors`` or a ``torch.save`` file (read with ``weights_only=True``) holding
      (a) an OpenAI CLIP state dict (``visual.attnpool.*``), (b) an open_clip state dict (same names,
      optionally ``module.``-prefixed or wrapped in ``{'state_dict': ...}``), (c) a timm ``resnet50_clip`` /
      ``resnet101_clip`` state dict (``head.pos_embed``, ``head.q/k/v/proj.*``), or (d) a bare pool state dict.
      OpenAI's original ``.pt`` releases are TorchScript archives: refused unless ``allow_torchscript=True``.
    arch: 'RN101' or 'RN50'; None infers it from the tensor shapes (c_proj output 512 -> RN101, 1024 -> RN50).
    Raises ValueError listing every missing key, unexpected key and shape mismatch (no partial loads).
    The weights are cast to float32 (OpenAI stores fp16); the module is returned in eval mode."""
    sd, naming = extract_attnpool_state(_read_state_dict(str(path), allow_torchscript))
    inferred = _infer_arch(sd)
    if arch is None:
        if inferred is None:
            missing = [k for k in POOL_KEYS if k not in sd]
            if missing:
                raise ValueError(f"CLIP attention pool checkpoint {path!r} ({naming} naming) is incomplete: "
                                 f"missing keys {missing}")
            shapes = {k: tuple(v.shape) for k, v in sd.items() if k in ("positional_embedding", "c_proj.weight")}
            raise ValueError(f"cannot infer the CLIP arch of {path!r} from its pool shapes {shapes}; supported: "
                             + "; ".join(f"{a}: {s}" for a, s in ARCH_SPECS.items()))
        arch = inferred
    pool = AttentionPool2d.from_arch(arch)
    expected = pool.state_dict()
    problems: list[str] = []
    problems += [f"missing key {k!r}" for k in expected if k not in sd]
    problems += [f"unexpected key {k!r}" for k in sd if k not in expected]
    problems += [f"shape mismatch for {k!r}: checkpoint {tuple(sd[k].shape)}, {arch} pool {tuple(v.shape)}"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if problems:
        raise ValueError(f"CLIP attention pool checkpoint {path!r} ({naming} naming) does not match the {arch} pool:\n  "
                         + "\n  ".join(problems))
    pool.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    logger.info("loaded CLIP %s attention pool from %s (%s naming)", arch, path, naming)
    return pool.eval()
