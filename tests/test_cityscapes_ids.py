"""Cityscapes labelIds -> train ids for ALL 34 labelIds (all 19 train ids and every ignored id), against the
table of cityscapesScripts' labels.py written out here, through the real dataset path (file -> ds[i]) and in
the evaluation metrics (each train id is its own class)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from c2vkd import IGNORE_INDEX
from c2vkd.data import build_dataset
from c2vkd.data.synthetic import write_cityscapes
from c2vkd.eval.metrics import ConfusionMatrix

# cityscapesScripts helpers/labels.py: (name, labelId, trainId) of the 19 evaluated classes
CITYSCAPES = [
    ("road", 7, 0), ("sidewalk", 8, 1), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("pole", 17, 5),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18),
]
# every other labelId 0..33 (unlabeled, ego vehicle, ..., ground, parking, rail track, guard rail, bridge, tunnel,
# polegroup, caravan, trailer) is ignored in evaluation
IGNORED = sorted(set(range(34)) - {lid for _, lid, _ in CITYSCAPES})


def test_all_label_ids_map_to_the_official_train_ids(tmp_path: Path) -> None:
    assert len(CITYSCAPES) == 19 and len(IGNORED) == 15
    root = write_cityscapes(tmp_path / "cs", {"val": 1}, cities=("ulm",))
    lbl = root / "gtFine/val/ulm/ulm_000000_000000_gtFine_labelIds.png"
    h, w = np.asarray(Image.open(lbl)).shape
    raw = (np.arange(h * w) % 34).reshape(h, w).astype(np.uint8)  # every labelId, several times
    assert set(np.unique(raw).tolist()) == set(range(34))
    Image.fromarray(raw).save(lbl)

    ds = build_dataset({"format": "cityscapes", "root": str(root)}, "val", train=False)
    assert ds.num_classes == 19
    assert list(ds.classes) == [name for name, _, _ in sorted(CITYSCAPES, key=lambda c: c[2])]
    label = ds[0]["label"]
    table = {lid: tid for _, lid, tid in CITYSCAPES} | {lid: IGNORE_INDEX for lid in IGNORED}
    want = torch.tensor([[table[int(v)] for v in row] for row in raw.tolist()], dtype=torch.int64)
    assert torch.equal(label, want)
    assert sorted(set(label.unique().tolist()) - {IGNORE_INDEX}) == list(range(19))

    # in evaluation every train id is its own class: a perfect prediction has IoU 1 for all 19
    cm = ConfusionMatrix(19)
    cm.update(label.clamp(0, 18), label)
    m = cm.compute()
    assert m.present == list(range(19)) and m.miou == 1.0
    assert m.num_pixels == sum(int((raw == lid).sum()) for _, lid, _ in CITYSCAPES)
