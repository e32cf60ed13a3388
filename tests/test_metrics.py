"""ConfusionMatrix / SegMetrics: golden case, naive numpy reference, torchmetrics cross-check."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from c2vkd import IGNORE_INDEX
from c2vkd.eval.metrics import ConfusionMatrix, SegMetrics, format_table


def _random_case(k: int = 6, shape=(2, 16, 16), seed: int = 0):
    """Labels/preds in [0, k-2] (class k-1 absent everywhere), ~15% ignore, class k-2 never labelled."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k - 2, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.15] = IGNORE_INDEX
    pred = torch.randint(0, k - 1, shape, generator=g)  # k-2 may be predicted, never labelled
    agree = (torch.rand(shape, generator=g) < 0.4) & (target != IGNORE_INDEX)
    pred = torch.where(agree, target, pred)
    return pred, target


def _naive(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = IGNORE_INDEX) -> dict:
    """Independent per-pixel loop (no confusion matrix)."""
    inter = [0] * k
    gt = [0] * k
    pr = [0] * k
    n = correct = 0
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t == ignore:
            continue
        n += 1
        gt[t] += 1
        pr[p] += 1
        if p == t:
            inter[t] += 1
            correct += 1
    iou, present = [], []
    for c in range(k):
        union = gt[c] + pr[c] - inter[c]
        if union == 0:
            iou.append(float("nan"))
        else:
            iou.append(inter[c] / union)
            present.append(c)
    cacc = [inter[c] / gt[c] if gt[c] else float("nan") for c in range(k)]
    return {
        "iou": iou,
        "miou": float(np.nanmean(iou)),
        "acc": correct / n,
        "macc": float(np.nanmean(cacc)),
        "class_acc": cacc,
        "fwiou": sum(gt[c] / n * iou[c] for c in present),
        "present": present,
    }


def _assert_list_close(a, b, tol=1e-9):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if math.isnan(y):
            assert math.isnan(x)
        else:
            assert x == pytest.approx(y, abs=tol)


def test_golden_2x3():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    _assert_list_close(m.iou, [0.5, 0.5, 0.0, float("nan")])
    assert m.miou == pytest.approx(1 / 3)
    assert m.acc == pytest.approx(3 / 5)
    _assert_list_close(m.class_acc, [0.5, 1.0, 0.0, float("nan")])
    assert m.macc == pytest.approx(0.5)
    assert m.fwiou == pytest.approx(0.4)
    assert m.present == [0, 1, 2] and m.absent == [3] and m.label_present == [0, 1, 2]
    assert m.num_pixels == 5
    _assert_list_close(m.pixel_share, [0.4, 0.4, 0.2, 0.0])


def test_absent_excluded_and_predicted_only_included():
    # class 2 only predicted (IoU 0, in mIoU, not in mAcc); class 3 absent from both (excluded)
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    _assert_list_close(m.iou, [1.0, 0.5, 0.0, float("nan")])
    assert m.miou == pytest.approx(0.5)
    assert m.present == [0, 1, 2] and m.absent == [3]
    assert m.label_present == [0, 1]
    assert m.macc == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_loop(seed):
    k = 6
    pred, target = _random_case(k, seed=seed)
    cm = ConfusionMatrix(k)
    # two updates == one big update
    cm.update(pred[:1], target[:1])
    cm.update(pred[1:], target[1:])
    m = cm.compute()
    ref = _naive(pred.numpy(), target.numpy(), k)
    _assert_list_close(m.iou, ref["iou"])
    _assert_list_close(m.class_acc, ref["class_acc"])
    assert m.miou == pytest.approx(ref["miou"])
    assert m.acc == pytest.approx(ref["acc"])
    assert m.macc == pytest.approx(ref["macc"])
    assert m.fwiou == pytest.approx(ref["fwiou"])
    assert m.present == ref["present"]
    assert k - 1 in m.absent  # the never-seen class
    assert int(m.confusion.sum()) == int((target != IGNORE_INDEX).sum())


