"""The pure helpers of benchmarks/class_gradient_share.py on hand-made tensors (golden numbers)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "class_gradient_share.py"
    spec = importlib.util.spec_from_file_location("class_gradient_share", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cgs = _load()

# [B=2, K=3, H=1, W=2]: |grad| per channel 2, 1, 5 (total 8)
GRAD = torch.tensor([[[[1.0, -1.0]], [[0.5, 0.0]], [[0.0, -2.0]]],
                     [[[0.0, 0.0]], [[-0.25, 0.25]], [[3.0, 0.0]]]])
# [B=2, H=1, W=4], 255 ignored: class counts 2, 1, 3
LABELS = torch.tensor([[[0, 0, 2, 255]], [[1, 2, 2, 255]]])


def test_channel_abs_sums_and_shares():
    sums = cgs.channel_abs_sums(GRAD)
    assert sums.dtype == torch.float64
    assert sums.tolist() == [2.0, 1.0, 5.0]
    assert cgs.shares(sums).tolist() == [0.25, 0.125, 0.625]
    # signs cancel nowhere: the L1 share is not the share of the signed sum
    assert cgs.channel_abs_sums(-GRAD).tolist() == [2.0, 1.0, 5.0]
    assert cgs.shares(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        cgs.channel_abs_sums(torch.ones(3))


def test_class_counts_ratio_and_rare_group():
    counts = cgs.class_counts(LABELS, 3, ignore_index=255)
    assert counts.tolist() == [2.0, 1.0, 3.0]
    freq = counts / counts.sum()
    ratio = cgs.share_ratio(cgs.shares(cgs.channel_abs_sums(GRAD)), freq)
    assert ratio.tolist() == pytest.approx([0.75, 0.75, 1.25])
    assert cgs.rare_classes(freq, 0.2) == [1]
    assert cgs.group_sum(torch.tensor([0.25, 0.125, 0.625]), [1, 2]) == 0.75
    assert cgs.group_sum(torch.tensor([0.25, 0.125, 0.625]), []) == 0.0
    # a class with no pixels has no ratio; argmax maps are counted without an ignore value
    r = cgs.share_ratio(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    assert r[0] == 0.5 and math.isnan(float(r[1]))
    assert cgs.class_counts(torch.tensor([[0, 1, 1]]), 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        cgs.class_counts(torch.tensor([0, 3]), 3, ignore_index=255)
