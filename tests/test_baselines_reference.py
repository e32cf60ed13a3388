"""Every baseline *module* against a transcription of its reference code's arithmetic (issue 12).

Each ``ref_*`` function below is re-typed from the public reference (repository, file and function named in
its docstring), in float64, with the reference's pooling, resolution and reduction -- never by calling our
loss functions. The modules are built with NON-default settings (temperature, target source, ignore index,
``at: stride | input``, ``on: features``, pooling, weights) and fed random inputs with ignore pixels, so a
dropped or swapped argument changes the number and fails.
"""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from c2vkd.losses.adversarial import AdversarialLoss
from c2vkd.losses.base import LOSSES, LossContext, LossInputs

IGN = 7          # a non-default ignore index (the modules read it from the LossContext)
K = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def _labels(b: int, h: int, w: int, n_ignore: int) -> torch.Tensor:
    t = torch.randint(0, K, (b, h, w))
    flat = t.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignore]] = IGN
    return t


def _nearest(labels: torch.Tensor, size) -> torch.Tensor:
    """nn.Upsample(size, mode='nearest') on labels, as CIRKD / IFVD downsample them."""
    return nn.Upsample(size=size, mode="nearest")(labels[:, None].double())[:, 0].long()


def _ctx(**shapes) -> LossContext:
    return LossContext(num_classes=K, ignore_index=IGN, student_shapes=shapes.get("s", {}),
                       teacher_shapes=shapes.get("t", {}), input_size=(32, 40))


def _inputs(zs_up, zt_up, target, s_feats=None, t_feats=None) -> LossInputs:
    return LossInputs(student_logits=zs_up, target=target, teacher_logits=zt_up,
                      student_feats=dict(s_feats or {}), teacher_feats=dict(t_feats or {}))


@pytest.fixture()
def logit_batch():
    """Logits at two strides (student 1/4 of 32x40 -> 8x10, teacher 1/8 -> 4x5) plus their upsampled outputs,
    labels at 32x40 with ignore pixels."""
    zs = (torch.randn(2, K, 8, 10) * 2).requires_grad_(True)
    zt = torch.randn(2, K, 4, 5) * 2
    up = lambda z: F.interpolate(z, size=(32, 40), mode="bilinear", align_corners=False)  # noqa: E731
    target = _labels(2, 32, 40, 300)
    return zs, zt, up(zs), up(zt), target


# ------------------------------------------------------------------------------------ KD (CIRKD)
def ref_kd(pred: torch.Tensor, soft: torch.Tensor, T: float) -> float:
    """winycg/CIRKD losses/kd.py CriterionKD.forward: permute to [B*h*w, C], log_softmax / softmax at T,
    F.kl_div(..., reduction='batchmean') * T^2 (every pixel counts)."""
    B, C, h, w = soft.size()
    scale_pred = pred.double().permute(0, 2, 3, 1).contiguous().view(-1, C)
    scale_soft = soft.double().permute(0, 2, 3, 1).contiguous().view(-1, C)
    p_s = F.log_softmax(scale_pred / T, dim=1)
    p_t = F.softmax(scale_soft / T, dim=1)
    return (F.kl_div(p_s, p_t, reduction="batchmean") * T ** 2).item()


def ref_kd_masked(pred, soft, labels, T) -> float:
    """The same KL per pixel, averaged over the pixels whose label is not the ignore index (our option)."""
    C = soft.shape[1]
    p_s = F.log_softmax(pred.double().permute(0, 2, 3, 1).reshape(-1, C) / T, dim=1)
    p_t = F.softmax(soft.double().permute(0, 2, 3, 1).reshape(-1, C) / T, dim=1)
    kl = (p_t * (p_t.log() - p_s)).sum(1)
    keep = labels.reshape(-1) != IGN
    return (kl[keep].mean() * T ** 2).item()


def test_kd_module_at_stride_and_input(logit_batch) -> None:
    zs, zt, zs_up, zt_up, target = logit_batch
    inp = _inputs(zs_up, zt_up, target, {"logits": zs}, {"logits": zt})
    # at: stride -> student resized (bilinear) to the teacher's 4x5, all pixels (the preset's setting)
    got = LOSSES.get("kd")(_ctx(), temperature=2.5, at="stride", mask_ignore=False)(inp)["kd"]
    zs_t = F.interpolate(zs.double(), size=(4, 5), mode="bilinear", align_corners=False)
    assert got.item() == pytest.approx(ref_kd(zs_t, zt, 2.5), rel=1e-5)
    # stride + ignore masking with labels nearest-downsampled; the ignore index comes from the context
    got = LOSSES.get("kd")(_ctx(), temperature=2.5, at="stride")(inp)["kd"]
    assert got.item() == pytest.approx(ref_kd_masked(zs_t, zt, _nearest(target, (4, 5)), 2.5), rel=1e-5)
    # at: input -> the upsampled outputs
    got = LOSSES.get("kd")(_ctx(), temperature=0.7, at="input")(inp)["kd"]
    assert got.item() == pytest.approx(ref_kd_masked(zs_up, zt_up, target, 0.7), rel=1e-5)
    assert LOSSES.get("kd").taps({"at": "stride"}) == (["logits"], ["logits"])
    assert LOSSES.get("kd").taps({}) == ([], [])


# ------------------------------------------------------------------------------------ DKD (mdistiller)
def ref_dkd(logits_student, logits_teacher, target, alpha, beta, temperature) -> float:
    """megvii-research/mdistiller mdistiller/distillers/DKD.py dkd_loss (+ _get_gt_mask, _get_other_mask,
    cat_mask) on [N, K] rows: KL sums / N * T^2, the target logit removed with -1000 * gt_mask."""
    logits_student, logits_teacher = logits_student.double(), logits_teacher.double()
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature ** 2 / target.shape[0]
    pt2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    ls2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * temperature ** 2 / target.shape[0]
    return (alpha * tckd + beta * nckd).item()


