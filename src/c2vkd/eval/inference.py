"""Test-time inference (whole / sliding window / centre crop, multi-scale, flip) and evaluation.

Conventions
-----------
* A model maps ``[B, 3, h, w]`` images to logits ``[B, K, h', w']``.  If ``(h', w') != (h, w)`` the
  logits are bilinearly upsampled (``align_corners=False``) to the model input size.  A model may also
  return a dict (key ``"logits"`` or ``"out"``) or a tuple/list whose first item is the logits.
* All accumulation is done in float32, whatever autocast dtype the forward ran in.
* Modes:
    - ``"whole"``: one forward on the full image.
    - ``"slide"``: mmsegmentation's ``slide_inference``: ``h_grids = max(H - wh + sh - 1, 0) // sh + 1``
      windows along H (same along W), window ``i`` starts at ``i * sh`` and the last one is clamped to
      the bottom/right border; per-window logits are summed into the full canvas and divided by the
      per-pixel window count (i.e. logits are *averaged* over overlaps).  If the image is smaller than
      the window along a dimension it is zero-padded at the bottom/right up to the window size and the
      pad is cropped off the result.  Windows are forwarded in batches of ``window_batch`` windows.
      ``stride`` defaults to ``window`` (non-overlapping tiles).
    - ``"center_crop"``: only the central ``window`` of the image is predicted: the image is cropped to
      :func:`center_crop_box` (``top = (H - wh) // 2`` when ``H >= wh``), zero-padded bottom/right to the
      window if smaller, run as ``"whole"`` (with the multi-scale / flip options), and the pad is cropped
      off.  The returned logits cover **only the crop** (``[B, K, min(H, wh), min(W, ww)]``, or
      ``out_size``).  Labels must be cropped identically with :func:`crop_labels_like`;
      :func:`evaluate` does that automatically, so pixels outside the crop never enter the metrics.
* Multi-scale / flip (test-time augmentation): for every scale ``s`` the image is resized bilinearly to
  ``round(H * s), round(W * s)``, run through the mode, and the logits resized back to the output size
  (``out_size`` or the input size).  With ``flip=True`` each scale is also run on the horizontally
  flipped image and the result flipped back.  The passes are merged by ``tta_merge``:
    - ``"prob"`` (default, as mmsegmentation): mean of the per-pass softmax probabilities, returned as
      its log (``log(mean_p softmax(l_p))``), so ``softmax(output)`` is the averaged distribution and
      ``argmax(output)`` is the argmax of the averaged probabilities.
    - ``"logit"``: plain mean of the per-pass logits.
  With a single pass (one scale, no flip) the raw (resized) logits are returned unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from c2vkd import IGNORE_INDEX
from c2vkd.eval.metrics import ConfusionMatrix, SegMetrics
from c2vkd.utils.device import autocast_ctx
from c2vkd.utils.sizes import checked_hw

__all__ = [
    "predict_logits",
    "evaluate",
    "center_crop_box",
    "crop_labels_like",
    "MODES",
]

MODES = ("whole", "slide", "center_crop")


# ----------------------------------------------------------------------------------------- helpers


def _extract_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "out"):
            if key in out:
                return out[key]
        raise TypeError(f"model returned a dict without 'logits'/'out' key (keys: {list(out)})")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model output of type {type(out).__name__} is not a logits tensor")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _forward(model: nn.Module, x: Tensor, num_classes: int | None) -> Tensor:
    """One forward; float32 logits at the input resolution."""
    logits = _extract_logits(model(x))
    if logits.ndim != 4 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(x.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model returned {logits.shape[1]} channels, expected num_classes={num_classes}")
    return _resize(logits.float(), (x.shape[-2], x.shape[-1]))


def _pad_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad bottom/right so that x is at least ``size``."""
    ph = max(size[0] - x.shape[-2], 0)
    pw = max(size[1] - x.shape[-1], 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), value=0.0)


