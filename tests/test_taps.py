"""Feature taps (forward hooks), tap listing and shape probing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from c2vkd.models import FeatureTaps, build_model, format_taps, list_taps, probe_shapes

K = 5


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return build_model("segformer_b0", K).eval()


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return build_model("deeplabv3plus_r18", K).eval()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_taps_return_the_hooked_tensors(student: nn.Module, teacher: nn.Module) -> None:
    cases = ((student, ["feat", "stage1"], "stage4"), (teacher, ["feat", "layer1"], "backbone.layer4"))
    for model, names, path in cases:
        manual: dict[str, torch.Tensor] = {}
        module = dict(model.named_modules())[path]
        handle = module.register_forward_hook(lambda m, a, o: manual.__setitem__("out", o))
        with FeatureTaps(model, names) as taps, torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
            assert taps.outputs["feat"] is manual["out"]
            assert list(taps.outputs) == names
        handle.remove()


def test_alias_and_path_share_one_hook(teacher: nn.Module) -> None:
    before = _hook_count(teacher)
    with FeatureTaps(teacher, ["feat", "layer4", "backbone.layer4", "feat"]) as taps, torch.no_grad():
        assert _hook_count(teacher) == before + 2  # one root pre-hook (clearing) + one hook on layer4
        teacher(torch.randn(1, 3, 64, 64))
        out = taps.outputs
        assert list(out) == ["feat", "layer4", "backbone.layer4"]
        assert out["feat"] is out["layer4"] is out["backbone.layer4"]


def test_outputs_cleared_at_each_forward_and_by_pop(student: nn.Module) -> None:
    seen_during_forward: list[list[str]] = []
    with FeatureTaps(student, ["feat", "stage1"]) as taps, torch.no_grad():
        student(torch.randn(1, 3, 64, 64))
        first = taps.outputs["feat"]
        # while the next forward is in stage2, nothing from the previous forward may remain
        h = student.stage2.register_forward_hook(lambda *a: seen_during_forward.append(sorted(taps.outputs)))
        student(torch.randn(1, 3, 64, 64))
        h.remove()
        assert seen_during_forward == [["stage1"]]
        assert taps.outputs["feat"] is not first
        popped = taps.pop()
        assert set(popped) == {"feat", "stage1"} and taps.outputs == {}
        with pytest.raises(KeyError, match="did not fire"):
            taps.pop()


def test_student_features_keep_their_graph(student: nn.Module) -> None:
    student.train()
    try:
        with FeatureTaps(student, ["feat"]) as taps:
            student(torch.randn(2, 3, 64, 64))
            feat = taps.pop()["feat"]
        assert feat.requires_grad
        feat.pow(2).mean().backward()
        assert student.segformer.stages[0].patch_embeddings.proj.weight.grad is not None
    finally:
        student.zero_grad(set_to_none=True)
        student.eval()


def test_unknown_name_suggests_and_nothing_is_registered(student: nn.Module, teacher: nn.Module) -> None:
    before = _hook_count(teacher)
    with pytest.raises(KeyError, match=r"Did you mean: .*layer4"):
        FeatureTaps(teacher, ["feat", "layr4"])
    assert _hook_count(teacher) == before
    with pytest.raises(KeyError, match=r"Did you mean: .*stage4.*Aliases: feat -> stage4"):
        FeatureTaps(student, ["stage_4"])
    with pytest.raises(TypeError):
        FeatureTaps(student, "feat")  # type: ignore[arg-type]


def test_remove_leaves_no_hooks(teacher: nn.Module) -> None:
    before = _hook_count(teacher)
    taps = FeatureTaps(teacher, ["feat", "aspp", "decoder", "backbone.layer2.1.conv1"])
    assert _hook_count(teacher) == before + 5
    taps.remove()
    taps.remove()  # idempotent
    assert _hook_count(teacher) == before
    with FeatureTaps(teacher, ["layer1"]):
        pass
    assert _hook_count(teacher) == before


def test_tuple_output_module_yields_first_tensor(teacher: nn.Module) -> None:
    with FeatureTaps(teacher, ["backbone", "layer1"]) as taps, torch.no_grad():
        teacher(torch.randn(1, 3, 64, 64))
        assert taps.outputs["backbone"] is taps.outputs["layer1"]  # backbone returns [c1, c2, c3, c4]


def test_wrapped_models_ddp_and_compile(student: nn.Module, tmp_path: Path) -> None:
    import torch.distributed as dist

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), FeatureTaps(student, ["feat"]) as ref_taps:
        student(x)
        ref = ref_taps.pop()["feat"]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(student)
        with FeatureTaps(ddp, ["feat", "segformer.stages.3"]) as taps, torch.no_grad():
            ddp(x)
            torch.testing.assert_close(taps.outputs["feat"], ref)
    finally:
        dist.destroy_process_group()

    torch._dynamo.reset()
    compiled = torch.compile(student, backend="eager")  # backend without a C++ toolchain; hooks are traced
    with FeatureTaps(compiled, ["feat"]) as taps, torch.no_grad():
        compiled(x)
        torch.testing.assert_close(taps.pop()["feat"], ref)
        # names resolve on the compiled wrapper as on the model
        assert taps.paths == {"feat": "stage4"}
    torch._dynamo.reset()


def test_list_and_format_taps_teacher(teacher: nn.Module) -> None:
    teacher.train()
    try:
        infos = list_taps(teacher, input_hw=(128, 128))
        assert teacher.training  # mode restored
    finally:
        teacher.eval()
    by_name = {t.name: t for t in infos}
    l4 = by_name["backbone.layer4"]
    assert l4.stride == 16 and l4.shape == (1, 512, 8, 8) and set(l4.alias.split(",")) == {"feat", "layer4"}
    assert by_name["backbone.layer1"].stride == 4 and by_name["aspp"].alias == "aspp"
    assert by_name["classifier"].stride == 4
    assert "backbone" not in by_name  # returns a list, not a tensor
    names = [t.name for t in infos]
    assert names.index("backbone.conv1") < names.index("backbone.layer4") < names.index("classifier")
    assert names.index("aspp") < names.index("aspp.project")  # call order: parents before children
    table = format_taps(infos, title="deeplabv3plus_r18 @ 128x128")
    assert "backbone.layer4" in table and "[B, 512, 8, 8]" in table and "feat" in table
    short = format_taps(list_taps(teacher, (128, 128), max_depth=1), aliased_only=True)
    assert short.splitlines()[0].split() == ["module", "alias", "shape", "stride"]
    assert [ln.split()[0] for ln in short.splitlines()[2:]] == ["aspp", "decoder", "classifier"]


def test_list_taps_student_odd_size(student: nn.Module) -> None:
    infos = {t.name: t for t in list_taps(student, input_hw=(97, 131))}
    assert infos["stage4"].shape == (1, 256, 4, 5) and infos["stage4"].alias == "feat,stage4"
    assert infos["stage4"].stride == pytest.approx(97 / 4)
    assert infos["decode_head.activation"].alias == "decoder"
    assert "[B, 256, 4, 5]" in format_taps(list(infos.values()))


def test_probe_shapes_restores_modes_and_statistics(teacher: nn.Module) -> None:
    teacher.train()
    teacher.backbone.eval()  # e.g. a frozen backbone inside a training model
    bn = teacher.decoder.fuse[0][1]
    stats = bn.running_mean.clone()
    hooks = _hook_count(teacher)
    try:
        shapes = probe_shapes(teacher, ["feat", "decoder"], (96, 128), batch=2)
        assert shapes == {"feat": (2, 512, 6, 8), "decoder": (2, 256, 24, 32)}
        assert teacher.training and not teacher.backbone.training and teacher.aspp.training
        torch.testing.assert_close(bn.running_mean, stats)  # ran in eval mode
        assert _hook_count(teacher) == hooks
    finally:
        teacher.eval()
