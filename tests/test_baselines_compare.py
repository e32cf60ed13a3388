"""Acceptance of issue 12: `c2vkd compare` runs every baseline preset, unmodified, on the bundled CamVid sample
(2 iterations, 64x64 crops; eval on the 16 test frames, resized to 60x80: the final evaluation of 20 runs was
more than half of this test's time, and nothing here depends on its size) with a SegFormer-B0 student and a
DeepLabV3+-R18 teacher -- once with the live teacher and once from a teacher cache (every baseline reads only
teacher outputs, so all of them allow it). The presets are the packaged ones (every `methods/*.yaml` but C2VKD's
own and `none`), so a new baseline preset is run here without editing this file; TERMS must name its terms.

The only change to a preset is CIRKD's memory size (the packaged preset keeps the reference's 20000 + 2000
entries per class, a 294 MB checkpoint at 11 classes x 256 channels): shrunk explicitly with --set, as a
CPU recipe would."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from c2vkd.runners import compare as cmp
from c2vkd.cli import main
from c2vkd.config import load_config
from c2vkd.data import sample_root
from c2vkd.engine.distiller import loss_tap_names
from c2vkd.runners.cache_teacher import build_teacher_cache
from c2vkd.runners.oneline import method_presets
from c2vkd.engine.weights import save_student
from c2vkd.models import build_model

pytestmark = pytest.mark.slow

# every packaged preset but C2VKD's (c2vkd*: CLIP teacher) and `none` (no teacher); CIRKD runs apart (below)
PRESETS = sorted(m for m in method_presets() if not m.startswith("c2vkd") and m != "none")
BASELINES = [m for m in PRESETS if m != "cirkd"]
CIRKD_CPU = ["losses.2.memory_size=256", "losses.2.region_memory_size=32"]
# the terms each preset must log (raw values), beyond ce
TERMS = {"kd": {"kd"}, "dkd": {"dkd"}, "cwd": {"kd", "cwd", "cwd_feat", "adv_g", "adv_d"},
         "skd": {"kd", "skd", "adv_g", "adv_d"}, "ifvd": {"kd", "ifvd", "adv_g", "adv_d"}, "dist": {"dist"},
         "fitnet": {"kd", "fitnet"}, "at": {"kd", "at"},
         "ofa": {"ofa_final", "ofa_stage1", "ofa_stage2", "ofa_stage3", "ofa_stage4"},
         "cirkd": {"kd", "cirkd_p2p", "cirkd_mem_p2p", "cirkd_mem_p2r"},
         "heteroakd": {"heteroakd", "heteroakd_kd", "heteroakd_proj_s", "heteroakd_proj_t"},
         "hmkd": {"hmkd_gla", "hmkd_hfa"}, "fskd": {"kd", "fskd_global", "fskd_patch", "fskd_attn"}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baselines_compare")
    classes = json.loads((Path(sample_root()) / "classes.json").read_text())["classes"]
    torch.manual_seed(0)
    teacher = build_model("deeplabv3plus_r18", len(classes))
    save_student(root / "teacher.safetensors", teacher, "deeplabv3plus_r18", len(classes), {}, classes)
    cfg = root / "exp.yaml"
    cfg.write_text(f"""
_base_: datasets/camvid_sample.yaml
experiment: {{name: baselines, output_dir: {root / 'runs'}}}
data: {{root: {sample_root()}, batch_size: 2, num_workers: 0, augment_pool: 1,
        train_transform: {{crop_size: [64, 64], base_size: 80}}, eval_transform: {{mode: resize, size: [60, 80]}}}}
student: {{name: segformer_b0}}
teacher: {{name: deeplabv3plus_r18, checkpoint: {root / 'teacher.safetensors'}}}
optim: {{name: adamw, lr: 1.0e-4}}
schedule: {{iters: 2, warmup_iters: 0}}
train: {{progress: false, device: cpu, log_interval: 1, val_interval: 0, ckpt_interval: 0}}
eval: {{split: null, final_split: test}}
""")
    return cfg


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _compare(experiment: Path, out: Path, methods: list[str], *overrides: str) -> None:
    argv = ["compare", str(experiment), "--methods", ",".join(methods), "--seeds", "1", "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 0


def test_compare_runs_every_baseline_preset_live_and_cached(experiment: Path, tmp_path: Path) -> None:
    assert set(TERMS) == set(PRESETS), "TERMS must list the terms of every baseline preset (and no other)"
    live, cached = tmp_path / "live", tmp_path / "cached"
    # one teacher cache serves every preset: the union of the teacher taps they read (logits at: stride, decoder,
    # feat, HMKD's layer1 / layer3)
    taps: list[str] = []
    for m in PRESETS:
        taps += [t for t in loss_tap_names(cmp.variant_config(experiment, m, 0)["losses"])[1] if t not in taps]
    cache = tmp_path / "teacher_cache"
    build_teacher_cache(load_config(experiment), cache, taps=taps, progress=False)
    for out, extra in ((live, []), (cached, [f"teacher.cache={cache}"])):
        _compare(experiment, out, BASELINES, *extra)
        # `compare --set` also applies its overrides to the bare experiment (no losses.2 there), so CIRKD's
        # shrunk memory goes through the per-variant functions compare itself uses
        cmp.run_variant(cmp.variant_config(experiment, "cirkd", 0, [*CIRKD_CPU, *extra]), out / "cirkd" / "seed0")
    for method, terms in TERMS.items():
        recs = {}
        for name, out in (("live", live), ("cached", cached)):
            rec = recs[name] = _records(out / method / "seed0")
            assert len(rec) == 2, (method, name)
            assert (terms | {"ce", "loss"}) <= set(rec[-1]), (method, name, sorted(rec[-1]))
            assert all(math.isfinite(r[t]) for r in rec for t in terms | {"loss"}), (method, name)
            assert json.loads((out / method / "seed0" / "result.json").read_text())["iters"] == 2
            assert math.isfinite(json.loads((out / method / "seed0" / "eval_test.json").read_text())["miou"])
        # same student init, same views: the first step's CE is identical, and the terms read from the cached
        # teacher taps (float16) match the live teacher's closely
        assert recs["cached"][0]["ce"] == pytest.approx(recs["live"][0]["ce"], rel=1e-5), method
        for t in terms & {"kd", "cwd", "cwd_feat", "skd", "ifvd", "fitnet", "at", "cirkd_p2p", "dist", "ofa_final",
                          "heteroakd", "heteroakd_kd", "heteroakd_proj_t", "hmkd_gla", "hmkd_hfa"}:
            assert recs["cached"][0][t] == pytest.approx(recs["live"][0][t], rel=2e-2, abs=1e-5), (method, t)
