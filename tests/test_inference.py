"""predict_logits (whole / slide / center_crop, multi-scale, flip) and evaluate()."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from c2vkd import IGNORE_INDEX
from c2vkd.eval.inference import center_crop_box, crop_labels_like, evaluate, predict_logits, slide_windows

K = 4


def pointwise_model() -> nn.Module:
    return nn.Conv2d(3, K, 1)  # exactly translation (and flip) equivariant


def conv3_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, K, 3, padding=1))


def naive_slide(model, x, window, stride):
    """Reference written independently: start offsets range(0, H-wh+1, sh) plus a border-clamped last
    window; each window forwarded on its own; pad small images with zeros bottom/right."""
    h, w = x.shape[-2:]
    wh, ww = window
    sh, sw = stride
    xp = F.pad(x, (0, max(ww - w, 0), 0, max(wh - h, 0)))
    H, W = xp.shape[-2:]

    def starts(n, win, st):
        s = list(range(0, n - win + 1, st))
        if s[-1] + win < n:
            s.append(n - win)
        return s

    total = torch.zeros(x.shape[0], K, H, W)
    count = torch.zeros(H, W)
    for y in starts(H, wh, sh):
        for xx in starts(W, ww, sw):
            out = model(xp[:, :, y : y + wh, xx : xx + ww])
            for i in range(wh):
                for j in range(ww):
                    total[:, :, y + i, xx + j] += out[:, :, i, j]
                    count[y + i, xx + j] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def test_whole_is_model_output_and_no_graph():
    m = conv3_model()
    x = torch.randn(2, 3, 12, 17)
    out = predict_logits(m, x)
    assert torch.equal(out, m(x))
    assert not out.requires_grad
    # multi-scale with only 1.0 equals whole, bit for bit
    assert torch.equal(predict_logits(m, x, scales=(1.0,)), out)


def test_no_graph_without_caller_no_grad():
    m = conv3_model()
    out = predict_logits(m, torch.randn(1, 3, 8, 8))
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize(
    "size,window,stride",
    [((32, 48), (16, 16), (16, 16)),  # exact tiling
     ((30, 45), (16, 20), (10, 12)),  # overlapping + clamped last window
     ((30, 45), (16, 20), None)],  # stride defaults to window; last window overlaps
)
def test_slide_equals_whole_for_pointwise(size, window, stride):
    m = pointwise_model()
    x = torch.randn(2, 3, *size)
    whole = predict_logits(m, x)
    slide = predict_logits(m, x, mode="slide", window=window, stride=stride, window_batch=3)
    assert slide.shape == whole.shape
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_windows_grid_mmseg():
    # H=30, wh=16, sh=10: h_grids = (30-16+9)//10+1 = 3 -> starts 0, 10, clamped 14
    boxes = slide_windows((30, 16), (16, 16), (10, 10))
    assert [(b[0], b[1]) for b in boxes] == [(0, 16), (10, 26), (14, 30)]
    assert all(b[2:] == (0, 16) for b in boxes)


@pytest.mark.parametrize(
    "size,window,stride",
    [((22, 29), (12, 14), (8, 9)), ((24, 28), (12, 14), (12, 14))],
)
@torch.no_grad()
def test_slide_conv3_matches_naive_and_differs_from_whole(size, window, stride):
    m = conv3_model()
    x = torch.randn(2, 3, *size)
    slide = predict_logits(m, x, mode="slide", window=window, stride=stride, window_batch=2)
    ref = naive_slide(m, x, window, stride)
    torch.testing.assert_close(slide, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(slide, m(x), atol=1e-4)  # zero padding at window borders matters


@pytest.mark.parametrize("size", [(10, 12), (10, 30), (25, 9)])
@torch.no_grad()
def test_slide_image_smaller_than_window(size):
    m = conv3_model()
    x = torch.randn(1, 3, *size)
    window, stride = (16, 16), (8, 8)
    out = predict_logits(m, x, mode="slide", window=window, stride=stride)
    assert out.shape == (1, K, *size)
    torch.testing.assert_close(out, naive_slide(m, x, window, stride), rtol=1e-5, atol=1e-5)
    if size == (10, 12):  # single padded window: exactly model(pad(x)) cropped
        ref = m(F.pad(x, (0, 4, 0, 6)))[:, :, :10, :12]
        torch.testing.assert_close(out, ref)


class LowRes(nn.Module):
    """Predicts at 1/2 resolution (like a stride-2 head)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, stride=2, padding=1)

    def forward(self, x):
        return {"logits": self.conv(x)}


