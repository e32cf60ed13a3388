"""The `c2vkd` command: train / distill / eval / demo / data check / data show / taps / config / plot / predict /
export / info / cache-teacher / models / methods.

Every command that takes a CONFIG accepts `--set key=value` (repeatable) overrides, validated like the file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from c2vkd.config import ConfigError, dump_config, import_plugins, load_config

log = logging.getLogger("c2vkd")


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", help="experiment YAML (a path, or the name of a packaged config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 --set data.root=/data/camvid")
    p.add_argument("--run-dir", default=None, help="run directory (default: experiment.output_dir/experiment.name)")


def _add_oneline_args(p: argparse.ArgumentParser, *, teacher: bool) -> None:
    """The no-config-file form of train / distill (c2vkd.runners.oneline decides format, sizes and recipe)."""
    g = p.add_argument_group("one-line run (instead of CONFIG)")
    if teacher:
        g.add_argument("--teacher", default=None, metavar="NAME[=CHECKPOINT]",
                       help="registered teacher model and its trained weights, e.g. deeplabv3plus_r101=teacher.pt")
        g.add_argument("--student", default=None, metavar="NAME", help="registered student model, e.g. segformer_b0")
    else:
        g.add_argument("--model", dest="student", default=None, metavar="NAME", help="registered model to train")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="dataset folder; its format is detected (classes.json folder layout, Cityscapes, ADE20K, "
                        "VOC, SegNet CamVid)")
    g.add_argument("--method", default="c2vkd" if teacher else "none", metavar="PRESET",
                   help="method preset (`c2vkd methods`) or a YAML path (default: %(default)s)")
    g.add_argument("--iters", type=int, default=None, metavar="N", help="training iterations (schedule.iters)")
    g.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/STUDENT-METHOD-DATA)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="c2vkd", description="CNN-to-ViT knowledge distillation for segmentation")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="supervised training (no teacher): the student baseline or a teacher",
                       description="c2vkd train CONFIG, or with no config file: c2vkd train --model NAME --data DIR "
                                   "[--method none] [--iters N] [--out DIR]")
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (a path, or the name of a packaged config); omit it for a one-line run")
    _add_config_args(p, config_required=False)
    p.add_argument("--resume", default=None, help="'auto' (latest valid checkpoint in the run) or a checkpoint path")
    _add_oneline_args(p, teacher=False)

    p = sub.add_parser("distill", help="distil a frozen teacher into the student (C2VKD or a baseline)",
                       description="c2vkd distill CONFIG, or with no config file: c2vkd distill --teacher "
                                   "NAME[=CHECKPOINT] --student NAME --data DIR [--method c2vkd] [--iters N] "
                                   "[--out DIR]")
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (a path, or the name of a packaged config); omit it for a one-line run")
    _add_config_args(p, config_required=False)
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    _add_oneline_args(p, teacher=True)

    p = sub.add_parser("eval", help="evaluate a checkpoint or student export (per-class IoU table)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or student export (.safetensors)")
    p.add_argument("--split", default=None, help="split to evaluate (default: eval.final_split, else eval.split)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")

    p = sub.add_parser("compare", help="train several KD methods x seeds under one schedule; tabulate gains")
    p.add_argument("config", nargs="?", default=None, help="experiment YAML (not needed with --summarize)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set optim.lr=1e-4")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="accumulate results across sessions/machines: each finished variant's record goes to "
                        "DIR/<method>/seed<k>.json (commit it), recorded variants are skipped, and the summary "
                        "is rebuilt from every record in DIR")
    p.add_argument("--summarize", default=None, metavar="DIR",
                   help="only rebuild DIR/compare.md, compare.json and plots from the records in DIR")
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # alias of --out
    p.add_argument("--methods", default=None,
                   help="comma-separated method presets (configs/methods/*.yaml names or YAML paths), e.g. "
                        "none,kd,dkd,cwd,cirkd,c2vkd; 'none' is the student-without-KD reference")
    p.add_argument("--seeds", default="1", help="a count (experiment.seed, +1, ...) or a list such as 0,1,2")
    p.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR/compare-NAME); rerun to resume")
    p.add_argument("--no-teacher-eval", action="store_true", help="do not evaluate the teacher checkpoint")

    p = sub.add_parser("report", help="which loss terms really train the student: gradient share per term over "
                                      "N real training steps (no checkpoint left behind)")
    p.add_argument("config", help="experiment YAML (a path, or the name of a packaged config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--iters", type=int, default=20, help="training steps to measure (default 20)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write {iters, terms: {term: {raw, weight, weighted, grad_norm, grad_share, target, "
                        "suggested_weight}}} here")
    p.add_argument("--detail-json", default=None, metavar="PATH",
                   help="write everything else (min/max, backbone/decoder shares, alignment-head RMS) here")
    p.add_argument("--from-step", type=int, default=None, metavar="K",
                   help="average over steps K..N (default: after balance.warmup when balancing, else all)")

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
    q = dsub.add_parser("show", help="ground-truth overlays with a legend for a few samples of every split")
    q.add_argument("root")
    q.add_argument("--format", default=None, help="dataset format (default: detected from the folder)")
    q.add_argument("--splits", default=None, help="comma-separated splits (default: all present)")
    q.add_argument("--per-split", type=int, default=3, help="samples per split, evenly spaced (default 3)")
    q.add_argument("--out", default=None, help="output folder (default: ./data_show)")
    q.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlays (0..1)")

    p = sub.add_parser("taps", help="list every tappable module of a model with output shape and stride")
    p.add_argument("model")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module (dotted name or .py path) that registers your own models first")
    p.add_argument("--input", default="512x512", help="HxW of the dummy input")
    p.add_argument("--num-classes", type=int, default=19)

    p = sub.add_parser("plot", help="PNG curves of a run: loss terms, lr, val mIoU, per-class IoU")
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")

    p = sub.add_parser("predict", help="class-id masks, colour predictions, overlays and a captioned side-by-side "
                                       "with a legend, for a checkpoint on images")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="student export (.safetensors) or training checkpoint (.pt)")
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--teacher", action="store_true", help="also predict with teacher.checkpoint, side by side")
    p.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlays (0..1)")

    p = sub.add_parser("export", help="student-only export of a run (safetensors / TorchScript / ONNX / "
                                      "HuggingFace folder), verified")
    p.add_argument("run_dir", help="a run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="checkpoint to export (default: the latest valid one)")
    p.add_argument("--format", default="safetensors",
                   help="comma-separated: safetensors, torchscript, onnx, hf (default: safetensors); hf = a folder "
                        "transformers' SegformerForSemanticSegmentation.from_pretrained loads, with a model card")
    p.add_argument("--input", default=None,
                   help="HxW the TorchScript/ONNX graphs are traced and checked at (default: the run's evaluation "
                        "size: data.eval_transform.size, else the size of the evaluation images)")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX with dynamic batch, height and width (verified at two input sizes)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| accepted when verifying")

    p = sub.add_parser("info", help="parameters, GFLOPs and latency of a model at an input size")
    p.add_argument("model")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module (dotted name or .py path) that registers your own models first")
    p.add_argument("--input", default="512x512", help="HxW of the dummy input")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--runs", type=int, default=10, help="timed forward passes (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")

    p = sub.add_parser("cache-teacher", help="precompute the frozen teacher's outputs on every augmentation-pool "
                                             "view (needs data.augment_pool >= 1; train with teacher.cache=OUT)")
    p.add_argument("config", help="the distillation config (same --set overrides as the training run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="cache folder (default: teacher.cache)")
    p.add_argument("--topk", type=int, default=5,
                   help="logits kept per pixel; the rest become one log-sum-exp (softmax mass kept); 0 = all classes")
    p.add_argument("--downsample", type=int, default=4,
                   help="store logits at 1/N of the crop (bilinear); 1 = full size")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage of logits and taps")
    p.add_argument("--taps", default="auto",
                   help="teacher feature taps to store: auto (those the config's losses read), none, or names a,b")
    p.add_argument("--shard-size", type=int, default=256, help="views per shard file")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch size (default: data.batch_size)")

    p = sub.add_parser("models", help="every registered model: family, parameters and default feature taps")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module (dotted name or .py path) that registers your own models first")
    p.add_argument("--num-classes", type=int, default=19, help="classes the parameter count assumes (default 19)")

    sub.add_parser("methods", help="the method presets (configs/methods/*.yaml), one line each")

    p = sub.add_parser("config", help="print the fully resolved config")
    _add_config_args(p)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import c2vkd

    parts = [f"c2vkd {c2vkd.__version__}"]
    for dist in ("torch", "transformers", "timm"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def cmd_models(args: argparse.Namespace) -> int:
    """One row per registered model; built on the meta device (no memory, no init cost) to count parameters."""
    import torch

    from c2vkd.models import MODELS, build_model

    import_plugins(args.imports, "--import")
    rows = [("model", "family", "params (M)", "default taps (alias=module; feat is the KD tap)")]
    for name in MODELS.names():
        with torch.device("meta"):
            model = build_model(name, args.num_classes)
        taps = dict(getattr(model, "default_taps", {}) or {})
        feat = taps.pop("feat", None)
        shown = ([f"feat={feat}"] if feat else []) + [a if a == m else f"{a}={m}" for a, m in taps.items()]
        rows.append((name, str(getattr(model, "family", "?")), f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
                     ", ".join(shown) or "(none)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * len(r[3]))
    print(f"{len(rows) - 1} models; parameters at {args.num_classes} classes. Shapes of every tappable module: "
          "c2vkd taps MODEL; latency and GFLOPs: c2vkd info MODEL")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from c2vkd.runners.oneline import method_presets

    presets = method_presets()
    width = max(map(len, presets))
    for name, line in presets.items():
        print(f"{name.ljust(width)}  {line}")
    print(f"{len(presets)} presets (src/c2vkd/configs/methods/NAME.yaml): c2vkd distill --method NAME ..., "
          "_base_: methods/NAME.yaml, or c2vkd compare --methods a,b")
    return 0


def _hw(text: str) -> tuple[int, int]:
    from c2vkd.utils.sizes import parse_hw

    try:
        return parse_hw(text)
    except ValueError:
        raise SystemExit(f"--input must look like 512x512, got {text!r}") from None


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (for model cards and printed configs)."""
    import shlex

    return "c2vkd " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))


