"""VLFD `reduction`: 'distribution' = per-distribution means (method.md's bound discussion), checked against
plain formulas written here, and the module passing the option to all three terms."""
from __future__ import annotations

import math

import pytest
import torch

from c2vkd.losses import LOSSES, LossContext, LossInputs
from c2vkd.losses.vlfd import linguistic_loss, patch_graph_loss, vlfd_global_loss


def _kl_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) per row of [R, C] in float64, written out."""
    pt = torch.softmax(t.double(), 1)
    return (pt * (pt.log() - torch.log_softmax(s.double(), 1))).sum(1)


def test_global_and_linguistic_distribution_is_mean_kl_per_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 7, 3, 4, generator=g), torch.randn(2, 7, 3, 4, generator=g)
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 7)  # noqa: E731
    per_pixel = _kl_rows(rows(ft), rows(fs))
    assert float(vlfd_global_loss(fs, ft, reduction="distribution")) == pytest.approx(float(per_pixel.mean()), rel=1e-5)
    assert float(vlfd_global_loss(fs, ft)) == pytest.approx(float(per_pixel.mean()) / 7, rel=1e-5)
    es, et = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    per_sample = _kl_rows(et, es)
    assert float(linguistic_loss(es, et, reduction="distribution")) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert float(linguistic_loss(es, et)) == pytest.approx(float(per_sample.mean()) / 5, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        vlfd_global_loss(fs, ft, reduction="sum")


@pytest.mark.parametrize("mode", ["gram", "naive"])
def test_patch_distribution_drops_the_c_minus_1_normalisation(mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 6, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)

    def rows(x: torch.Tensor) -> torch.Tensor:
        r = x.double().permute(0, 2, 3, 1).reshape(-1, 6)
        r = r / r.norm(dim=1, keepdim=True)
        return r - r.mean(dim=1, keepdim=True)

    a, b = rows(ft), rows(fs)
    unnormalised = ((a @ a.T - b @ b.T) ** 2).mean().item()
    got = float(patch_graph_loss(fs, ft, exact_mode=mode, reduction="distribution"))
    assert got == pytest.approx(unnormalised, rel=1e-5)
    assert float(patch_graph_loss(fs, ft, exact_mode=mode)) == pytest.approx(unnormalised / 25, rel=1e-5)
    assert got <= 4.0  # rows of X have norm <= 1, so every affinity difference is within [-2, 2]


def test_module_passes_reduction_to_every_term() -> None:
    ctx = LossContext(num_classes=3, student_shapes={"feat": (1, 8, 4, 4)}, teacher_shapes={"feat": (1, 16, 4, 4)})
    torch.manual_seed(0)
    elem = LOSSES.get("vlfd")(ctx)
    torch.manual_seed(0)
    dist = LOSSES.get("vlfd")(ctx, reduction="distribution")
    dist.load_state_dict(elem.state_dict())
    inputs = LossInputs(student_logits=torch.zeros(2, 3, 8, 8), target=torch.zeros(2, 8, 8, dtype=torch.long),
                        student_feats={"feat": torch.randn(2, 8, 4, 4)}, teacher_feats={"feat": torch.randn(2, 16, 4, 4)})
    with torch.no_grad():
        e, d = elem(inputs), dist(inputs)
    c_t, dim = 16, elem.linguistic_dim
    assert float(d["vlfd_global"]) == pytest.approx(float(e["vlfd_global"]) * c_t, rel=1e-5)
    assert float(d["vlfd_linguistic"]) == pytest.approx(float(e["vlfd_linguistic"]) * dim, rel=1e-5)
    assert float(d["vlfd_patch"]) == pytest.approx(float(e["vlfd_patch"]) * (c_t - 1) ** 2, rel=1e-5)
    assert not math.isclose(float(d["vlfd_patch"]), float(e["vlfd_patch"]))
    with pytest.raises(ValueError, match="reduction"):
        LOSSES.get("vlfd")(ctx, reduction="pixel")
