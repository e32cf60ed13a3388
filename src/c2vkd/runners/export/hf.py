"""The ``hf`` export: a folder that transformers (SegFormer students) or c2vkd / timm (other students) load,
verified by loading it back, with a model card (``README.md``).

The SegFormer folder's image processor and the card's snippet reproduce `c2vkd predict` on an image of any
size: ``data.eval_transform`` ``whole`` (the default) keeps every image at its own size (``do_resize`` false),
``resize`` resizes every image to ``eval_transform.size`` as c2vkd does (bilinear, antialiased, aspect ratio
not kept). What a single transformers forward cannot do (a centre crop, a sliding window, several scales or
flips, autocast) is named in the card (:func:`predict_differences`)."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import shlex
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from c2vkd.runners.export.verify import ExportError, max_diff
from c2vkd.utils.io import sha256_file
from c2vkd.utils.sizes import as_hw

log = logging.getLogger("c2vkd")


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


def _hw(v: Any) -> str:
    h, w = as_hw(v)
    return f"{h}x{w}"


def _windows(e: dict[str, Any]) -> str:
    """``eval.window`` / ``eval.stride`` in words (the stride defaults to the window, as in predict_logits)."""
    return f"{_hw(e['window'])} windows, stride {_hw(e['stride'] or e['window'])}"


def _eval_transform(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved ``data.eval_transform`` (defaults filled in, as the dataset builder sees it)."""
    from c2vkd.data.build import resolve_data_cfg

    return resolve_data_cfg(cfg["data"])["eval_transform"]


