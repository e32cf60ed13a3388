"""``c2vkd export RUN_DIR``: the trained student of a run as deployable files, each one verified.

What is read: ``RUN_DIR/config.yaml`` (the resolved config the trainer wrote) and a c2vkd training checkpoint
(``--checkpoint``, else the latest ``checkpoints/iter_*.pt`` whose checksum verifies), always through
``safe_load`` (``weights_only=True``). Only ``checkpoint["student"]`` is used: the teacher is never in a
checkpoint, and the loss modules' alignment heads (``loss_heads``), the optimizer and the RNG state are left
behind. A ``c2vkd-student-v1`` safetensors file is accepted as ``--checkpoint`` too.

What is written to ``out_dir`` (default ``RUN_DIR/export``):

=============  =============================  =====================================================
format         file                           verified by
=============  =============================  =====================================================
safetensors    ``student.safetensors``         rebuilt with ``c2vkd.engine.weights.build_for_eval``
torchscript    ``student.torchscript.pt``      ``torch.jit.load``
onnx           ``student.onnx``                ``onnx.checker``, then onnxruntime if installed, else
                                               ``onnx.reference.ReferenceEvaluator`` (pure numpy)
=============  =============================  =====================================================

plus ``export.json`` (model, classes, input shape, normalisation, sha256 and verification of every file).
Each file is reloaded after writing and its logits on a random input are compared with the student built
from the checkpoint (max abs difference <= ``atol``, default 1e-4); a larger difference raises
:class:`ExportError` and the file is removed.

TorchScript and ONNX are *traced* (``torch.jit.trace``; the legacy TorchScript-based ONNX exporter,
``dynamo=False``: the torch.export-based one needs ``onnxscript``, which c2vkd does not require) at one fixed
input shape ``[1, 3, H, W]`` (``input_hw``). Shape-dependent Python in the models (padding amounts,
interpolation sizes, positional-embedding resampling) is frozen at that size, so feed the exported graphs
exactly that shape; the safetensors export has no such restriction. Inputs are normalised images
(``mean``/``std`` in export.json), outputs logits ``[1, K, H, W]``. (torch marks ``torch.jit`` deprecated
in favour of ``torch.export``; its warnings are silenced here because every traced file is verified.)
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from c2vkd.utils.io import CheckpointError, sha256_file, verify

log = logging.getLogger("c2vkd")

FORMATS = ("safetensors", "torchscript", "onnx")
FILE_NAMES = {"safetensors": "student.safetensors", "torchscript": "student.torchscript.pt", "onnx": "student.onnx"}


class ExportError(CheckpointError):
    """A run cannot be exported, or an exported file does not reproduce the student's logits."""


def find_checkpoint(run_dir: str | Path) -> Path:
    """Latest ``checkpoints/iter_*.pt`` of a run whose checksum verifies (corrupt ones are skipped, logged)."""
    ckdir = Path(run_dir) / "checkpoints"
    candidates = sorted(ckdir.glob("iter_*.pt"), reverse=True)
    if not candidates:
        raise ExportError(f"no training checkpoint in {ckdir} (expected checkpoints/iter_*.pt); pass --checkpoint")
    for path in candidates:
        if verify(path):
            return path
        log.warning("checkpoint %s fails its checksum (truncated or corrupt); trying the previous one", path)
    raise ExportError(f"every checkpoint in {ckdir} fails its checksum: {[p.name for p in candidates]}")


def load_run_student(run_dir: str | Path, checkpoint: str | Path | None = None
                     ) -> tuple[nn.Module, dict[str, Any], dict[str, Any], Path]:
    """(student in eval mode on CPU, meta, resolved config, checkpoint path) for a run directory.

    meta: ``model``, ``num_classes``, ``kwargs``, ``classes`` as recorded in the checkpoint."""
    from c2vkd.config import load_config
    from c2vkd.engine.weights import read_c2vkd_weights
    from c2vkd.models import build_model

    run = Path(run_dir)
    if not run.exists():
        raise ExportError(f"run directory not found: {run}")
    if not run.is_dir():
        raise ExportError(f"{run} is not a directory; give the run directory (the one holding config.yaml "
                          "and checkpoints/), and a checkpoint file with --checkpoint")
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run} is not a c2vkd run directory: config.yaml is missing")
    cfg = load_config(run / "config.yaml")
    path = Path(checkpoint) if checkpoint else find_checkpoint(run)
    got = read_c2vkd_weights(path)
    if got is None:
        raise ExportError(f"{path} is not a c2vkd training checkpoint or student export")
    state, meta = got
    if meta["model"] != cfg["student"]["name"]:
        raise ExportError(f"{path} holds a {meta['model']}, but {run / 'config.yaml'} trains "
                          f"{cfg['student']['name']}: wrong checkpoint for this run?")
    model = build_model(meta["model"], int(meta["num_classes"]), **meta.get("kwargs", {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: student state dict does not fit {meta['model']}: missing {list(missing)[:10]}, "
                          f"unexpected {list(unexpected)[:10]}")
    return model.eval(), meta, cfg, path


def _max_diff(got: Any, ref: torch.Tensor) -> float:
    got_t = torch.as_tensor(got)
    if tuple(got_t.shape) != tuple(ref.shape):
        return float("inf")
    return float((got_t.float() - ref.float()).abs().max())


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _export_model(model: nn.Module, input_hw: tuple[int, int]) -> nn.Module:
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


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        _atomic(path, lambda tmp: torch.jit.save(traced, str(tmp)))


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with _quiet_jit(), torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(x)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any], opset: int) -> None:
    import onnx

    def write(tmp: Path) -> None:
        with _quiet_jit(), torch.no_grad():
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["image"],
                              output_names=["logits"], opset_version=opset, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {k: json.dumps(v) if not isinstance(v, str) else v
                                            for k, v in meta.items()})
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))

    _atomic(path, write)


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[Any, str]:
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