@torch.no_grad()
def test_low_res_output_upsampled_and_out_size():
    m = LowRes()
    x = torch.randn(2, 3, 16, 20)
    out = predict_logits(m, x)
    ref = F.interpolate(m.conv(x), size=(16, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref)
    big = predict_logits(m, x, out_size=(32, 40))
    torch.testing.assert_close(big, F.interpolate(ref, size=(32, 40), mode="bilinear", align_corners=False))
    # slide with a low-res model: each window upsampled to window size before averaging
    s = predict_logits(m, x, mode="slide", window=(8, 10), stride=(8, 10))
    assert s.shape == (2, K, 16, 20)
    for y0, x0 in ((0, 0), (0, 10), (8, 0), (8, 10)):  # exact tiling: each tile is its own upsampled forward
        tile = F.interpolate(m.conv(x[:, :, y0:y0 + 8, x0:x0 + 10]), size=(8, 10), mode="bilinear",
                             align_corners=False)
        torch.testing.assert_close(s[:, :, y0:y0 + 8, x0:x0 + 10], tile)


@torch.no_grad()
def test_flip_with_flip_equivariant_model():
    torch.manual_seed(2)
    m = nn.Conv2d(3, K, 3, padding=1)
    m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)  # horizontally symmetric kernel
    x = torch.randn(2, 3, 12, 15)
    whole = m(x)
    torch.testing.assert_close(predict_logits(m, x, flip=True, tta_merge="logit"), whole, rtol=1e-5, atol=1e-5)
    prob = predict_logits(m, x, flip=True)  # log of averaged probabilities
    torch.testing.assert_close(prob, whole.log_softmax(1), rtol=1e-5, atol=1e-5)
    # slide + flip too (pointwise model so slide == whole)
    p = pointwise_model()
    torch.testing.assert_close(
        predict_logits(p, x, mode="slide", window=(8, 8), stride=(5, 5), flip=True, tta_merge="logit"),
        p(x), rtol=1e-5, atol=1e-5,
    )


@torch.no_grad()
def test_flip_not_equivariant_is_average():
    m = conv3_model()
    x = torch.randn(1, 3, 10, 13)
    out = predict_logits(m, x, flip=True, tta_merge="logit")
    torch.testing.assert_close(out, (m(x) + m(x.flip(-1)).flip(-1)) / 2)


