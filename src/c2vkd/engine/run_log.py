"""What a run writes about itself while it trains: ``metrics.jsonl``, TensorBoard (``tb/``) and the console
progress bar. Only the main process (rank 0) writes; on other ranks every method is a no-op.

``metrics.jsonl`` lines: training records ``{"iter", "lr", "loss", "img_per_s", "grad_norm", "skipped",
<term>, <term>/w ...}`` every ``train.log_interval`` steps, validation records ``{"iter", "val_split",
"miou", "acc", "macc"}`` and the final ``{"iter", "eval_split", "miou"}``. TensorBoard gets ``loss/<term>``,
``train/{lr,img_per_s,grad_norm,loss}``, peak memory (``train/max_mem_gb`` on CUDA, the process's peak RSS
``train/max_rss_gb`` on CPU) and ``val/<split>_miou``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("c2vkd")

_TRAIN_TAGS = ("lr", "img_per_s", "grad_norm", "loss")


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training if it is broken
        log.warning("tensorboard is not importable; only metrics.jsonl is written")
        return None
    return SummaryWriter(str(Path(run_dir) / "tb"))


class RunLog:
    """The open log sinks of one ``Trainer.fit``: call :meth:`open_bar` once the loop starts, :meth:`close_bar`
    when it ends, :meth:`close` at the end (or on an error)."""

    def __init__(self, run_dir: Path, *, main: bool, device: torch.device) -> None:
        self.run_dir, self.main, self.device = Path(run_dir), main, device
        self.writer = tensorboard_writer(self.run_dir) if main else None
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a") if main else None
        self.bar = None

    def open_bar(self, total: int, initial: int) -> None:
        """tqdm bar over the iterations (main process only)."""
        if self.main:
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
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.writer:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and k != "iter":
                    tag = f"loss/{k}" if k not in _TRAIN_TAGS else f"train/{k}"
                    self.writer.add_scalar(tag, v, rec["iter"])
            if torch.cuda.is_available() and self.device.type == "cuda":
                self.writer.add_scalar("train/max_mem_gb", torch.cuda.max_memory_allocated(self.device) / 2**30,
                                       rec["iter"])
            else:  # CPU: the process's peak resident set size (Linux reports KiB)
                import resource

                self.writer.add_scalar("train/max_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                       rec["iter"])
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
            self.jsonl.write(json.dumps(rec) + "\n")
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