def slide_windows(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Window boxes ``(y1, y2, x1, x2)`` of mmseg's sliding window for an image of ``size`` (H, W).

    Assumes ``H >= wh`` and ``W >= ww`` (smaller images are padded first by :func:`predict_logits`).
    """
    (h, w), (wh, ww), (sh, sw) = size, window, stride
    h_grids = max(h - wh + sh - 1, 0) // sh + 1
    w_grids = max(w - ww + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + wh, h), min(x1 + ww, w)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def center_crop_box(size: tuple[int, int], window: tuple[int, int]) -> tuple[int, int, int, int]:
    """Central crop ``(y1, y2, x1, x2)`` of a ``window`` inside an image of ``size``, clipped to the image.

    ``y1 = max(H - wh, 0) // 2``, ``y2 = y1 + min(H, wh)`` (same along W).
    """
    (h, w), (wh, ww) = size, window
    y1 = max(h - wh, 0) // 2
    x1 = max(w - ww, 0) // 2
    return y1, y1 + min(h, wh), x1, x1 + min(w, ww)


def crop_labels_like(labels: Tensor, image_size: tuple[int, int], window: int | Sequence[int]) -> Tensor:
    """Crop ``labels [..., Hl, Wl]`` to the region that ``mode="center_crop"`` predicts.

    ``image_size`` is the (H, W) of the image given to :func:`predict_logits`.  When the labels have the
    image's size the box is exactly :func:`center_crop_box`; otherwise (the eval transform resized the
    image) the window is mapped to label coordinates by the ratio ``Hl / H`` (rounded) and centred the
    same way, and logits must then be resized to the cropped label size (``out_size``).
    """
    win = checked_hw(window, "window")
    hl, wl = labels.shape[-2:]
    h, w = image_size
    if (hl, wl) != (h, w):
        win = (max(1, round(win[0] * hl / h)), max(1, round(win[1] * wl / w)))
    y1, y2, x1, x2 = center_crop_box((hl, wl), win)
    return labels[..., y1:y2, x1:x2]


# ----------------------------------------------------------------------------------------- modes


def _slide(
    model: nn.Module,
    x: Tensor,
    window: tuple[int, int],
    stride: tuple[int, int],
    num_classes: int | None,
    window_batch: int,
) -> Tensor:
    b, _, h, w = x.shape
    xp = _pad_to(x, window)
    hp, wp = xp.shape[-2:]
    boxes = slide_windows((hp, wp), window, stride)
    canvas: Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=x.device, dtype=torch.float32)
    for start in range(0, len(boxes), window_batch):
        chunk = boxes[start : start + window_batch]
        crops = torch.cat([xp[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in chunk], dim=0)
        out = _forward(model, crops, num_classes)  # [len(chunk) * B, K, wh, ww]
        if canvas is None:
            canvas = torch.zeros(b, out.shape[1], hp, wp, device=x.device, dtype=torch.float32)
        for n, (y1, y2, x1, x2) in enumerate(chunk):
            canvas[:, :, y1:y2, x1:x2] += out[n * b : (n + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    assert canvas is not None
    # every pixel is covered by construction (last window clamped to the border)
    return (canvas / count)[:, :, :h, :w]


def _single_pass(
    model: nn.Module,
    x: Tensor,
    mode: str,
    window: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    num_classes: int | None,
    window_batch: int,
) -> Tensor:
    if mode == "slide":
        assert window is not None and stride is not None
        return _slide(model, x, window, stride, num_classes, window_batch)
    return _forward(model, x, num_classes)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    *,
    mode: str = "whole",
    window: tuple[int, int] | int | None = None,
    stride: tuple[int, int] | int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    num_classes: int | None = None,
    out_size: tuple[int, int] | None = None,
    tta_merge: str = "prob",
    window_batch: int = 8,
) -> Tensor:
    """Predict float32 logits ``[B, K, H', W']`` for ``images [B, C, H, W]`` (see module docstring).

    Args:
        model: called as ``model(x)``; not switched to eval mode here (the caller / :func:`evaluate` does).
        mode: ``"whole"``, ``"slide"`` or ``"center_crop"``.
        window: (h, w) window for ``slide`` / ``center_crop`` (required there), in pixels of the
            (scaled) image for ``slide`` and of the input image for ``center_crop``.
        stride: (h, w) stride for ``slide``; defaults to ``window``.
        scales: test-time scale factors.
        flip: also run horizontally flipped inputs.
        num_classes: if given, the model's channel count is checked against it.
        out_size: output (H', W'); defaults to the input size (the crop size for ``center_crop``).
        tta_merge: ``"prob"`` (average softmax, return log of it) or ``"logit"`` (average logits);
            only used with more than one pass.
        window_batch: windows forwarded together in ``slide`` mode (each window holds all B images).

    Runs under ``torch.no_grad()``; autocast, if any, is the caller's.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if tta_merge not in ("prob", "logit"):
        raise ValueError(f"tta_merge must be 'prob' or 'logit', got {tta_merge!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty sequence of positive floats, got {scales}")
    if window_batch < 1:
        raise ValueError("window_batch must be >= 1")
    win = None if window is None else checked_hw(window, "window")
    strd = None if stride is None else checked_hw(stride, "stride")
    if mode in ("slide", "center_crop") and win is None:
        raise ValueError(f"mode={mode!r} needs window=(h, w)")
    if mode == "slide" and strd is None:
        strd = win

    x = images
    h, w = x.shape[-2:]
    crop_hw: tuple[int, int] | None = None
    if mode == "center_crop":
        assert win is not None
        y1, y2, x1, x2 = center_crop_box((h, w), win)
        crop_hw = (y2 - y1, x2 - x1)
        x = _pad_to(x[:, :, y1:y2, x1:x2], win)
        run_mode = "whole"
    else:
        run_mode = mode
    base_hw = (x.shape[-2], x.shape[-1])  # size of the tensor each pass is mapped back to
    final_hw = tuple(out_size) if out_size is not None else (crop_hw or (h, w))

    def finish(t: Tensor) -> Tensor:
        if crop_hw is not None:
            t = t[:, :, : crop_hw[0], : crop_hw[1]]
        return _resize(t, final_hw)  # type: ignore[arg-type]

    n_pass = len(scales) * (2 if flip else 1)
    acc: Tensor | None = None
    for s in scales:
        xs = x if s == 1.0 else _resize(x, (max(1, round(base_hw[0] * s)), max(1, round(base_hw[1] * s))))
        for flipped in (False, True) if flip else (False,):
            xi = xs.flip(-1) if flipped else xs
            out = _single_pass(model, xi, run_mode, win, strd, num_classes, window_batch)
            if flipped:
                out = out.flip(-1)
            out = finish(_resize(out, base_hw))
            if n_pass == 1:
                return out
            if tta_merge == "prob":
                out = out.softmax(dim=1)
            acc = out if acc is None else acc.add_(out)
    assert acc is not None
    acc = acc / n_pass
    if tta_merge == "prob":
        acc = acc.clamp_min_(torch.finfo(acc.dtype).tiny).log_()
    return acc