@torch.no_grad()
def test_multiscale_manual():
    m = conv3_model()
    x = torch.randn(2, 3, 16, 20)
    out = predict_logits(m, x, scales=(0.5, 1.0, 1.5))
    probs = []
    for s, size in ((0.5, (8, 10)), (1.0, (16, 20)), (1.5, (24, 30))):
        xs = x if s == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        lo = m(xs)
        lo = F.interpolate(lo, size=(16, 20), mode="bilinear", align_corners=False) if s != 1.0 else lo
        probs.append(lo.softmax(1))
    ref = (sum(probs) / 3).log()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.softmax(1), sum(probs) / 3, rtol=1e-5, atol=1e-6)
    # logit averaging variant
    lo = predict_logits(m, x, scales=(0.5, 1.0), tta_merge="logit")
    ref_lo = (F.interpolate(m(F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False)), size=(16, 20),
                            mode="bilinear", align_corners=False) + m(x)) / 2
    torch.testing.assert_close(lo, ref_lo, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_center_crop():
    m = conv3_model()
    x = torch.randn(2, 3, 20, 31)
    out = predict_logits(m, x, mode="center_crop", window=(16, 16))
    assert center_crop_box((20, 31), (16, 16)) == (2, 18, 7, 23)
    torch.testing.assert_close(out, m(x[:, :, 2:18, 7:23]))
    labels = torch.arange(20 * 31).reshape(1, 20, 31)
    assert torch.equal(crop_labels_like(labels, (20, 31), (16, 16)), labels[:, 2:18, 7:23])
    # smaller than the window along H: zero pad bottom, crop the pad off
    x2 = torch.randn(1, 3, 10, 31)
    out2 = predict_logits(m, x2, mode="center_crop", window=16)
    assert out2.shape == (1, K, 10, 16)
    torch.testing.assert_close(out2, m(F.pad(x2[:, :, :, 7:23], (0, 0, 0, 6)))[:, :, :10])
    assert crop_labels_like(torch.zeros(1, 10, 31), (10, 31), 16).shape == (1, 10, 16)
    # labels at 2x the image size: the crop is mapped proportionally
    lab2 = torch.arange(40 * 62).reshape(1, 40, 62)
    assert torch.equal(crop_labels_like(lab2, (20, 31), (16, 16)), lab2[:, 4:36, 15:47])


def test_bad_arguments():
    m = pointwise_model()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="window"):
        predict_logits(m, x, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        predict_logits(m, x, mode="tiles")
    with pytest.raises(ValueError, match="num_classes"):
        predict_logits(m, x, num_classes=K + 1)
    with pytest.raises(ValueError):
        predict_logits(m, x[0])


# ----------------------------------------------------------------------------------- evaluate


class Decoder(nn.Module):
    """Channel 0 of the image holds the class to predict: logits_c = -(x0 - c)^2. Records eval mode."""

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.seen_training: list[bool] = []

    def forward(self, x):
        self.seen_training.append(self.training or self.head.training)
        c = torch.arange(K, dtype=x.dtype, device=x.device).view(1, K, 1, 1)
        return -(x[:, :1] - c) ** 2 + 0 * self.dummy


def _fake_loader(preds, labels, bs=2):
    batches = []
    for i in range(0, len(preds), bs):
        p = preds[i : i + bs]
        img = torch.zeros(p.shape[0], 3, *p.shape[-2:])
        img[:, 0] = p.float()
        batches.append({"image": img, "label": labels[i : i + bs], "name": [f"im{j}" for j in range(i, i + len(p))]})
    return batches


class _Naive:
    """Expected metrics counted pixel by pixel in plain Python (independent of c2vkd.eval.metrics)."""

    def __init__(self, preds, labels):
        mat = [[0] * K for _ in range(K)]
        for p, t in zip(preds.reshape(-1).tolist(), labels.reshape(-1).tolist()):
            if t != IGNORE_INDEX:
                mat[t][p] += 1
        self.confusion = torch.tensor(mat, dtype=torch.int64)
        ious = []
        for k in range(K):
            tp, gt, pd = mat[k][k], sum(mat[k]), sum(mat[t][k] for t in range(K))
            if gt + pd:
                ious.append(tp / (gt + pd - tp))
        self.miou = sum(ious) / len(ious)
        self.num_pixels = sum(map(sum, mat))
        self.acc = sum(mat[k][k] for k in range(K)) / self.num_pixels


def _expected(preds, labels):
    return _Naive(preds, labels)


def test_evaluate_metrics_and_restores_modes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K - 1, (5, 6, 7), generator=g)
    labels[:, 0, :3] = IGNORE_INDEX
    preds = torch.where(torch.rand(5, 6, 7, generator=g) < 0.6, labels, torch.randint(0, K, (5, 6, 7), generator=g))
    preds = torch.where(preds == IGNORE_INDEX, torch.zeros_like(preds), preds)
    loader = _fake_loader(preds, labels)
    model = Decoder()
    model.train()
    model.head.eval()  # a mixed state must be restored exactly
    m = evaluate(model, loader, num_classes=K, device="cpu", progress=False)
    exp = _expected(preds, labels)
    assert torch.equal(m.confusion, exp.confusion)
    assert m.miou == pytest.approx(exp.miou, rel=1e-12) and m.acc == pytest.approx(exp.acc, rel=1e-12)
    assert m.num_pixels == exp.num_pixels == 5 * 6 * 7 - 5 * 3
    assert model.training and not model.head.training
    assert model.seen_training and not any(model.seen_training)

    # max_batches, bf16 autocast on CPU, progress bar path
    m2 = evaluate(model, loader, num_classes=K, device="cpu", max_batches=1, amp="bf16", progress=True)
    assert torch.equal(m2.confusion, _expected(preds[:2], labels[:2]).confusion)
    with pytest.raises(ValueError, match="fp16"):
        evaluate(model, loader, num_classes=K, device="cpu", amp="fp16", progress=False)
    assert model.training and not model.head.training