def test_matches_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    k = 6
    pred, target = _random_case(k, shape=(3, 20, 24), seed=3)
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    m = cm.compute()

    per_class = MulticlassJaccardIndex(k, ignore_index=IGNORE_INDEX, average=None)(pred, target)
    # torchmetrics returns 0 (zero_division) for a class absent from labels and preds; we return nan
    # and exclude it.  Everywhere else the values agree.
    for c in range(k):
        if c in m.absent:
            assert math.isnan(m.iou[c]) and per_class[c].item() == 0.0
        else:
            assert m.iou[c] == pytest.approx(per_class[c].item(), abs=1e-6)
    # average="macro" skips classes absent from both, exactly like our mIoU
    macro = MulticlassJaccardIndex(k, ignore_index=IGNORE_INDEX, average="macro")(pred, target)
    assert m.miou == pytest.approx(macro.item(), abs=1e-6)

    aacc = MulticlassAccuracy(k, ignore_index=IGNORE_INDEX, average="micro")(pred, target)
    assert m.acc == pytest.approx(aacc.item(), abs=1e-6)
    # per-class accuracy agrees on labelled classes (torchmetrics' macro average would also count
    # predicted-but-unlabelled classes as 0, our mAcc averages labelled classes only, like mmseg)
    cacc = MulticlassAccuracy(k, ignore_index=IGNORE_INDEX, average=None)(pred, target)
    for c in m.label_present:
        assert m.class_acc[c] == pytest.approx(cacc[c].item(), abs=1e-6)


def test_out_of_range_label_raises():
    cm = ConfusionMatrix(5)
    target = torch.tensor([[0, 7, IGNORE_INDEX], [-1, 4, 7]])
    pred = torch.zeros_like(target)
    with pytest.raises(ValueError, match=r"\[-1, 7\]"):
        cm.update(pred, target)
    assert int(cm.mat.sum()) == 0  # nothing accumulated


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.full((2,), 3), torch.zeros(2, dtype=torch.long))


def test_all_ignored_and_reset():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(4, dtype=torch.long), torch.full((4,), IGNORE_INDEX))
    m = cm.compute()
    assert math.isnan(m.miou) and math.isnan(m.acc) and m.num_pixels == 0 and m.absent == [0, 1, 2]
    cm.update(torch.tensor([1]), torch.tensor([1]))
    assert cm.compute().miou == 1.0
    cm.reset()
    assert int(cm.mat.sum()) == 0


def test_custom_ignore_index():
    cm = ConfusionMatrix(3, ignore_index=-1)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 2]))
    assert cm.compute().num_pixels == 2


def test_all_reduce_noop_and_wiring(monkeypatch):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.all_reduce()  # not initialised -> no-op
    assert cm.mat.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]

    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.mul_(2))
    cm.all_reduce()
    assert cm.mat.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]


def test_to_dict_json_and_table():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1, 1], [1, 1, 0]]), torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]]))
    m = cm.compute()
    d = m.to_dict()
    s = json.dumps(d, allow_nan=False)
    back = json.loads(s)
    assert back["iou"][3] is None and back["miou"] == pytest.approx(1 / 3)
    assert back["confusion"][0] == [1, 1, 0, 0]
    table = format_table(m, ["road", "car", "sky", "unused"])
    assert table == m.format_table(["road", "car", "sky", "unused"])
    assert "road" in table and " 50.00" in table and "mIoU : 33.33" in table
    assert "aAcc : 60.00" in table and "mAcc : 50.00" in table
    assert "excluded" in table and "unused" in table.splitlines()[-1]
    with pytest.raises(ValueError):
        format_table(m, ["a"])
    assert isinstance(m, SegMetrics)


def test_boundary_values_labels_and_class_count():
    """The first out-of-range values (label K, prediction K, label -1) give the clear error, not a bincount
    failure; K = 1 is a valid (if degenerate) metric, K = 0 is not."""
    cm = ConfusionMatrix(5)
    with pytest.raises(ValueError, match=r"target contains values \[5\] outside \[0, 5\)"):
        cm.update(torch.tensor([0, 4]), torch.tensor([5, 4]))
    with pytest.raises(ValueError, match=r"pred contains values \[5\]"):
        cm.update(torch.tensor([5, 0]), torch.tensor([4, 4]))
    assert int(cm.mat.sum()) == 0
    one = ConfusionMatrix(1)
    one.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, IGNORE_INDEX]))
    m = one.compute()
    assert m.confusion.tolist() == [[2]] and m.miou == 1.0 and m.num_pixels == 2
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        ConfusionMatrix(0)