def processor_resize(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """(H, W) the exported image processor resizes every image to, or None: keep each image's own size.

    Only ``eval_transform.mode: resize`` resizes in c2vkd (to that fixed size, whatever the image's size).
    ``whole`` and ``center_crop`` feed the image at its own size; the processor cannot crop, so a centre-crop
    run gets the whole image (named in the card by :func:`predict_differences`)."""
    t = _eval_transform(cfg)
    return as_hw(t["size"]) if t["mode"] == "resize" else None


def eval_protocol(cfg: dict[str, Any]) -> str:
    """How the run's test numbers were measured: split, evaluation transform and inference mode, in words."""
    t, e = _eval_transform(cfg), cfg["eval"]
    split = e.get("final_split") or e.get("split")
    where = f"split `{split}`" if split else "no evaluation split"
    if t["mode"] == "resize":
        how = (f"each image resized to {_hw(t['size'])} (bilinear, antialiased; aspect ratio not kept), logits "
               "upsampled bilinearly to the image's native size")
    elif t["mode"] == "center_crop":
        how = f"the central {_hw(t['size'])} crop of each image (padded when smaller)"
    else:
        how = "each image whole, at its native size"
    if e["mode"] == "slide":
        how += f"; sliding {_windows(e)}"
    elif e["mode"] == "center_crop":
        how += f"; only the central {_hw(e['window'])} window predicted"
    else:
        how += "; one forward pass"
    if list(e["scales"]) != [1.0] or e["flip"]:
        how += f"; scales {list(e['scales'])}{' + horizontal flip' if e['flip'] else ''} (softmax averaged)"
    return f"{where}; {how}"


def predict_differences(cfg: dict[str, Any]) -> list[str]:
    """What `c2vkd predict` does with this run's config that the card's single transformers forward does not
    (empty: the snippet reproduces it). Mirrors ``runners/predict.Predictor``."""
    t, e, amp = _eval_transform(cfg), cfg["eval"], cfg["train"]["amp"]
    out = []
    if t["mode"] == "center_crop":
        out.append(f"`data.eval_transform` center_crop: c2vkd predicts only the central {_hw(t['size'])} crop, "
                   "the processor keeps the whole image")
    if e["mode"] != "whole":  # predict turns eval.mode center_crop into a sliding window of the same size
        out.append(f"`eval.mode` {e['mode']}: c2vkd predict slides {_windows(e)}, the snippet runs one pass "
                   "over the whole input")
    if list(e["scales"]) != [1.0] or e["flip"]:
        out.append(f"`eval.scales` {list(e['scales'])} / `eval.flip` {str(e['flip']).lower()}: c2vkd predict "
                   "averages those passes, the snippet runs one")
    if amp != "off":
        out.append(f"`train.amp` {amp}: c2vkd predict runs the model under {amp} autocast, the snippet in float32")
    return out


def segformer_snippet(resize: tuple[int, int] | None) -> str:
    """The card's transformers recipe: the image at ``'image.jpg'`` in, ``seg`` (class ids [H, W] at the image's
    own size) out; ``'FOLDER'`` is the exported folder. With a resize it does two things the plain recipe does
    not, both because c2vkd does them (each changes a few pixels otherwise): float pixels, so the resize is not
    rounded to 8 bits, and logits upsampled to the network input before the image size."""
    lines = ["import torch", *(["import numpy as np"] if resize else []), "from PIL import Image",
             "from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor", "",
             "model = SegformerForSemanticSegmentation.from_pretrained('FOLDER').eval()",
             "processor = SegformerImageProcessor.from_pretrained('FOLDER')",
             "image = Image.open('image.jpg').convert('RGB')  # any size; no EXIF rotation, as in c2vkd"]
    if resize is None:
        lines.append("inputs = processor(images=image, return_tensors='pt')  # kept at its own size")
    else:
        lines += [f"# resized to {resize[0]}x{resize[1]} as c2vkd evaluates; float pixels: c2vkd resizes floats",
                  "inputs = processor(images=np.asarray(image, dtype=np.float32), return_tensors='pt')"]
    lines += ["with torch.no_grad():", "    outputs = model(**inputs)  # logits [1, K, h/4, w/4] of the input h x w"]
    if resize is not None:
        lines += ["# as c2vkd: logits to the network input size first, then to the image size",
                  "outputs.logits = torch.nn.functional.interpolate(outputs.logits, "
                  "size=inputs['pixel_values'].shape[-2:], mode='bilinear', align_corners=False)"]
    lines.append("seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]"
                 "  # [H, W] class ids")
    return "\n".join(lines)


def _segformer_usage(cfg: dict[str, Any]) -> str:
    """The card's "Use it" text for a SegFormer folder: the snippet and how it relates to `c2vkd predict`."""
    resize, diffs = processor_resize(cfg), predict_differences(cfg)
    pre = (f"resizes every image to {resize[0]}x{resize[1]} (aspect ratio not kept) as c2vkd evaluates"
           if resize else "keeps every image at its own size (one image per call), as c2vkd evaluates")
    same = ("`seg` is what `c2vkd predict` writes as `NAME_mask.png` for the same image, at any size and "
            "aspect ratio (c2vkd's tests run this snippet against it)." if not diffs else
            "`seg` differs from `c2vkd predict` with this run's config: " + "; ".join(diffs) + ".")
    return (f"transformers (no c2vkd needed). The image processor scales RGB to [0, 1], normalises with the "
            f"run's mean / std and {pre}; FOLDER is this folder (or its Hub id).\n\n```python\n"
            f"{segformer_snippet(resize)}\n```\n\n{same}")


def model_card(*, title: str, model_name: str, cfg: dict[str, Any], classes: list[str], run_dir: Path,
               checkpoint: Path, loads_with: str, verification: str, command: str | None) -> str:
    """The README.md of an exported folder: what was distilled from what, on which data, how long, how
    good (``eval_test.json`` of the run when present), and the commands to use and reproduce it."""
    from c2vkd.engine.loss_config import needs_teacher
    from c2vkd.engine.run_dir import repeat_command
    from c2vkd.losses import LOSSES

    t, d, sch, opt = cfg["teacher"], cfg["data"], cfg["schedule"], cfg["optim"]
    losses = cfg["losses"]
    known = [e for e in losses if e["name"] in LOSSES]  # an unimportable plugin: not counted
    distilled = needs_teacher(known)
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
        f"| input | RGB scaled to [0, 1], normalised with mean {d['mean']} / std {d['std']} |",
        f"| evaluation | {eval_protocol(cfg)} |",
        f"| run | `{run_dir}`, checkpoint `{checkpoint.name}` |", "",
    ]
    ev = Path(run_dir) / "eval_test.json"
    if ev.is_file():
        m = json.loads(ev.read_text())
        names = m.get("classes") or classes
        lines += [f"## Test mIoU: {_fmt_pct(m.get('miou'))} %", "",
                  f"From `{ev.name}` of the run (split `{m.get('split', 'test')}`, measured as the evaluation row "
                  "above says).", "", "| class | IoU % |", "|---|---|"]
        lines += [f"| {n} | {_fmt_pct(v)} |" for n, v in zip(names, m.get("iou", []))]
        lines.append("")
    else:
        lines += ["## Test mIoU", "", f"Not measured: the run has no `eval_test.json` (run `c2vkd eval "
                  f"{shlex.quote(str(Path(run_dir) / 'config.yaml'))} --checkpoint "
                  f"{shlex.quote(str(Path(run_dir) / 'student.safetensors'))} --split test`).", ""]
    lines += ["## Classes", "", ", ".join(f"{i} `{c}`" for i, c in enumerate(classes)), "",
              "## Use it", "", loads_with, "", "## Verified at export", "", verification, "",
              "## Reproduce", "", "```bash",
              f"{repeat_command(known, run_dir)}   "
              f"# the run's resolved config; runs in a new folder, the original is never touched",
              *([command] if command else []), "```", ""]
    return "\n".join(lines)