def test_evaluate_golden_and_restores_on_error():
    labels = torch.tensor([[[0, 0, 1], [1, 2, IGNORE_INDEX]]])
    preds = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    model = Decoder().train()
    m = evaluate(model, _fake_loader(preds, labels), num_classes=K, device="cpu", progress=False)
    assert m.miou == pytest.approx(1 / 3) and m.acc == pytest.approx(0.6) and m.absent == [3]
    # a dataset whose ignore value is not 255: the evaluation must use the one it is given
    relabelled = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, 200), labels)
    m200 = evaluate(model, _fake_loader(preds, relabelled), num_classes=K, device="cpu", ignore_index=200,
                    progress=False)
    assert torch.equal(m200.confusion, m.confusion) and m200.num_pixels == 5

    bad = _fake_loader(preds, torch.full_like(labels, 9))
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, bad, num_classes=K, device="cpu", progress=False)
    assert model.training


def test_evaluate_label_size_and_modes():
    # image at half resolution of the labels: logits resized to label size (nearest-like for constant blocks)
    labels = torch.randint(0, K, (2, 8, 12))
    preds_small = torch.randint(0, K, (2, 4, 6))
    img = torch.zeros(2, 3, 4, 6)
    img[:, 0] = preds_small.float()
    loader = [{"image": img, "label": labels, "name": ["a", "b"]}]
    m = evaluate(Decoder(), loader, num_classes=K, device="cpu", progress=False)
    logits = F.interpolate(Decoder()(img), size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.equal(m.confusion, _expected(logits.argmax(1), labels).confusion)

    # slide (pointwise decoder -> same as whole) and center_crop (labels cropped identically)
    preds = torch.randint(0, K, (2, 10, 14))
    labels = torch.randint(0, K, (2, 10, 14))
    loader = _fake_loader(preds, labels)
    ms = evaluate(Decoder(), loader, num_classes=K, device="cpu", mode="slide", window=(6, 6), stride=(4, 4),
                  progress=False)
    assert torch.equal(ms.confusion, _expected(preds, labels).confusion)
    mc = evaluate(Decoder(), loader, num_classes=K, device="cpu", mode="center_crop", window=(6, 8), progress=False)
    assert mc.num_pixels == 2 * 6 * 8
    assert torch.equal(mc.confusion, _expected(preds[:, 2:8, 3:11], labels[:, 2:8, 3:11]).confusion)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_evaluate_cuda(amp):
    preds = torch.randint(0, K, (2, 10, 14))
    labels = torch.randint(0, K, (2, 10, 14))
    model = Decoder().cuda().train()
    m = evaluate(model, _fake_loader(preds, labels), num_classes=K, device="cuda", amp=amp, progress=False,
                 mode="slide", window=(6, 6), stride=(4, 4))
    assert torch.equal(m.confusion, _expected(preds, labels).confusion)
    assert model.training
