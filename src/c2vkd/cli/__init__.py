"""The `c2vkd` command: train / distill / eval / demo / data check / data show / taps / config / plot / predict /
export / info / cache-teacher / models / methods.

Every command that takes a CONFIG accepts `--set key=value` (repeatable) overrides, validated like the file.

``parser.py`` builds the argument parser, ``commands.py`` holds one ``cmd_*`` per command, and :func:`main`
(here) dispatches and turns known user errors into one line.
"""
from __future__ import annotations

import re
import sys

from c2vkd.cli.commands import (cmd_cache_teacher, cmd_compare, cmd_config, cmd_data, cmd_demo, cmd_eval, cmd_export,
                                cmd_info, cmd_methods, cmd_models, cmd_plot, cmd_predict, cmd_report, cmd_taps,
                                cmd_train)
from c2vkd.cli.parser import build_parser
from c2vkd.config import ConfigError

__all__ = ["build_parser", "main", "worker_error_line"]

_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.")


def worker_error_line(msg: str) -> str:
    """A data-loader worker's error as one line: torch re-raises it in the main process with the worker's whole
    traceback in the message; the user needs its last line (which names the file), and where it came from."""
    m = _WORKER_ERROR.match(msg)
    if not m:
        return msg
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    last = lines[-1]
    prefix = f"{m.group(1)}: "
    cut = last.find(prefix)  # "c2vkd.data.base.DatasetError: PATH: ..." -> "PATH: ..."
    if cut >= 0:
        last = last[cut + len(prefix):]
    return f"{last} (raised in data-loader worker {m.group(2)})"


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
            return cmd_config(args)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Known user-facing errors: one clear line, no traceback (set C2VKD_DEBUG=1 for one).
        import os

        if os.environ.get("C2VKD_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        msg = worker_error_line(msg)
        print(f"c2vkd {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # a Trainer stopped by SIGTERM/SIGINT says where its checkpoint is; exit 128 + signal, as shells do
        print(f"c2vkd {args.command}: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    return 0
