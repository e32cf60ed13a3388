"""The ``c2vkd`` argument parser: one sub-parser per command (the commands themselves: ``commands.py``)."""
from __future__ import annotations

import argparse
from typing import Any


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


def _add_run_command(sub: Any, name: str, *, help: str, description: str, teacher: bool) -> None:
    """`c2vkd train` / `c2vkd distill`: a config (or the one-line options), overrides and --resume."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (a path, or the name of a packaged config); omit it for a one-line run")
    _add_config_args(p, config_required=False)
    p.add_argument("--resume", default=None, help="'auto' (latest valid checkpoint in the run) or a checkpoint path")
    _add_oneline_args(p, teacher=teacher)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """`c2vkd taps` / `c2vkd info`: a registered model name at a dummy input size."""
    p.add_argument("model")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module (dotted name or .py path) that registers your own models first")
    p.add_argument("--input", default="512x512", help="HxW of the dummy input")
    p.add_argument("--num-classes", type=int, default=19)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="c2vkd", description="CNN-to-ViT knowledge distillation for segmentation")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True)

    _add_run_command(sub, "train", help="supervised training (no teacher): the student baseline or a teacher",
                     description="c2vkd train CONFIG, or with no config file: c2vkd train --model NAME --data DIR "
                                 "[--method none] [--iters N] [--out DIR]", teacher=False)
    _add_run_command(sub, "distill", help="distil a frozen teacher into the student (C2VKD or a baseline)",
                     description="c2vkd distill CONFIG, or with no config file: c2vkd distill --teacher "
                                 "NAME[=CHECKPOINT] --student NAME --data DIR [--method c2vkd] [--iters N] "
                                 "[--out DIR]", teacher=True)

    p = sub.add_parser("eval", help="evaluate a checkpoint or student export (per-class IoU table)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or student export (.safetensors)")
    p.add_argument("--split", default=None, help="split to evaluate (default: eval.final_split, else eval.split)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")

    p = sub.add_parser("compare", help="train several KD methods x seeds under one schedule; tabulate gains")
    p.add_argument("config", nargs="?", default=None, help="experiment YAML (not needed with --summarize or --across)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set optim.lr=1e-4")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="accumulate results across sessions/machines: each finished variant's record goes to "
                        "DIR/<method>/seed<k>.json (commit it), recorded variants are skipped, and the summary "
                        "is rebuilt from every record in DIR")
    p.add_argument("--summarize", default=None, metavar="DIR",
                   help="only rebuild DIR/compare.md, compare.json and plots from the records in DIR")
    p.add_argument("--across", nargs="+", default=None, metavar="DIR",
                   help="set two or more protocols' results folders side by side per method (gain vs none, rank, "
                        "rank correlations per pair of protocols); prints markdown, writes it to --out FILE.md if "
                        "given, and writes nothing into the DIRs")
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # alias of --out
    p.add_argument("--methods", default=None,
                   help="comma-separated method presets (configs/methods/*.yaml names or YAML paths), e.g. "
                        "none,kd,dkd,cwd,cirkd,c2vkd; 'none' is the student-without-KD reference")
    p.add_argument("--seeds", default="1", help="a count (experiment.seed, +1, ...) or a list such as 0,1,2")
    p.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR/compare-NAME); rerun to resume; "
                                               "with --across, the markdown file to write")
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
    _add_model_args(p)

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
    _add_model_args(p)
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
