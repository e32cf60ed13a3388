"""Feature-based baseline KD losses (SKD, IFVD, CIRKD, FitNets, AT) and the shared adapters, against
independent straightforward references (mostly the authors' reference code, re-typed)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _ref import kl_list, softmax_list
from c2vkd.losses import make_adapter, resize_to
from c2vkd.losses.at import ATLoss, at_loss
from c2vkd.losses.base import LOSSES, LossContext, LossInputs
from c2vkd.losses.cirkd import (CIRKDLoss, ClassQueues, chunked_row_kl, cirkd_memory_loss, cirkd_pixel_loss,
                                cirkd_region_loss, memory_entries)
from c2vkd.losses.fitnet import FitNetLoss, fitnet_loss
from c2vkd.losses.ifvd import IFVDLoss, ifvd_loss
from c2vkd.losses.skd import SKDLoss, capped_grid, skd_loss

IGN = 255


def _target(b, h, w, k, n_ignore=0):
    t = torch.randint(0, k, (b, h, w))
    if n_ignore:
        flat = t.view(-1)
        flat[torch.randperm(flat.numel())[:n_ignore]] = IGN
    return t


# ----------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind,nparams", [("conv1x1", 1), ("conv3x3", 4), ("mlp", 4), ("none", 0)])
def test_adapter_kinds_and_runtime_resize(kind, nparams):
    ad = make_adapter((2, 6, 4, 5), (2, 10, 8, 10), kind)
    assert len(list(ad.parameters())) == nparams
    x = torch.randn(3, 6, 4, 5)
    c = 6 if kind == "none" else 10
    assert ad(x).shape == (3, c, 8, 10)                  # default: teacher tap size from the context
    assert ad(x, (7, 9)).shape == (3, c, 7, 9)           # run-time size wins
    with pytest.raises(ValueError):
        ad(torch.randn(3, 5, 4, 5))


def test_adapter_conv1x1_is_projection_then_bilinear():
    ad = make_adapter((2, 3, 4, 5), (2, 4, 8, 10), "conv1x1")
    x = torch.randn(2, 3, 4, 5)
    ref = F.interpolate(torch.einsum("oc,bchw->bohw", ad.proj.weight[:, :, 0, 0], x), size=(8, 10),
                        mode="bilinear", align_corners=False)
    torch.testing.assert_close(ad(x), ref)
    assert resize_to(x, (4, 5)) is x
    with pytest.raises(ValueError):
        make_adapter((2, 3, 4, 5), (2, 4, 8, 10), "conv5x5")


def test_adapter_accepts_bf16_tap():
    ad = make_adapter((2, 3, 4, 5), (2, 4, 8, 10), "conv1x1")
    assert ad(torch.randn(2, 3, 4, 5, dtype=torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- SKD
def _skd_ref_authors(fs, ft, scale):
    """SKD's CriterionPairWiseforWholeFeatAfterPool + sim_dis_compute, re-typed."""
    def L2(f_):
        return (((f_ ** 2).sum(dim=1)) ** 0.5).reshape(f_.shape[0], 1, f_.shape[2], f_.shape[3]) + 1e-8

    def similarity(feat):
        feat = feat.double()
        tmp = L2(feat).detach()
        feat = feat / tmp
        feat = feat.reshape(feat.shape[0], feat.shape[1], -1)
        return torch.einsum("icm,icn->imn", [feat, feat])

    def sim_dis_compute(f_S, f_T):
        sim_err = ((similarity(f_T) - similarity(f_S)) ** 2) / ((f_T.shape[-1] * f_T.shape[-2]) ** 2) / f_T.shape[0]
        return sim_err.sum()

    total_w, total_h = ft.shape[2], ft.shape[3]
    patch_w, patch_h = int(total_w * scale), int(total_h * scale)
    maxpool = nn.MaxPool2d(kernel_size=(patch_w, patch_h), stride=(patch_w, patch_h), padding=0, ceil_mode=True)
    return sim_dis_compute(maxpool(fs), maxpool(ft)).item()


