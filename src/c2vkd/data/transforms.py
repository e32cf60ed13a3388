"""Joint image/label transforms.

Conventions (every function):
  * image: tensor [3, H, W], either uint8 (0..255) or float; label: int64 [H, W] with 255 = ignore.
  * Images are resampled bilinearly (antialiased when shrinking), labels with ``nearest-exact``, which
    samples at pixel centres like bilinear with ``align_corners=False`` - so both stay aligned. (Plain
    ``nearest`` floors ``i * scale`` and shifts labels by up to half a pixel against the image.)
  * Randomness only comes from the ``torch.Generator`` argument; nothing touches global RNG state, so a
    sample is reproducible from its sample seed alone (see ``SegDataset``).

Training pipeline (:class:`TrainTransform`): random long-side rescale -> random crop -> to float ->
photometric jitter -> normalise -> pad to crop size (image 0 i.e. the mean, label 255) -> random h-flip.
Cropping before normalising is only an optimisation: it gives exactly what "pad, then crop" gives
(when the image is smaller than the crop in a dimension the crop offset there is 0 either way), but only
the cropped pixels are converted, jittered and normalised. Padding goes bottom/right.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from c2vkd import IGNORE_INDEX
from c2vkd.utils.sizes import checked_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_MODES = ("whole", "resize", "center_crop")

Size = tuple[int, int]


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator | None, high: int) -> int:
    """Uniform integer in [0, high] (inclusive)."""
    return int(torch.randint(0, high + 1, (), generator=generator))


# ----------------------------------------------------------------------------------------------------
# Deterministic building blocks.
# ----------------------------------------------------------------------------------------------------
def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (float input is returned as float32 unchanged)."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(image/255 if uint8 - mean) / std, per channel; mean/std on the 0..1 scale."""
    x = to_float(image)
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize` (returns 0..1 floats); used for visualisation."""
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return image * s + m


def resize_image(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize to (H, W); antialiased so shrinking does not alias. Keeps the input dtype."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.dtype == torch.uint8:
        # torch has a fast uint8 antialiased bilinear kernel on CPU; result is rounded to uint8.
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.to(image.dtype)


def resize_label(label: torch.Tensor, size: Size) -> torch.Tensor:
    """Nearest (pixel-centre) resize of an int label map; class ids are never blended."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    # float32 represents every id 0..255 exactly
    out = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return out.to(label.dtype)


def rescale_long_side(image: torch.Tensor, label: torch.Tensor, long_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize both so the longer side equals ``long_side``, keeping the aspect ratio."""
    h, w = image.shape[-2:]
    scale = long_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize_image(image, size), resize_label(label, size)


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: Size, image_value: float = 0.0, label_value: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to at least ``size`` (never crops). Apply to the *normalised* image so the
    default 0 is the dataset mean; padded label pixels are ignored by loss and metrics."""
    h, w = image.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return image, label
    image = F.pad(image, (0, pw, 0, ph), value=image_value)
    label = F.pad(label, (0, pw, 0, ph), value=label_value)
    return image, label


def crop(image: torch.Tensor, label: torch.Tensor, top: int, left: int, size: Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop the same window from both (clipped at the border)."""
    h, w = size
    return image[..., top : top + h, left : left + w], label[..., top : top + h, left : left + w]


def center_crop(image: torch.Tensor, label: torch.Tensor, size: Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Central window of ``size``; pads (image 0, label 255) first when the input is smaller."""
    image, label = pad_to(image, label, size)
    h, w = image.shape[-2:]
    return crop(image, label, (h - size[0]) // 2, (w - size[1]) // 2, size)


def hflip(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image.flip(-1), label.flip(-1)


def _gray(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_color(image: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0) -> torch.Tensor:
    """Photometric change of a 0..1 float image (factor 1 = unchanged), result clamped to 0..1."""
    x = image * brightness
    if contrast != 1.0:
        m = _gray(x).mean()
        x = (x - m) * contrast + m
    if saturation != 1.0:
        g = _gray(x)
        x = (x - g) * saturation + g
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Random wrappers: every draw comes from `generator`, in a fixed order.
# ----------------------------------------------------------------------------------------------------
def random_rescale(
    image: torch.Tensor,
    label: torch.Tensor,
    scale_range: Sequence[float],
    base_size: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale so the long side is ``base * r``, r ~ U(scale_range); base = ``base_size`` or the image's own
    long side. One draw."""
    lo, hi = float(scale_range[0]), float(scale_range[1])
    ratio = _uniform(generator, lo, hi)
    base = base_size if base_size is not None else max(image.shape[-2:])
    return rescale_long_side(image, label, max(1, round(base * ratio)))


def random_crop(
    image: torch.Tensor, label: torch.Tensor, size: Size, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random window of ``size`` (smaller where the input is smaller: follow with :func:`pad_to`).
    Two draws (top, then left)."""
    h, w = image.shape[-2:]
    top = _randint(generator, max(h - size[0], 0))
    left = _randint(generator, max(w - size[1], 0))
    return crop(image, label, top, left, size)


def random_hflip(
    image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip both with probability ``p``. One draw."""
    if _uniform(generator, 0.0, 1.0) < p:
        return hflip(image, label)
    return image, label


def random_jitter(image: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation factors each ~ U(max(0, 1-s), 1+s). Three draws."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    b, c, s = (_uniform(generator, lo, hi) for _ in range(3))
    return adjust_color(to_float(image), b, c, s)


# ----------------------------------------------------------------------------------------------------
# Pipelines used by SegDataset.
# ----------------------------------------------------------------------------------------------------
class TrainTransform:
    """Training augmentation; output image float32 normalised [3, crop_h, crop_w], label int64.

    ``scale_range=None`` disables rescaling, ``crop_size=None`` disables crop+pad (then samples keep
    their own size and cannot be batched unless all images match).
    """

    def __init__(
        self,
        crop_size: int | Sequence[int] | None = (512, 512),
        scale_range: Sequence[float] | None = (0.5, 2.0),
        base_size: int | None = None,
        flip: bool = True,
        jitter: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop_size = checked_hw(crop_size, "crop_size") if crop_size is not None else None
        if scale_range is not None:
            if len(scale_range) != 2 or not 0 < float(scale_range[0]) <= float(scale_range[1]):
                raise ValueError(f"scale_range must be [lo, hi] with 0 < lo <= hi, got {scale_range!r}")
            scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale_range = scale_range
        if base_size is not None and (isinstance(base_size, bool) or int(base_size) <= 0):
            raise ValueError(f"base_size must be a positive int or null, got {base_size!r}")
        self.base_size = int(base_size) if base_size is not None else None
        self.flip = bool(flip)
        if float(jitter) < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter!r}")
        self.jitter = float(jitter)
        self.mean, self.std = _check_stats(mean, std)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale_range is not None:
            image, label = random_rescale(image, label, self.scale_range, self.base_size, generator)
        if self.crop_size is not None:
            image, label = random_crop(image, label, self.crop_size, generator)
        image = to_float(image)
        if self.jitter > 0:
            image = random_jitter(image, self.jitter, generator)
        image = normalize(image, self.mean, self.std)
        if self.crop_size is not None:
            image, label = pad_to(image, label, self.crop_size)
        if self.flip:
            image, label = random_hflip(image, label, generator)
        return image.contiguous(), label.contiguous()

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
            f"base_size={self.base_size}, flip={self.flip}, jitter={self.jitter})"
        )


class EvalTransform:
    """Deterministic evaluation transform.

    * ``whole``: full image, label unchanged.
    * ``resize``: image resized to ``size`` [H, W] (bilinear); the label stays at its *native* resolution,
      so metrics are always computed on the original annotation. The engine must upsample logits to the
      label size (``label.shape[-2:]``) before argmax.
    * ``center_crop``: central ``size`` window of both (padded with 0 / 255 if the image is smaller).
    """

    def __init__(
        self,
        mode: str = "whole",
        size: int | Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if mode not in EVAL_MODES:
            raise ValueError(f"eval_transform.mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
        if mode != "whole" and size is None:
            raise ValueError(f"eval_transform.mode {mode!r} needs eval_transform.size [H, W]")
        self.mode = mode
        self.size = checked_hw(size, "eval_transform.size") if size is not None else None
        self.mean, self.std = _check_stats(mean, std)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "resize":
            assert self.size is not None
            image = resize_image(to_float(image), self.size)
            return normalize(image, self.mean, self.std).contiguous(), label
        if self.mode == "center_crop":
            assert self.size is not None
            image = normalize(image, self.mean, self.std)
            image, label = center_crop(image, label, self.size)
            return image.contiguous(), label.contiguous()
        return normalize(image, self.mean, self.std), label

    def __repr__(self) -> str:
        return f"EvalTransform(mode={self.mode!r}, size={self.size})"


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} / {list(std)}")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std values must be > 0, got {list(std)}")
    return mean_t, std_t
