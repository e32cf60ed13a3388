"""Joint transforms: image/label alignment, padding values, determinism from the generator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from c2vkd import IGNORE_INDEX
from c2vkd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    adjust_color,
    center_crop,
    denormalize,
    hflip,
    normalize,
    pad_to,
    random_crop,
    random_hflip,
    random_jitter,
    random_rescale,
    rescale_long_side,
    resize_label,
)

K = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def encoded_pair(h: int = 48, w: int = 64, block: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image whose grey level encodes the label (value = 30 * (label + 1)), label in 8x8 blocks."""
    g = gen(seed)
    tiles = torch.randint(0, K, (-(-h // block), -(-w // block)), generator=g)
    label = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].contiguous()
    grey = (30 * (label + 1)).to(torch.uint8)
    return grey.expand(3, h, w).contiguous(), label


def decode(image: torch.Tensor) -> torch.Tensor:
    """Grey level (0..255 float) of a uint8 or normalised float image."""
    if image.dtype == torch.uint8:
        return image.float()
    return denormalize(image, IMAGENET_MEAN, IMAGENET_STD) * 255


def assert_aligned(image: torch.Tensor, label: torch.Tensor, exact: bool = False, min_checked: int = 50) -> None:
    """Image and label agree everywhere the label is locally uniform (away from resampling blur), and
    padded pixels (label 255) are image 0 after normalisation."""
    assert image.shape[-2:] == label.shape
    grey = decode(image)
    real = label != IGNORE_INDEX  # padding decodes to the mean colour, which is not grey
    assert torch.allclose(grey[0][real], grey[1][real], atol=1e-3)
    assert torch.allclose(grey[0][real], grey[2][real], atol=1e-3)
    lab = label.float()[None, None]
    if exact:
        uniform = torch.ones_like(label, dtype=torch.bool)
    else:
        # pixels whose 5x5 neighbourhood has one label: interpolation cannot blend classes there. Pixels
        # near the border are skipped: a crop may cut just inside a class boundary of the resized image.
        mx = F.max_pool2d(F.pad(lab, (2, 2, 2, 2), value=1000.0), 5, 1)[0, 0]
        mn = -F.max_pool2d(F.pad(-lab, (2, 2, 2, 2), value=1.0), 5, 1)[0, 0]
        uniform = mx == mn
    valid = uniform & (label != IGNORE_INDEX)
    assert int(valid.sum()) >= min_checked
    want = 30.0 * (label[valid].float() + 1)
    assert torch.allclose(grey[0][valid], want, atol=1.0), (grey[0][valid] - want).abs().max()
    pad = label == IGNORE_INDEX
    if pad.any():
        assert torch.all(image[:, pad] == 0)


# ------------------------------------------------------------------------------- building blocks
def test_normalize_roundtrip():
    img, _ = encoded_pair()
    x = normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    assert x.dtype == torch.float32
    assert torch.allclose(denormalize(x, IMAGENET_MEAN, IMAGENET_STD) * 255, img.float(), atol=1e-3)


@pytest.mark.parametrize("long_side", [32, 40, 97, 128])
def test_rescale_long_side_keeps_aspect_and_alignment(long_side):
    img, lbl = encoded_pair(block=16)
    out_img, out_lbl = rescale_long_side(img, lbl, long_side)
    assert max(out_img.shape[-2:]) == long_side
    assert out_img.shape[-2:] == out_lbl.shape and out_img.dtype == torch.uint8
    assert abs(out_img.shape[-2] / out_img.shape[-1] - 48 / 64) < 0.05
    assert set(out_lbl.unique().tolist()) <= set(lbl.unique().tolist())  # nearest never invents classes
    assert_aligned(out_img, out_lbl, min_checked=10)


def test_resize_label_is_pixel_centre_aligned():
    lbl = torch.arange(4).repeat_interleave(2)[None].repeat(2, 1)  # 2x8: 0 0 1 1 2 2 3 3
    assert resize_label(lbl, (2, 4)).tolist() == [[0, 1, 2, 3]] * 2
    assert resize_label(torch.tensor([[0, 1]]), (1, 4)).tolist() == [[0, 0, 1, 1]]


def test_random_rescale_range_and_determinism():
    img, lbl = encoded_pair()
    sizes = set()
    for s in range(20):
        a = random_rescale(img, lbl, (0.5, 2.0), None, gen(s))
        b = random_rescale(img, lbl, (0.5, 2.0), None, gen(s))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert 32 <= max(a[0].shape[-2:]) <= 128
        sizes.add(a[0].shape)
    assert len(sizes) > 5
    # base_size sets the long side before scaling
    out, _ = random_rescale(img, lbl, (1.0, 1.0), 200, gen(0))
    assert max(out.shape[-2:]) == 200


def test_pad_to_values_and_noop():
    img = torch.randn(3, 5, 7)
    lbl = torch.zeros(5, 7, dtype=torch.long)
    pi, pl = pad_to(img, lbl, (8, 9))
    assert pi.shape == (3, 8, 9) and pl.shape == (8, 9)
    assert torch.equal(pi[:, :5, :7], img) and torch.all(pi[:, 5:] == 0) and torch.all(pi[:, :, 7:] == 0)
    assert torch.all(pl[5:] == IGNORE_INDEX) and torch.all(pl[:, 7:] == IGNORE_INDEX) and torch.all(pl[:5, :7] == 0)
    same = pad_to(img, lbl, (3, 3))
    assert same[0] is img and same[1] is lbl


def test_random_crop_alignment_and_bounds():
    img, lbl = encoded_pair()
    tops = set()
    for s in range(10):
        ci, cl = random_crop(img, lbl, (20, 30), gen(s))
        assert ci.shape == (3, 20, 30) and cl.shape == (20, 30)
        assert_aligned(ci, cl, exact=True)
        # the window is a real window of the input
        hit = [(t, l) for t in range(48 - 19) for l in range(64 - 29) if torch.equal(lbl[t : t + 20, l : l + 30], cl)]
        assert hit
        tops.add(hit[0])
    assert len(tops) > 3
    small = random_crop(img, lbl, (100, 100), gen(0))  # larger than the input: whole image
    assert small[0].shape == (3, 48, 64)


def test_hflip_and_center_crop():
    img, lbl = encoded_pair()
    fi, fl = hflip(img, lbl)
    assert torch.equal(fl, lbl.flip(-1)) and torch.equal(fi, img.flip(-1))
    flips = [torch.equal(random_hflip(img, lbl, gen(s))[1], fl) for s in range(20)]
    assert 0 < sum(flips) < 20
    x = normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    ci, cl = center_crop(x, lbl, (16, 20))
    assert torch.equal(cl, lbl[16:32, 22:42])
    assert_aligned(ci, cl, exact=True)
    pi, pl = center_crop(x, lbl, (60, 64))  # taller than the image: padded, then centred
    assert pi.shape == (3, 60, 64) and (pl == IGNORE_INDEX).sum() == 12 * 64
    assert_aligned(pi, pl, exact=True)


def test_jitter_changes_image_only_within_range():
    img, _ = encoded_pair()
    a = random_jitter(img, 0.4, gen(1))
    b = random_jitter(img, 0.4, gen(1))
    c = random_jitter(img, 0.4, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.dtype == torch.float32
    assert torch.equal(adjust_color(img.float() / 255), img.float() / 255)


# ------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("seed", range(6))
def test_train_transform_alignment_and_padding(seed):
    img, lbl = encoded_pair(block=16, seed=seed)
    t = TrainTransform(crop_size=(40, 56), scale_range=(0.5, 1.5), flip=True)
    out_img, out_lbl = t(img, lbl, gen(seed))
    assert out_img.shape == (3, 40, 56) and out_lbl.shape == (40, 56)
    assert out_img.dtype == torch.float32 and out_lbl.dtype == torch.int64
    assert_aligned(out_img, out_lbl, min_checked=20)


def test_train_transform_pads_small_images_with_zero_and_ignore():
    img, lbl = encoded_pair(16, 20, block=4)
    t = TrainTransform(crop_size=32, scale_range=None, flip=False)
    out_img, out_lbl = t(img, lbl, gen(0))
    assert torch.equal(out_lbl[:16, :20], lbl)
    assert torch.all(out_lbl[16:] == IGNORE_INDEX) and torch.all(out_lbl[:, 20:] == IGNORE_INDEX)
    assert torch.all(out_img[:, 16:] == 0) and torch.all(out_img[:, :, 20:] == 0)
    assert_aligned(out_img, out_lbl, exact=True)


def test_train_transform_determinism():
    img, lbl = encoded_pair()
    t = TrainTransform(crop_size=(32, 32), scale_range=(0.5, 2.0), jitter=0.3)
    a = t(img, lbl, gen(7))
    b = t(img, lbl, gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outs = [t(img, lbl, gen(s)) for s in range(8)]
    assert len({o[1].numpy().tobytes() for o in outs}) > 4  # different seeds, different samples


def test_eval_transform_modes():
    img, lbl = encoded_pair()
    whole = EvalTransform("whole")(img, lbl)
    assert whole[0].shape == (3, 48, 64) and torch.equal(whole[1], lbl)
    assert_aligned(*whole, exact=True)
    ri, rl = EvalTransform("resize", size=[24, 40])(img, lbl)
    assert ri.shape == (3, 24, 40) and torch.equal(rl, lbl)  # label stays at native resolution
    ci, cl = EvalTransform("center_crop", size=[32, 32])(img, lbl)
    assert ci.shape == (3, 32, 32) and torch.equal(cl, lbl[8:40, 16:48])


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="eval_transform.mode"):
        EvalTransform("tiles")
    with pytest.raises(ValueError, match="needs eval_transform.size"):
        EvalTransform("resize")
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(0, 5))
    with pytest.raises(ValueError, match="mean and std"):
        TrainTransform(mean=(0.5,))
