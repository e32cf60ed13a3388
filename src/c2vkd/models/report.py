"""``c2vkd info MODEL``: parameters, FLOPs and latency of a model at one input size.

* **Parameters**: total and trainable (``numel`` of ``model.parameters()``), split into encoder
  (``backbone.*`` / ``encoder.*`` / ``segformer.*``) and decoder + head (everything else) when the model has
  one of those encoder prefixes.
* **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode`` for one forward at the input size.
  Convention: **FLOPs = 2 x MACs** (a multiply-accumulate is two operations), the convention of PyTorch's
  counter and of most recent segmentation papers; some papers (and fvcore / mmcv's ``get_model_complexity_info``)
  report MACs and call them FLOPs: divide ours by 2 to compare with those. Counted: convolutions, matrix
  products (``mm/addmm/bmm/baddbmm``, i.e. Linear layers and attention written with matmuls) and fused
  scaled-dot-product attention (``4 * B * heads * Lq * Lk * d``). Not counted: elementwise ops,
  normalisation, softmax, pooling, interpolation, bias additions (a few percent for these models).
  The CPU fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is missing from
  PyTorch's table; we add the same formula PyTorch uses for its GPU kernels.
* **Latency**: ``model.eval()`` under ``torch.no_grad()``, ``warmup`` untimed passes, then ``runs`` timed
  forward passes of a random ``[batch, 3, H, W]`` input (``torch.cuda.synchronize`` around each pass on
  GPU); median / min / max in milliseconds. CPU numbers depend on ``torch.get_num_threads()`` (reported)
  and, on a shared machine, on ``OMP_WAIT_POLICY`` (see :func:`model_info`).
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: parameter-name prefixes that mark a model's encoder (ResNet teachers, timm students, SegFormer)
ENCODER_PREFIXES = ("backbone.", "encoder.", "segformer.")


@dataclass
class ModelInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int, int]
    params: int
    trainable: int
    encoder_params: int | None
    decoder_params: int | None
    flops: int
    encoder_flops: int | None
    device: str
    threads: int
    latency_ms: list[float] = field(default_factory=list)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def latency_summary(self) -> dict[str, float] | None:
        if not self.latency_ms:
            return None
        return {"median": statistics.median(self.latency_ms), "min": min(self.latency_ms),
                "max": max(self.latency_ms)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "params": self.params, "trainable": self.trainable, "encoder_params": self.encoder_params,
                "decoder_params": self.decoder_params, "flops": self.flops, "gflops": self.gflops,
                "encoder_flops": self.encoder_flops, "flops_convention": "FLOPs = 2 x MACs",
                "device": self.device, "threads": self.threads, "latency_ms": self.latency_summary(),
                "runs": len(self.latency_ms)}


def count_params(model: nn.Module) -> dict[str, int | None]:
    """``total``, ``trainable``, ``encoder``, ``decoder`` (the last two None when no encoder prefix matches)."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    enc = sum(p.numel() for n, p in named if n.startswith(ENCODER_PREFIXES))
    has_split = any(n.startswith(ENCODER_PREFIXES) for n, _ in named)
    return {"total": total, "trainable": trainable, "encoder": enc if has_split else None,
            "decoder": total - enc if has_split else None}


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                out_shape: Any = None, **kwargs: Any) -> int:
    """Q K^T and (softmax) V for [B, heads, L, d] tensors: 2 * B*h*Lq*Lk*d + 2 * B*h*Lq*Lk*dv."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _custom_flop_formulas() -> dict[Any, Any]:
    aten = torch.ops.aten
    extra = {}
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _sdpa_flops
    return extra


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per top-level child module) of ``model(x)`` in eval mode under no_grad.

    FLOPs = 2 x MACs (see the module doc for what is counted)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas()) as fc:
            model(x)
    finally:
        model.train(was_training)
    # module paths below the root that recorded FLOPs; a parent's count includes its children's, and a child
    # may be called without its parent (a model iterating encoder.stages itself), so sum the outermost ones
    root = type(model).__name__ + "."
    counts = {k[len(root):]: int(sum(ops.values())) for k, ops in fc.get_flop_counts().items() if k.startswith(root)}
    per_child: dict[str, int] = {}
    for path, n in counts.items():
        if not any(path.startswith(other + ".") for other in counts):
            top = path.split(".")[0]
            per_child[top] = per_child.get(top, 0) + n
    return int(fc.get_total_flops()), per_child


def measure_latency(model: nn.Module, x: torch.Tensor, *, runs: int = 10, warmup: int = 2) -> list[float]:
    """Milliseconds of ``runs`` forward passes after ``warmup`` untimed ones (eval, no_grad, synchronised)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    cuda = x.device.type == "cuda"
    times: list[float] = []
    model.eval()
    with torch.no_grad():
        for i in range(max(0, warmup) + runs):
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_info(model: str | nn.Module, *, num_classes: int = 19, input_hw: Sequence[int] = (512, 512),
               runs: int = 10, warmup: int = 2, batch: int = 1, device: str | torch.device = "cpu",
               name: str | None = None, threads: int | None = None) -> ModelInfo:
    """Parameters, FLOPs (one forward of batch ``batch``) and latency of a registered model name or a module.

    ``runs=0`` skips the latency measurement. ``threads``: ``torch.set_num_threads`` for the measurement
    (restored afterwards). On a shared CPU, start Python with ``OMP_WAIT_POLICY=PASSIVE``: OpenMP's default
    active spin-wait can make multi-threaded forwards 10-100x slower while another process is busy."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return model_info(model, num_classes=num_classes, input_hw=input_hw, runs=runs, warmup=warmup,
                              batch=batch, device=device, name=name)
        finally:
            torch.set_num_threads(before)
    if isinstance(model, str):
        from c2vkd.models import build_model

        name = name or model
        model = build_model(model, num_classes)
    name = name or getattr(model, "arch", type(model).__name__)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    model = model.to(dev).eval()
    h, w = (int(v) for v in input_hw)
    x = torch.randn(batch, 3, h, w, device=dev)
    params = count_params(model)
    flops, per_child = count_flops(model, x)
    enc_flops = None
    if params["encoder"] is not None:
        enc_flops = sum(v for k, v in per_child.items() if f"{k}.".startswith(ENCODER_PREFIXES))
    latency = measure_latency(model, x, runs=runs, warmup=warmup) if runs > 0 else []
    return ModelInfo(name=name, num_classes=int(getattr(model, "num_classes", num_classes)),
                     input_shape=(batch, 3, h, w), params=int(params["total"] or 0),
                     trainable=int(params["trainable"] or 0), encoder_params=params["encoder"],
                     decoder_params=params["decoder"], flops=flops, encoder_flops=enc_flops,
                     device=_device_name(dev), threads=torch.get_num_threads(), latency_ms=latency)


def _m(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} M"


def format_info(info: ModelInfo) -> str:
    """Two-column plain-text table of a :class:`ModelInfo`."""
    b, _, h, w = info.input_shape
    rows = [("model", info.name), ("input", f"{b}x3x{h}x{w}"), ("classes", str(info.num_classes)),
            ("params (total)", f"{_m(info.params)} ({info.params:,})"),
            ("params (trainable)", _m(info.trainable))]
    if info.encoder_params is not None:
        rows += [("params (encoder)", _m(info.encoder_params)), ("params (decoder+head)", _m(info.decoder_params))]
    rows.append(("GFLOPs (FLOPs = 2 x MACs)", f"{info.gflops:.2f}"))
    if info.encoder_flops is not None:
        rows.append(("GFLOPs (encoder)", f"{info.encoder_flops / 1e9:.2f}"))
    lat = info.latency_summary()
    if lat:
        rows.append((f"latency ms, {len(info.latency_ms)} runs", f"median {lat['median']:.1f}  min {lat['min']:.1f}  "
                                                                 f"max {lat['max']:.1f}"))
    rows.append(("device", info.device))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
