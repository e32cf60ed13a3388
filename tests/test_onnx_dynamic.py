"""`c2vkd export --format onnx --dynamic`: one graph with dynamic batch / height / width that gives the torch
student's logits at several input sizes (checked here again with onnxruntime when installed, else the pure
numpy onnx.reference evaluator), and a clear refusal when the trace froze a shape."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import _toy  # noqa: F401  (registers toy_vit)
from c2vkd.cli import main
from c2vkd.config import dump_config, load_config
from c2vkd.engine.weights import save_student
from c2vkd.runners.export import ExportError, export_run
from c2vkd.models import MODELS, build_model
from c2vkd.models.base import SegmentationModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return torch.from_numpy(ReferenceEvaluator(onnx.load(str(path))).run(None, {"image": x.numpy()})[0])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])


def _student_run(tmp_path: Path, name: str) -> torch.nn.Module:
    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, [f"student.name={name}"])))
    model = build_model(name, 3).eval()
    save_student(tmp_path / "s.safetensors", model, name, 3, {}, ["a", "b", "c"])
    return model


@pytest.mark.parametrize("name", ["toy_vit", "segformer_b0"])
def test_dynamic_onnx_matches_torch_at_two_sizes(tmp_path: Path, name: str) -> None:
    import onnx

    model = _student_run(tmp_path, name)
    m = export_run(tmp_path, checkpoint=tmp_path / "s.safetensors", formats=["onnx"], input_hw=(64, 96),
                   dynamic=True, out_dir=tmp_path / "out")
    assert m["input"]["shape"] == ["batch", 3, "height", "width"]
    path = tmp_path / "out/student.onnx"
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    # sizes other than the traced 64x96 and other than the export's own second check
    for shape in [(1, 3, 80, 72), (3, 3, 56, 104)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        got = _run_onnx(path, x)
        assert got.shape == (shape[0], 3, *shape[2:])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


class _FrozenShape(SegmentationModel):
    """Reads the input size as Python ints: a trace freezes it, so a dynamic graph would be wrong."""

    default_taps = {"feat": "conv"}

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, output_stride=2)
        self.conv = torch.nn.Conv2d(3, num_classes, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])
        return F.interpolate(self.conv(x), size=(h, w), mode="bilinear", align_corners=False)


def test_dynamic_export_of_a_frozen_trace_is_refused(tmp_path: Path) -> None:
    MODELS.add("frozen_shape_test", _FrozenShape)
    try:
        _student_run(tmp_path, "frozen_shape_test")
        with pytest.raises(ExportError, match=r"does not reproduce the student at a second input size"):
            export_run(tmp_path, checkpoint=tmp_path / "s.safetensors", formats=["onnx"], input_hw=(32, 48),
                       dynamic=True, out_dir=tmp_path / "out")
        assert not (tmp_path / "out/student.onnx").exists()
        # without --dynamic the fixed-size graph is right at its own size
        m = export_run(tmp_path, checkpoint=tmp_path / "s.safetensors", formats=["onnx"], input_hw=(32, 48),
                       out_dir=tmp_path / "out")
        assert m["files"]["onnx"]["max_abs_diff"] < 1e-4
    finally:
        MODELS.remove("frozen_shape_test")


def test_export_defaults_to_the_runs_evaluation_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from c2vkd.data.synthetic import write_folder

    root = write_folder(tmp_path / "ds", {"train": 1, "test": 2}, size_hw=(40, 56))
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(dump_config(load_config(None, ["student.name=toy_vit",
                                                                             f"data.root={root}"])))
    save_student(tmp_path / "s.safetensors", build_model("toy_vit", 3), "toy_vit", 3, {}, ["a", "b", "c"])
    assert main(["export", str(tmp_path / "run"), "--checkpoint", str(tmp_path / "s.safetensors"), "--format",
                 "onnx", "--dynamic", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "onnx dynamic axes verified at 1x3x40x56 and 2x3x49x81" in out
    # an explicit eval_transform.size wins over the images' size
    (tmp_path / "run/config.yaml").write_text(dump_config(load_config(None, [
        "student.name=toy_vit", f"data.root={root}", "data.eval_transform={mode: resize, size: [48, 64]}"])))
    m = export_run(tmp_path / "run", checkpoint=tmp_path / "s.safetensors", formats=["onnx"],
                   out_dir=tmp_path / "out2")
    assert m["input"]["shape"] == [1, 3, 48, 64]
    with pytest.raises(ExportError, match="--dynamic applies to the onnx format"):
        export_run(tmp_path / "run", checkpoint=tmp_path / "s.safetensors", formats=["torchscript"], dynamic=True)
