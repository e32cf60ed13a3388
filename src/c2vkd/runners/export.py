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
hf             ``hf/`` (a folder)              SegFormer students: ``transformers``' own
                                               ``SegformerForSemanticSegmentation.from_pretrained`` and
                                               ``SegformerImageProcessor.from_pretrained`` (offline),
                                               and c2vkd's HF loader; other students: c2vkd's loader and,
                                               for a timm encoder, ``timm.create_model`` + strict load
=============  =============================  =====================================================

plus ``export.json`` (model, classes, input shape, normalisation, sha256 and verification of every file).
The default input size is the run's *evaluation* size (:func:`run_eval_size`): ``data.eval_transform.size``
when set, else the size of the first image of the evaluation split.

HF folder (``--format hf``), SegFormer students: ``config.json`` + ``model.safetensors`` written by
transformers' ``save_pretrained`` (our SegFormer's parameter names *are* transformers' own, so the student's
state dict loads into ``SegformerForSemanticSegmentation`` strictly, with no key mapping; transformers writes
its on-disk names itself and c2vkd reads them back through the one HF mapping in
``c2vkd.models.segformer`` - the export checks that round trip too), ``preprocessor_config.json``
(``SegformerImageProcessor``: resize to the evaluation size, the run's mean/std, no label reduction),
``id2label``/``label2id`` from the dataset's classes, and a model card ``README.md`` (teacher, method, data,
schedule, test mIoU and per-class IoU from ``eval_test.json`` when present, the commands). transformers'
SegFormer returns logits at 1/4 of the input: the verification compares them with the student's decode-head
output (the same 1/4 tensor, before c2vkd's upsampling), and their bilinear upsampling
(``align_corners=False``, as c2vkd does) with the student's full-size logits. Other students: the same card,
``model.safetensors`` (c2vkd student format: ``c2vkd eval/predict --checkpoint``, ``build_model(NAME, K,
pretrained=FOLDER)``), ``config.json``, and for timm encoders ``encoder/model.safetensors`` +
``encoder/config.json`` that ``timm.create_model(ARCH, num_classes=0)`` loads strictly.

``--dynamic`` (ONNX): batch, height and width are dynamic axes. The graph is traced once and then checked at
two different input sizes (and batch 2 at the second), against the student run in torch.
Each file is reloaded after writing and its logits on a random input are compared with the student built
from the checkpoint (max abs difference <= ``atol``, default 1e-4); a larger difference raises
:class:`ExportError` and the file is removed.

TorchScript and ONNX are *traced* (``torch.jit.trace``; the legacy TorchScript-based ONNX exporter,
``dynamo=False``: the torch.export-based one needs ``onnxscript``, which c2vkd does not require) at one fixed
input shape ``[1, 3, H, W]`` (``input_hw``). Shape-dependent Python in the models (padding amounts,
interpolation sizes, positional-embedding resampling) is frozen at that size, so feed the exported graphs
exactly that shape (unless the ONNX graph was exported with ``dynamic=True`` and verified at two sizes);
the safetensors export has no such restriction. Inputs are normalised images
(``mean``/``std`` in export.json), outputs logits ``[1, K, H, W]``. (torch marks ``torch.jit`` deprecated
in favour of ``torch.export``; its warnings are silenced here because every traced file is verified.)
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from c2vkd.utils.io import CheckpointError, sha256_file
from c2vkd.utils.sizes import as_hw

log = logging.getLogger("c2vkd")

FORMATS = ("safetensors", "torchscript", "onnx", "hf")
FILE_NAMES = {"safetensors": "student.safetensors", "torchscript": "student.torchscript.pt", "onnx": "student.onnx",
              "hf": "hf"}


class ExportError(CheckpointError):
    """A run cannot be exported, or an exported file does not reproduce the student's logits."""


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


#: ONNX dynamic axes of ``--dynamic``: batch and both spatial sides, on the input and the logits
DYNAMIC_AXES = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any], opset: int,
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


