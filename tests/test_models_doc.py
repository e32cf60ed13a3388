"""Every model in docs/models.md runs at 512x512 and exposes exactly the tap shapes the table documents.

The table is parsed from the doc, so the documentation cannot drift from the code (issue: model zoo)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from c2vkd.models import MODELS, FeatureTaps, build_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
K = 19


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.strip(" []").split(","))


def documented_rows() -> dict[str, dict]:
    rows = {}
    in_table = False
    for line in DOC.read_text().splitlines():
        if line.startswith("| model | OS | `feat`"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if not in_table or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        stages = [_shape(s) for s in re.findall(r"\[[\d, ]+\]", cells[3])]
        other = {m.group(1): _shape(m.group(2)) for m in re.finditer(r"`(\w+)` (\[[\d, ]+\])", cells[5])}
        rows[name] = {"os": int(cells[1]), "feat": _shape(re.search(r"\[[\d, ]+\]", cells[2]).group(0)),
                      "stages": stages, "decoder": _shape(re.search(r"\[[\d, ]+\]", cells[4]).group(0)),
                      "other": other}
    return rows


ROWS = documented_rows()


def test_doc_table_lists_every_registered_model() -> None:
    assert len(ROWS) >= 17
    builtin = {n for n in MODELS.names() if MODELS.get(n).__module__.startswith("c2vkd.models")}
    assert set(ROWS) == builtin


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROWS))
def test_model_at_512_matches_documented_taps(name: str) -> None:
    row = ROWS[name]
    torch.manual_seed(0)
    model = build_model(name, K).eval()
    stage_alias = "layer" if model.family == "cnn" else "stage"
    names = ["feat", "decoder", *(f"{stage_alias}{i}" for i in range(1, 5)), *row["other"]]
    with torch.no_grad(), FeatureTaps(model, names) as taps:
        out = model(torch.randn(1, 3, 512, 512))
        got = {n: tuple(t.shape[1:]) for n, t in taps.pop().items()}
    assert out.shape == (1, K, 512, 512) and torch.isfinite(out).all()
    assert got["feat"] == row["feat"] and got["decoder"] == row["decoder"]
    assert [got[f"{stage_alias}{i}"] for i in range(1, 5)] == row["stages"]
    for alias, shape in row["other"].items():
        assert got[alias] == shape
    assert model.output_stride == row["os"] == 512 // row["feat"][-1]