def _oneline_cfg(args: argparse.Namespace, *, distill: bool) -> tuple[dict, Path]:
    """Config and run directory of `c2vkd train/distill` without a config file; prints the config."""
    from c2vkd.runners.oneline import oneline_config, summary

    flag = "--student" if distill else "--model"
    need = [(flag, args.student), ("--data", args.data)] + ([("--teacher", args.teacher)] if distill else [])
    missing = [f for f, v in need if not v]
    if missing:
        raise ConfigError(f"give a CONFIG file, or {', '.join(missing)} for a one-line run "
                          f"(see `c2vkd {args.command} --help`)")
    cfg, detected = oneline_config(data=args.data, student=args.student, teacher=getattr(args, "teacher", None),
                                   method=args.method, iters=args.iters, extra=args.overrides)
    exp = cfg["experiment"]
    run_dir = Path(args.out or args.run_dir or Path(exp["output_dir"]) / exp["name"])
    print(summary(cfg, detected, run_dir, _command_line(args)), flush=True)
    return cfg, run_dir


def cmd_train(args: argparse.Namespace, *, distill: bool) -> int:
    from c2vkd.engine.loss_config import needs_teacher, validate_loss_args
    from c2vkd.engine.trainer import Trainer

    oneline = [f for f, v in (("--teacher", getattr(args, "teacher", None)), ("--student/--model", args.student),
                              ("--data", args.data), ("--iters", args.iters), ("--out", args.out)) if v]
    if args.config is not None and oneline:
        raise ConfigError(f"give either CONFIG ({args.config}) or the one-line options ({', '.join(oneline)}), "
                          "not both; change a config's values with --set KEY=VALUE")
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.config is None:
        cfg, run_dir = _oneline_cfg(args, distill=distill)
    else:
        cfg = load_config(args.config, args.overrides)
    validate_loss_args(cfg, source=str(args.config or "the one-line options"))
    uses_teacher = needs_teacher(cfg)
    if distill and not uses_teacher:
        raise ConfigError(f"{args.config}: `c2vkd distill` needs at least one distillation loss in `losses` "
                          f"(got {[e['name'] for e in cfg['losses']]}); use `c2vkd train` for supervised training")
    if not distill and uses_teacher:
        raise ConfigError(f"{args.config}: the config has distillation losses; run it with `c2vkd distill`")
    trainer = Trainer(cfg, run_dir=run_dir, resume=args.resume)
    result = trainer.fit()
    if result.final_metrics is not None and trainer.main:  # one line, not one per torchrun worker
        print(json.dumps({"run_dir": str(result.run_dir), "miou": result.final_metrics.get("miou")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from c2vkd.engine.evaluation import evaluate_checkpoint
    from c2vkd.eval.metrics import format_table
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    split = args.split or cfg["eval"]["final_split"] or cfg["eval"]["split"]
    m, classes, name, _ = evaluate_checkpoint(args.checkpoint, cfg, split)
    print(f"{name} on {split} (mode {cfg['eval']['mode']}):")
    print(format_table(m, classes))
    if args.out:
        Path(args.out).write_text(json.dumps({"split": split, **m.to_dict()}, indent=1))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from c2vkd.runners.compare import run_compare
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    command = "c2vkd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    if args.summarize:
        from c2vkd.runners.compare import summarize_results

        summary = summarize_results(args.summarize, command=command)
        print(summary["markdown"])
        print(f"written: {summary['out_dir']}/compare.md, compare.json, " + ", ".join(Path(p).name for p in summary["plots"]))
        return 0
    if not args.config or not args.methods:
        raise ConfigError("c2vkd compare needs CONFIG and --methods (or --summarize DIR)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = run_compare(args.config, methods, args.seeds, overrides=args.overrides, out_dir=args.out or args.run_dir,
                          command=command, eval_teacher=not args.no_teacher_eval, results_dir=args.results)
    print(summary["markdown"])
    print(f"written: {summary['out_dir']}/compare.md, compare.json, " + ", ".join(Path(p).name for p in summary["plots"]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from c2vkd.runners.report import run_report
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    rep = run_report(args.config, args.overrides, iters=args.iters, json_path=args.json,
                     detail_path=args.detail_json, from_step=args.from_step)
    print(rep["text"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from c2vkd.runners.demo import run_demo
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    out = run_demo(args.run_dir, args.overrides)
    print("\nC2VKD demo on the bundled CamVid sample (tiny data, short CPU schedule: numbers are illustrative)")
    print(out["table"])
    print("\n" + out["verdict"])
    print(f"\nrun folder: {args.run_dir} (teacher/, students/none, students/c2vkd; demo.md, students/compare.md)\n"
          f"student checkpoint: {args.run_dir}/students/c2vkd/seed0/student.safetensors; "
          f"TensorBoard: tensorboard --logdir {args.run_dir}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from c2vkd.data import check_dataset, format_report

    if args.data_command == "show":
        from c2vkd.data.show import show_dataset

        out = args.out or "data_show"
        written = show_dataset(args.root, out, format=args.format,
                               splits=args.splits.split(",") if args.splits else None, per_split=args.per_split,
                               alpha=args.alpha)
        for p in written:
            print(p)
        print(f"wrote {len(written)} ground-truth overlays to {out}")
        return 0

    splits = args.splits.split(",") if args.splits else None
    report = check_dataset(args.root, format=args.format, splits=splits, num_classes=args.num_classes,
                           ignore_index=args.ignore_index)
    print(format_report(report))
    return 1 if report.problems else 0


def cmd_taps(args: argparse.Namespace) -> int:
    from c2vkd.models import build_model, format_taps, list_taps

    import_plugins(args.imports, "--import")
    model = build_model(args.model, args.num_classes)
    print(format_taps(list_taps(model, _hw(args.input)), title=f"{args.model} taps at input {args.input}"))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from c2vkd.runners.plots import plot_run
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from c2vkd.runners.predict import predict_images
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    written = predict_images(cfg, args.checkpoint, args.input, args.out, teacher=args.teacher, alpha=args.alpha)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from c2vkd.runners.export import export_run, format_manifest
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    manifest = export_run(args.run_dir, checkpoint=args.checkpoint, formats=formats,
                          input_hw=_hw(args.input) if args.input else None, out_dir=args.out, atol=args.atol,
                          dynamic=args.dynamic, command=_command_line(args))
    print(format_manifest(manifest))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from c2vkd.models.report import format_info, model_info

    import_plugins(args.imports, "--import")
    info = model_info(args.model, num_classes=args.num_classes, input_hw=_hw(args.input), runs=args.runs,
                      warmup=args.warmup, batch=args.batch, device=args.device, threads=args.threads)
    print(format_info(info))
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from c2vkd.engine.loss_config import validate_loss_args
    from c2vkd.runners.cache_teacher import build_teacher_cache
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    validate_loss_args(cfg, source=str(args.config))
    index = build_teacher_cache(cfg, args.out, topk=args.topk, downsample=args.downsample, dtype=args.dtype,
                                taps=args.taps, shard_size=args.shard_size, batch_size=args.batch_size)
    out = args.out or cfg["teacher"]["cache"]
    print(f"teacher cache {out}: {index['views']} views ({index['num_images']} images x pool {index['pool']}), "
          f"top-{index['topk']} of {index['num_classes']} logits at {index['logits_hw'][0]}x{index['logits_hw'][1]}, "
          f"taps {sorted(index['taps']) or 'none'}, {index['dtype']}, {index['bytes'] / 2**20:.1f} MiB "
          f"({index['bytes_per_view'] / 2**10:.1f} KiB/view)")
    print(f"use it: c2vkd distill {args.config} --set teacher.cache={out} (with the same --set overrides)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command in ("train", "distill"):
            return cmd_train(args, distill=args.command == "distill")
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "taps":
            return cmd_taps(args)
        if args.command == "plot":
            return cmd_plot(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "cache-teacher":
            return cmd_cache_teacher(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "methods":
            return cmd_methods(args)
        if args.command == "config":
            from c2vkd.engine.loss_config import validate_loss_args

            cfg = load_config(args.config, args.overrides)
            validate_loss_args(cfg, source=str(args.config) if args.config else "defaults")
            print(dump_config(cfg), end="")
            return 0
    except (ConfigError, KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Known user-facing errors: one clear line, no traceback (set C2VKD_DEBUG=1 for one).
        import os

        if os.environ.get("C2VKD_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"c2vkd {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # a Trainer stopped by SIGTERM/SIGINT says where its checkpoint is; exit 128 + signal, as shells do
        print(f"c2vkd {args.command}: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    return 0