# ----------------------------------------------------------------------------------------- evaluate


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    device: torch.device | str,
    mode: str = "whole",
    window: tuple[int, int] | int | None = None,
    stride: tuple[int, int] | int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "off",
    progress: bool = True,
    max_batches: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    tta_merge: str = "prob",
    window_batch: int = 8,
) -> SegMetrics:
    """Evaluate ``model`` (already on ``device``) over ``loader`` and return :class:`SegMetrics`.

    ``loader`` yields dicts with ``"image"`` ``[B, 3, H, W]`` float and ``"label"`` ``[B, Hl, Wl]`` long
    (``ignore_index`` = ignored).  Logits are resized to the label size (``out_size``), argmax-ed and
    accumulated in a :class:`~c2vkd.eval.metrics.ConfusionMatrix` which is summed over ranks at the end
    (each rank should see a disjoint shard; ``DistributedSampler`` pads with duplicates, so use an
    unpadded sharding for exact multi-GPU numbers).  In ``"center_crop"`` mode labels are cropped with
    :func:`crop_labels_like`, so only the central window is scored.

    The model is put in eval mode for the run and every submodule's previous ``training`` flag is
    restored afterwards (also on error).  ``amp``: ``"off"``, ``"bf16"`` (CUDA or CPU) or ``"fp16"`` (CUDA).
    Runs under ``torch.inference_mode()``.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    autocast_ctx(device, amp)  # validate early
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    prev_modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        total = None
        if hasattr(loader, "__len__"):
            total = len(loader)  # type: ignore[arg-type]
            if max_batches is not None:
                total = min(total, max_batches)
        bar = None
        if progress and _is_main_process():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="eval", dynamic_ncols=True, leave=False)
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                if labels.ndim == 4 and labels.shape[1] == 1:
                    labels = labels[:, 0]
                if labels.ndim != 3:
                    raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
                if mode == "center_crop":
                    labels = crop_labels_like(labels, (images.shape[-2], images.shape[-1]), window)  # type: ignore[arg-type]
                with autocast_ctx(device, amp):
                    logits = predict_logits(
                        model,
                        images,
                        mode=mode,
                        window=window,
                        stride=stride,
                        scales=scales,
                        flip=flip,
                        num_classes=num_classes,
                        out_size=(labels.shape[-2], labels.shape[-1]),
                        tta_merge=tta_merge,
                        window_batch=window_batch,
                    )
                cm.update(logits.argmax(dim=1), labels)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for m, was_training in prev_modes.items():
            m.training = was_training
    cm.all_reduce()
    return cm.compute()
