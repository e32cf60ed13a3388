"""The `c2vkd` command: train / distill / eval / demo / data check / taps / config.

Every command that takes a CONFIG accepts `--set key=value` (repeatable) overrides, validated like the file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from c2vkd.config import ConfigError, dump_config, load_config

log = logging.getLogger("c2vkd")


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", help="experiment YAML (a path, or the name of a packaged config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 --set data.root=/data/camvid")
    p.add_argument("--run-dir", default=None, help="run directory (default: experiment.output_dir/experiment.name)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="c2vkd", description="CNN-to-ViT knowledge distillation for segmentation")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="supervised training (no teacher): the student baseline or a teacher")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="'auto' (latest valid checkpoint in the run) or a checkpoint path")

    p = sub.add_parser("distill", help="distil a frozen teacher into the student (C2VKD or a baseline)")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")

    p = sub.add_parser("eval", help="evaluate a checkpoint or student export (per-class IoU table)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or student export (.safetensors)")
    p.add_argument("--split", default=None, help="split to evaluate (default: eval.final_split, else eval.split)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")

    p = sub.add_parser("demo", help="the embedded default: a short run on the bundled CamVid sample")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", default="runs/demo")

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("check", help="scan a dataset: class pixel histogram and every problem found")
    q.add_argument("root")
    q.add_argument("--format", default="folder")
    q.add_argument("--splits", default=None, help="comma-separated splits (default: all present)")
    q.add_argument("--num-classes", type=int, default=None)
    q.add_argument("--ignore-index", type=int, default=None)

    p = sub.add_parser("taps", help="list every tappable module of a model with output shape and stride")
    p.add_argument("model")
    p.add_argument("--input", default="512x512", help="HxW of the dummy input")
    p.add_argument("--num-classes", type=int, default=19)

    p = sub.add_parser("config", help="print the fully resolved config")
    _add_config_args(p)
    return ap


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--input must look like 512x512, got {text!r}") from None
    return h, w


def cmd_train(args: argparse.Namespace, *, distill: bool) -> int:
    from c2vkd.engine.trainer import Trainer
    from c2vkd.losses import LOSSES

    cfg = load_config(args.config, args.overrides)
    uses_teacher = any(LOSSES.get(e["name"]).requires_teacher for e in cfg["losses"])
    if distill and not uses_teacher:
        raise ConfigError(f"{args.config}: `c2vkd distill` needs at least one distillation loss in `losses` "
                          f"(got {[e['name'] for e in cfg['losses']]}); use `c2vkd train` for supervised training")
    if not distill and uses_teacher:
        raise ConfigError(f"{args.config}: the config has distillation losses; run it with `c2vkd distill`")
    trainer = Trainer(cfg, run_dir=Path(args.run_dir) if args.run_dir else None, resume=args.resume)
    result = trainer.fit()
    if result.final_metrics is not None:
        print(json.dumps({"run_dir": str(result.run_dir), "miou": result.final_metrics.get("miou")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from c2vkd.data import build_dataloader, build_dataset
    from c2vkd.engine.trainer import _hw as hw
    from c2vkd.engine.trainer import pick_device
    from c2vkd.engine.weights import build_for_eval
    from c2vkd.inference import evaluate
    from c2vkd.metrics import format_table
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    split = args.split or cfg["eval"]["final_split"] or cfg["eval"]["split"]
    d, e = cfg["data"], cfg["eval"]
    dataset = build_dataset(d, split, train=False)
    device = pick_device(cfg["train"]["device"])
    model, name = build_for_eval(args.checkpoint, cfg, dataset.num_classes, device)
    loader = build_dataloader(dataset, batch_size=d["eval_batch_size"], train=False, num_workers=d["num_workers"])
    with torch.inference_mode():
        m = evaluate(model, loader, num_classes=dataset.num_classes, device=device, mode=e["mode"],
                     window=hw(e["window"]), stride=hw(e["stride"]), scales=e["scales"], flip=e["flip"],
                     amp=cfg["train"]["amp"], progress=cfg["train"]["progress"])
    print(f"{name} on {split} ({len(dataset)} images, mode {e['mode']}):")
    print(format_table(m, list(dataset.classes)))
    if args.out:
        Path(args.out).write_text(json.dumps({"split": split, **m.to_dict()}, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from c2vkd.engine.trainer import Trainer
    from c2vkd.data import sample_root

    overrides = [f"data.root={sample_root()}", *args.overrides]
    cfg = load_config("demo.yaml", overrides)
    trainer = Trainer(cfg, run_dir=Path(args.run_dir))
    result = trainer.fit()
    m = result.final_metrics or {}
    print(f"\ndemo finished: {cfg['student']['name']} test mIoU {100 * (m.get('miou') or 0):.2f} "
          f"(tiny sample, short schedule)\ncheckpoint: {result.run_dir / 'student.safetensors'}\n"
          f"logs: {result.run_dir / 'metrics.jsonl'}, tensorboard --logdir {result.run_dir / 'tb'}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from c2vkd.data import check_dataset, format_report

    splits = args.splits.split(",") if args.splits else None
    report = check_dataset(args.root, format=args.format, splits=splits, num_classes=args.num_classes,
                           ignore_index=args.ignore_index)
    print(format_report(report))
    return 1 if report.problems else 0


def cmd_taps(args: argparse.Namespace) -> int:
    from c2vkd.models import build_model, format_taps, list_taps

    model = build_model(args.model, args.num_classes)
    print(format_taps(list_taps(model, _hw(args.input)), title=f"{args.model} taps at input {args.input}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "distill"):
            return cmd_train(args, distill=args.command == "distill")
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "taps":
            return cmd_taps(args)
        if args.command == "config":
            print(dump_config(load_config(args.config, args.overrides)), end="")
            return 0
    except (ConfigError, KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Known user-facing errors: one clear line, no traceback (set C2VKD_DEBUG=1 for one).
        import os

        if os.environ.get("C2VKD_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"c2vkd {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