def _rows(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_dkd_module_ground_truth_target_differs_from_teacher_argmax(logit_batch) -> None:
    _, _, zs_up, zt_up, target = logit_batch
    # make the label disagree with the teacher's argmax on most valid pixels
    target = torch.where(target == IGN, target, (zt_up.argmax(1) + 1 + target % (K - 1)) % K)
    valid = target.reshape(-1) != IGN
    assert (target.reshape(-1)[valid] != zt_up.argmax(1).reshape(-1)[valid]).float().mean() > 0.9
    inp = _inputs(zs_up, zt_up, target)
    got = LOSSES.get("dkd")(_ctx(), alpha=0.3, beta=2.0, temperature=2.0)(inp)["dkd"]   # default: gt target
    want = ref_dkd(_rows(zs_up)[valid], _rows(zt_up)[valid], target.reshape(-1)[valid], 0.3, 2.0, 2.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # target_source: teacher uses the teacher's argmax instead: a different number, equal to its reference
    got_t = LOSSES.get("dkd")(_ctx(), alpha=0.3, beta=2.0, temperature=2.0, target_source="teacher")(inp)["dkd"]
    want_t = ref_dkd(_rows(zs_up)[valid], _rows(zt_up)[valid], zt_up.argmax(1).reshape(-1)[valid], 0.3, 2.0, 2.0)
    assert got_t.item() == pytest.approx(want_t, rel=1e-5)
    assert abs(want_t - want) > 0.1 * abs(want)


# ------------------------------------------------------------------------------------ CWD (CIRKD)
def ref_cwd(preds_S, preds_T, conv_weight, temperature) -> float:
    """winycg/CIRKD losses/cwd.py CriterionCWD.forward (norm_type='channel', divergence='kl'): n, c from the
    student BEFORE its optional 1x1 conv; softmax over h*w of x / T; KLDivLoss(sum) / (n * c) * T^2."""
    n, c, h, w = preds_S.shape
    preds_S, preds_T = preds_S.double(), preds_T.double()
    if conv_weight is not None:
        preds_S = F.conv2d(preds_S, conv_weight.double())
    norm_s = (preds_S / temperature).reshape(n, preds_S.shape[1], -1).softmax(dim=-1)
    norm_t = (preds_T / temperature).reshape(n, preds_T.shape[1], -1).softmax(dim=-1)
    loss = nn.KLDivLoss(reduction="sum")(norm_s.log(), norm_t)
    return (loss / (n * c) * temperature ** 2).item()


def test_cwd_module_logits_at_stride_and_features(logit_batch) -> None:
    zs, zt, zs_up, zt_up, target = logit_batch
    inp = _inputs(zs_up, zt_up, target, {"logits": zs}, {"logits": zt})
    got = LOSSES.get("cwd")(_ctx(), temperature=2.5, at="stride")(inp)
    zs_t = F.interpolate(zs.double(), size=(4, 5), mode="bilinear", align_corners=False)
    assert set(got) == {"cwd"} and got["cwd"].item() == pytest.approx(ref_cwd(zs_t, zt, None, 2.5), rel=1e-5)
    got = LOSSES.get("cwd")(_ctx(), temperature=1.5)(inp)["cwd"]          # at: input (module default)
    assert got.item() == pytest.approx(ref_cwd(zs_up, zt_up, None, 1.5), rel=1e-5)
    # on features, channels differ (6 -> 9): 1x1 conv, divisor = B x the student's 6 channels
    fs, ft = torch.randn(2, 6, 4, 5), torch.randn(2, 9, 4, 5)
    ctx = _ctx(s={"decoder": (2, 6, 4, 5)}, t={"decoder": (2, 9, 4, 5)})
    mod = LOSSES.get("cwd")(ctx, weight=50.0, temperature=3.0, on="features", student_tap="decoder",
                            teacher_tap="decoder")
    assert mod.weights == {"cwd_feat": 50.0}
    out = mod(_inputs(zs_up, zt_up, target, {"decoder": fs}, {"decoder": ft}))["cwd_feat"]
    assert out.item() == pytest.approx(ref_cwd(fs, ft, mod.adapter.proj.weight.detach(), 3.0), rel=1e-5)
    mean = LOSSES.get("cwd")(ctx, temperature=3.0, on="features", student_tap="decoder", teacher_tap="decoder",
                             reduction="mean")
    mean.adapter.load_state_dict(mod.adapter.state_dict())
    out_mean = mean(_inputs(zs_up, zt_up, target, {"decoder": fs}, {"decoder": ft}))["cwd_feat"]
    assert out_mean.item() == pytest.approx(out.item() * 6 / 9, rel=1e-6)
    # equal channels: no projection at all (adapter auto), as CriterionCWD
    same = LOSSES.get("cwd")(_ctx(s={"feat": (2, 9, 4, 5)}, t={"feat": (2, 9, 4, 5)}), on="features")
    assert not list(same.parameters())
    fs9 = torch.randn(2, 9, 4, 5)
    assert same(_inputs(zs_up, zt_up, target, {"feat": fs9}, {"feat": ft}))["cwd_feat"].item() == pytest.approx(
        ref_cwd(fs9, ft, None, 4.0), rel=1e-5)


# ------------------------------------------------------------------------------------ DIST (DIST_KD)
def ref_dist(y_s, y_t, beta, gamma, tau) -> float:
    """hunto/DIST_KD segmentation/losses/dist_kd.py DIST.forward (+ cosine_similarity, pearson_correlation,
    inter/intra_class_relation) on y.transpose(1, 3).reshape(-1, K); tau as in classification/.../dist_kd.py."""
    def cosine_similarity(x, y, eps=1e-8):
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)

    def pearson_correlation(x, y, eps=1e-8):
        return cosine_similarity(x - x.mean(1).unsqueeze(1), y - y.mean(1).unsqueeze(1), eps)

    def inter_class_relation(a, b):
        return 1 - pearson_correlation(a, b).mean()

    def intra_class_relation(a, b):
        return inter_class_relation(a.transpose(0, 1), b.transpose(0, 1))

    num_classes = y_s.shape[1]
    y_s = y_s.double().transpose(1, 3).reshape(-1, num_classes)
    y_t = y_t.double().transpose(1, 3).reshape(-1, num_classes)
    y_s = (y_s / tau).softmax(dim=1)
    y_t = (y_t / tau).softmax(dim=1)
    return (tau ** 2 * (beta * inter_class_relation(y_s, y_t) + gamma * intra_class_relation(y_s, y_t))).item()


def test_dist_module_at_stride(logit_batch) -> None:
    zs, zt, zs_up, zt_up, target = logit_batch
    inp = _inputs(zs_up, zt_up, target, {"logits": zs}, {"logits": zt})
    got = LOSSES.get("dist")(_ctx(), beta=0.7, gamma=1.3, temperature=2.0, at="stride", mask_ignore=False)(inp)
    zs_t = F.interpolate(zs.double(), size=(4, 5), mode="bilinear", align_corners=False)
    assert got["dist"].item() == pytest.approx(ref_dist(zs_t, zt, 0.7, 1.3, 2.0), rel=1e-5)
    # with ignore masking, the reference applied to the valid pixels only (a [1, K, n_valid, 1] map)
    masked = LOSSES.get("dist")(_ctx(), beta=0.7, gamma=1.3, temperature=2.0, at="stride")(inp)["dist"]
    keep = _nearest(target, (4, 5)).reshape(-1) != IGN
    sel = lambda z: _rows(z)[keep].T[None, :, :, None]  # noqa: E731
    assert masked.item() == pytest.approx(ref_dist(sel(zs_t), sel(zt.double()), 0.7, 1.3, 2.0), rel=1e-5)


# ------------------------------------------------------------------------------------ SKD (CIRKD)
def ref_skd(feat_S, feat_T) -> float:
    """winycg/CIRKD losses/skd.py CriterionStructuralKD.forward: MaxPool2d(2, 2, ceil_mode=True),
    F.normalize over C, bmm similarity per image, ((S_S - S_T)^2).mean()."""
    maxpool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
    feat_S = F.normalize(maxpool(feat_S.double()), p=2, dim=1)
    feat_T = F.normalize(maxpool(feat_T.double()), p=2, dim=1)

    def sim(fea):
        B, C, H, W = fea.size()
        fea = fea.reshape(B, C, -1)
        return torch.bmm(fea.transpose(1, 2), fea)

    return ((sim(feat_S) - sim(feat_T)) ** 2).mean().item()


def test_skd_module_cirkd_pooling_and_resize() -> None:
    fs, ft = torch.randn(2, 6, 4, 5), torch.randn(2, 11, 7, 9)   # strides differ; odd sizes -> ceil mode
    ctx = _ctx(s={"decoder": (2, 6, 4, 5)}, t={"decoder": (2, 11, 7, 9)})
    mod = LOSSES.get("skd")(ctx, weight=10.0, student_tap="decoder", teacher_tap="decoder")
    out = mod(_inputs(None, None, None, {"decoder": fs}, {"decoder": ft}))["skd"]
    fs_t = F.interpolate(fs.double(), size=(7, 9), mode="bilinear", align_corners=False)
    assert out.item() == pytest.approx(ref_skd(fs_t, ft), rel=1e-5)
    other = LOSSES.get("skd")(ctx, pool_kernel=3, student_tap="decoder", teacher_tap="decoder")
    assert abs(other(_inputs(None, None, None, {"decoder": fs}, {"decoder": ft}))["skd"].item() - out.item()) > 1e-4


# ------------------------------------------------------------------------------------ IFVD (CIRKD)
def ref_ifvd(feat_S, feat_T, target, num_classes) -> float:
    """winycg/CIRKD losses/ifvd.py CriterionIFV.forward (labels nearest-upsampled to the feature size, class
    loop 0..K-1, prototypes with + 1e-6, nn.CosineSimilarity(dim=1), nn.MSELoss over all pixels)."""
    feat_S, feat_T = feat_S.double(), feat_T.double()
    size_f = (feat_S.shape[2], feat_S.shape[3])
    tar_feat_S = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).double()).expand(feat_S.size())
    tar_feat_T = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).double()).expand(feat_T.size())
    center_feat_S, center_feat_T = feat_S.clone(), feat_T.clone()
    for i in range(num_classes):
        mask_feat_S = (tar_feat_S == i).double()
        mask_feat_T = (tar_feat_T == i).double()
        center_feat_S = (1 - mask_feat_S) * center_feat_S + mask_feat_S * ((mask_feat_S * feat_S).sum(-1).sum(-1) / (
            mask_feat_S.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
        center_feat_T = (1 - mask_feat_T) * center_feat_T + mask_feat_T * ((mask_feat_T * feat_T).sum(-1).sum(-1) / (
            mask_feat_T.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    return nn.MSELoss()(cos(feat_S, center_feat_S), cos(feat_T, center_feat_T)).item()


def test_ifvd_module_no_adapter_different_channels() -> None:
    fs, ft = torch.randn(2, 6, 5, 6), torch.randn(2, 11, 5, 6)     # channel counts differ, no adapter
    target = _labels(2, 20, 24, 150)
    ctx = _ctx(s={"decoder": (2, 6, 5, 6)}, t={"decoder": (2, 11, 5, 6)})
    mod = LOSSES.get("ifvd")(ctx, weight=20.0, mean_over="all", student_tap="decoder", teacher_tap="decoder")
    assert not list(mod.parameters())
    out = mod(_inputs(None, None, target, {"decoder": fs}, {"decoder": ft}))["ifvd"]
    # the reference knows no ignore index: our ignore pixels keep their own feature as centre (cos 1 in both
    # networks, error 0) exactly like a label outside 0..K-1 there
    assert out.item() == pytest.approx(ref_ifvd(fs, ft, target, K), rel=1e-5)
    # ignore index from the context: the same map with IGN relabelled to a real class gives another number
    relabel = mod(_inputs(None, None, torch.where(target == IGN, 0, target), {"decoder": fs}, {"decoder": ft}))["ifvd"]
    assert abs(relabel.item() - out.item()) > 1e-5


# ------------------------------------------------------------------------------------ FitNet / AT (CIRKD)
def test_fitnet_module_matches_cirkd() -> None:
    """winycg/CIRKD losses/fitnet.py CriterionFitNet.forward: 1x1 conv (no bias), ((s - t)^2).mean()."""
    fs, ft = torch.randn(2, 6, 5, 6), torch.randn(2, 11, 5, 6)
    mod = LOSSES.get("fitnet")(_ctx(s={"decoder": (2, 6, 5, 6)}, t={"decoder": (2, 11, 5, 6)}), weight=10.0,
                               student_tap="decoder", teacher_tap="decoder")
    out = mod(_inputs(None, None, None, {"decoder": fs}, {"decoder": ft}))["fitnet"]
    want = ((F.conv2d(fs.double(), mod.adapter.proj.weight.detach().double()) - ft.double()) ** 2).mean().item()
    assert out.item() == pytest.approx(want, rel=1e-5) and mod.weights == {"fitnet": 10.0}


def test_at_module_matches_cirkd() -> None:
    """winycg/CIRKD losses/at.py CriterionAT.forward: at(f) = F.normalize(f.pow(2).mean(1).view(B, -1)),
    (at(s) - at(t)).pow(2).mean(); the preset's weight 10000 with beta 2 makes our raw term exactly this."""
    fs, ft = torch.randn(2, 6, 5, 6), torch.randn(2, 11, 5, 6)

    def at(f):
        return F.normalize(f.double().pow(2).mean(1).view(f.size(0), -1))

    mod = LOSSES.get("at")(_ctx(s={"decoder": (2, 6, 5, 6)}, t={"decoder": (2, 11, 5, 6)}), weight=10000.0, beta=2.0,
                           student_tap="decoder", teacher_tap="decoder")
    out = mod(_inputs(None, None, None, {"decoder": fs}, {"decoder": ft}))["at"]
    assert out.item() == pytest.approx((at(fs) - at(ft)).pow(2).mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------ CIRKD
def ref_cirkd_minibatch(feat_S, feat_T, temperature, min_size) -> float:
    """winycg/CIRKD losses/cirkd_mini_batch.py CriterionMiniBatchCrossImagePair.forward (HEAD): AvgPool2d(4, 4,
    ceil_mode=True) when H, W >= 256 (``min_size`` here, so the rule runs on small maps), F.normalize, for
    every (i, j): KL(softmax(S_T_ij / tau) || softmax(S_S_ij / tau)) batchmean; sum / B^2."""
    B, C, H, W = feat_S.size()
    feat_S, feat_T = feat_S.double(), feat_T.double()
    if H >= min_size and W >= min_size:
        avg_pool = nn.AvgPool2d(kernel_size=(4, 4), stride=(4, 4), padding=0, ceil_mode=True)
        feat_S, feat_T = avg_pool(feat_S), avg_pool(feat_T)
    feat_S = F.normalize(feat_S, p=2, dim=1)
    feat_T = F.normalize(feat_T, p=2, dim=1)

    def pair_wise_sim_map(fea_0, fea_1):
        c = fea_0.shape[0]
        return torch.mm(fea_0.reshape(c, -1).transpose(0, 1), fea_1.reshape(c, -1))

    sim_dis = 0.0
    for i in range(B):
        for j in range(B):
            p_s = F.log_softmax(pair_wise_sim_map(feat_S[i], feat_S[j]) / temperature, dim=1)
            p_t = F.softmax(pair_wise_sim_map(feat_T[i], feat_T[j]) / temperature, dim=1)
            sim_dis += F.kl_div(p_s, p_t, reduction="batchmean").item()
    return sim_dis / (B * B)


@pytest.mark.parametrize("min_size", [8, 100])   # pooled / not pooled
def test_cirkd_minibatch_term_raw_student(min_size) -> None:
    fs, ft = torch.randn(3, 6, 9, 10), torch.randn(3, 11, 9, 10)   # raw student: channels may differ
    ctx = _ctx(s={"decoder": (3, 6, 9, 10)}, t={"decoder": (3, 11, 9, 10)})
    mod = LOSSES.get("cirkd")(ctx, temperature=0.2, pool_min_size=min_size, memory=False, student_tap="decoder",
                              teacher_tap="decoder", max_rows_per_chunk=7)
    out = mod(_inputs(None, None, _labels(3, 9, 10, 5), {"decoder": fs}, {"decoder": ft}))
    assert set(out) == {"cirkd_p2p"}
    assert out["cirkd_p2p"].item() == pytest.approx(ref_cirkd_minibatch(fs, ft, 0.2, min_size), rel=1e-5)


class RefStudentSegContrast:
    """winycg/CIRKD losses/cirkd_memory.py StudentSegContrast, re-typed (float64, no DDP gather): per-class
    queues, _dequeue_and_enqueue (pixel_update_freq pixels via ``this_feat[:, perm[:K]]``, the pointer rules),
    _sample_negative, contrast_sim_kd. The projection head is given as a function (BN in training mode)."""

    def __init__(self, pixel_queue, segment_queue, pixel_contrast_size, region_contrast_size, tau, kd_t, ignore):
        self.teacher_pixel_queue = pixel_queue.clone().double()
        self.teacher_segment_queue = segment_queue.clone().double()
        self.pixel_queue_ptr = torch.zeros(pixel_queue.shape[0], dtype=torch.long)
        self.segment_queue_ptr = torch.zeros(segment_queue.shape[0], dtype=torch.long)
        self.pixel_memory_size, self.region_memory_size = pixel_queue.shape[1], segment_queue.shape[1]
        self.pixel_update_freq = 16
        self.pixel_contrast_size, self.region_contrast_size = pixel_contrast_size, region_contrast_size
        self.contrast_temperature, self.contrast_kd_temperature, self.ignore_label = tau, kd_t, ignore

    def _sample_negative(self, Q, index):
        class_num, cache_size, feat_size = Q.shape
        contrast_size = index.size(0)
        X_ = torch.zeros((class_num * contrast_size, feat_size), dtype=torch.float64)
        sample_ptr = 0
        for ii in range(class_num):
            X_[sample_ptr:sample_ptr + contrast_size, ...] = Q[ii, index, :]
            sample_ptr += contrast_size
        return X_

    def _dequeue_and_enqueue(self, keys, labels):
        batch_size, feat_dim, H, W = keys.size()
        for bs in range(batch_size):
            this_feat = keys[bs].contiguous().view(feat_dim, -1)
            this_label = labels[bs].contiguous().view(-1)
            this_label_ids = [x for x in torch.unique(this_label) if x != self.ignore_label]
            for lb in this_label_ids:
                idxs = (this_label == lb).nonzero()
                feat = torch.mean(this_feat[:, idxs], dim=1).squeeze(1)
                ptr = int(self.segment_queue_ptr[lb])
                self.teacher_segment_queue[lb, ptr, :] = F.normalize(feat.view(-1), p=2, dim=0)
                self.segment_queue_ptr[lb] = (self.segment_queue_ptr[lb] + 1) % self.region_memory_size
                num_pixel = idxs.shape[0]
                perm = torch.randperm(num_pixel)
                k = min(num_pixel, self.pixel_update_freq)
                feat = torch.transpose(this_feat[:, perm[:k]], 0, 1)
                ptr = int(self.pixel_queue_ptr[lb])
                if ptr + k >= self.pixel_memory_size:
                    self.teacher_pixel_queue[lb, -k:, :] = F.normalize(feat, p=2, dim=1)
                    self.pixel_queue_ptr[lb] = 0
                else:
                    self.teacher_pixel_queue[lb, ptr:ptr + k, :] = F.normalize(feat, p=2, dim=1)
                    self.pixel_queue_ptr[lb] = (self.pixel_queue_ptr[lb] + k) % self.pixel_memory_size

    def contrast_sim_kd(self, s_logits, t_logits):
        p_s = F.log_softmax(s_logits / self.contrast_kd_temperature, dim=1)
        p_t = F.softmax(t_logits / self.contrast_kd_temperature, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * self.contrast_kd_temperature ** 2

    def forward(self, s_feats_projected, t_feats, labels):
        t_feats = F.normalize(t_feats.double(), p=2, dim=1)
        s_feats = F.normalize(s_feats_projected.double(), p=2, dim=1)
        labels = F.interpolate(labels.unsqueeze(1).double(), (s_feats.shape[2], s_feats.shape[3]),
                               mode="nearest").squeeze(1).long()
        ori_t_fea, ori_labels = t_feats, labels
        labels = labels.contiguous().view(-1)
        idxs = labels != self.ignore_label
        s_feats = s_feats.permute(0, 2, 3, 1).contiguous().view(-1, s_feats.shape[1])[idxs, :]
        t_feats = t_feats.permute(0, 2, 3, 1).contiguous().view(-1, t_feats.shape[1])[idxs, :]
        self._dequeue_and_enqueue(ori_t_fea.detach().clone(), ori_labels.detach().clone())
        class_num, pixel_queue_size, feat_size = self.teacher_pixel_queue.shape
        pixel_index = torch.randperm(pixel_queue_size)[:self.pixel_contrast_size]
        t_X_pixel_contrast = self._sample_negative(self.teacher_pixel_queue, pixel_index)
        t_pixel_logits = torch.div(torch.mm(t_feats, t_X_pixel_contrast.T), self.contrast_temperature)
        s_pixel_logits = torch.div(torch.mm(s_feats, t_X_pixel_contrast.T), self.contrast_temperature)
        class_num, region_queue_size, feat_size = self.teacher_segment_queue.shape
        region_index = torch.randperm(region_queue_size)[:self.region_contrast_size]
        t_X_region_contrast = self._sample_negative(self.teacher_segment_queue, region_index)
        t_region_logits = torch.div(torch.mm(t_feats, t_X_region_contrast.T), self.contrast_temperature)
        s_region_logits = torch.div(torch.mm(s_feats, t_X_region_contrast.T), self.contrast_temperature)
        return (self.contrast_sim_kd(s_pixel_logits, t_pixel_logits).item(),
                self.contrast_sim_kd(s_region_logits, t_region_logits).item())


def test_cirkd_memory_terms_match_reference_over_steps() -> None:
    """Three steps of the memory terms (queues filling, the block pointer wrapping) against StudentSegContrast;
    labels with ignore pixels; the same CPU RNG stream for the permutations."""
    cs, ct, h, w = 6, 4, 6, 7
    ctx = _ctx(s={"decoder": (2, cs, h, w)}, t={"decoder": (2, ct, h, w)})
    # 40 pixel slots per class: 16-pixel blocks fill 0..15, 16..31, then 32 + 16 >= 40 -> the last 16, ptr 0
    mod = LOSSES.get("cirkd")(ctx, p2p_weight=0.0, memory_size=40, region_memory_size=2, pixel_contrast_size=12,
                              region_contrast_size=7, region_temperature=0.2, region_kd_temperature=1.5,
                              pixel_sampling="reference", student_tap="decoder", teacher_tap="decoder")
    assert set(mod.weights) == {"cirkd_p2p", "cirkd_mem_p2p", "cirkd_mem_p2r"}
    head = mod.adapter.proj   # conv1x1 -> BN -> ReLU -> conv1x1 (the reference's project_head)
    ref = RefStudentSegContrast(mod.pixel_queue.bank, mod.region_queue.bank, 12 // K + 1, 7 // K + 1, 0.2, 1.5, IGN)
    for step in range(3):
        fs, ft = torch.randn(2, cs, h, w), torch.randn(2, ct, h, w)
        labels = _labels(2, h, w, 8)
        with torch.no_grad():
            x = F.conv2d(fs.double(), head[0].weight.double())
            x = F.batch_norm(x, None, None, head[1].weight.double(), head[1].bias.double(), training=True,
                             eps=head[1].eps)
            projected = F.conv2d(F.relu(x), head[3].weight.double())
        rng = torch.get_rng_state()
        got = mod(_inputs(None, None, labels, {"decoder": fs}, {"decoder": ft}))
        torch.set_rng_state(rng)
        want_pix, want_reg = ref.forward(projected, ft, labels)
        assert got["cirkd_mem_p2p"].item() == pytest.approx(want_pix, rel=1e-5), step
        assert got["cirkd_mem_p2r"].item() == pytest.approx(want_reg, rel=1e-5), step
        torch.testing.assert_close(mod.pixel_queue.bank.double(), ref.teacher_pixel_queue, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mod.region_queue.bank.double(), ref.teacher_segment_queue, rtol=1e-6, atol=1e-6)
        assert torch.equal(mod.pixel_queue.ptr, ref.pixel_queue_ptr)


# ------------------------------------------------------------------------------------ adversarial (SKD / CIRKD)
def ref_d_loss(D, s, t, mode, lambda_d, lambda_gp, alpha):
    """CIRKD losses/adv.py CriterionAdv (hinge / wgan-gp) on D(s.detach()), D(t.detach()) (train_kd.py order)
    plus SKD utils/criterion.py CriterionAdditionalGP (interpolation alpha * t + (1 - alpha) * s, grad of
    D(x) with ones, per-sample L2 norm, mean (norm - 1)^2, * lambda_gp); all * lambda_d (kd_model.py)."""
    d_out_S, d_out_T = D(s.detach()), D(t.detach())
    if mode == "wgan-gp":
        loss = -torch.mean(d_out_T) + d_out_S.mean()
    else:
        loss = torch.nn.ReLU()(1.0 - d_out_T).mean() + torch.nn.ReLU()(1.0 + d_out_S).mean()
    if mode == "wgan-gp":
        interpolated = (alpha * t.detach() + (1 - alpha) * s.detach()).requires_grad_(True)
        out = D(interpolated)
        grad = torch.autograd.grad(outputs=out, inputs=interpolated, grad_outputs=torch.ones(out.size()),
                                   retain_graph=True, create_graph=True, only_inputs=True)[0]
        grad_l2norm = torch.sqrt(torch.sum(grad.view(grad.size(0), -1) ** 2, dim=1))
        loss = loss + lambda_gp * torch.mean((grad_l2norm - 1) ** 2)
    return lambda_d * loss


@pytest.mark.parametrize("mode", ["wgan-gp", "hinge"])
def test_adversarial_term_and_deferred_discriminator_step(mode) -> None:
    zs = (torch.randn(2, K, 64, 64) * 2).requires_grad_(True)
    zt = torch.randn(2, K, 64, 64) * 2
    mod = AdversarialLoss(_ctx(), weight=0.01, d_weight=0.3, mode=mode, gp_weight=5.0, d_lr=1e-3, conv_dim=8)
    assert mod.weights == {"adv_g": 0.01, "adv_d": 0.0}
    assert not any(p.requires_grad for p in mod.parameters())     # never in the trainer's optimizer
    assert LOSSES.get("adv").taps({}) == (["logits"], ["logits"])
    inp = _inputs(None, None, None, {"logits": zs}, {"logits": zt})
    d0 = copy.deepcopy(mod.discriminator)
    out = mod(inp)
    # generator term: -mean D(z_S) (CriterionAdvForG) with the discriminator as it was; gradient reaches z_S
    d_g = copy.deepcopy(d0)
    assert out["adv_g"].item() == pytest.approx(-d_g(zs.detach()).mean().item(), rel=1e-5)
    out["adv_g"].backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert all(p.grad is None for p in mod.parameters())
    # the next forward first applies the deferred step on step 1's maps: compare with the reference step
    ref_d = copy.deepcopy(d_g)          # same BN / spectral-norm state as the module's discriminator now
    opt = torch.optim.Adam(list(ref_d.parameters()), lr=1e-3, betas=(0.9, 0.99))
    for p in ref_d.parameters():
        p.requires_grad_(True)
    zs2, zt2 = torch.randn(2, K, 64, 64), torch.randn(2, K, 64, 64)
    rng = torch.get_rng_state()
    alpha = torch.rand(2, 1, 1, 1)
    torch.set_rng_state(rng)
    out2 = mod(_inputs(None, None, None, {"logits": zs2}, {"logits": zt2}))
    want = ref_d_loss(ref_d, zs.detach(), zt, mode, 0.3, 5.0, alpha)
    assert out2["adv_d"].item() == pytest.approx(want.item(), rel=1e-5)
    opt.zero_grad()
    want.backward()
    opt.step()
    for (name, p), q in zip(mod.discriminator.named_parameters(), ref_d.parameters()):
        # atol 1e-5 = 1% of one Adam step (lr 1e-3): WGAN-GP's double backward sums in a CPU-dependent order and
        # Adam's m / sqrt(v) amplifies that rounding on near-zero gradient entries (1.3e-6 measured on AMD EPYC)
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert any((p - q).abs().max() > 0 for p, q in zip(mod.discriminator.parameters(), d0.parameters()))


def test_adversarial_checkpoint_resumes_exactly() -> None:
    """Optimizer state and pending maps travel in state_dict (get/set_extra_state): a module restored from a
    checkpoint continues bit-identically (loaded with weights_only=True, as training checkpoints are)."""
    import io

    def make():
        torch.manual_seed(3)
        return AdversarialLoss(_ctx(), mode="wgan-gp", conv_dim=8, d_lr=1e-3)

    batches = [(torch.randn(2, K, 64, 64), torch.randn(2, K, 64, 64)) for _ in range(4)]
    a = make()
    for zs, zt in batches[:2]:
        a(_inputs(None, None, None, {"logits": zs}, {"logits": zt}))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b._d_opt.state_dict()["state"]  # Adam moments restored
    rng = torch.get_rng_state()
    outs_a = [a(_inputs(None, None, None, {"logits": zs}, {"logits": zt})) for zs, zt in batches[2:]]
    torch.set_rng_state(rng)
    outs_b = [b(_inputs(None, None, None, {"logits": zs}, {"logits": zt})) for zs, zt in batches[2:]]
    for oa, ob in zip(outs_a, outs_b):
        assert oa["adv_g"].item() == ob["adv_g"].item() and oa["adv_d"].item() == ob["adv_d"].item()


def test_adversarial_small_maps_upsampled_and_eval_does_not_update(caplog) -> None:
    mod = AdversarialLoss(_ctx(), conv_dim=8).eval()
    zs, zt = torch.randn(2, K, 8, 10), torch.randn(2, K, 4, 5)   # at stride, strides differ, below 64 px
    before = copy.deepcopy(mod.state_dict())
    with caplog.at_level("WARNING", logger="c2vkd.losses.adversarial"):
        out = mod(_inputs(None, None, None, {"logits": zs}, {"logits": zt}))
    assert torch.isfinite(out["adv_g"]) and any("upsampling" in r.getMessage() for r in caplog.records)
    mod(_inputs(None, None, None, {"logits": zs}, {"logits": zt}))
    assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items() if torch.is_tensor(v))
    with pytest.raises(ValueError):
        AdversarialLoss(_ctx(), mode="lsgan")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, data: list, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        mod = AdversarialLoss(_ctx(), mode="hinge", conv_dim=8, d_lr=1e-2)
        for zs, zt in data[rank]:      # each rank its own batches
            mod(_inputs(None, None, None, {"logits": zs}, {"logits": zt}))
        out[rank] = [p.detach().clone() for p in mod.discriminator.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~25 s on one core
def test_adversarial_discriminator_identical_across_ddp_ranks() -> None:
    """Under DDP the discriminator gradients are all-reduced before its step: different data per rank, the
    same discriminator on every rank afterwards."""
    data = [[(torch.randn(1, K, 64, 64), torch.randn(1, K, 64, 64)) for _ in range(3)] for _ in range(2)]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _port(), data, out), nprocs=2, join=True)
        got = dict(out)
    for p0, p1 in zip(got[0], got[1]):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)


def test_trainer_resume_is_exact_with_discriminator_and_queues(tmp_path) -> None:
    """Through the real Trainer: a run resumed from its mid-point checkpoint ends bit-identical to the straight
    run, discriminator (weights, Adam state, pending maps) and CIRKD queues included."""
    import _toy  # noqa: F401  (toy_cnn / toy_vit with a `logits` alias)
    from c2vkd.config import load_config
    from c2vkd.data.synthetic import write_folder
    from c2vkd.engine.trainer import Trainer
    from c2vkd.engine.weights import save_student
    from c2vkd.models import build_model
    from c2vkd.utils.io import safe_load

    root = write_folder(tmp_path / "ds", {"train": 6, "val": 2}, size_hw=(32, 40))
    torch.manual_seed(1)
    save_student(tmp_path / "t.safetensors", build_model("toy_cnn", 3), "toy_cnn", 3, {}, ["a", "b", "c"])
    cfg = load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "teacher.name=toy_cnn",
        f"teacher.checkpoint={tmp_path / 't.safetensors'}", "optim.lr=0.01", "schedule.iters=4",
        "train.progress=false", "train.log_interval=1", "train.device=cpu", "train.ckpt_interval=2",
        "train.val_interval=0", "eval.split=null", "eval.final_split=null", "experiment.deterministic=true",
        f"experiment.output_dir={tmp_path}",
        "losses=[{name: ce}, {name: kd, at: stride}, {name: adv, mode: wgan-gp, conv_dim: 8, weight: 0.1}, "
        "{name: cirkd, memory_size: 16, region_memory_size: 4, pixel_contrast_size: 6, region_contrast_size: 3}]"])
    Trainer(cfg, run_dir=tmp_path / "straight").fit()
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    for suffix in ("", ".sha256"):
        src = tmp_path / f"straight/checkpoints/iter_0000002.pt{suffix}"
        (tmp_path / f"resumed/checkpoints/iter_0000002.pt{suffix}").write_bytes(src.read_bytes())
    t = Trainer(cfg, run_dir=tmp_path / "resumed", resume="auto")
    assert t.iteration == 2
    t.fit()
    a = safe_load(tmp_path / "straight/checkpoints/iter_0000004.pt")
    b = safe_load(tmp_path / "resumed/checkpoints/iter_0000004.pt")
    heads_a, heads_b = a["loss_heads"], b["loss_heads"]
    assert any(k.startswith("2.discriminator.") for k in heads_a) and "3.pixel_queue.bank" in heads_a
    for k, v in heads_a.items():
        if torch.is_tensor(v):
            assert torch.equal(v, heads_b[k]), k
    assert heads_a["2._extra_state"]["pending"] is not None
    for x, y in zip(heads_a["2._extra_state"]["pending"], heads_b["2._extra_state"]["pending"]):
        assert torch.equal(x, y)
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), k
    # the discriminator really trained and is not in the trainer's optimizer
    n_opt = sum(len(g["params"]) for g in a["optimizer"]["param_groups"])
    assert n_opt == len([p for p in t.model.parameters() if p.requires_grad])
    assert not any(p.requires_grad for p in t.model.losses[2].discriminator.parameters())


# ------------------------------------------------------------------------------------ option wiring
#: every numeric / bool constructor option of the baselines must change the value or the student's gradient
#: (a dropped option fails); memory/chunking options must not. Per loss: base args for a small, fast module.
WIRING_BASE = {"kd": {}, "dkd": {}, "cwd": {}, "dist": {}, "skd": {}, "ifvd": {}, "fitnet": {}, "at": {},
               "cirkd": {"memory_size": 8, "region_memory_size": 2, "pool_min_size": 1},
               "adv": {"conv_dim": 8, "mode": "wgan-gp"}}
WIRING_OTHER = {("cirkd", "pixel_contrast_size"): 17, ("cirkd", "region_contrast_size"): 4,
                ("cirkd", "pool_min_size"): 100, ("adv", "conv_dim"): 16, ("adv", "min_input"): 80,
                ("skd", "pool_kernel"): 3, ("cirkd", "memory_size"): 9, ("cirkd", "region_memory_size"): 3}
WIRING_SAME = {("skd", "max_pairs"): 10 ** 6, ("cirkd", "max_elements"): 37, ("cirkd", "max_rows_per_chunk"): 3}
WIRING_SKIP = {("dkd", "mask_ignore"): "only with target_source teacher (tested in test_baselines_logits.py)",
               ("skd", "pool_scale"): "alternative to pool_kernel (tested in test_baselines_features.py)",
               ("adv", "d_momentum"): "only with d_optimizer sgd",
               ("cirkd", "p2p_weight"): "a term weight: checked through mod.weights below"}


def _wiring_options() -> list[tuple[str, str, object, str]]:
    import inspect

    out = []
    for name in WIRING_BASE:
        for p in inspect.signature(LOSSES.get(name).__init__).parameters.values():
            key = (name, p.name)
            if p.name in ("self", "ctx", "weight") or key in WIRING_SKIP or (
                    p.name in WIRING_BASE[name] and key not in WIRING_OTHER):
                continue
            d = p.default
            if key in WIRING_SAME:
                out.append((name, p.name, WIRING_SAME[key], "same"))
            elif key in WIRING_OTHER:
                out.append((name, p.name, WIRING_OTHER[key], "differs"))
            elif isinstance(d, bool):
                out.append((name, p.name, not d, "differs"))
            elif isinstance(d, int):
                out.append((name, p.name, d + 1, "differs"))
            elif isinstance(d, float):
                out.append((name, p.name, d * 1.7 + 0.3, "differs"))
    return out


def _wiring_inputs(step: int) -> LossInputs:
    g = torch.Generator().manual_seed(step)
    target = torch.randint(0, K, (2, 16, 20), generator=g)
    target[0, :3] = IGN
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return LossInputs(student_logits=(r(2, K, 16, 20) * 2).requires_grad_(True), target=target,
                      teacher_logits=r(2, K, 16, 20) * 2,
                      student_feats={"feat": r(2, 6, 8, 10).requires_grad_(True),
                                     "logits": (r(2, K, 8, 10) * 2).requires_grad_(True)},
                      teacher_feats={"feat": r(2, 9, 8, 10).relu(), "logits": r(2, K, 4, 5) * 2})


def _wiring_run(name: str, **kw) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    ctx = _ctx(s={"feat": (2, 6, 8, 10)}, t={"feat": (2, 9, 8, 10)})
    mod = LOSSES.get(name)(ctx, **{**WIRING_BASE[name], **kw}).train()
    steps = 2 if name == "adv" else 1    # the discriminator's options act from its first update (step 2)
    for step in range(steps):
        inp = _wiring_inputs(step)
        out = mod(inp)
    total = sum(mod.weights[k] * v for k, v in out.items()) + out.get("adv_d", 0.0)
    leaves = [inp.student_logits, inp.student_feats["feat"], inp.student_feats["logits"]]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    flat = torch.cat([(gr if gr is not None else torch.zeros_like(x)).reshape(-1) for gr, x in zip(grads, leaves)])
    return float(total.detach()), flat


@pytest.mark.parametrize("name,option,value,expect", _wiring_options(), ids=lambda v: str(v))
def test_baseline_option_reaches_the_computation(name, option, value, expect) -> None:
    base_v, base_g = _wiring_run(name)
    v, g = _wiring_run(name, **{option: value})
    assert torch.isfinite(torch.tensor(v)) and torch.isfinite(g).all()
    if expect == "same":
        assert v == pytest.approx(base_v, rel=1e-5, abs=1e-9), (name, option)
        # atol 1e-7: chunking changes the summation order; tiny entries differ by ~2e-8 on some CPUs (AMD EPYC)
        torch.testing.assert_close(g, base_g, rtol=1e-4, atol=1e-7)
    else:
        moved = abs(v - base_v) > 1e-6 * max(abs(base_v), 1e-12) or \
            (g - base_g).abs().max() > 1e-6 * max(float(base_g.abs().max()), 1e-12)
        assert moved, f"loss {name}: {option}={value!r} changes nothing (dropped option?)"


def test_baseline_wiring_finds_the_options() -> None:
    found = {(n, o) for n, o, _, _ in _wiring_options()}
    assert {("kd", "temperature"), ("dkd", "beta"), ("cwd", "temperature"), ("dist", "gamma"), ("skd", "detach_norm"),
            ("at", "p"), ("cirkd", "temperature"), ("cirkd", "memory"), ("cirkd", "pixels_per_class"),
            ("adv", "d_weight"), ("adv", "gp_weight"), ("adv", "d_lr")} <= found
    mod = LOSSES.get("cirkd")(_ctx(s={"feat": (2, 6, 8, 10)}, t={"feat": (2, 9, 8, 10)}), weight=2.0, p2p_weight=0.25,
                              memory=False)
    assert mod.weights == {"cirkd_p2p": 0.5}
