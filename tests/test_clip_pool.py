"""CLIP attention pool: equivalence with open_clip's / timm's pools and strict loading in every naming."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from c2vkd.models.clip_pool import ARCH_SPECS, TIMM_TO_CLIP, AttentionPool2d, load_clip_attnpool

open_clip_mr = pytest.importorskip("open_clip.modified_resnet")


@pytest.fixture(scope="module")
def ref_pool() -> torch.nn.Module:
    """open_clip's own AttentionPool2d, RN101-shaped, random init (no download)."""
    torch.manual_seed(1)
    spec = ARCH_SPECS["RN101"]
    ref = open_clip_mr.AttentionPool2d(spec["spacial_dim"], spec["embed_dim"], spec["num_heads"], spec["output_dim"])
    return ref.eval()


@pytest.fixture(scope="module")
def feat7() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 2048, 7, 7, generator=g)


def _save(sd: dict[str, torch.Tensor], path: Path) -> str:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return str(path)


def _namings(ref_sd: dict[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    openai = {f"visual.attnpool.{k}": v for k, v in ref_sd.items()}
    openai["visual.conv1.weight"] = torch.zeros(4, 3, 3, 3)       # rest of the tower: ignored
    openai["positional_embedding"] = torch.zeros(77, 8)           # text tower's, not the pool's
    timm_sd = {"head." + {v: k for k, v in TIMM_TO_CLIP.items()}[k]: v for k, v in ref_sd.items()}
    timm_sd["stem.conv1.conv.weight"] = torch.zeros(4, 3, 3, 3)
    return {
        "openai": openai,
        "open_clip_ddp": {f"module.{k}": v for k, v in openai.items()},
        "wrapped": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in openai.items()}},
        "modified_resnet": {f"attnpool.{k}": v for k, v in ref_sd.items()},
        "timm": timm_sd,
        "bare": dict(ref_sd),
    }


@pytest.mark.parametrize("naming", ["openai", "open_clip_ddp", "wrapped", "modified_resnet", "timm", "bare"])
@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_load_every_naming_matches_open_clip(ref_pool, feat7, tmp_path, naming, fmt):
    sd = _namings(ref_pool.state_dict())[naming]
    if fmt == ".safetensors" and naming == "wrapped":
        pytest.skip("safetensors holds flat tensor dicts only")
    path = str(tmp_path / f"ckpt{fmt}")
    if fmt == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    pool = load_clip_attnpool(path)
    assert not pool.training and pool.output_dim == 512 and pool.num_heads == 32
    with torch.no_grad():
        torch.testing.assert_close(pool(feat7), ref_pool(feat7), rtol=1e-5, atol=1e-5)


