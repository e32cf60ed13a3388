"""Traced exports (``torchscript``, ``onnx``): a fixed-size copy of the student, the writers (atomic, ONNX
checked with ``onnx.checker``) and the runners that reload each file for verification."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("c2vkd")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_copy(model: nn.Module, input_hw: tuple[int, int]) -> nn.Module:
    """The copy that gets traced: eval mode, specialised for the fixed size when the model asks for it."""
    m = copy.deepcopy(model).eval()
    special = getattr(m, "specialize_for_export", None)
    if callable(special):
        special(input_hw)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch >= 2.10 marks torch.jit as deprecated (FutureWarning) and the tracer warns about every
    shape-dependent Python value; both are expected here (fixed-size traces, verified afterwards)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        yield


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        _atomic(path, lambda tmp: torch.jit.save(traced, str(tmp)))


def run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with _quiet_jit(), torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(x)


#: ONNX dynamic axes of ``--dynamic``: batch and both spatial sides, on the input and the logits
DYNAMIC_AXES = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any], opset: int,
               dynamic: bool = False) -> None:
    import onnx

    def write(tmp: Path) -> None:
        with _quiet_jit(), torch.no_grad():
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["image"],
                              output_names=["logits"], opset_version=opset, do_constant_folding=True,
                              dynamic_axes=DYNAMIC_AXES if dynamic else None)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {k: json.dumps(v) if not isinstance(v, str) else v
                                            for k, v in meta.items()})
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))

    _atomic(path, write)


def run_onnx(path: Path, x: torch.Tensor) -> tuple[Any, str]:
    try:
        import onnxruntime as ort  # optional
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        log.info("onnxruntime is not installed: checking %s with onnx.reference.ReferenceEvaluator "
                 "(pure numpy, slow for large models/inputs)", path.name)
        out = ReferenceEvaluator(onnx.load(str(path))).run(None, {"image": x.numpy()})[0]
        return out, "onnx.reference.ReferenceEvaluator"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x.numpy()})[0], f"onnxruntime {ort.__version__}"
