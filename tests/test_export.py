"""`c2vkd export`: student-only files from a run directory, each verified against the training student.

ONNX outputs are compared with onnxruntime when it is installed, else with onnx.reference.ReferenceEvaluator
(pure numpy; this environment has no onnxruntime), always after onnx.checker.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import _toy  # registers toy_cnn / toy_vit
from c2vkd.cli import main
from c2vkd.config import load_config
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.trainer import Trainer
from c2vkd.runners.export import ExportError, export_run, load_run_student
from c2vkd.utils.io import safe_load


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-iteration distillation run: toy_vit student, a toy_cnn teacher checkpoint, FitNet (has an adapter)."""
    from c2vkd.engine.weights import save_student

    tmp = tmp_path_factory.mktemp("export")
    root = write_folder(tmp / "ds", {"train": 4, "val": 2}, size_hw=(32, 40))
    teacher = save_student(tmp / "teacher.safetensors", _toy.ToyCNN(3), "toy_cnn", 3, {}, ["a", "b", "c"])
    cfg = load_config(None, [
        f"data.root={root}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.batch_size=2", "data.num_workers=0", "student.name=toy_vit", "teacher.name=toy_cnn",
        f"teacher.checkpoint={teacher}",
        "losses=[{name: ce}, {name: fitnet, weight: 0.5}]", "optim.lr=0.01", "schedule.iters=3",
        "train.progress=false", "train.ckpt_interval=2", "eval.split=null", "eval.final_split=null",
        f"experiment.output_dir={tmp}", "train.device=cpu"])
    Trainer(cfg, run_dir=tmp / "run").fit()
    return tmp / "run"


def test_export_all_formats_verified(kd_run: Path, tmp_path: Path) -> None:
    m = export_run(kd_run, formats=["safetensors", "torchscript", "onnx"], input_hw=(40, 56), out_dir=tmp_path)
    assert m["checkpoint"].endswith("iter_0000003.pt")  # the latest checkpoint by default
    assert m["model"] == "toy_vit" and m["num_classes"] == 3 and m["input"]["shape"] == [1, 3, 40, 56]
    assert set(m["files"]) == {"safetensors", "torchscript", "onnx"}
    assert all(f["max_abs_diff"] < 1e-4 for f in m["files"].values())
    assert m["files"]["onnx"]["verified_with"].startswith(("onnxruntime", "onnx.reference"))
    assert json.loads((tmp_path / "export.json").read_text())["files"].keys() == m["files"].keys()

    # student-only: exactly the student's tensors; no teacher, no FitNet adapter, no optimizer state
    ck = safe_load(kd_run / "checkpoints/iter_0000003.pt")
    assert ck["loss_heads"], "the run should have trained alignment heads (the test's premise)"
    exported = safe_load(tmp_path / "student.safetensors")
    assert set(exported) == set(ck["student"])
    assert not [k for k in exported if k.startswith(("teacher", "losses", "loss_heads", "adapter"))]
    for k, v in ck["student"].items():
        assert torch.equal(exported[k], v), k

    # the exported graphs reproduce the student's logits on a fresh input (done by hand here, too)
    student, meta, _, _ = load_run_student(kd_run)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        ref = student(x)
        ts = torch.jit.load(str(tmp_path / "student.torchscript.pt"))(x)
    torch.testing.assert_close(ts, ref, atol=1e-5, rtol=0)
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(tmp_path / "student.onnx"))
    onnx.checker.check_model(proto)
    assert {p.key: p.value for p in proto.metadata_props}["c2vkd_model"] == "toy_vit"
    out = ReferenceEvaluator(proto).run(None, {"image": x.numpy()})[0]
    assert float(abs(out - ref.numpy()).max()) < 1e-4


def test_export_specific_checkpoint_and_default_out_dir(kd_run: Path) -> None:
    m = export_run(kd_run, checkpoint=kd_run / "checkpoints/iter_0000002.pt", input_hw=(32, 32))
    assert m["checkpoint"].endswith("iter_0000002.pt") and (kd_run / "export/student.safetensors").is_file()
    ck = safe_load(kd_run / "checkpoints/iter_0000002.pt")
    exported = safe_load(kd_run / "export/student.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in ck["student"].items())


def test_verification_failure_is_an_error(kd_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import c2vkd.runners.export.traced as ex

    real = ex.run_torchscript
    monkeypatch.setattr(ex, "run_torchscript", lambda path, x: real(path, x) + 1e-3)
    with pytest.raises(ExportError, match=r"torchscript export of toy_vit does not reproduce.*0\.001 > 0\.0001"):
        export_run(kd_run, formats=["torchscript"], input_hw=(32, 32), out_dir=tmp_path)
    assert not (tmp_path / "student.torchscript.pt").exists()  # a file that failed is not left behind


def test_bad_run_dirs_are_clear_errors(kd_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="run directory not found"):
        export_run(tmp_path / "nope")
    with pytest.raises(ExportError, match="config.yaml is missing"):
        export_run(tmp_path)
    (tmp_path / "config.yaml").write_text((kd_run / "config.yaml").read_text())
    with pytest.raises(ExportError, match="no training checkpoint"):
        export_run(tmp_path)
    with pytest.raises(ExportError, match="not a directory"):
        export_run(kd_run / "config.yaml")
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(kd_run, formats=["tflite"])
    # a corrupt latest checkpoint is skipped for the previous valid one
    bad = tmp_path / "checkpoints/iter_0000009.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    bad.with_name(bad.name + ".sha256").write_text("0" * 64 + "  iter_0000009.pt\n")
    with pytest.raises(ExportError, match="fails its checksum"):
        export_run(tmp_path)


def test_export_command(kd_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", str(kd_run), "--format", "safetensors,torchscript", "--input", "32x48",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "torchscript" in out and "student.torchscript.pt" in out and "toy_vit" in out
    assert (tmp_path / "student.safetensors").is_file() and (tmp_path / "export.json").is_file()
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_export_vit_student_with_interpolated_position_embedding(tmp_path: Path) -> None:
    """deit_tiny at 40x56: padded to 48x64 and a 3x4 token grid, i.e. the antialiased bicubic resampling of
    the 14x14 position table that the ONNX exporter cannot express; the export precomputes it
    (DeiTSeg.specialize_for_export) and the verification shows the graph still matches the student."""
    from c2vkd.config import dump_config
    from c2vkd.engine.weights import save_student
    from c2vkd.models import build_model

    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, ["student.name=deit_tiny"])))
    model = build_model("deit_tiny", 3)
    save_student(tmp_path / "s.safetensors", model, "deit_tiny", 3, {}, ["a", "b", "c"])
    m = export_run(tmp_path, checkpoint=tmp_path / "s.safetensors", formats=["torchscript", "onnx"],
                   input_hw=(40, 56))
    assert m["files"]["onnx"]["max_abs_diff"] < 1e-4 and m["files"]["torchscript"]["max_abs_diff"] < 1e-4
    assert model.encoder.pos_embed.shape[1] == 197  # the student itself was not specialised


def test_finished_run_without_checkpoints_exports_its_final_student(kd_run: Path, tmp_path: Path) -> None:
    """`c2vkd demo` removes a finished stage's checkpoints/: the run's own student.safetensors is exported."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(kd_run / "config.yaml", run / "config.yaml")
    shutil.copy(kd_run / "student.safetensors", run / "student.safetensors")
    m = export_run(run, formats=["safetensors"], input_hw=(32, 32))
    assert m["checkpoint"] == str(run / "student.safetensors")
    final, exported = safe_load(kd_run / "student.safetensors"), safe_load(run / "export/student.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in final.items())
