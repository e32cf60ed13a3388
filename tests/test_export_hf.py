"""`c2vkd export RUN --format hf`: a folder transformers loads offline, with the run's classes, normalisation,
evaluation size and a model card; other students get a c2vkd/timm folder. Every comparison here is done
again by the test itself (hooks and transformers' own loaders), not read from the export's report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import _toy
from c2vkd.cli import main
from c2vkd.config import load_config
from c2vkd.data import sample_root
from c2vkd.engine.trainer import Trainer
from c2vkd.engine.weights import save_student
from c2vkd.runners.export import ExportError, export_run, load_run_student

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE_CLASSES = json.loads((sample_root() / "classes.json").read_text())["classes"]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-iteration KD run on the bundled CamVid sample: segformer_b0 student, a toy CNN teacher checkpoint
    made here, the `kd` preset; evaluated on the 16 test frames (writes eval_test.json)."""
    tmp = tmp_path_factory.mktemp("hf")
    teacher = save_student(tmp / "teacher.safetensors", _toy.ToyCNN(11), "toy_cnn", 11, {}, SAMPLE_CLASSES)
    cfg = load_config("datasets/camvid_sample.yaml", [
        f"data.root={sample_root()}", "data.train_transform.crop_size=[64,64]", "data.batch_size=2",
        "student.name=segformer_b0", "teacher.name=toy_cnn", f"teacher.checkpoint={teacher}",
        "optim.lr=0.001", "schedule.iters=2", "train.progress=false", "eval.split=null",
        "eval.final_split=test", f"experiment.output_dir={tmp}", "train.device=cpu"],
        layers=["methods/kd.yaml"])
    Trainer(cfg, run_dir=tmp / "run").fit()
    return tmp / "run"