# ------------------------------------------------------------------------------------------ HF / card
def preset_for_losses(losses: list[dict[str, Any]]) -> str | None:
    """Name of the packaged method preset whose ``losses`` equal these (after config resolution), else None."""
    from c2vkd.config import PACKAGE_CONFIGS, ConfigError, load_config

    for path in sorted((PACKAGE_CONFIGS / "methods").glob("*.yaml")):
        try:
            if load_config(None, layers=[path])["losses"] == losses:
                return path.stem
        except ConfigError:  # a preset needing something this run lacks cannot be the one it used
            continue
    return None


def _fmt_pct(v: Any) -> str:
    return "n/a" if v is None else f"{100.0 * float(v):.2f}"


def model_card(*, title: str, model_name: str, cfg: dict[str, Any], classes: list[str], run_dir: Path,
               checkpoint: Path, eval_hw: tuple[int, int], loads_with: str, verification: str,
               command: str | None) -> str:
    """The README.md of an exported folder: what was distilled from what, on which data, how long, how
    good (``eval_test.json`` of the run when present), and the commands to use and reproduce it."""
    from c2vkd.losses import LOSSES

    t, d, sch, opt = cfg["teacher"], cfg["data"], cfg["schedule"], cfg["optim"]
    losses = cfg["losses"]
    distilled = any(LOSSES.get(e["name"]).requires_teacher for e in losses if e["name"] in LOSSES)
    preset = preset_for_losses(losses)
    terms = ", ".join(f"{e['name']} x{e.get('weight', 1.0)}" for e in losses)
    method = (f"`{preset}` preset ({terms})" if preset else f"custom loss set ({terms})")
    teacher = (f"`{t['name']}` (weights: `{t['checkpoint']}`)" if t["name"] else "none (supervised training)")
    crop = d["train_transform"]["crop_size"]
    lines = [
        "---", "library_name: " + ("transformers" if "transformers" in loads_with else "c2vkd"),
        "pipeline_tag: image-segmentation", "tags: [semantic-segmentation, knowledge-distillation, c2vkd]", "---",
        "", f"# {title}", "",
        f"`{model_name}` student {'distilled' if distilled else 'trained'} with c2vkd.", "",
        "| | |", "|---|---|",
        f"| teacher | {teacher} |",
        f"| method | {method} |",
        f"| data | `{d['format']}` dataset at `{d['root']}`, {len(classes)} classes, splits {d['splits']} |",
        f"| schedule | {sch['iters']} iterations, batch {d['batch_size']}, {opt['name']} lr {opt['lr']} "
        f"(warm-up {sch['warmup_iters']}, poly {sch['power']}), crops {crop[0]}x{crop[1]}, seed "
        f"{cfg['experiment']['seed']} |",
        f"| input | RGB scaled to [0, 1], normalised with mean {d['mean']} / std {d['std']}; evaluated at "
        f"{eval_hw[0]}x{eval_hw[1]} |",
        f"| run | `{run_dir}`, checkpoint `{checkpoint.name}` |", "",
    ]
    ev = Path(run_dir) / "eval_test.json"
    if ev.is_file():
        m = json.loads(ev.read_text())
        names = m.get("classes") or classes
        lines += [f"## Test mIoU: {_fmt_pct(m.get('miou'))} %", "",
                  f"From `{ev.name}` of the run (split `{m.get('split', 'test')}`, eval mode "
                  f"`{cfg['eval']['mode']}`).", "", "| class | IoU % |", "|---|---|"]
        lines += [f"| {n} | {_fmt_pct(v)} |" for n, v in zip(names, m.get("iou", []))]
        lines.append("")
    else:
        lines += ["## Test mIoU", "", f"Not measured: the run has no `eval_test.json` (run `c2vkd eval "
                  f"{run_dir}/config.yaml --checkpoint ... --split test`).", ""]
    lines += ["## Classes", "", ", ".join(f"{i} `{c}`" for i, c in enumerate(classes)), "",
              "## Use it", "", loads_with, "", "## Verified at export", "", verification, "",
              "## Reproduce", "", "```bash",
              f"c2vkd {'distill' if distilled else 'train'} {run_dir}/config.yaml   # the run's resolved config",
              *([command] if command else []), "```", ""]
    return "\n".join(lines)


