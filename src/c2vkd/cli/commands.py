"""The bodies of the ``c2vkd`` commands: each reads its arguments, calls its runner / the engine, prints."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from c2vkd.config import ConfigError, dump_config, import_plugins, load_config


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

    from c2vkd.runners.results import RECONSTRUCTION_MARK, display_label

    presets = method_presets()
    shown = {name: display_label(name) for name in presets}  # NAME* for a reconstruction
    width = max(map(len, shown.values()))
    for name, line in presets.items():
        print(f"{shown[name].ljust(width)}  {line}")
    recon = (f"; NAME{RECONSTRUCTION_MARK} = a reconstruction (no official code; its preset header lists every "
             "inferred choice)") if any(shown[n] != n for n in presets) else ""
    print(f"{len(presets)} presets (src/c2vkd/configs/methods/NAME.yaml): c2vkd distill --method NAME ..., "
          f"_base_: methods/NAME.yaml, or c2vkd compare --methods a,b{recon}")
    return 0


def _hw(text: str) -> tuple[int, int]:
    from c2vkd.utils.sizes import parse_hw

    try:
        return parse_hw(text)
    except ValueError:
        raise SystemExit(f"--input must look like 512x512, got {text!r}") from None


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (for model cards and printed configs)."""
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
    from c2vkd.engine.run_dir import repeat_run_dir
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
        if run_dir is None and args.resume and repeat_run_dir(Path(args.config)) is not None:
            run_dir = Path(args.config).resolve().parent  # a run's own config resumes that run, where it is
        elif run_dir is None:
            # `c2vkd distill RUN/config.yaml` (the printed repeat command) repeats the run in a new folder
            run_dir = repeat_run_dir(Path(args.config))
            if run_dir is not None:
                print(f"{args.config} is a run's own config: this repeat runs in {run_dir}, the original run is "
                      f"not touched (--resume auto continues the original instead)", file=sys.stderr)
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
    from c2vkd.runners.compare import run_compare
    from c2vkd.utils.logging import setup_logging

    setup_logging()
    command = "c2vkd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    if args.across is not None:
        from c2vkd.runners.compare import compare_across
        from c2vkd.utils.io import atomic_write_text

        if args.summarize or args.config or args.methods:
            raise ConfigError("--across only reads results folders: give it no CONFIG, --methods or --summarize")
        across = compare_across(args.across, command=command)
        print(across["markdown"])
        if args.out:
            atomic_write_text(Path(args.out), across["markdown"])
            print(f"written: {args.out}")
        return 0
    if args.summarize:
        from c2vkd.runners.compare import summarize_results

        summary = summarize_results(args.summarize, command=command)
        print(summary["markdown"])
        print(f"written: {summary['out_dir']}/compare.md, compare.json, " + ", ".join(Path(p).name for p in summary["plots"]))
        return 0
    if not args.config or not args.methods:
        raise ConfigError("c2vkd compare needs CONFIG and --methods (or --summarize DIR, or --across DIR DIR ...)")
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
    p = {k: shlex.quote(str(v)) for k, v in out["paths"].items()}  # the run's own paths, quoted for the shell
    print(f"\nrun folder: {p['run_dir']} (teacher: {p['teacher']}, students: {p['students']}; {p['demo_md']}, "
          f"{p['compare_md']})\nstudent checkpoint: {p['student_checkpoint']}\n"
          f"TensorBoard: tensorboard --logdir {p['run_dir']}")
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


def cmd_config(args: argparse.Namespace) -> int:
    from c2vkd.engine.loss_config import validate_loss_args

    cfg = load_config(args.config, args.overrides)
    validate_loss_args(cfg, source=str(args.config) if args.config else "defaults")
    print(dump_config(cfg), end="")
    return 0