def decode_head_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits at the input size, the decode head's output before c2vkd's upsampling)."""
    seen: list[torch.Tensor] = []
    handle = model.decode_head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            full = model(x)
    finally:
        handle.remove()
    return full, seen[-1]


# A processor check at a size no run evaluates at, of another aspect ratio, with odd sides
_PROCESSOR_CHECK_HW = (61, 97)


def _processor_diff(proc: Any, resize: tuple[int, int] | None, mean: Sequence[float], std: Sequence[float]) -> float:
    """Max |difference| between the exported processor, fed as the card's snippet feeds it, and c2vkd's own
    evaluation transform (:class:`c2vkd.data.transforms.EvalTransform`) on a random image."""
    import numpy as np

    from c2vkd.data.transforms import EvalTransform

    img = np.random.default_rng(0).integers(0, 256, size=(*_PROCESSOR_CHECK_HW, 3), dtype=np.uint8)
    pixels = img.astype(np.float32) if resize else img  # as segformer_snippet: float pixels when resizing
    got = torch.as_tensor(proc(images=pixels, return_tensors="pt")["pixel_values"])[0]
    ours = EvalTransform("resize" if resize else "whole", resize, mean, std)
    want, _ = ours(torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.zeros(_PROCESSOR_CHECK_HW))
    if got.shape != want.shape:
        raise ExportError(f"hf export: the image processor gives {tuple(got.shape)} for a {_PROCESSOR_CHECK_HW} "
                          f"image, c2vkd's evaluation transform {tuple(want.shape)}")
    return max_diff(got, want)


def _hf_segformer_folder(model: nn.Module, classes: list[str], mean: Sequence[float], std: Sequence[float],
                         resize: tuple[int, int] | None, folder: Path, check_x: torch.Tensor,
                         kwargs: dict[str, Any] | None = None) -> tuple[float, str]:
    """Write transformers' SegFormer folder and verify it; returns (max |diff|, how it was verified).
    resize: :func:`processor_resize` (None: the processor keeps each image's size)."""
    import transformers
    from torch.nn import functional as F
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor
    from transformers.image_utils import PILImageResampling

    from c2vkd.engine.weights import fit_state_dict
    from c2vkd.models import build_model

    hf_cfg = copy.deepcopy(model.config)
    hf_cfg.id2label = {i: c for i, c in enumerate(classes)}
    hf_cfg.label2id = {c: i for i, c in enumerate(classes)}
    hf = SegformerForSemanticSegmentation(hf_cfg).eval()
    # our SegFormer owns transformers' own submodules (segformer.*, decode_head.*): a strict load, no renaming
    fit_state_dict(hf, model.state_dict(), what="student state dict",
                   arch="transformers' SegformerForSemanticSegmentation", error=ExportError)
    # size None is saved as null: no size a reader could take for the one the model wants. BILINEAR is
    # antialiased when shrinking, like c2vkd's resize_image; x/255 then (x - mean) / std, like normalize
    processor = SegformerImageProcessor(
        do_resize=resize is not None, size=None if resize is None else {"height": resize[0], "width": resize[1]},
        resample=PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_reduce_labels=False)
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
    ref_full, ref_quarter = decode_head_logits(model, check_x)
    with torch.no_grad():
        got_quarter = loaded(pixel_values=check_x).logits  # [B, K, H/4, W/4]
    up = F.interpolate(got_quarter, size=check_x.shape[-2:], mode="bilinear", align_corners=False)
    diffs = {"1/4": max_diff(got_quarter, ref_quarter), "full": max_diff(up, ref_full)}
    # c2vkd reading the folder back goes through the HF 4.x -> 5.x mapping of c2vkd.models.segformer
    back = build_model(getattr(model, "arch", "segformer_b0"), len(classes), pretrained=str(folder),
                       **(kwargs or {})).eval()
    with torch.no_grad():
        diffs["c2vkd"] = max_diff(back(check_x), ref_full)
    diffs["processor"] = _processor_diff(proc, resize, mean, std)
    pre = f"resize to {resize[0]}x{resize[1]}" if resize else "no resize"
    how = (f"transformers {transformers.__version__} from_pretrained: logits at 1/4 vs the student's decode head "
           f"{diffs['1/4']:.1e}, bilinearly upsampled (align_corners=False) vs the student's logits "
           f"{diffs['full']:.1e}; c2vkd reload {diffs['c2vkd']:.1e}; SegformerImageProcessor ({pre}) vs c2vkd's "
           f"evaluation transform on a {_PROCESSOR_CHECK_HW[0]}x{_PROCESSOR_CHECK_HW[1]} image "
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
        diffs = {"c2vkd": max_diff(back(check_x), model(check_x))}
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
            diffs["timm encoder"] = max_diff(timm_enc.forward_features(x), model.encoder.forward_features(x))
        config["timm_encoder"] = {"architecture": arch, "weights": "encoder/model.safetensors"}
        loads += (f"\n\nThe encoder alone (ImageNet-style backbone, timm {timm.__version__}):\n\n```python\nimport timm"
                  f"\nfrom safetensors.torch import load_file\nenc = timm.create_model({arch!r}, num_classes=0)\n"
                  "enc.load_state_dict(load_file('FOLDER/encoder/model.safetensors'))\n```")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    how = "c2vkd build_model(pretrained=FOLDER) reload " + f"{diffs['c2vkd']:.1e}" + (
        f"; encoder loads strictly into timm.create_model({arch!r}), forward_features "
        f"{diffs['timm encoder']:.1e}" if arch else "")
    return max(diffs.values()), how, loads


def write_hf(model: nn.Module, name: str, meta: dict[str, Any], cfg: dict[str, Any], folder: Path, *,
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
            diff, how = _hf_segformer_folder(model, classes, mean, std, processor_resize(cfg), tmp, check_x,
                                             dict(meta.get("kwargs", {})))
            loads = _segformer_usage(cfg)
            for why in predict_differences(cfg):
                log.warning("hf export: the model card's transformers snippet will not match c2vkd predict: %s", why)
        else:
            diff, how, loads = _generic_folder(model, name, classes, dict(meta.get("kwargs", {})), mean, std,
                                               eval_hw, tmp, check_x)
        card = model_card(title=f"{name} ({cfg['experiment']['name']})", model_name=name, cfg=cfg, classes=classes,
                          run_dir=run_dir, checkpoint=ckpt, loads_with=loads,
                          verification=how, command=command)
        (tmp / "README.md").write_text(card)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff, how


def folder_digest(folder: Path) -> tuple[str, int]:
    import hashlib

    h, size = hashlib.sha256(), 0
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + sha256_file(p).encode())
        size += p.stat().st_size
    return h.hexdigest(), size