def export_run(run_dir: str | Path, *, checkpoint: str | Path | None = None,
               formats: Sequence[str] = ("safetensors",), input_hw: Sequence[int] = (512, 512),
               out_dir: str | Path | None = None, atol: float = 1e-4, opset: int = 17,
               seed: int = 0) -> dict[str, Any]:
    """Export a run's student (see the module doc). Returns the manifest also written to ``export.json``.

    formats: any of ``safetensors``, ``torchscript``, ``onnx``. input_hw: (H, W) of the traced exports and of
    the verification input. Raises ExportError for a missing/invalid run or checkpoint, an unknown format or
    an export whose logits differ from the student's by more than ``atol``.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    h, w = (int(v) for v in input_hw)
    if h < 1 or w < 1:
        raise ExportError(f"input size must be positive, got {h}x{w}")
    model, meta, cfg, ckpt = load_run_student(run_dir, checkpoint)
    out = Path(out_dir) if out_dir else Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    trace_x = torch.randn(1, 3, h, w, generator=gen)
    check_x = torch.randn(1, 3, h, w, generator=gen)  # a second input: catches traces that froze data
    with torch.no_grad():
        ref = model(check_x)
    name, k = meta["model"], int(meta["num_classes"])
    classes = list(meta.get("classes", []))
    manifest: dict[str, Any] = {
        "format": "c2vkd-export-v1", "run_dir": str(run_dir), "checkpoint": str(ckpt), "model": name,
        "num_classes": k, "kwargs": meta.get("kwargs", {}), "classes": classes,
        "input": {"name": "image", "shape": [1, 3, h, w], "mean": cfg["data"]["mean"], "std": cfg["data"]["std"],
                  "note": "normalised RGB in [0,1] -> (x - mean) / std"},
        "output": {"name": "logits", "shape": [1, k, h, w]},
        "atol": atol, "files": {},
    }
    traced_model: nn.Module | None = None
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        if fmt == "safetensors":
            from c2vkd.engine.weights import build_for_eval, save_student

            save_student(path, model, name, k, dict(meta.get("kwargs", {})), classes)
            rebuilt, _ = build_for_eval(path, None, k, torch.device("cpu"))
            with torch.no_grad():
                got: Any = rebuilt(check_x)
            how = "c2vkd.engine.weights.build_for_eval"
        else:
            if traced_model is None:
                traced_model = _export_model(model, (h, w))
            try:
                if fmt == "torchscript":
                    _write_torchscript(traced_model, trace_x, path)
                    got, how = _run_torchscript(path, check_x), "torch.jit.load"
                else:
                    _write_onnx(traced_model, trace_x, path, {"c2vkd_model": name, "num_classes": k,
                                                              "classes": classes, "input_hw": [h, w]}, opset)
                    got, how = _run_onnx(path, check_x)
            except ExportError:
                raise
            except Exception as e:  # exporter / checker / runtime failures name the model and the format
                path.unlink(missing_ok=True)
                raise ExportError(f"{fmt} export of {name} at {h}x{w} failed: {type(e).__name__}: {e}") from e
        diff = _max_diff(got, ref)
        if not diff <= atol:
            path.unlink(missing_ok=True)
            raise ExportError(f"{fmt} export of {name} does not reproduce the student: max |logit difference| "
                              f"{diff:.3g} > {atol:g} on a random {h}x{w} input (checked with {how}); "
                              f"file removed")
        manifest["files"][fmt] = {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                                  "max_abs_diff": diff, "verified_with": how}
        log.info("exported %s -> %s (max |diff| %.2e, %s)", fmt, path, diff, how)
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    manifest["out_dir"] = str(out)
    return manifest


def format_manifest(manifest: dict[str, Any]) -> str:
    """Plain-text summary of :func:`export_run`'s result (one row per file)."""
    rows = [("format", "file", "max |diff|", "verified with")]
    for fmt, f in manifest["files"].items():
        rows.append((fmt, f["path"], f"{f['max_abs_diff']:.2e}", f["verified_with"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{manifest['model']} ({manifest['num_classes']} classes) from {manifest['checkpoint']}",
             f"input {manifest['input']['shape']} -> {manifest.get('out_dir', '')}"]
    lines.append("  ".join(c.ljust(wd) for c, wd in zip(rows[0], widths)).rstrip())
    lines.append("  ".join("-" * wd for wd in widths))
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows[1:]]
    return "\n".join(lines)
