"""What a run writes about itself while it trains: ``metrics.jsonl``, TensorBoard (``tb/``) and the console
progress bar. Only the main process (rank 0) writes; on other ranks every method is a no-op.

``metrics.jsonl`` lines: training records ``{"iter", "lr", "loss", "img_per_s", "grad_norm", "skipped",
<term>, <term>/w ...}`` every ``train.log_interval`` steps, validation records ``{"iter", "val_split",
"miou", "acc", "macc"}`` and the final ``{"iter", "eval_split", "miou"}``. TensorBoard gets ``loss/<term>``,
``train/{lr,img_per_s,grad_norm,loss}``, peak memory (``train/max_mem_gb`` on CUDA, the process's peak RSS
``train/max_rss_gb`` on CPU) and ``val/<split>_miou``. Every metrics.jsonl line carries the ``run_id``.

Every training record is also one text line in the console and ``train.log`` (``iter 50/4000  loss 0.8123
(ce 0.61 kd 0.20)  lr 5.90e-05  31.2 img/s  eta 0:21:07  peak mem 1.92 GiB``), whether or not the progress
bar is shown; the bar is drawn only when stderr is a terminal (a cluster job's log stays plain text).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("c2vkd")

_TRAIN_TAGS = ("lr", "img_per_s", "grad_norm", "loss")


def tensorboard_writer(run_dir: Path, purge_step: int | None = None):
    """SummaryWriter on ``run_dir/tb``; ``purge_step``: hide the events at and after this step (a resume)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training if it is broken
        log.warning("tensorboard is not importable; only metrics.jsonl is written")
        return None
    return SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step)


def peak_memory_gib(device: torch.device) -> tuple[str, float]:
    """("cuda", peak allocated GiB) on CUDA, else ("rss", the process's peak resident set size in GiB)."""
    if torch.cuda.is_available() and device.type == "cuda":
        return "cuda", torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_eta(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h}:{m:02d}:{s:02d}"


_NOT_TERMS = {"iter", "lr", "loss", "img_per_s", "grad_norm", "skipped", "run_id"}


class RunLog:
    """The open log sinks of one ``Trainer.fit``: call :meth:`open_bar` once the loop starts, :meth:`close_bar`
    when it ends, :meth:`close` at the end (or on an error)."""

    def __init__(self, run_dir: Path, *, main: bool, device: torch.device, run_id: str | None = None,
                 total: int | None = None, start: int = 0, purge_step: int | None = None) -> None:
        self.run_dir, self.main, self.device = Path(run_dir), main, device
        self.run_id, self.total = run_id, total
        self.writer = tensorboard_writer(self.run_dir, purge_step) if main else None
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a") if main else None
        self.bar = None
        self._t0, self._it0 = time.perf_counter(), start  # ETA: mean pace of this process's iterations

    def _line(self, rec: dict[str, Any]) -> str:
        return json.dumps({**rec, "run_id": self.run_id} if self.run_id else rec) + "\n"

    def text_line(self, rec: dict[str, Any]) -> str:
        """``iter N/T  loss L (term raw ...)  lr  img/s  eta  peak mem`` for one training record."""
        it = int(rec["iter"])
        total = self.total or it
        terms = " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                         if k not in _NOT_TERMS and "/" not in k and isinstance(v, (int, float)))
        done = it - self._it0
        eta = (time.perf_counter() - self._t0) / done * (total - it) if done > 0 else 0.0
        kind, gib = peak_memory_gib(self.device)
        mem = f"peak mem {gib:.2f} GiB" if kind == "cuda" else f"peak rss {gib:.2f} GiB"
        skipped = "  (step skipped)" if rec.get("skipped") else ""
        return (f"iter {it}/{total}  loss {rec['loss']:.4f} ({terms})  lr {rec['lr']:.3e}  "
                f"{rec['img_per_s']:.1f} img/s  eta {format_eta(eta)}  {mem}{skipped}")

    def open_bar(self, total: int, initial: int) -> None:
        """tqdm bar over the iterations (main process, stderr a terminal: never in a cluster job's log)."""
        if self.main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def train(self, rec: dict[str, Any]) -> None:
        """One training record (see the module docstring) to metrics.jsonl, TensorBoard and the bar."""
        if not self.main:
            return
        log.info("%s", self.text_line(rec))
        if self.jsonl:
            self.jsonl.write(self._line(rec))
            self.jsonl.flush()
        if self.writer:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and k != "iter":
                    tag = f"loss/{k}" if k not in _TRAIN_TAGS else f"train/{k}"
                    self.writer.add_scalar(tag, v, rec["iter"])
            kind, gib = peak_memory_gib(self.device)  # CPU: the process's peak resident set size
            self.writer.add_scalar("train/max_mem_gb" if kind == "cuda" else "train/max_rss_gb", gib, rec["iter"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_s']:.1f}")

    def validation(self, rec: dict[str, Any]) -> None:
        """A validation record ``{"iter", "val_split", "miou", ...}``: console line, TensorBoard, metrics.jsonl."""
        if not self.main:
            return
        split, it = rec["val_split"], rec["iter"]
        log.info("iteration %d: %s mIoU %.2f  aAcc %.2f", it, split, 100 * rec["miou"], 100 * rec["acc"])
        if self.writer:
            self.writer.add_scalar(f"val/{split}_miou", rec["miou"], it)
        if self.jsonl:
            self.jsonl.write(self._line(rec))

    def grad_shares(self, rec: dict[str, Any]) -> None:
        """A per-term gradient record ``{"iter", "grad_share/<term>", "grad_norm/<term>", "head_grad_rms/<head>"}``
        (``train.grad_share_interval``) to metrics.jsonl and TensorBoard (same tags)."""
        if not self.main:
            return
        if self.jsonl:
            self.jsonl.write(self._line(rec))
            self.jsonl.flush()
        if self.writer:
            for k, v in rec.items():
                if k != "iter":
                    self.writer.add_scalar(k, v, rec["iter"])

    def record(self, rec: dict[str, Any]) -> None:
        """Any other record (the final evaluation) to metrics.jsonl."""
        if self.jsonl:
            self.jsonl.write(self._line(rec))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
