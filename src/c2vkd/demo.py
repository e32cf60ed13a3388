"""`c2vkd demo`: the embedded default, a complete distillation story on the bundled CamVid sample.

Stage 1 trains a DeepLabV3+-R18 teacher briefly (``configs/demo_teacher.yaml``); stage 2 trains a SegFormer-B0
student without KD and with C2VKD under one schedule and seed (``configs/demo.yaml``, through the same
runner as ``c2vkd compare``); stage 3 prints teacher / student / student+C2VKD with test mIoU, parameters
and CPU latency. Every stage is resumable: rerunning the command skips finished stages. A finished stage
keeps only what the next ones use (its ``student.safetensors``, logs, metrics, config): its resumable
``checkpoints/iter_*.pt`` (weights + optimizer state, about 3x the weights each) are removed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from c2vkd.config import load_config

log = logging.getLogger(__name__)


def run_demo(run_dir: str | Path = "runs/demo", overrides: Sequence[str] = (), *,
             latency_runs: int = 5) -> dict[str, Any]:
    from c2vkd.compare import run_compare
    from c2vkd.data import sample_root
    from c2vkd.engine.evaluation import count_params, evaluate_checkpoint, measure_latency
    from c2vkd.engine.trainer import Trainer

    run_dir = Path(run_dir)
    common = [f"data.root={sample_root()}", *overrides]

    teacher_dir = run_dir / "teacher"
    teacher_file = teacher_dir / "student.safetensors"
    if not teacher_file.is_file():
        log.info("demo stage 1/3: training the teacher (DeepLabV3+-R18) in %s", teacher_dir)
        tcfg = load_config("demo_teacher.yaml", common)
        resume = "auto" if teacher_dir.is_dir() and any(teacher_dir.iterdir()) else None  # rerun = resume
        Trainer(tcfg, run_dir=teacher_dir, resume=resume).fit()
    else:
        log.info("demo stage 1/3: teacher already trained (%s)", teacher_file)
    _drop_training_checkpoints(teacher_dir)

    log.info("demo stage 2/3: SegFormer-B0 student without KD and with C2VKD (same schedule and seed)")
    scfg = [*common, f"teacher.checkpoint={teacher_file}"]
    summary = run_compare("demo.yaml", ["none", "c2vkd"], 1, overrides=scfg, out_dir=run_dir / "students",
                          command="c2vkd demo", eval_teacher=False)

    from c2vkd.compare import RESULT_FILE

    for m in ("none", "c2vkd"):
        variant = run_dir / "students" / m / f"seed{summary['seeds'][0]}"
        if (variant / RESULT_FILE).is_file():  # finished (compare skips it on a rerun)
            _drop_training_checkpoints(variant)

    log.info("demo stage 3/3: evaluation, parameters and latency")
    cfg = load_config("demo.yaml", scfg)
    split = cfg["eval"]["final_split"] or cfg["eval"]["split"]
    h, w = 180, 240  # the sample's frame size: latency at the resolution the table's mIoU is measured at
    rows = []
    entries = [("teacher (no KD)", teacher_file)]
    seed = summary["seeds"][0]
    entries += [(label, run_dir / "students" / m / f"seed{seed}" / "student.safetensors")
                for label, m in (("student, no KD", "none"), ("student + C2VKD", "c2vkd"))]
    for label, path in entries:
        m, _, name, model = evaluate_checkpoint(path, cfg, split, progress=False)
        lat = measure_latency(model, (h, w), runs=latency_runs)
        rows.append({"row": label, "model": name, "miou": m.miou, "params": count_params(model),
                     "latency_ms": lat["median_ms"], "checkpoint": str(path)})
    table = format_demo_table(rows, split=split, hw=(h, w))
    (run_dir / "demo.json").write_text(json.dumps({"rows": rows, "split": split}, indent=1))
    (run_dir / "demo.md").write_text(table + "\n")
    return {"rows": rows, "table": table, "summary": summary}


def _drop_training_checkpoints(stage_dir: Path) -> None:
    """Remove a finished stage's resumable checkpoints (and their .sha256 sidecars)."""
    ckdir = stage_dir / "checkpoints"
    files = sorted(ckdir.glob("iter_*.pt*")) if ckdir.is_dir() else []
    if not files:
        return
    freed = sum(p.stat().st_size for p in files)
    for p in files:
        p.unlink()
    if not any(ckdir.iterdir()):
        ckdir.rmdir()
    log.info("demo: %s is finished; removed its %d checkpoint files (%.1f MiB with optimizer state), kept "
             "student.safetensors", stage_dir, len(files), freed / 2**20)


def format_demo_table(rows: list[dict[str, Any]], *, split: str, hw: tuple[int, int]) -> str:
    import torch

    lines = [f"| model | | {split} mIoU | params | CPU latency ({hw[0]}x{hw[1]}, batch 1, "
             f"{torch.get_num_threads()} threads) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['model']} | {100 * r['miou']:.2f} | {r['params'] / 1e6:.2f} M | "
                     f"{r['latency_ms']:.1f} ms |")
    return "\n".join(lines)