def _skd_ref_loop(fs, ft):
    """Explicit pair loop on unpooled maps: mean over (b, i, j) of (cos_T(i, j) - cos_S(i, j))^2."""
    b, _, h, w = fs.shape
    n = h * w
    total = 0.0
    for i in range(b):
        s = fs[i].reshape(fs.shape[1], n).double()
        t = ft[i].reshape(ft.shape[1], n).double()
        for p in range(n):
            for q in range(n):
                cs = float(s[:, p] @ s[:, q]) / ((float(s[:, p].norm()) + 1e-8) * (float(s[:, q].norm()) + 1e-8))
                ct = float(t[:, p] @ t[:, q]) / ((float(t[:, p].norm()) + 1e-8) * (float(t[:, q].norm()) + 1e-8))
                total += (ct - cs) ** 2
    return total / (b * n * n)


@pytest.mark.parametrize("scale", [0.5, 0.25, 0.3])
def test_skd_matches_authors_code(scale):
    fs, ft = torch.randn(2, 6, 9, 11), torch.randn(2, 10, 9, 11)
    assert skd_loss(fs, ft, pool_scale=scale).item() == pytest.approx(_skd_ref_authors(fs, ft, scale), rel=1e-5)


def test_skd_matches_pair_loop_unpooled():
    fs, ft = torch.randn(2, 4, 3, 4), torch.randn(2, 7, 3, 4)
    assert skd_loss(fs, ft, pool_scale=None).item() == pytest.approx(_skd_ref_loop(fs, ft), rel=1e-5)


def test_skd_budget_pools_adaptively_and_logs_once(caplog):
    fs, ft = torch.randn(3, 4, 12, 16), torch.randn(3, 5, 12, 16)
    budget = 3 * 40 ** 2  # at most 40 nodes per image
    gh, gw = capped_grid(3, 12, 16, budget)
    assert gh * gw <= 40 and (gh, gw) == (5, 7)
    ref = _skd_ref_loop(F.adaptive_max_pool2d(fs, (gh, gw)), F.adaptive_max_pool2d(ft, (gh, gw)))
    with caplog.at_level("INFO", logger="c2vkd.losses.skd"):
        a = skd_loss(fs, ft, pool_scale=None, max_pairs=budget)
        skd_loss(fs, ft, pool_scale=None, max_pairs=budget)
    assert a.item() == pytest.approx(ref, rel=1e-5)
    assert sum("adaptive max pooling" in r.getMessage() for r in caplog.records) == 1
    assert capped_grid(3, 12, 16, 10 ** 9) == (12, 16)
    with pytest.raises(ValueError):
        capped_grid(8, 4, 4, 7)


def test_skd_detach_norm_changes_only_gradient():
    fs, ft = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    a = fs.clone().requires_grad_(True)
    b = fs.clone().requires_grad_(True)
    la, lb = skd_loss(a, ft, pool_scale=None), skd_loss(b, ft, pool_scale=None, detach_norm=False)
    assert la.item() == pytest.approx(lb.item())
    la.backward()
    lb.backward()
    assert not torch.allclose(a.grad, b.grad)


