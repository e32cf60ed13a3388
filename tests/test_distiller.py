"""Distiller wiring that the maths tests do not see (found by benchmarks/mutation.py on engine/distiller.py):
train() really trains the student, the taps hooked are the ones each loss's arguments name, and the losses are
sized with the dataset's class count."""
from __future__ import annotations

import torch

from c2vkd.engine.distiller import Distiller, loss_tap_names

from _toy import ToyCNN, ToyViT


def test_taps_follow_the_loss_arguments():
    cfgs = [{"name": "fitnet", "weight": 1.0, "student_tap": "stage", "teacher_tap": "layer1"},
            {"name": "kd", "weight": 1.0}]
    assert loss_tap_names(cfgs) == (["stage"], ["layer1"])


def test_train_and_eval_modes_and_class_count():
    torch.manual_seed(0)
    student, teacher = ToyViT(5, drop=0.5), ToyCNN(5)
    losses = [{"name": "fitnet", "weight": 1.0, "student_tap": "stage", "teacher_tap": "layer1"},
              {"name": "ce", "weight": 1.0, "class_weights": [1.0, 2.0, 3.0, 4.0, 5.0]}]
    d = Distiller(student, losses, num_classes=5, ignore_index=255, teacher=teacher, probe_hw=(32, 32))
    d.eval()
    assert not student.training and not teacher.training
    d.train()  # the default mode is training: dropout and BatchNorm statistics of the student are live
    assert student.training and all(m.training for m in student.modules())
    assert not teacher.training  # the teacher stays frozen in eval mode
    # the fitnet adapter maps the student's 12 channels to the teacher's layer1 (8 channels) at its size
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    total, terms, logits = d(x, y)
    assert logits.shape == (2, 5, 32, 32) and set(terms) >= {"fitnet", "ce"}
    assert d.losses[0].adapter(torch.zeros(1, 12, 4, 4), (16, 16)).shape == (1, 8, 16, 16)


def test_a_tag_tells_two_entries_of_one_loss_apart():
    """`tag:` appends _TAG to an entry's term names (logs, weights, balancing) and changes no number: the same
    loss twice (VLFD on two stages, as the ablation's c2vkd-abl-vlfd-s34) trains as two sets of terms."""
    import pytest

    from c2vkd.config import ConfigError
    from c2vkd.engine.loss_config import validate_loss_args

    torch.manual_seed(0)
    student, teacher = ToyViT(5), ToyCNN(5)
    kd = {"name": "kd", "weight": 1.0, "temperature": 2.0}
    d = Distiller(student, [kd, {**kd, "tag": "b", "weight": 0.5}], num_classes=5, ignore_index=255,
                  teacher=teacher, probe_hw=(32, 32))
    assert d.term_weights() == {"kd": 1.0, "kd_b": 0.5} and d.loss_labels == ["kd", "kd_b"]
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    total, terms, _ = d(x, y)
    assert torch.equal(terms["kd"], terms["kd_b"])  # the tag changes names, not values
    assert torch.allclose(total, 1.5 * terms["kd"])
    d.set_term_weights({"kd_b": 2.0})  # the balancer writes by the run's term names
    assert d.term_weights() == {"kd": 1.0, "kd_b": 2.0} and d.losses[1].weights == {"kd": 2.0}
    with pytest.raises(ValueError, match="configured twice.*tag"):
        Distiller(ToyViT(5), [kd, kd], num_classes=5, ignore_index=255, teacher=ToyCNN(5), probe_hw=(32, 32))
    with pytest.raises(ConfigError, match="tag must be"):
        validate_loss_args([{**kd, "tag": "s-3"}])
    validate_loss_args([{**kd, "tag": "s3"}])
