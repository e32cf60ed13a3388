"""teacher.amp: the live teacher's forward in its own precision, its outputs handed to the losses in the
student's dtype; null keeps the old behaviour (teacher under train.amp) bit for bit."""
from __future__ import annotations

import pytest
import torch

from c2vkd.engine.distiller import Distiller
from c2vkd.losses.kd import kd_loss
from c2vkd.utils.device import teacher_autocast

from _toy import ToyCNN, ToyViT

CPU = torch.device("cpu")
LOSSES = [{"name": "kd", "weight": 1.0, "temperature": 2.0}]


def build(amp):
    torch.manual_seed(0)
    student, teacher = ToyViT(5, drop=0.0), ToyCNN(5)
    d = Distiller(student, LOSSES, num_classes=5, ignore_index=255, teacher=teacher, probe_hw=(32, 32),
                  teacher_autocast=teacher_autocast(CPU, amp))
    seen = {}
    teacher.layer1.register_forward_hook(lambda m, i, o: seen.__setitem__("dtype", o.dtype))
    return d, teacher, seen


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2, 32, 32), generator=g)


def test_bf16_teacher_runs_in_bf16_and_feeds_the_losses_fp32():
    x, y = batch()
    d, teacher, seen = build("bf16")
    total, terms, s_logits = d(x, y)
    assert seen["dtype"] == torch.bfloat16 and s_logits.dtype == torch.float32 and total.dtype == torch.float32
    # the KD term is the pure function of the student logits and the bf16 teacher's logits, cast to fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t16 = teacher(x)
    assert t16.dtype == torch.bfloat16
    want = kd_loss(s_logits.detach(), t16.float(), temperature=2.0, ignore_index=255, target=y)
    assert float(terms["kd"]) == pytest.approx(float(want), rel=1e-6)
    # ... and differs from the fp32 teacher's by bf16 rounding only (not by a different computation)
    d32, _, seen32 = build(None)
    _, terms32, _ = d32(x, y)
    assert seen32["dtype"] == torch.float32
    assert float(terms["kd"]) != float(terms32["kd"])
    assert float(terms["kd"]) == pytest.approx(float(terms32["kd"]), rel=2e-2)


def test_off_keeps_the_teacher_fp32_under_a_bf16_student():
    x, y = batch()
    d, _, seen = build("off")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d(x, y)
    assert seen["dtype"] == torch.float32
    d_inherit, _, seen_inherit = build(None)  # null: the teacher follows train.amp, as before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_inherit(x, y)
    assert seen_inherit["dtype"] == torch.bfloat16


@pytest.mark.parametrize("bad,msg", [("half", "teacher.amp must be null, off, bf16 or fp16, got 'half'"),
                                     ("fp16", "needs a CUDA device")])
def test_bad_values_fail_when_the_run_is_built(bad, msg):
    with pytest.raises(ValueError, match=msg):
        teacher_autocast(CPU, bad)


def test_trainer_reads_teacher_amp(tmp_path):
    from c2vkd.config import load_config
    from c2vkd.data import sample_root
    from c2vkd.engine.trainer import Trainer

    cfg = load_config("datasets/camvid_sample.yaml", [
        f"data.root={sample_root()}", "data.num_workers=0", "data.batch_size=2", "data.train_transform.crop_size=[32,32]",
        "student.name=segformer_b0", "teacher.name=deeplabv3plus_r18", "teacher.allow_random_init=true",
        "teacher.amp=bf16", "teacher.channels_last=true", "losses=[{name: kd, weight: 1.0}]",
        f"experiment.output_dir={tmp_path}", "train.progress=false", "eval.split=null", "eval.final_split=null"])
    tr = Trainer(cfg, run_dir=tmp_path / "run")
    seen = {}
    tr.model.teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("dtype", o.dtype))
    x, y = batch()
    _, terms, _ = tr.model(x, y)  # 32x32, labels 0..4 of CamVid's 11 classes
    assert seen["dtype"] == torch.bfloat16 and torch.isfinite(terms["kd"])
