"""`c2vkd info` (models/report.py) and the "bring your own model" example of docs/models.md (run as written)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import _toy  # noqa: F401  (registers toy_cnn / toy_vit)
from c2vkd.cli import main
from c2vkd.models import MODELS, build_model
from c2vkd.models.report import count_flops, count_params, format_info, model_info

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_params_are_numel_sums() -> None:
    model = build_model("toy_cnn", 3)
    model.layer1[0].weight.requires_grad_(False)
    p = count_params(model)
    assert p["total"] == sum(t.numel() for t in model.parameters())
    assert p["trainable"] == p["total"] - model.layer1[0].weight.numel()
    assert p["encoder"] is None and p["decoder"] is None  # toy_cnn has no backbone/encoder prefix
    seg = build_model("segformer_b0", 3)
    ps = count_params(seg)
    assert ps["encoder"] == sum(t.numel() for n, t in seg.named_parameters() if n.startswith("segformer."))
    assert ps["encoder"] + ps["decoder"] == ps["total"]


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_conv_flops_closed_form(k: int, stride: int, pad: int) -> None:
    cin, cout, h, w = 5, 7, 12, 10
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    total, _ = count_flops(conv, torch.randn(2, cin, h, w))
    assert total == 2 * 2 * cin * cout * k * k * ho * wo  # batch 2; FLOPs = 2 x MACs, bias not counted


def test_linear_and_cpu_attention_flops() -> None:
    lin = nn.Linear(16, 8)
    assert count_flops(lin, torch.randn(3, 16))[0] == 2 * 3 * 16 * 8

    class Attn(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, q, q)

    b, heads, n, d = 2, 3, 10, 4
    # PyTorch's table lacks the CPU fused kernel; we count Q K^T and A V: 2 * (2 * B*h*N*N*d)
    assert count_flops(Attn(), torch.randn(b, heads, n, d))[0] == 4 * b * heads * n * n * d


def test_per_module_flops_add_up() -> None:
    model = build_model("pvtv2_b0", 3)
    total, per = count_flops(model, torch.randn(1, 3, 64, 64))
    assert set(per) == {"encoder", "decode_head"} and sum(per.values()) == total > 0


def test_model_info_and_table() -> None:
    threads = torch.get_num_threads()
    info = model_info("toy_vit", num_classes=3, input_hw=(32, 48), runs=3, warmup=1, threads=1)
    assert info.threads == 1 and torch.get_num_threads() == threads  # restored
    assert info.params == sum(p.numel() for p in build_model("toy_vit", 3).parameters())
    assert len(info.latency_ms) == 3 and all(t > 0 for t in info.latency_ms)
    assert info.to_dict()["flops_convention"] == "FLOPs = 2 x MACs"
    text = format_info(info)
    assert "GFLOPs (FLOPs = 2 x MACs)" in text and "median" in text and "1x3x32x48" in text
    with pytest.raises(ValueError, match="runs"):
        from c2vkd.models.report import measure_latency

        measure_latency(nn.Identity(), torch.zeros(1), runs=0)


def test_info_command_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "toy_cnn", "--input", "32x32", "--num-classes", "3", "--runs", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["model", "toy_cnn"]
    assert any(line.startswith("params (total)") for line in lines)
    assert re.search(r"GFLOPs \(FLOPs = 2 x MACs\)\s+\d+\.\d\d", out)
    assert re.search(r"latency ms, 2 runs\s+median [\d.]+\s+min [\d.]+\s+max [\d.]+", out)
    assert main(["info", "toy_cnx"]) == 2
    assert "toy_cnn" in capsys.readouterr().err


# --------------------------------------------------------------------------- docs/models.md worked example
def _doc_blocks() -> dict[str, str]:
    """Code blocks of docs/models.md preceded by ``<!-- file: NAME -->``: {NAME: code}."""
    text = DOCS.read_text()
    found = re.findall(r"<!-- file: (\S+) -->\s*```[a-z]*\n(.*?)```", text, flags=re.S)
    return dict(found)


def test_docs_table_lists_every_builtin_model() -> None:
    text = DOCS.read_text()
    builtin = [n for n in MODELS.names() if MODELS.get(n).__module__.startswith("c2vkd.models")]
    missing = [n for n in builtin if f"`{n}`" not in text]
    assert not missing, f"docs/models.md does not list {missing}"


def test_bring_your_own_model_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from c2vkd.config import load_config
    from c2vkd.data.synthetic import write_folder
    from c2vkd.engine.trainer import Trainer

    blocks = _doc_blocks()
    assert {"my_models.py", "my_teacher.yaml", "my_kd.yaml"} <= set(blocks)
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    monkeypatch.chdir(tmp_path)  # `imports: [my_models.py]` and `runs/...` are relative to the working dir
    root = write_folder(tmp_path / "ds", {"train": 4, "val": 2, "test": 2}, size_hw=(32, 40))
    quick = [f"data.root={root}", "data.format=folder", "data.train_transform.crop_size=[32,32]",
             "data.train_transform.base_size=40", "data.batch_size=2", "data.num_workers=0", "schedule.iters=2",
             "schedule.warmup_iters=0", "train.progress=false", "train.device=cpu", "eval.split=null",
             "eval.final_split=null", "train.ckpt_interval=0"]
    try:
        # 1. train the custom teacher as the "student" of a supervised run (as the docs say)
        tcfg = load_config("my_teacher.yaml", quick)
        assert "my_teacher" in MODELS
        Trainer(tcfg, run_dir=Path("runs/my_teacher")).fit()
        assert Path("runs/my_teacher/student.safetensors").is_file()
        # the model contract, as `c2vkd taps` / distillation use it
        teacher = build_model("my_teacher", 3)
        from c2vkd.models import probe_shapes

        shapes = probe_shapes(teacher, ["feat", "stage1"], (64, 64), batch=1)
        assert shapes["feat"][-2:] == (8, 8) and shapes["stage1"][-2:] == (32, 32)
        assert teacher(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)
        # 2. distil from it with the docs' config (a toy student and a cheap loss keep the test fast)
        cfg = load_config("my_kd.yaml", [*quick, "student.name=toy_vit",
                                         "losses=[{name: kd, weight: 1.0}, {name: fitnet, weight: 0.5}]"])
        assert cfg["teacher"]["name"] == "my_teacher"
        t = Trainer(cfg, run_dir=Path("runs/my_kd"))
        assert type(t.teacher).__name__ == "MyTeacher" and not t.teacher.training
        t.fit()
        assert Path("runs/my_kd/student.safetensors").is_file()
    finally:
        for name in [n for n in MODELS.names() if n.startswith("my_")]:
            MODELS._items.pop(name)  # the docs' plugin registered names in the process-wide registry
