"""``c2vkd export RUN_DIR``: read the run's student, write each requested format, verify it, write
``export.json`` (the formats and what they are checked with: the package's docstring)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from c2vkd.runners.export import hf, traced
from c2vkd.runners.export.verify import ExportError, max_diff
from c2vkd.utils.io import sha256_file
from c2vkd.utils.sizes import as_hw

log = logging.getLogger("c2vkd")

FORMATS = ("safetensors", "torchscript", "onnx", "hf")
FILE_NAMES = {"safetensors": "student.safetensors", "torchscript": "student.torchscript.pt", "onnx": "student.onnx",
              "hf": "hf"}


def find_checkpoint(run_dir: str | Path) -> Path:
    """Latest ``checkpoints/iter_*.pt`` of a run whose checksum verifies (corrupt ones are skipped, logged);
    a finished run whose checkpoints were removed (``c2vkd demo`` keeps only the final weights) falls back to
    its own final ``student.safetensors``."""
    ckdir = Path(run_dir) / "checkpoints"
    candidates = sorted(ckdir.glob("iter_*.pt"), reverse=True)
    final = Path(run_dir) / "student.safetensors"
    if not candidates and final.is_file():
        log.info("no checkpoints/iter_*.pt in %s: exporting the run's final %s", run_dir, final.name)
        return final
    if not candidates:
        raise ExportError(f"no training checkpoint in {ckdir} (expected checkpoints/iter_*.pt); pass --checkpoint")
    from c2vkd.engine.checkpoints import latest_valid
    from c2vkd.engine.run_dir import read_run_id

    run_id = read_run_id(Path(run_dir))  # only this run's checkpoints (engine/run_dir.py)
    path = latest_valid(ckdir, run_id=run_id)
    if path is not None:
        return path
    other = f" or belongs to another run than this directory's {run_id}" if run_id else ""
    raise ExportError(f"every checkpoint in {ckdir} fails its checksum{other}: {[p.name for p in candidates]}")


def load_run_student(run_dir: str | Path, checkpoint: str | Path | None = None
                     ) -> tuple[nn.Module, dict[str, Any], dict[str, Any], Path]:
    """(student in eval mode on CPU, meta, resolved config, checkpoint path) for a run directory.

    meta: ``model``, ``num_classes``, ``kwargs``, ``classes`` as recorded in the checkpoint."""
    from c2vkd.config import load_config
    from c2vkd.engine.weights import fit_state_dict, read_c2vkd_weights
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
    fit_state_dict(model, state, what=f"{path}: student state dict", arch=meta["model"], error=ExportError)
    return model.eval(), meta, cfg, path


def run_eval_size(cfg: dict[str, Any]) -> tuple[int, int]:
    """(H, W) a run evaluates at: ``data.eval_transform.size`` when set (resize / center_crop), else the size of
    the first image of the evaluation split (``eval.final_split``, else ``eval.split``, else train), read from
    its header. Raises ExportError when neither is available (then pass an explicit size)."""
    from PIL import Image

    from c2vkd.data.base import DatasetError
    from c2vkd.data.build import index_split, resolve_data_cfg, resolve_split

    d = resolve_data_cfg(cfg["data"])
    size = d["eval_transform"]["size"]
    if size is not None:
        return as_hw(size)
    e = cfg["eval"]
    tried: list[str] = []
    for split in dict.fromkeys(s for s in (e.get("final_split"), e.get("split"), "train") if s):
        try:
            index = index_split(d["format"], d["root"], resolve_split(d, split), d["ignore_index"])
        except (DatasetError, OSError, KeyError, TypeError) as err:
            tried.append(f"{split}: {err}")
            continue
        if index.samples:
            with Image.open(index.samples[0][0]) as im:
                w, h = im.size
            return h, w
        tried.append(f"{split}: empty")
    raise ExportError(f"cannot tell the run's evaluation size: data.eval_transform.size is null and no image of "
                      f"the evaluation split is readable under data.root={d['root']!r} ({'; '.join(tried)}); "
                      "pass --input HxW")


def _other_size(h: int, w: int) -> tuple[int, int]:
    """A second verification size for dynamic graphs: different in both sides, not a multiple of the first."""
    return h + 8 + (h % 2 == 0), w + 24 + (w % 2 == 0)


def export_run(run_dir: str | Path, *, checkpoint: str | Path | None = None,
               formats: Sequence[str] = ("safetensors",), input_hw: Sequence[int] | None = None,
               out_dir: str | Path | None = None, atol: float = 1e-4, opset: int = 17,
               seed: int = 0, dynamic: bool = False, command: str | None = None) -> dict[str, Any]:
    """Export a run's student (see the module doc). Returns the manifest also written to ``export.json``.

    formats: any of ``safetensors``, ``torchscript``, ``onnx``, ``hf``. input_hw: (H, W) of the traced exports
    and of the verification input; None = the run's evaluation size (:func:`run_eval_size`). dynamic: ONNX
    with dynamic batch / height / width, verified at two sizes. command: the command line, quoted in the hf
    model card. Raises ExportError for a missing/invalid run or checkpoint, an unknown format or an export
    whose logits differ from the student's by more than ``atol``.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    if dynamic and "onnx" not in formats:
        raise ExportError(f"--dynamic applies to the onnx format; formats are {formats}")
    model, meta, cfg, ckpt = load_run_student(run_dir, checkpoint)
    eval_hw: tuple[int, int] | None = None
    if input_hw is None or "hf" in formats:
        try:
            eval_hw = run_eval_size(cfg)
        except ExportError:
            if input_hw is None:
                raise
    h, w = (int(v) for v in (input_hw if input_hw is not None else eval_hw))  # type: ignore[union-attr]
    if h < 1 or w < 1:
        raise ExportError(f"input size must be positive, got {h}x{w}")
    eval_hw = eval_hw or (h, w)
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
        "eval_size": list(eval_hw), "atol": atol, "files": {},
    }
    if dynamic:
        manifest["input"]["shape"] = ["batch", 3, "height", "width"]
        manifest["output"]["shape"] = ["batch", k, "height", "width"]
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
        elif fmt == "hf":
            got, how = None, ""
            try:
                diff_hf, how = hf.write_hf(model, name, meta, cfg, path, run_dir=Path(run_dir), ckpt=ckpt,
                                           eval_hw=eval_hw, check_x=check_x, command=command)
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"hf export of {name} failed: {type(e).__name__}: {e}") from e
            if not diff_hf <= atol:
                shutil.rmtree(path, ignore_errors=True)
                raise ExportError(f"hf export of {name} does not reproduce the student: max |difference| "
                                  f"{diff_hf:.3g} > {atol:g} ({how}); folder removed")
            digest, size = hf.folder_digest(path)
            manifest["files"][fmt] = {"path": path.name, "sha256": digest, "bytes": size, "max_abs_diff": diff_hf,
                                      "verified_with": how,
                                      "files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())}
            log.info("exported hf -> %s (max |diff| %.2e; %s)", path, diff_hf, how)
            continue
        else:
            if traced_model is None:
                traced_model = traced.export_copy(model, (h, w))
            try:
                if fmt == "torchscript":
                    traced.write_torchscript(traced_model, trace_x, path)
                    got, how = traced.run_torchscript(path, check_x), "torch.jit.load"
                else:
                    onnx_model = model if dynamic else traced_model  # no fixed-size specialisation when dynamic
                    onnx_meta = {"c2vkd_model": name, "num_classes": k, "classes": classes, "input_hw": [h, w],
                                 "dynamic": dynamic}
                    traced.write_onnx(onnx_model, trace_x, path, onnx_meta, opset, dynamic=dynamic)
                    got, how = traced.run_onnx(path, check_x)
                    if dynamic:  # a second size and batch 2: shapes must not have been frozen by the trace
                        h2, w2 = _other_size(h, w)
                        x2 = torch.randn(2, 3, h2, w2, generator=gen)
                        with torch.no_grad():
                            ref2 = model(x2)
                        got2, _ = traced.run_onnx(path, x2)
                        diff2 = max_diff(got2, ref2)
                        if not diff2 <= atol:
                            raise ExportError(f"dynamic onnx export of {name} does not reproduce the student at "
                                              f"a second input size 2x3x{h2}x{w2}: max |logit difference| "
                                              f"{diff2:.3g} > {atol:g} (traced at {h}x{w}; shape-dependent code "
                                              f"was frozen by the trace?); export without --dynamic")
                        manifest["dynamic_check"] = {"sizes": [[1, 3, h, w], [2, 3, h2, w2]],
                                                     "max_abs_diff_second_size": diff2}
                        how += f"; dynamic axes checked at 1x3x{h}x{w} and 2x3x{h2}x{w2} ({diff2:.1e})"
            except ExportError:
                path.unlink(missing_ok=True)
                raise
            except Exception as e:  # exporter / checker / runtime failures name the model and the format
                path.unlink(missing_ok=True)
                hint = (" (--dynamic exports the model without its fixed-size specialisation; export without "
                        "--dynamic)" if dynamic and fmt == "onnx" else "")
                raise ExportError(f"{fmt} export of {name} at {h}x{w} failed: {type(e).__name__}: {e}{hint}") from e
        diff = max_diff(got, ref)
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
    if "dynamic_check" in manifest:
        lines.append("onnx dynamic axes verified at " + " and ".join(
            "x".join(map(str, s)) for s in manifest["dynamic_check"]["sizes"]))
    lines.append("  ".join(c.ljust(wd) for c, wd in zip(rows[0], widths)).rstrip())
    lines.append("  ".join("-" * wd for wd in widths))
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows[1:]]
    return "\n".join(lines)