# --------------------------------------------------------------------------------------------- IFVD
def _ifvd_ref_authors(feat_S, feat_T, target, num_classes):
    """IFVD's CriterionIFV, re-typed (float64); returns the per-pixel squared error map too."""
    feat_S, feat_T = feat_S.double(), feat_T.double()
    size_f = (feat_S.shape[2], feat_S.shape[3])
    tar_feat_S = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_S.size())
    tar_feat_T = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_T.size())
    center_feat_S = feat_S.clone()
    center_feat_T = feat_T.clone()
    for i in range(num_classes):
        mask_feat_S = (tar_feat_S == i).double()
        mask_feat_T = (tar_feat_T == i).double()
        center_feat_S = (1 - mask_feat_S) * center_feat_S + mask_feat_S * (
            (mask_feat_S * feat_S).sum(-1).sum(-1) / (mask_feat_S.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
        center_feat_T = (1 - mask_feat_T) * center_feat_T + mask_feat_T * (
            (mask_feat_T * feat_T).sum(-1).sum(-1) / (mask_feat_T.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    err = (cos(feat_S, center_feat_S) - cos(feat_T, center_feat_T)) ** 2
    lab = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float())[:, 0]
    return err.mean().item(), (err * (lab != IGN)).sum().item() / max(1, int((lab != IGN).sum()))


def test_ifvd_matches_authors_code():
    k = 4
    fs, ft = torch.randn(2, 6, 5, 6), torch.randn(2, 6, 5, 6)
    tgt = _target(2, 10, 12, k, n_ignore=40)  # labels at 2x the feature size -> nearest downsample
    ref_all, ref_valid = _ifvd_ref_authors(fs, ft, tgt, k)
    assert ifvd_loss(fs, ft, tgt, num_classes=k, mean_over="all").item() == pytest.approx(ref_all, rel=1e-4)
    assert ifvd_loss(fs, ft, tgt, num_classes=k).item() == pytest.approx(ref_valid, rel=1e-4)


def test_ifvd_pixel_loop_different_channels():
    k = 3
    fs, ft = torch.randn(1, 3, 3, 3), torch.randn(1, 5, 3, 3)
    tgt = torch.tensor([[[0, 0, 1], [1, IGN, 2], [0, 2, 2]]])
    errs = []
    for y in range(3):
        for x in range(3):
            c = int(tgt[0, y, x])
            if c == IGN:
                continue
            m = tgt[0] == c
            vals = []
            for f in (fs, ft):
                proto = f[0][:, m].double().mean(1)
                v = f[0, :, y, x].double()
                vals.append(float(v @ proto / (v.norm() * proto.norm())))
            errs.append((vals[0] - vals[1]) ** 2)
    assert ifvd_loss(fs, ft, tgt, num_classes=k).item() == pytest.approx(sum(errs) / len(errs), rel=1e-4)


# -------------------------------------------------------------------------------------------- CIRKD
def _cirkd_p2p_ref_authors(feat_S, feat_T, temperature, pool=True):
    """CIRKD's CriterionMiniBatchCrossImagePair, re-typed (float64); pool=False: its pooling=False branch."""
    def pair_wise_sim_map(fea_0, fea_1):
        C, H, W = fea_0.size()
        fea_0 = fea_0.reshape(C, -1).transpose(0, 1)
        fea_1 = fea_1.reshape(C, -1).transpose(0, 1)
        return torch.mm(fea_0, fea_1.transpose(0, 1))

    B = feat_S.shape[0]
    maxpool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True) if pool else nn.Identity()
    feat_S = F.normalize(maxpool(feat_S.double()), p=2, dim=1)
    feat_T = F.normalize(maxpool(feat_T.double()), p=2, dim=1)
    sim_dis = torch.tensor(0.0, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            p_s = F.log_softmax(pair_wise_sim_map(feat_S[i], feat_S[j]) / temperature, dim=1)
            p_t = F.softmax(pair_wise_sim_map(feat_T[i], feat_T[j]) / temperature, dim=1)
            sim_dis += F.kl_div(p_s, p_t, reduction="batchmean")
    return (sim_dis / (B * B)).item()


def _cirkd_p2p_batch_naive(fs, ft, tau):
    """Unchunked exact batch-scope formula: full N x N relation, row softmax, mean KL over rows."""
    def rows(f):
        f = F.normalize(f.double(), dim=1)
        return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1])
    s, t = rows(fs), rows(ft)
    ls, lt = F.log_softmax(s @ s.T / tau, 1), F.log_softmax(t @ t.T / tau, 1)
    return (lt.exp() * (lt - ls)).sum(1).mean().item()


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_cirkd_p2p_pair_scope_matches_authors_code(tau):
    fs, ft = torch.randn(3, 5, 7, 6), torch.randn(3, 9, 7, 6)  # odd h -> ceil-mode pooling
    for rows in (None, 1, 4):
        got = cirkd_pixel_loss(fs, ft, temperature=tau, scope="pair", pool_size=2, pool_mode="max", pool_min_size=0,
                               max_rows_per_chunk=rows)
        assert got.item() == pytest.approx(_cirkd_p2p_ref_authors(fs, ft, tau), rel=1e-4)


def test_cirkd_chunked_equals_unchunked_exact_batch_scope_with_grads():
    fs, ft = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4)
    ref = _cirkd_p2p_batch_naive(fs, ft, 0.2)
    grads = []
    for max_elements, rows in ((10 ** 9, None), (40 * 7, None), (10 ** 9, 3)):   # 1 chunk; 7 rows; 3 rows
        x = fs.clone().requires_grad_(True)
        out = cirkd_pixel_loss(x, ft, temperature=0.2, scope="batch", pool_size=1, max_elements=max_elements,
                               max_rows_per_chunk=rows)
        assert out.item() == pytest.approx(ref, rel=1e-5)
        out.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["self_pairs", "memory", "masked_bias"])