def test_hf_export_loads_offline_and_matches_student_logits(sample_run: Path, tmp_path: Path) -> None:
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

    m = export_run(sample_run, formats=["hf"], out_dir=tmp_path, command="c2vkd export RUN --format hf")
    folder = tmp_path / "hf"
    assert m["files"]["hf"]["max_abs_diff"] < 1e-4
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(
        m["files"]["hf"]["files"])
    assert m["eval_size"] == [180, 240]  # the sample's frames are 240x180 and eval_transform is `whole`

    hf = SegformerForSemanticSegmentation.from_pretrained(folder, local_files_only=True).eval()
    proc = SegformerImageProcessor.from_pretrained(folder, local_files_only=True)
    assert hf.config.id2label == dict(enumerate(SAMPLE_CLASSES))
    assert hf.config.label2id == {c: i for i, c in enumerate(SAMPLE_CLASSES)}
    assert proc.size == {"height": 180, "width": 240} and proc.do_reduce_labels is False
    cfg = load_config(sample_run / "config.yaml")
    assert list(proc.image_mean) == cfg["data"]["mean"] and list(proc.image_std) == cfg["data"]["std"]

    # HF SegFormer returns logits at 1/4 of the input: compare them with our decode head's output (a hook,
    # before our bilinear upsampling), then upsample them as we do and compare with our final logits
    student, _, _, _ = load_run_student(sample_run)
    quarter: list[torch.Tensor] = []
    student.decode_head.register_forward_hook(lambda _m, _i, out: quarter.append(out))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = student(x)
        theirs = hf(pixel_values=x).logits
    assert theirs.shape == (2, 11, 24, 32) and quarter[-1].shape == theirs.shape
    torch.testing.assert_close(theirs, quarter[-1], atol=1e-5, rtol=0)
    up = F.interpolate(theirs, size=(96, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[:, 0], ours[:, 1])  # a real, non-constant output

    # the processor does what our evaluation transform does: scale to [0, 1] and normalise with mean/std
    img = torch.randint(0, 256, (180, 240, 3), dtype=torch.uint8)
    pv = proc(images=img.numpy(), return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(cfg["data"]["mean"]), torch.tensor(cfg["data"]["std"])
    want = (img.permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(pv, want, atol=1e-5, rtol=0)

    # the model card: teacher, method preset, data, schedule, test mIoU + one row per class, commands
    card = (folder / "README.md").read_text()
    ev = json.loads((sample_run / "eval_test.json").read_text())
    assert f"## Test mIoU: {100 * ev['miou']:.2f} %" in card
    for name, iou in zip(SAMPLE_CLASSES, ev["iou"]):
        assert (f"| {name} | {100 * iou:.2f} |" if iou is not None else f"| {name} | n/a |") in card
    assert "`toy_cnn`" in card and "teacher.safetensors" in card and "`kd` preset" in card
    assert "2 iterations, batch 2" in card and "camvid" in card
    # how it was evaluated, not one size (the frames' 180x240 was read as "evaluated at 180x240": issue 30)
    assert "| evaluation | split `test`; each image whole, at its native size; one forward pass |" in card
    assert f"c2vkd distill {sample_run}/config.yaml" in card and "c2vkd export RUN --format hf" in card


def test_hf_export_that_does_not_reproduce_is_refused(sample_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import c2vkd.runners.export.hf as ex

    real = ex.decode_head_logits
    monkeypatch.setattr(ex, "decode_head_logits", lambda m, x: tuple(t + 1e-3 for t in real(m, x)))
    with pytest.raises(ExportError, match=r"hf export of segformer_b0 does not reproduce.*0\.001 > 0\.0001"):
        export_run(sample_run, formats=["hf"], out_dir=tmp_path)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_hf_export_command(sample_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(sample_run), "--format", "hf,safetensors", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hf " in out and "from_pretrained" in out and "[1, 3, 180, 240]" in out
    card = (tmp_path / "hf/README.md").read_text()
    assert f"c2vkd export {sample_run} --format hf,safetensors --out {tmp_path}" in card


def _generic_run(tmp_path: Path, name: str, k: int = 3) -> tuple[Path, torch.nn.Module]:
    from c2vkd.config import dump_config
    from c2vkd.data.synthetic import write_folder
    from c2vkd.models import build_model

    root = write_folder(tmp_path / "ds", {"train": 1, "test": 1}, size_hw=(64, 96))
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(dump_config(load_config(None, [f"student.name={name}",
                                                                             f"data.root={root}"])))
    model = build_model(name, k).eval()
    save_student(tmp_path / "s.safetensors", model, name, k, {}, ["a", "b", "c"])
    return tmp_path / "run", model


def test_non_segformer_student_gets_c2vkd_folder(tmp_path: Path) -> None:
    from c2vkd.models import build_model

    run, model = _generic_run(tmp_path, "toy_vit")
    m = export_run(run, checkpoint=tmp_path / "s.safetensors", formats=["hf"], out_dir=tmp_path / "out")
    folder = tmp_path / "out/hf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    conf = json.loads((folder / "config.json").read_text())
    assert conf["architecture"] == "toy_vit" and conf["num_classes"] == 3 and conf["label_names"] == ["a", "b", "c"]
    assert conf["pretrained_cfg"]["input_size"] == [3, 64, 96] and m["eval_size"] == [64, 96]
    back = build_model("toy_vit", 3, pretrained=str(folder)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    card = (folder / "README.md").read_text()
    assert "build_model('toy_vit', 3, pretrained='FOLDER')" in card and "library_name: c2vkd" in card


def test_timm_encoder_student_folder_loads_into_timm(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    run, model = _generic_run(tmp_path, "pvtv2_b0")
    export_run(run, checkpoint=tmp_path / "s.safetensors", formats=["hf"], out_dir=tmp_path / "out")
    enc_dir = tmp_path / "out/hf/encoder"
    conf = json.loads((enc_dir / "config.json").read_text())
    assert conf["architecture"] == "pvt_v2_b0"
    enc = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=0).eval()
    enc.load_state_dict(load_file(str(enc_dir / "model.safetensors")), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), model.encoder.forward_features(x), atol=0, rtol=0)


def test_hf_export_keeps_segformer_config_overrides(tmp_path: Path) -> None:
    """student.kwargs change the architecture (here a 64-wide decoder): the HF config carries them."""
    from transformers import SegformerForSemanticSegmentation

    from c2vkd.config import dump_config
    from c2vkd.data.synthetic import write_folder
    from c2vkd.models import build_model

    root = write_folder(tmp_path / "ds", {"train": 1, "test": 1}, size_hw=(64, 64))
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(dump_config(load_config(None, [
        "student.name=segformer_b0", "student.kwargs={decoder_hidden_size: 64}", f"data.root={root}"])))
    model = build_model("segformer_b0", 3, decoder_hidden_size=64).eval()
    save_student(tmp_path / "s.safetensors", model, "segformer_b0", 3, {"decoder_hidden_size": 64}, ["a", "b", "c"])
    export_run(tmp_path / "run", checkpoint=tmp_path / "s.safetensors", formats=["hf"], out_dir=tmp_path / "out")
    hf = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "out/hf", local_files_only=True).eval()
    assert hf.config.decoder_hidden_size == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        up = F.interpolate(hf(pixel_values=x).logits, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(up, model(x), atol=1e-5, rtol=0)
