"""`c2vkd export RUN --format hf`: a folder transformers loads offline, with the run's classes, normalisation,
preprocessing and a model card; other students get a c2vkd/timm folder. Every comparison here is done
again by the test itself (hooks and transformers' own loaders), not read from the export's report."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import _toy
from c2vkd.cli import main
from c2vkd.config import dump_config, load_config
from c2vkd.data import sample_root
from c2vkd.engine.trainer import Trainer
from c2vkd.engine.weights import save_student
from c2vkd.runners.export import ExportError, export_run, find_checkpoint, load_run_student

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
    # eval_transform `whole`: c2vkd evaluates (and predicts) every image at its own size, so the processor
    # resizes nothing (it used to resize to the first test frame's 180x240, squashing other sizes: issue 30)
    assert proc.do_resize is False and proc.size is None and proc.do_reduce_labels is False
    assert proc.resample == 2  # PIL BILINEAR, antialiased like c2vkd's resize_image (used by `resize` runs)
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
    assert ("| evaluation | split `test`; each image whole, at its native size; one forward pass |" in card
            and "180x240" not in card)
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


def _run_with(run: Path, dest: Path, overrides: list[str]) -> Path:
    """A copy of ``run`` (same checkpoints and run id) whose config.yaml has ``overrides``: another evaluation
    protocol for the same weights, without training again."""
    shutil.copytree(run, dest)
    (dest / "config.yaml").write_text(dump_config(load_config(dest / "config.yaml", overrides)))
    return dest


def _images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """A real CamVid test frame resized to each (H, W), saved losslessly as PNG (NAME = HxW)."""
    folder.mkdir()
    with Image.open(sorted((sample_root() / "images/test").iterdir())[0]) as im:
        frame = im.convert("RGB")
    paths = [folder / f"{h}x{w}.png" for h, w in sizes]
    for (h, w), path in zip(sizes, paths):
        frame.resize((w, h), Image.BILINEAR).save(path)
    return paths


def card_snippet(card: str) -> str:
    """The python block of the card's "Use it" section, as a user copies it."""
    use = card.split("## Use it", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", use, re.S)
    assert found, f"no python block in the card's Use it section:\n{use}"
    return found.group(1)


def run_card_snippet(snippet: str, folder: Path, image: Path) -> np.ndarray:
    """Exec the card's snippet unchanged but for its two placeholders (the folder and the image path);
    returns its ``seg``."""
    code = snippet.replace("'FOLDER'", repr(str(folder))).replace("'image.jpg'", repr(str(image)))
    assert str(folder) in code and str(image) in code, snippet
    scope: dict = {}
    exec(compile(code, "<model card>", "exec"), scope)
    return np.asarray(scope["seg"])


# (H, W): landscape 4:3, portrait with odd sides, a small odd wide one; none is the 180x240 of the sample
ANY_SIZES = [(240, 320), (243, 161), (97, 203)]


@pytest.mark.parametrize("overrides", [[], ["data.eval_transform.mode=resize", "data.eval_transform.size=[120,160]"]],
                         ids=["whole", "resize"])
def test_model_card_snippet_agrees_with_predict_at_any_size(sample_run: Path, tmp_path: Path,
                                                            overrides: list[str]) -> None:
    """The card's own recipe (processor, model, post_process_semantic_segmentation) gives `c2vkd predict`'s
    NAME_mask.png on images of sizes and aspect ratios other than the evaluation size (issue 30: a processor
    that resized everything to the first test image's size agreed on 83-91 % of the pixels only)."""
    run = _run_with(sample_run, tmp_path / "run", overrides) if overrides else sample_run
    export_run(run, formats=["hf"], out_dir=tmp_path / "out")
    folder = tmp_path / "out/hf"
    images = _images(tmp_path / "images", ANY_SIZES)
    assert main(["predict", str(run / "config.yaml"), "--checkpoint", str(find_checkpoint(run)),
                 "--input", str(tmp_path / "images"), "--out", str(tmp_path / "pred")]) == 0
    snippet = card_snippet((folder / "README.md").read_text())
    for (h, w), image in zip(ANY_SIZES, images):
        ours = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}_mask.png"))
        theirs = run_card_snippet(snippet, folder, image)
        assert ours.shape == theirs.shape == (h, w)
        agree = float((ours == theirs).mean())
        assert agree >= 0.999, f"{image.name}: the card's snippet agrees with c2vkd predict on {agree:.2%} only"


def test_model_card_names_what_the_snippet_does_not_reproduce(sample_run: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A protocol one transformers forward cannot follow (centre crop, sliding window, flip, autocast): the
    card's evaluation line says what c2vkd did, the snippet stays the whole-image pass, and the card and the
    export log say where `c2vkd predict` differs instead of claiming agreement."""
    run = _run_with(sample_run, tmp_path / "run", [
        "data.eval_transform.mode=center_crop", "data.eval_transform.size=[96,128]", "eval.mode=slide",
        "eval.window=[64,64]", "eval.stride=[48,48]", "eval.flip=true", "train.amp=bf16"])
    export_run(run, formats=["hf"], out_dir=tmp_path / "out")
    card = (tmp_path / "out/hf/README.md").read_text()
    assert ("| evaluation | split `test`; the central 96x128 crop of each image (padded when smaller); sliding 64x64 "
            "windows, stride 48x48; scales [1.0] + horizontal flip (softmax averaged) |") in card
    from transformers import SegformerImageProcessor

    assert SegformerImageProcessor.from_pretrained(tmp_path / "out/hf").do_resize is False  # it cannot crop
    assert "processor(images=image, return_tensors='pt')" in card_snippet(card)
    reasons = ["central 96x128 crop", "slides 64x64 windows, stride 48x48", "`eval.flip` true", "bf16 autocast"]
    assert "`seg` differs from `c2vkd predict`" in card and "writes as `NAME_mask.png`" not in card
    assert all(r in card for r in reasons)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(r in warned for r in reasons)


def _generic_run(tmp_path: Path, name: str, k: int = 3) -> tuple[Path, torch.nn.Module]:
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