def test_cirkd_closed_form_backward_equals_autograd(case):
    """_RowKL's closed-form backward against plain autograd of the formula (closed_form=False), float64, uneven
    chunks: self relations (rows = cols, grouped softmax), a constant memory bank, masked columns + kd_T."""
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    t = torch.randn(12, 5, dtype=torch.float64)
    bank = F.normalize(torch.randn(10, 5, dtype=torch.float64), dim=1)
    bias = torch.zeros(10, dtype=torch.float64)
    bias[[2, 7]] = -1e9

    def run(closed_form: bool, rows):
        f = x.clone().requires_grad_(True)
        kw = dict(temperature=0.3, max_rows_per_chunk=rows, closed_form=closed_form)
        if case == "self_pairs":
            out = chunked_row_kl(f, t, f, t, groups=3, **kw)
        elif case == "memory":
            out = chunked_row_kl(f, t, bank, bank, kd_temperature=1.0, **kw)
        else:
            out = chunked_row_kl(f, t, bank, bank, col_bias=bias, kd_temperature=2.0, **kw)
        # a non-uniform upstream gradient, so every row's scale is checked
        (out * torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype)).sum().backward()
        return out.detach(), f.grad

    ref_val, ref_grad = run(False, None)
    assert (ref_val > 0).all()
    for rows in (None, 5, 1):
        val, grad = run(True, rows)
        torch.testing.assert_close(val, ref_val, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_cirkd_pair_blocks_equal_row_chunks_and_autograd_with_grads():
    """Pair scope three ways: symmetric per-pair blocks (default here: A^2 <= max_elements), row chunks with the
    closed-form backward (max_rows_per_chunk < A), plain autograd (closed_form=False): same value and gradient."""
    torch.manual_seed(3)
    fs0, ft = torch.randn(3, 6, 4, 5), torch.randn(3, 7, 4, 5)
    out = {}
    for name, kw in (("blocks", {}), ("rows", dict(max_rows_per_chunk=7)), ("autograd", dict(closed_form=False))):
        fs = fs0.clone().requires_grad_(True)
        loss = cirkd_pixel_loss(fs, ft, temperature=0.1, scope="pair", pool_size=1, **kw)
        (2.5 * loss).backward()
        out[name] = (loss.item(), fs.grad)
    assert out["blocks"][0] == pytest.approx(_cirkd_p2p_ref_authors(fs0, ft, 0.1, pool=False), rel=1e-5)
    for name in ("rows", "autograd"):
        assert out[name][0] == pytest.approx(out["blocks"][0], rel=1e-5)
        torch.testing.assert_close(out[name][1], out["blocks"][1], rtol=1e-4, atol=1e-7)


def _cirkd_p2r_ref_loop(fs, ft, target, k, tau, kd_t, source):
    b, _, h, w = ft.shape
    ns, nt = F.normalize(fs.double(), dim=1), F.normalize(ft.double(), dim=1)

    def regions(n):
        out = []
        for i in range(b):
            for c in range(k):
                m = target[i] == c
                if m.any():
                    out.append(F.normalize(n[i][:, m].mean(1), dim=0))
        return out

    rt = regions(nt)
    rs = rt if source == "teacher" else regions(ns)
    vals = []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if int(target[i, y, x]) == IGN:
                    continue
                ls = [float(ns[i, :, y, x] @ r) / tau / kd_t for r in rs]
                lt = [float(nt[i, :, y, x] @ r) / tau / kd_t for r in rt]
                vals.append(kl_list(softmax_list(lt), softmax_list(ls)))
    return kd_t ** 2 * sum(vals) / max(1, len(vals))


@pytest.mark.parametrize("source,kd_t,rows", [("teacher", 1.0, None), ("teacher", 2.0, 5), ("own", 1.0, 7)])
def test_cirkd_p2r_matches_loop(source, kd_t, rows):
    k = 4
    fs, ft = torch.randn(2, 6, 4, 5), torch.randn(2, 6, 4, 5)
    tgt = _target(2, 4, 5, k, n_ignore=6)
    tgt[1][tgt[1] == 3] = 2  # class 3 absent in image 1 -> masked region slot
    got = cirkd_region_loss(fs, ft, tgt, num_classes=k, temperature=0.1, kd_temperature=kd_t, region_source=source,
                            max_rows_per_chunk=rows)
    assert got.item() == pytest.approx(_cirkd_p2r_ref_loop(fs, ft, tgt, k, 0.1, kd_t, source), rel=1e-4)


def test_class_queues_pointer_rules():
    """CIRKD's _dequeue_and_enqueue pointer rules: pixel blocks reset to 0 when they reach the end (writing the
    last slots), regions are a ring."""
    torch.manual_seed(0)
    q = ClassQueues(2, 5, 2)
    torch.testing.assert_close(q.bank.norm(dim=2), torch.ones(2, 5))   # random unit vectors at start
    rows = torch.arange(6.0).view(3, 2)
    q.push_block(1, rows)                                # slots 0..2 of class 1
    assert q.ptr.tolist() == [0, 3] and torch.equal(q.bank[1, :3], rows)
    q.push_block(1, rows[:2] + 100)                      # 3 + 2 >= 5: last 2 slots, ptr -> 0
    assert q.ptr.tolist() == [0, 0] and torch.equal(q.bank[1, 3:], rows[:2] + 100)
    r = ClassQueues(1, 3, 2)
    for v in range(4):
        r.push_block(0, torch.full((1, 2), float(v)), wrap="ring")
    assert r.bank[0, :, 0].tolist() == [3.0, 1.0, 2.0] and int(r.ptr[0]) == 1
    assert q.sample(torch.tensor([0, 4])).shape == (4, 2)
    torch.testing.assert_close(q.sample(torch.tensor([0, 4]))[2:], torch.stack([q.bank[1, 0], q.bank[1, 4]]))
    # the queues travel in state_dict (training checkpoints)
    assert set(q.state_dict()) == {"bank", "ptr"}


def test_memory_entries_per_image_and_class():
    k = 3
    ft = F.normalize(torch.randn(2, 4, 3, 4), dim=1)
    tgt = torch.tensor([[[0] * 4, [1] * 4, [IGN] * 4], [[2] * 4, [2] * 4, [IGN] * 4]])
    torch.manual_seed(0)
    p_meta, p_rows, r_meta, r_rows = memory_entries(ft, tgt, num_classes=k, pixels_per_class=3)
    assert r_meta.tolist() == [[0, 0], [1, 1], [2, 5]]          # (class, block = image * K + class)
    assert p_meta[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    torch.testing.assert_close(r_rows[2], F.normalize(ft[1, :, :2].reshape(4, -1).mean(1), dim=0))
    for (c, blk), row in zip(p_meta.tolist(), p_rows):          # each pixel row is a pixel of its class
        img = blk // k
        cand = ft[img].flatten(1).T[tgt[img].flatten() == c]
        assert (cand - row).abs().sum(1).min() < 1e-6
    # the reference's indexing: positions perm[:k] of the whole image (here always rows 0..k-1 of image 0)
    torch.manual_seed(0)
    _, ref_rows, _, _ = memory_entries(ft, tgt, num_classes=k, pixels_per_class=4, pixel_sampling="reference")
    allpix = ft[0].flatten(1).T
    assert all((allpix[:4] - r).abs().sum(1).min() < 1e-6 for r in ref_rows[:4])


def test_cirkd_memory_loss_matches_loop_and_empty_memory():
    k = 3
    fs, ft = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    tgt = _target(2, 3, 4, k, n_ignore=5)
    mem = F.normalize(torch.randn(9, 5), dim=1)
    ns, nt = F.normalize(fs.double(), dim=1), F.normalize(ft.double(), dim=1)
    vals = []
    for i in range(2):
        for y in range(3):
            for x in range(4):
                if int(tgt[i, y, x]) != IGN:
                    ls = [float(ns[i, :, y, x] @ m) / 0.1 / 2.0 for m in mem.double()]
                    lt = [float(nt[i, :, y, x] @ m) / 0.1 / 2.0 for m in mem.double()]
                    vals.append(kl_list(softmax_list(lt), softmax_list(ls)))
    got = cirkd_memory_loss(fs, ft, tgt, mem, num_classes=k, temperature=0.1, kd_temperature=2.0, max_rows_per_chunk=5)
    assert got.item() == pytest.approx(4.0 * sum(vals) / len(vals), rel=1e-4)
    x = fs.clone().requires_grad_(True)
    empty = cirkd_memory_loss(x, ft, tgt, mem[:0], num_classes=k)
    empty.backward()
    assert empty.item() == 0.0 and x.grad is not None


def test_cirkd_module_memory_bank():
    ctx = LossContext(**ODD_CTX)
    mod = CIRKDLoss(ctx, memory_size=12, region_memory_size=4, pixels_per_class=5, pixel_contrast_size=10,
                    region_contrast_size=5)
    assert set(mod.weights) == {"cirkd_p2p", "cirkd_mem_p2p", "cirkd_mem_p2r"}
    assert mod.pixel_contrast_per_class == 10 // 5 + 1 and mod.region_contrast_per_class == 2
    # the queues are checkpointed with the loss heads (exact resume)
    assert {f"{q}_queue.{b}" for q in ("pixel", "region") for b in ("bank", "ptr")} <= set(mod.state_dict())
    assert mod.pixel_queue.bank.shape == (5, 12, 2048)
    fs = torch.randn(2, 256, 4, 5, requires_grad=True)
    tgt = torch.full((2, 8, 10), IGN)
    tgt[0, :4] = 1
    tgt[1, 4:] = 3
    inputs = LossInputs(student_logits=torch.zeros(1), target=tgt,
                        student_feats={"feat": fs}, teacher_feats={"feat": torch.randn(2, 2048, 8, 10)})
    out = mod(inputs)
    assert set(out) == set(mod.weights)
    assert mod.pixel_queue.ptr.tolist() == [0, 5, 0, 5, 0] and mod.region_queue.ptr.tolist() == [0, 1, 0, 1, 0]
    sum(mod.weights[k] * v for k, v in out.items()).backward()
    assert fs.grad is not None and all(p.grad is not None for p in mod.parameters())
    mod(inputs)
    assert mod.pixel_queue.ptr.tolist() == [0, 10, 0, 10, 0]
    mod(inputs)   # 10 + 5 >= 12: the block goes to the last 5 slots and the pointer resets
    assert mod.pixel_queue.ptr.tolist() == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        CIRKDLoss(ctx, memory_size=0)


# ---------------------------------------------------------------------------------------- FitNet / AT
def test_fitnet_matches_mse_of_adapted_student():
    ctx = LossContext(num_classes=3, student_shapes={"feat": (2, 3, 4, 5)}, teacher_shapes={"feat": (2, 4, 8, 10)})
    mod = FitNetLoss(ctx)
    fs, ft = torch.randn(2, 3, 4, 5), torch.randn(2, 4, 8, 10)
    hint = F.interpolate(F.conv2d(fs, mod.adapter.proj.weight), size=(8, 10), mode="bilinear", align_corners=False)
    ref = ((hint.double() - ft.double()) ** 2).sum().item() / ft.numel()
    out = mod(LossInputs(student_logits=torch.zeros(1), target=torch.zeros(1),
                         student_feats={"feat": fs}, teacher_feats={"feat": ft}))["fitnet"]
    assert out.item() == pytest.approx(ref, rel=1e-5)


def test_at_matches_reference_code_same_size():
    fs, ft = torch.randn(3, 5, 6, 7), torch.randn(3, 8, 6, 7)

    def at(x):
        return F.normalize(x.double().pow(2).mean(1).view(x.size(0), -1))

    ref = 1000.0 / 2 * (at(fs) - at(ft)).pow(2).mean().item()
    assert at_loss(fs, ft).item() == pytest.approx(ref, rel=1e-5)


def test_at_resizes_student_map_before_normalising():
    fs, ft = torch.randn(2, 5, 3, 4), torch.randn(2, 8, 6, 8)
    q = fs.abs().pow(3).mean(1, keepdim=True)
    q = F.interpolate(q, size=(6, 8), mode="bilinear", align_corners=False).flatten(1)
    qs = q / q.norm(dim=1, keepdim=True)
    qt = ft.abs().pow(3).mean(1).flatten(1)
    qt = qt / qt.norm(dim=1, keepdim=True)
    ref = 0.5 * ((qs - qt) ** 2).mean().item()
    assert at_loss(fs, ft, p=3, beta=1.0).item() == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------------- shared checks
FEAT_FNS = {
    "skd": lambda s, t, y: skd_loss(s, t, pool_scale=0.5),
    "skd_full": lambda s, t, y: skd_loss(s, t, pool_scale=None),
    "ifvd": lambda s, t, y: ifvd_loss(s, t, y, num_classes=4),
    "cirkd_p2p": lambda s, t, y: cirkd_pixel_loss(s, t, max_rows_per_chunk=5),
    "cirkd_p2p_batch": lambda s, t, y: cirkd_pixel_loss(s, t, scope="batch", max_rows_per_chunk=5),
    "cirkd_p2r": lambda s, t, y: cirkd_region_loss(s, t, y, num_classes=4, max_rows_per_chunk=5),
    "cirkd_mem": lambda s, t, y: cirkd_memory_loss(s, t, y, F.normalize(torch.randn(7, 6), dim=1), num_classes=4,
                                                   max_rows_per_chunk=5),
    "fitnet": lambda s, t, y: fitnet_loss(s, t),
    "at": lambda s, t, y: at_loss(s, t),
}


@pytest.mark.parametrize("name", sorted(FEAT_FNS))
def test_identical_features_give_zero(name):
    f = torch.randn(2, 6, 6, 8)
    tgt = _target(2, 12, 16, 4, n_ignore=10)
    assert abs(FEAT_FNS[name](f.clone(), f.clone(), tgt).item()) < 1e-5


@pytest.mark.parametrize("name", sorted(FEAT_FNS))
def test_feature_grads_student_only_low_precision(name):
    tgt = _target(2, 12, 16, 4, n_ignore=10)
    for dtype in (torch.float16, torch.bfloat16):
        fs = torch.randn(2, 6, 6, 8).to(dtype).requires_grad_(True)
        ft = torch.randn(2, 6, 6, 8).to(dtype).requires_grad_(True)
        out = FEAT_FNS[name](fs, ft, tgt)
        assert out.dtype == torch.float32 and torch.isfinite(out)
        out.backward()
        assert ft.grad is None
        assert fs.grad is not None and torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ifvd", "cirkd_p2r", "cirkd_mem"])
def test_feature_all_ignored_gives_zero_with_grad_path(name):
    fs = torch.randn(2, 6, 6, 8, requires_grad=True)
    out = FEAT_FNS[name](fs, torch.randn(2, 6, 6, 8), torch.full((2, 12, 16), IGN))
    assert out.item() == 0.0
    out.backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all()


def test_autocast_still_float32():
    fs, ft = torch.randn(2, 6, 6, 8), torch.randn(2, 6, 6, 8)
    ref = cirkd_pixel_loss(fs, ft, max_rows_per_chunk=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cirkd_pixel_loss(fs, ft, max_rows_per_chunk=5)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------- modules
ODD_CTX = dict(num_classes=5, student_shapes={"feat": (2, 256, 4, 5)}, teacher_shapes={"feat": (2, 2048, 8, 10)})
FEAT_MODULES = [("skd", {}), ("skd", {"adapter": "conv1x1", "pool_scale": None}), ("ifvd", {}),
                ("ifvd", {"adapter": "conv1x1"}), ("cirkd", {"memory": False}),
                ("cirkd", {"memory": False, "p2r_weight": 0.1, "adapter": "conv1x1", "scope": "batch"}),
                ("cirkd", {"memory_size": 64, "region_memory_size": 8, "p2p_student": "adapted"}),
                ("fitnet", {}), ("fitnet", {"adapter": "conv3x3"}), ("at", {})]


@pytest.mark.parametrize("name,args", FEAT_MODULES)
def test_feature_modules_from_odd_context(name, args):
    ctx = LossContext(**ODD_CTX)
    cls = LOSSES.get(name)
    mod = cls(ctx, weight=2.0, **args)
    assert cls.taps(args) == (["feat"], ["feat"])
    assert cls.taps({"student_tap": "s4", "teacher_tap": "backbone.layer4"}) == (["s4"], ["backbone.layer4"])
    fs = torch.randn(2, 256, 4, 5, requires_grad=True)
    ft = torch.randn(2, 2048, 8, 10, requires_grad=True)
    tgt = _target(2, 32, 40, 5, n_ignore=50)
    inputs = LossInputs(student_logits=torch.randn(2, 5, 32, 40), target=tgt, teacher_logits=torch.randn(2, 5, 32, 40),
                        student_feats={"feat": fs}, teacher_feats={"feat": ft})
    out = mod(inputs)
    assert set(out) == set(mod.weights)
    total = sum(mod.weights[k] * v for k, v in out.items())
    assert torch.isfinite(total)
    total.backward()
    assert ft.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    for p in mod.parameters():
        assert p.grad is not None


def test_cirkd_module_terms_and_weights():
    ctx = LossContext(**ODD_CTX)
    mod = CIRKDLoss(ctx, weight=2.0, memory=False)
    assert mod.weights == {"cirkd_p2p": 2.0} and not list(mod.parameters())   # raw student: no head
    inputs = LossInputs(student_logits=torch.zeros(1), target=_target(2, 8, 10, 5),
                        student_feats={"feat": torch.randn(2, 256, 4, 5)},
                        teacher_feats={"feat": torch.randn(2, 2048, 8, 10)})
    assert set(mod(inputs)) == {"cirkd_p2p"}
    mem = CIRKDLoss(ctx, weight=2.0, memory_size=8, region_memory_size=4, mem_p2r_weight=0.5, p2r_weight=0.3)
    assert mem.weights == {"cirkd_p2p": 2.0, "cirkd_p2r": 0.6, "cirkd_mem_p2p": 0.2, "cirkd_mem_p2r": 1.0}
    assert set(mem(inputs)) == set(mem.weights)
    with pytest.raises(ValueError, match="channel adapter"):
        CIRKDLoss(ctx, adapter="none", memory_size=8)
    with pytest.raises(ValueError):
        CIRKDLoss(ctx, scope="global", memory=False)
    with pytest.raises(ValueError):
        CIRKDLoss(ctx, pool_mode="median", memory=False)


def test_feature_module_validation():
    ctx = LossContext(**ODD_CTX)
    with pytest.raises(KeyError, match="available: feat"):
        SKDLoss(ctx, teacher_tap="layer4")
    with pytest.raises(ValueError):
        FitNetLoss(ctx, adapter="none")
    with pytest.raises(ValueError):
        IFVDLoss(ctx, mean_over="some")
    with pytest.raises(ValueError):
        ATLoss(ctx, p=0)
    with pytest.raises(ValueError):
        SKDLoss(ctx, pool_scale=2.0)