def _decode_head_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits at the input size, the decode head's output before c2vkd's upsampling)."""
    seen: list[torch.Tensor] = []
    handle = model.decode_head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            full = model(x)
    finally:
        handle.remove()
    return full, seen[-1]


def _hf_segformer_folder(model: nn.Module, classes: list[str], mean: Sequence[float], std: Sequence[float],
                         eval_hw: tuple[int, int], folder: Path, check_x: torch.Tensor,
                         kwargs: dict[str, Any] | None = None) -> tuple[float, str]:
    """Write transformers' SegFormer folder and verify it; returns (max |diff|, how it was verified)."""
    import numpy as np
    import transformers
    from torch.nn import functional as F
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    from c2vkd.engine.weights import fit_state_dict
    from c2vkd.models import build_model

    hf_cfg = copy.deepcopy(model.config)
    hf_cfg.id2label = {i: c for i, c in enumerate(classes)}
    hf_cfg.label2id = {c: i for i, c in enumerate(classes)}
    hf = SegformerForSemanticSegmentation(hf_cfg).eval()
    # our SegFormer owns transformers' own submodules (segformer.*, decode_head.*): a strict load, no renaming
    fit_state_dict(hf, model.state_dict(), what="student state dict",
                   arch="transformers' SegformerForSemanticSegmentation", error=ExportError)
    h, w = eval_hw
    processor = SegformerImageProcessor(do_resize=True, size={"height": h, "width": w}, do_rescale=True,
                                        rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean),
                                        image_std=list(std), do_reduce_labels=False)
    transformers.logging.disable_progress_bar()
    try:
        hf.save_pretrained(str(folder))
        processor.save_pretrained(str(folder))
        # verification: load exactly as a user would, offline
        loaded = SegformerForSemanticSegmentation.from_pretrained(str(folder), local_files_only=True).eval()
        proc = SegformerImageProcessor.from_pretrained(str(folder), local_files_only=True)
    finally:
        transformers.logging.enable_progress_bar()
    if loaded.config.id2label != hf_cfg.id2label:
        raise ExportError(f"hf export: id2label did not survive the round trip: {loaded.config.id2label}")
    ref_full, ref_quarter = _decode_head_logits(model, check_x)
    with torch.no_grad():
        got_quarter = loaded(pixel_values=check_x).logits  # [B, K, H/4, W/4]
    up = F.interpolate(got_quarter, size=check_x.shape[-2:], mode="bilinear", align_corners=False)
    diffs = {"1/4": _max_diff(got_quarter, ref_quarter), "full": _max_diff(up, ref_full)}
    # c2vkd reading the folder back goes through the HF 4.x -> 5.x mapping of c2vkd.models.segformer
    back = build_model(getattr(model, "arch", "segformer_b0"), len(classes), pretrained=str(folder),
                       **(kwargs or {})).eval()
    with torch.no_grad():
        diffs["c2vkd"] = _max_diff(back(check_x), ref_full)
    # the processor: resize to the evaluation size, scale, normalise with the run's mean/std
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    pv = torch.as_tensor(proc(images=img, return_tensors="pt")["pixel_values"])
    want = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / \
        torch.tensor(std)[:, None, None]
    diffs["processor"] = _max_diff(pv[0], want)
    how = (f"transformers {transformers.__version__} from_pretrained: logits at 1/4 vs the student's decode head "
           f"{diffs['1/4']:.1e}, bilinearly upsampled (align_corners=False) vs the student's logits "
           f"{diffs['full']:.1e}; c2vkd reload {diffs['c2vkd']:.1e}; SegformerImageProcessor vs (x/255-mean)/std "
           f"{diffs['processor']:.1e}")
    return max(diffs.values()), how