def test_rn50_inferred_and_fp16_weights_upcast(tmp_path):
    ref = open_clip_mr.AttentionPool2d(7, 2048, 32, 1024).half()
    path = _save({f"visual.attnpool.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "rn50.pt")
    pool = load_clip_attnpool(path)
    assert pool.output_dim == 1024 and pool.c_proj.weight.dtype == torch.float32
    x = torch.randn(1, 2048, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(pool(x), ref.float()(x), rtol=1e-4, atol=1e-4)


def test_timm_resnet50_clip_head_round_trip(tmp_path, caplog):
    timm = pytest.importorskip("timm")
    head = timm.create_model("resnet50_clip", pretrained=False).head.eval()  # the pool only is used
    path = _save({f"head.{k}": v for k, v in head.state_dict().items()}, tmp_path / "timm.safetensors")
    pool = load_clip_attnpool(path, arch="RN50")
    with torch.no_grad():
        x = torch.randn(2, 2048, 7, 7)
        torch.testing.assert_close(pool(x), head(x), rtol=1e-5, atol=1e-5)
        # off the native grid both resample the 7x7 embedding the same way (bicubic, antialias)
        with caplog.at_level(logging.INFO, logger="c2vkd"):
            for _ in range(2):
                x = torch.randn(2, 2048, 8, 10)
                torch.testing.assert_close(pool(x), head(x), rtol=1e-5, atol=1e-5)
            x = torch.randn(1, 2048, 4, 3)  # downsampling: antialias matters
            torch.testing.assert_close(pool(x), head(x), rtol=1e-5, atol=1e-5)
    resize_logs = [r for r in caplog.records if "resizing" in r.getMessage()]
    assert len(resize_logs) == 2  # once per new size, not per call


def test_timm_fused_qkv_split(ref_pool, feat7, tmp_path):
    sd = ref_pool.state_dict()
    fused = {"head.pos_embed": sd["positional_embedding"],
             "head.qkv.weight": torch.cat([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]]),
             "head.qkv.bias": torch.cat([sd["q_proj.bias"], sd["k_proj.bias"], sd["v_proj.bias"]]),
             "head.proj.weight": sd["c_proj.weight"], "head.proj.bias": sd["c_proj.bias"]}
    pool = load_clip_attnpool(_save(fused, tmp_path / "fused.pt"))
    with torch.no_grad():
        torch.testing.assert_close(pool(feat7), ref_pool(feat7), rtol=1e-5, atol=1e-5)


def test_strict_errors_list_every_problem(ref_pool, tmp_path):
    sd = {f"visual.attnpool.{k}": v for k, v in ref_pool.state_dict().items()}
    del sd["visual.attnpool.q_proj.bias"]
    sd["visual.attnpool.extra.weight"] = torch.zeros(3)
    sd["visual.attnpool.k_proj.weight"] = torch.zeros(2048, 1024)
    with pytest.raises(ValueError) as err:
        load_clip_attnpool(_save(sd, tmp_path / "bad.pt"), arch="RN101")
    msg = str(err.value)
    assert "missing key 'q_proj.bias'" in msg and "unexpected key 'extra.weight'" in msg
    assert "shape mismatch for 'k_proj.weight'" in msg


def test_wrong_arch_and_unknown_shapes(ref_pool, tmp_path):
    path = _save(dict(ref_pool.state_dict()), tmp_path / "rn101.pt")
    with pytest.raises(ValueError, match="shape mismatch for 'c_proj.weight'"):
        load_clip_attnpool(path, arch="RN50")
    small = AttentionPool2d(7, 64, 2, 32).state_dict()
    with pytest.raises(ValueError, match="cannot infer the CLIP arch"):
        load_clip_attnpool(_save(small, tmp_path / "small.pt"))
    with pytest.raises(ValueError, match="no CLIP attention pool found"):  # e.g. a ViT CLIP
        load_clip_attnpool(_save({"visual.conv1.weight": torch.zeros(1), "positional_embedding": torch.zeros(77, 8)},
                                 tmp_path / "none.pt"))
    incomplete = {k: v for k, v in ref_pool.state_dict().items() if not k.startswith("c_proj")}
    with pytest.raises(ValueError, match=r"missing keys \['c_proj.weight', 'c_proj.bias'\]"):
        load_clip_attnpool(_save(incomplete, tmp_path / "incomplete.pt"))


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_truncated_file(ref_pool, tmp_path, fmt):
    path = Path(_save({f"visual.attnpool.{k}": v for k, v in ref_pool.state_dict().items()}, tmp_path / f"f{fmt}"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_clip_attnpool(str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_refused_unless_allowed(tmp_path):
    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attnpool = AttentionPool2d(**ARCH_SPECS["RN101"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Clip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = Visual()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    model = Clip().eval()
    path = str(tmp_path / "RN101.pt")
    torch.jit.save(torch.jit.trace(model, torch.zeros(1)), path)
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_clip_attnpool(path)
    pool = load_clip_attnpool(path, allow_torchscript=True)
    x = torch.randn(1, 2048, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(pool(x), model.visual.attnpool(x))
    # the VLFD loss hands its allow_torchscript option to the loader (refused without it)
    from c2vkd.losses import LossContext
    from c2vkd.losses.vlfd import VLFDLoss

    ctx = LossContext(num_classes=19, student_shapes={"feat": (2, 256, 4, 5)},
                      teacher_shapes={"feat": (2, 2048, 8, 10)})
    with pytest.raises(ValueError, match="TorchScript archive"):
        VLFDLoss(ctx, clip_checkpoint=path)
    vlfd = VLFDLoss(ctx, clip_checkpoint=path, allow_torchscript=True)
    assert vlfd.clip_grounded and torch.equal(vlfd.pool.c_proj.weight, model.visual.attnpool.c_proj.weight)


def test_reads_through_the_one_weight_reader(ref_pool, feat7, tmp_path):
    """The CLIP loader reads and unwraps with models/weights.py: a safetensors file under a .bin name (found
    by its header), an ``ema`` wrapper (now also accepted by load_checkpoint_weights), a checksum sidecar."""
    from c2vkd.models.weights import read_state_dict
    from c2vkd.utils.io import atomic_save

    openai = {f"visual.attnpool.{k}": v.contiguous() for k, v in ref_pool.state_dict().items()}
    named_bin = tmp_path / "open_clip_pytorch_model.bin"
    save_file(openai, str(named_bin))
    ema = tmp_path / "ema.pt"
    atomic_save({"step": 7, "ema": openai}, ema)  # writes ema.pt.sha256
    assert set(read_state_dict(ema)) == set(openai) == set(read_state_dict(named_bin))
    for path in (named_bin, ema):
        with torch.no_grad():
            torch.testing.assert_close(load_clip_attnpool(str(path))(feat7), ref_pool(feat7), rtol=1e-5, atol=1e-5)
    ema.with_name("ema.pt.sha256").write_text("0" * 64 + "  ema.pt\n")
    with pytest.raises(ValueError, match="truncated or corrupt.*checksum"):
        load_clip_attnpool(str(ema))


def _load_bench():
    """benchmarks/bench_clip_pool.py, loaded by path: its ``naive_pool`` (CLIP's literal full multi-head
    attention) is the reference here too, written once."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clip_pool.py"
    spec = importlib.util.spec_from_file_location("bench_clip_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_naive_pool = _load_bench().naive_pool


@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (5, 9)])
def test_folded_single_query_pool_equals_full_attention_value_and_gradient(hw):
    """The pool folds W_k / W_v into the one query: same value and input gradient as CLIP's full attention."""
    torch.manual_seed(3)
    pool = AttentionPool2d(spacial_dim=7, embed_dim=64, num_heads=8, output_dim=32).double().eval()
    x = torch.randn(3, 64, *hw, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = pool(x), _naive_pool(pool, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():                                   # the no-grad path (the teacher side) writes in place
        torch.testing.assert_close(pool(x), ref, rtol=1e-10, atol=1e-12)


def test_resized_positional_table_is_reused_until_the_table_changes():
    torch.manual_seed(4)
    pool = AttentionPool2d(spacial_dim=7, embed_dim=32, num_heads=4).eval().requires_grad_(False)
    x = torch.randn(2, 32, 8, 8)
    first = pool.pos_embed(8, 8)
    assert pool.pos_embed(8, 8) is first                     # cached: the bicubic resize runs once per size
    with torch.no_grad():
        pool.positional_embedding.mul_(2.0)                  # in place (as load_state_dict does): not stale
    torch.testing.assert_close(pool(x), _naive_pool(pool, x))
    assert pool.pos_embed(8, 8) is not first
    pool.load_state_dict({k: v * 0.5 if k == "positional_embedding" else v for k, v in pool.state_dict().items()})
    torch.testing.assert_close(pool(x), _naive_pool(pool, x))
    trained = AttentionPool2d(spacial_dim=7, embed_dim=32, num_heads=4)   # a trainable table is never cached
    assert trained.pos_embed(8, 8) is not trained.pos_embed(8, 8)
