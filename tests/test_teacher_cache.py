"""Augmentation pool + teacher cache (`c2vkd cache-teacher`, `teacher.cache`) on toy models and tiny data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F

import _toy
from c2vkd.config import ConfigError, load_config
from c2vkd.data import TrainSampler, build_dataset, sample_seed, view_seed
from c2vkd.data.synthetic import write_folder
from c2vkd.engine.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    decode_logits,
    encode_logits,
)
from c2vkd.engine.trainer import Trainer
from c2vkd.runners.cache_teacher import build_teacher_cache
from c2vkd.engine.weights import save_student

N, POOL, CLASSES = 6, 2, ("a", "b", "c")


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("tc")
    root = write_folder(tmp / "ds", {"train": N, "val": 2}, size_hw=(32, 40))
    torch.manual_seed(1)
    teacher = tmp / "teacher.safetensors"
    save_student(teacher, _toy.ToyCNN(3), "toy_cnn", 3, {}, list(CLASSES))
    other = tmp / "other.safetensors"
    save_student(other, _toy.ToyCNN(3), "toy_cnn", 3, {}, list(CLASSES))
    return {"tmp": tmp, "root": root, "teacher": teacher, "other": other}


def make_cfg(env: dict, *extra: str) -> dict:
    return load_config(None, [
        f"data.root={env['root']}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
        "data.train_transform.jitter=0.2", "data.batch_size=2", "data.num_workers=0", f"data.augment_pool={POOL}",
        "student.name=toy_vit", "teacher.name=toy_cnn", f"teacher.checkpoint={env['teacher']}",
        "losses=[{name: kd, weight: 1.0, temperature: 2.0}, {name: fitnet, weight: 0.5}, {name: ce, weight: 1.0}]",
        "optim.lr=0.01", "schedule.iters=6", "train.progress=false", "train.log_interval=1", "train.device=cpu",
        f"experiment.output_dir={env['tmp']}", "eval.split=null", "eval.final_split=null", *extra])


def cache(env: dict, name: str, *extra: str, **kw) -> tuple[Path, dict]:
    out = env["tmp"] / name
    if not (out / "index.json").is_file():
        build_teacher_cache(make_cfg(env, *extra), out, progress=False, **kw)
    return out, json.loads((out / "index.json").read_text())


def run_terms(cfg: dict, run_dir: Path) -> list[dict]:
    Trainer(cfg, run_dir=run_dir).fit()
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]


# ------------------------------------------------------------------------------------------- the pool
def test_pool_views_are_exactly_the_cached_ones(env: dict) -> None:
    seed = 5
    # default: fresh augmentation every epoch, bit-identical to the pool-less stream
    plain = take(iter(TrainSampler(N, seed=seed)), 2 * N)
    assert [s for _, s in plain] == [sample_seed(seed, e, p) for e in range(2) for p in range(N)]
    assert take(iter(TrainSampler(N, seed=seed, augment_pool=0)), 2 * N) == plain

    k, epochs = 3, 6
    stream = take(iter(TrainSampler(N, seed=seed, augment_pool=k)), epochs * N)
    pool = {(i, view_seed(seed, i, j)) for i in range(N) for j in range(k)}
    assert set(stream) == pool and len(pool) == N * k
    for b in range(epochs // k):  # every view exactly once per block of K epochs
        block = stream[b * k * N:(b + 1) * k * N]
        assert sorted(block) == sorted(pool)
    assert [i for i, _ in stream] == [i for i, _ in take(iter(TrainSampler(N, seed=seed)), epochs * N)]  # same order
    # DDP shards and resume see the same views
    ranks = [take(iter(TrainSampler(N, seed=seed, augment_pool=k, rank=r, world_size=2)), epochs * N // 2)
             for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == stream
    assert take(iter(TrainSampler(N, seed=seed, augment_pool=k, start=7)), 5) == stream[7:12]
    with pytest.raises(ValueError, match="augment_pool must be an integer >= 0"):
        TrainSampler(N, augment_pool=-1)
    with pytest.raises((ConfigError, ValueError), match="augment_pool"):
        build_dataset(make_cfg(env, "data.augment_pool=1.5")["data"], "train", train=True)

    # the cache holds exactly the views the training stream draws, in view order, with matching pixels
    out, index = cache(env, "exact", topk=0, downsample=1, dtype="float32", shard_size=5)
    assert index["views"] == N * POOL and len(index["shards"]) == 3 and index["taps"] == {"feat": [16, 8, 8]}
    keys = []
    for s in index["shards"]:
        with safe_open(str(out / s["file"]), framework="pt") as f:
            keys += list(zip(f.get_tensor("index").tolist(), f.get_tensor("seed").tolist()))
    cfg = make_cfg(env)
    stream = take(iter(TrainSampler(N, seed=cfg["experiment"]["seed"], augment_pool=POOL)), 4 * N)
    assert set(stream) == set(keys) and len(set(keys)) == N * POOL
    tc = TeacherCache(out)
    ds = build_dataset(cfg["data"], "train", train=True)
    teacher = _toy.ToyCNN(3)
    teacher.load_state_dict(safe_load_student(env["teacher"]))
    teacher.eval()
    for key in stream[:3]:
        with torch.no_grad():
            live = teacher(ds[key]["image"][None])
        got = decode_logits({k: v[None] for k, v in tc.read(*key).items()}, 3)
        torch.testing.assert_close(got, live, rtol=1e-5, atol=1e-5)


def safe_load_student(path: Path) -> dict:
    from c2vkd.utils.io import safe_load

    return safe_load(path)


# --------------------------------------------------------------------------------- exact replay
def test_cache_reproduces_live_teacher_and_never_runs_it(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    live = run_terms(make_cfg(env), env["tmp"] / "live")  # 6 iterations x 2 = 2 epochs: both views of each image
    out, _ = cache(env, "exact", topk=0, downsample=1, dtype="float32", shard_size=5)

    calls = {"n": 0}

    def spy(self, x):
        calls["n"] += 1
        raise AssertionError("the teacher must not run when teacher.cache is set")

    monkeypatch.setattr(_toy.ToyCNN, "forward", spy)
    t = Trainer(make_cfg(env, f"teacher.cache={out}"), run_dir=env["tmp"] / "cached")
    assert t.teacher is None and t.model.teacher is None and t.model.teacher_cache is not None
    t.fit()
    cached = [json.loads(x) for x in (env["tmp"] / "cached/metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert calls["n"] == 0
    assert len(cached) == len(live) == 6
    for a, b in zip(live, cached):
        for term in ("kd", "fitnet", "ce", "loss"):
            assert math.isclose(a[term], b[term], rel_tol=1e-5, abs_tol=1e-6), (a["iter"], term, a[term], b[term])


def test_compact_cache_trains_close_to_live(env: dict) -> None:
    """Defaults (fp16, top-2 of 3 classes, logits at 1/4): an approximation, close to the live teacher."""
    out, index = cache(env, "compact", topk=2, downsample=4, dtype="float16")
    assert index["logits_hw"] == [8, 8] and index["topk"] == 2 and index["dtype"] == "float16"
    live = [json.loads(x) for x in (env["tmp"] / "live/metrics.jsonl").read_text().splitlines() if '"lr"' in x] \
        if (env["tmp"] / "live/metrics.jsonl").is_file() else run_terms(make_cfg(env), env["tmp"] / "live")
    # a DataLoader worker reads the cache (its own file handles), as in real runs
    approx = run_terms(make_cfg(env, f"teacher.cache={out}", "data.num_workers=1"), env["tmp"] / "compact_run")
    assert abs(approx[0]["fitnet"] - live[0]["fitnet"]) < 1e-3 * max(1.0, live[0]["fitnet"])  # taps: fp16 only
    assert abs(approx[0]["kd"] - live[0]["kd"]) < 0.1 * live[0]["kd"] + 1e-3
    assert approx[0]["ce"] == pytest.approx(live[0]["ce"], rel=1e-6)  # the student's first step is unaffected


# ------------------------------------------------------------------------------ reconstruction
def test_topk_reconstruction_keeps_softmax_mass() -> None:
    torch.manual_seed(0)
    k_cls, k = 12, 3
    z = 3 * torch.randn(2, k_cls, 6, 7)
    p = z.softmax(1)
    top_p, top_i = p.topk(k, dim=1)
    rest = 1 - top_p.sum(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        enc = encode_logits(z, topk=k, dtype=dtype)
        assert enc["top_idx"].dtype == torch.uint8 and enc["top_val"].dtype == dtype
        assert enc["max"].dtype == torch.float32
        zh = decode_logits(enc, k_cls)
        ph = zh.softmax(1)
        assert torch.equal(zh.argmax(1), z.argmax(1))
        torch.testing.assert_close(ph.gather(1, top_i), top_p, rtol=0, atol=tol)  # top-k probabilities kept
        torch.testing.assert_close(1 - ph.gather(1, top_i).sum(1), rest, rtol=0, atol=tol)  # rest mass kept
        assert ((ph - p).abs() <= rest[:, None] + tol).all()  # per-class error bounded by the rest mass
        kl = (p * (p.log() - ph.log())).sum(1)
        assert (kl <= rest * math.log(k_cls - k) + tol).all() and (kl >= -tol).all()
        fill = zh.scatter(1, top_i, float("inf")).amin(1)
        assert (fill <= zh.gather(1, top_i).amin(1) + tol).all()  # the fill never overtakes a stored class
    # k = K: lossless in float32 (no rest term), int16 ids beyond 256 classes
    enc = encode_logits(z, topk=0, dtype=torch.float32)
    assert "rest_lse" not in enc
    torch.testing.assert_close(decode_logits(enc, k_cls), z, rtol=0, atol=1e-5)
    assert encode_logits(torch.randn(1, 300, 2, 2), topk=5)["top_idx"].dtype == torch.int16
    # downsampling: logits that vary at the teacher's stride-4 resolution come back close after 1/4 storage
    low = 2 * torch.randn(1, k_cls, 8, 8)
    full = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    back = decode_logits(encode_logits(full, topk=0, downsample=4, dtype=torch.float32), k_cls, (32, 32))
    err = (back.softmax(1) - full.softmax(1)).abs()
    assert err.mean() < 0.02 and err.max() < 0.3


# ------------------------------------------------------------------------------------ staleness
def test_stale_or_incomplete_cache_is_refused(env: dict, tmp_path: Path) -> None:
    out, _ = cache(env, "exact", topk=0, downsample=1, dtype="float32", shard_size=5)
    with pytest.raises(TeacherCacheError, match=r"other settings.*teacher\.checkpoint_sha256.*teacher\.weights_sha256"):
        Trainer(make_cfg(env, f"teacher.cache={out}", f"teacher.checkpoint={env['other']}"), run_dir=tmp_path / "a")
    with pytest.raises(TeacherCacheError, match=r"data\.train_transform\.flip: cache True, now False"):
        Trainer(make_cfg(env, f"teacher.cache={out}", "data.train_transform.flip=false"), run_dir=tmp_path / "b")
    with pytest.raises(TeacherCacheError, match=r"data\.augment_pool: cache 2, now 3"):
        Trainer(make_cfg(env, f"teacher.cache={out}", "data.augment_pool=3"), run_dir=tmp_path / "c")
    with pytest.raises(TeacherCacheError, match="augment_pool is 0"):
        Trainer(make_cfg(env, f"teacher.cache={out}", "data.augment_pool=0"), run_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="augment_pool is 0"):
        build_teacher_cache(make_cfg(env, "data.augment_pool=0"), tmp_path / "x", progress=False)
    with pytest.raises(TeacherCacheError, match="not found"):
        Trainer(make_cfg(env, f"teacher.cache={tmp_path / 'nothing'}"), run_dir=tmp_path / "e")
    tc = TeacherCache(out)
    with pytest.raises(TeacherCacheError, match="no entry for sample 1 with augmentation seed 123"):
        tc.read(1, 123)
    # the losses need a tap the cache lacks
    no_taps = tmp_path / "no_taps"
    build_teacher_cache(make_cfg(env), no_taps, taps="none", progress=False)
    with pytest.raises(TeacherCacheError, match=r"teacher taps \['feat'\].*no taps"):
        Trainer(make_cfg(env, f"teacher.cache={no_taps}"), run_dir=tmp_path / "f")
    # an interrupted build: no index.json
    (no_taps / "index.json").unlink()
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(no_taps)


def test_cli_builds_resumes_and_reports(env: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from c2vkd.cli import main

    (tmp_path / "c.yaml").write_text("{}\n")
    cfg = make_cfg(env)
    sets = [f"data.root={env['root']}", "data.train_transform.crop_size=[32,32]", "data.train_transform.base_size=40",
            "data.train_transform.jitter=0.2", "data.num_workers=0", f"data.augment_pool={POOL}",
            "student.name=toy_vit", "teacher.name=toy_cnn", f"teacher.checkpoint={env['teacher']}",
            f"losses={json.dumps(cfg['losses'])}", "train.device=cpu", "train.progress=false",
            f"teacher.cache={tmp_path / 'cli'}"]
    argv = ["cache-teacher", str(tmp_path / "c.yaml"), "--shard-size", "4", "--topk", "2",
            *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"{N * POOL} views ({N} images x pool {POOL}), top-2 of 3 logits at 8x8, taps ['feat']" in text
    index = json.loads((tmp_path / "cli/index.json").read_text())
    assert index["made_with"]["views_computed_now"] == N * POOL and index["downsample"] == 4
    # resume: only the missing shard is recomputed; an up-to-date cache is left alone
    (tmp_path / "cli" / index["shards"][1]["file"]).unlink()
    assert main(argv) == 0
    assert json.loads((tmp_path / "cli/index.json").read_text())["made_with"]["views_computed_now"] == 4
    assert main(argv) == 0
    assert json.loads((tmp_path / "cli/index.json").read_text())["made_with"]["views_computed_now"] == 4
    # no teacher configured: one clear line
    assert main(["cache-teacher", str(tmp_path / "c.yaml"), "--set", "teacher.name=null", "--set",
                 f"teacher.cache={tmp_path / 'y'}"]) == 2
    assert "teacher.name is not set" in capsys.readouterr().err