def _timm_encoder_arch(model: nn.Module) -> str | None:
    enc = getattr(model, "encoder", None)
    cfg = getattr(enc, "pretrained_cfg", None)
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def _generic_folder(model: nn.Module, name: str, classes: list[str], kwargs: dict[str, Any], mean: Sequence[float],
                    std: Sequence[float], eval_hw: tuple[int, int], folder: Path, check_x: torch.Tensor
                    ) -> tuple[float, str, str]:
    """timm-style folder for a non-SegFormer student; returns (max |diff|, how verified, how to load it)."""
    from safetensors.torch import load_file, save_file

    from c2vkd.engine.weights import fit_state_dict, save_student
    from c2vkd.models import build_model

    k = len(classes)
    save_student(folder / "model.safetensors", model, name, k, kwargs, classes)
    config = {"architecture": name, "library": "c2vkd", "num_classes": k, "kwargs": kwargs,
              "label_names": classes, "id2label": {str(i): c for i, c in enumerate(classes)},
              "pretrained_cfg": {"input_size": [3, *eval_hw], "mean": list(mean), "std": list(std),
                                 "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": k}}
    loads = (f"```python\nfrom c2vkd.models import build_model\nmodel = build_model({name!r}, {k}"
             f"{''.join(f', {a}={v!r}' for a, v in kwargs.items())}, pretrained='FOLDER').eval()"
             f"  # logits [B, {k}, H, W]\n```\n\nor `c2vkd eval CONFIG --checkpoint FOLDER/model.safetensors` / "
             "`c2vkd predict ... --checkpoint FOLDER/model.safetensors`.")
    back = build_model(name, k, pretrained=str(folder), **kwargs).eval()
    with torch.no_grad():
        diffs = {"c2vkd": _max_diff(back(check_x), model(check_x))}
    arch = _timm_encoder_arch(model)
    if arch is not None:
        import timm

        enc_dir = folder / "encoder"
        enc_dir.mkdir()
        enc_sd = {k_[len("encoder."):]: v.detach().cpu().contiguous() for k_, v in model.state_dict().items()
                  if k_.startswith("encoder.")}
        save_file(enc_sd, str(enc_dir / "model.safetensors"), metadata={"format": "pt"})
        (enc_dir / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 0, "pretrained_cfg": {
            "architecture": arch, "mean": list(mean), "std": list(std), "num_classes": 0}}, indent=1))
        timm_enc = timm.create_model(arch, pretrained=False, num_classes=0).eval()
        fit_state_dict(timm_enc, load_file(str(enc_dir / "model.safetensors")),
                       what="hf export: the encoder weights", arch=f"timm's {arch}", error=ExportError)
        # same features as the student's encoder, at timm's own input size for the architecture
        x = torch.randn(1, *timm_enc.pretrained_cfg.get("input_size", (3, 224, 224)),
                        generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diffs["timm encoder"] = _max_diff(timm_enc.forward_features(x), model.encoder.forward_features(x))
        config["timm_encoder"] = {"architecture": arch, "weights": "encoder/model.safetensors"}
        loads += (f"\n\nThe encoder alone (ImageNet-style backbone, timm {timm.__version__}):\n\n```python\nimport timm"
                  f"\nfrom safetensors.torch import load_file\nenc = timm.create_model({arch!r}, num_classes=0)\n"
                  "enc.load_state_dict(load_file('FOLDER/encoder/model.safetensors'))\n```")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    how = "c2vkd build_model(pretrained=FOLDER) reload " + f"{diffs['c2vkd']:.1e}" + (
        f"; encoder loads strictly into timm.create_model({arch!r}), forward_features "
        f"{diffs['timm encoder']:.1e}" if arch else "")
    return max(diffs.values()), how, loads


def _write_hf(model: nn.Module, name: str, meta: dict[str, Any], cfg: dict[str, Any], folder: Path, *,
              run_dir: Path, ckpt: Path, eval_hw: tuple[int, int], check_x: torch.Tensor,
              command: str | None) -> tuple[float, str]:
    """The ``hf`` format: a folder written next to its final place and renamed in when verified."""
    from c2vkd.models.segformer import SegFormer

    classes = list(meta.get("classes") or [])
    k = int(meta["num_classes"])
    if len(classes) != k:
        raise ExportError(f"hf export needs the class names ({k} classes, the checkpoint records "
                          f"{len(classes)}): id2label is built from them")
    mean, std = cfg["data"]["mean"], cfg["data"]["std"]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if isinstance(model, SegFormer):
            diff, how = _hf_segformer_folder(model, classes, mean, std, eval_hw, tmp, check_x,
                                             dict(meta.get("kwargs", {})))
            loads = ("transformers (no c2vkd needed):\n\n```python\nfrom transformers import "
                     "SegformerForSemanticSegmentation, SegformerImageProcessor\n"
                     "model = SegformerForSemanticSegmentation.from_pretrained('FOLDER').eval()\n"
                     "processor = SegformerImageProcessor.from_pretrained('FOLDER')\n"
                     "inputs = processor(images=image, return_tensors='pt')\n"
                     "logits = model(**inputs).logits  # [B, K, H/4, W/4]: upsample bilinearly (align_corners=False)"
                     "\nseg = processor.post_process_semantic_segmentation(model(**inputs), "
                     "target_sizes=[image.size[::-1]])[0]\n```")
        else:
            diff, how, loads = _generic_folder(model, name, classes, dict(meta.get("kwargs", {})), mean, std,
                                               eval_hw, tmp, check_x)
        card = model_card(title=f"{name} ({cfg['experiment']['name']})", model_name=name, cfg=cfg, classes=classes,
                          run_dir=run_dir, checkpoint=ckpt, eval_hw=eval_hw, loads_with=loads,
                          verification=how, command=command)
        (tmp / "README.md").write_text(card)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff, how


def _folder_digest(folder: Path) -> tuple[str, int]:
    import hashlib

    h, size = hashlib.sha256(), 0
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + sha256_file(p).encode())
        size += p.stat().st_size
    return h.hexdigest(), size


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
                diff_hf, how = _write_hf(model, name, meta, cfg, path, run_dir=Path(run_dir), ckpt=ckpt,
                                         eval_hw=eval_hw, check_x=check_x, command=command)
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"hf export of {name} failed: {type(e).__name__}: {e}") from e
            if not diff_hf <= atol:
                shutil.rmtree(path, ignore_errors=True)
                raise ExportError(f"hf export of {name} does not reproduce the student: max |difference| "
                                  f"{diff_hf:.3g} > {atol:g} ({how}); folder removed")
            digest, size = _folder_digest(path)
            manifest["files"][fmt] = {"path": path.name, "sha256": digest, "bytes": size, "max_abs_diff": diff_hf,
                                      "verified_with": how,
                                      "files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())}
            log.info("exported hf -> %s (max |diff| %.2e; %s)", path, diff_hf, how)
            continue
        else:
            if traced_model is None:
                traced_model = _export_model(model, (h, w))
            try:
                if fmt == "torchscript":
                    _write_torchscript(traced_model, trace_x, path)
                    got, how = _run_torchscript(path, check_x), "torch.jit.load"
                else:
                    onnx_model = model if dynamic else traced_model  # no fixed-size specialisation when dynamic
                    _write_onnx(onnx_model, trace_x, path, {"c2vkd_model": name, "num_classes": k, "classes": classes,
                                                            "input_hw": [h, w], "dynamic": dynamic}, opset,
                                dynamic=dynamic)
                    got, how = _run_onnx(path, check_x)
                    if dynamic:  # a second size and batch 2: shapes must not have been frozen by the trace
                        h2, w2 = _other_size(h, w)
                        x2 = torch.randn(2, 3, h2, w2, generator=gen)
                        with torch.no_grad():
                            ref2 = model(x2)
                        got2, _ = _run_onnx(path, x2)
                        diff2 = _max_diff(got2, ref2)
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
    if "dynamic_check" in manifest:
        lines.append("onnx dynamic axes verified at " + " and ".join(
            "x".join(map(str, s)) for s in manifest["dynamic_check"]["sizes"]))
    lines.append("  ".join(c.ljust(wd) for c, wd in zip(rows[0], widths)).rstrip())
    lines.append("  ".join("-" * wd for wd in widths))
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows[1:]]
    return "\n".join(lines)
