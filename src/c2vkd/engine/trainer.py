"""The one training loop behind `c2vkd train`, `c2vkd distill` and `c2vkd compare`.

Flow per run:  config -> datasets/loaders -> student (+ frozen teacher) -> Distiller (losses, taps, heads)
-> optimizer + warm-up/poly schedule -> iterations (AMP, accumulation, clipping, NaN policy) ->
periodic validation + atomic checkpoints -> final evaluation (per-class IoU) -> student export.

Exact resume: the training sampler is a pure function of (seed, epoch, position) and every augmentation
is seeded per sample, so restoring the iteration counter restores the data stream; optimizer, scheduler,
scaler and RNG states are in the checkpoint as well.
"""
from __future__ import annotations

import json
import logging
import math
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from c2vkd.config import absolute_paths, dump_config
from c2vkd.data import build_dataloader, build_dataset
from c2vkd.data.preflight import preflight
from c2vkd.data.workers import shutdown_iterator
from c2vkd.engine import checkpoints
from c2vkd.engine.grad_probe import GradientProbe
from c2vkd.engine.distiller import Distiller
from c2vkd.engine.evaluation import evaluate_split
from c2vkd.engine.failures import (NonFiniteLossError, StopSignals, TrainingInterrupted, TrainingOutOfMemoryError,
                                   handle_non_finite, oom_message)
from c2vkd.engine.loss_config import needs_teacher, validate_loss_args
from c2vkd.engine.optim import build_optimizer, build_scheduler, distiller_param_groups, group_eps
from c2vkd.engine.run_dir import (lock_run_dir, new_run_id, read_metrics, read_run_id, refuse_used,
                                  truncate_metrics, unlock_run_dir, write_run_id)
from c2vkd.engine.run_log import RunLog
from c2vkd.engine.teacher_cache.store import CachedTeacherDataset, open_for_config
from c2vkd.engine.runtime import (autocast_ctx, check_compile_mode, compiled, pick_device, restore_rng, rng_state,
                                  seed_everything, sync_batchnorm)
from c2vkd.engine.weights import build_from_config, save_student
from c2vkd.eval.metrics import format_table
from c2vkd.utils import dist
from c2vkd.utils.device import teacher_autocast
from c2vkd.utils.logging import setup_logging

log = logging.getLogger("c2vkd")

__all__ = ["NonFiniteLossError", "RunResult", "Trainer", "TrainingInterrupted", "TrainingOutOfMemoryError"]


@dataclass
class RunResult:
    run_dir: Path
    final_metrics: dict[str, Any] | None = None
    best_miou: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: dict[str, Any], *, run_dir: Path | None = None, resume: str | None = None) -> None:
        validate_loss_args(cfg)
        # every path absolute: the saved config.yaml and checkpoint metadata work from any directory
        self.cfg = cfg = absolute_paths(cfg)
        exp, tr = cfg["experiment"], cfg["train"]
        self.device = pick_device(tr["device"])
        dist.init_from_env(self.device.type)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.run_dir = Path(run_dir) if run_dir else Path(exp["output_dir"]) / exp["name"]
        if not resume:  # before logging creates train.log: a new run never writes into another run's folder
            refuse_used(self.run_dir, world=self.world, device=self.device)
        # held for this process's life: another process never takes this folder for an early-failed run
        if self.main:
            weakref.finalize(self, unlock_run_dir, lock_run_dir(self.run_dir))
        setup_logging(self.run_dir if self.main else None, main_process=self.main)
        if exp["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Same seed on every rank while building, so a randomly initialised teacher (smoke tests) and every
        # module are identical across ranks; per-rank streams (dropout, drop-path) start after building.
        seed_everything(exp["seed"])
        self.amp = tr["amp"]
        check_compile_mode(tr["compile"])  # a bad value fails now, not after the data and models are built

        d = cfg["data"]
        self.train_set = build_dataset(d, "train", train=True)
        self.num_classes = self.train_set.num_classes
        self.class_names = list(self.train_set.classes)
        self.ignore_index = self.train_set.ignore_index
        # before iteration 1, not at the first validation: every split this run reads exists, is not empty and
        # has labels of the images' sizes (headers only)
        preflight(d, ["train", cfg["eval"]["split"], cfg["eval"]["final_split"]], built={"train": self.train_set})

        self.student, self.teacher = build_from_config(cfg, self.num_classes, self.class_names, self.device)
        if cfg["student"]["sync_bn"]:
            self.student = self._sync_bn(self.student)
        self.teacher_cache = None
        if cfg["teacher"]["cache"] and self.teacher is not None and needs_teacher(cfg):
            # the teacher is built (same RNG stream as a live run) only to fingerprint its weights, never run
            self.teacher_cache = open_for_config(cfg["teacher"]["cache"], cfg, self.train_set, self.teacher)
            self.teacher = None
        crop = tuple(d["train_transform"]["crop_size"])
        self.model = Distiller(self.student, cfg["losses"], num_classes=self.num_classes,
                               ignore_index=self.ignore_index, teacher=self.teacher,
                               probe_hw=crop, teacher_cache=self.teacher_cache,
                               teacher_autocast=teacher_autocast(self.device, cfg["teacher"]["amp"])).to(self.device)
        # train.compile: compiled stand-ins in the Distiller's forward; self.student stays the plain module (state
        # dicts, hooks, validation, exports, DDP)
        parts: dict[str, nn.Module] = {"student": self.student}
        loss_keys = [f"loss {i}: {e['name']}" for i, e in enumerate(cfg["losses"])]
        if tr["compile"] == "all":
            parts.update(zip(loss_keys, self.model.losses))
        fns = compiled(parts, tr["compile"], self.device)
        if fns:
            self.model.use_compiled(fns["student"], [fns[k] for k in loss_keys] if tr["compile"] == "all" else None)
        self.optimizer = build_optimizer(distiller_param_groups(self.model, self.student, cfg["optim"]), cfg["optim"])
        # per-term gradient measurement and balancing (engine/grad_probe.py, engine/balance.py)
        self.probe = GradientProbe(self.student, list(zip(self.model.loss_labels, self.model.losses)),
                                   term_weights=self.model.term_weights(), balance_cfg=cfg["balance"],
                                   share_interval=tr["grad_share_interval"], world=self.world, device=self.device)
        self.balancer = self.probe.balancer
        self.total_iters = int(cfg["schedule"]["iters"])
        self.scheduler = build_scheduler(self.optimizer, cfg["schedule"], cfg["optim"]["lr"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.amp == "fp16"))
        if self.rank:  # rank 0 keeps the single-process stream
            seed_everything(exp["seed"] + self.rank)
        self.iteration = 0
        self.best_miou = -1.0
        self.history: list[dict[str, Any]] = []
        self.stop_signals = StopSignals()  # SIGTERM / SIGINT -> checkpoint and stop (engine/failures.py)
        self.run_id: str | None = None  # engine/run_dir.py: stored in run.json, checkpoints, metrics lines
        self.resumed = bool(resume)
        if resume:
            self._resume(resume)
        if self.run_id is None:
            self.run_id = read_run_id(self.run_dir) or new_run_id()
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            # a weight-0 term ("compute and log only") leaves its alignment head out of the graph
            zero_w = any(w == 0 for m in self.model.losses for w in m.weights.values())
            unused = zero_w and any(p.requires_grad for p in self.model.losses.parameters())
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)

    # ----------------------------------------------------------------------------------------- setup
    def _sync_bn(self, student: nn.Module) -> nn.Module:
        return sync_batchnorm(student, world=self.world, device=self.device)  # engine/runtime.py

    def _ckpt_dir(self) -> Path:
        return checkpoints.checkpoint_dir(self.run_dir)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": checkpoints.FORMAT,
            "run_id": self.run_id,
            "meta": {"model": self.cfg["student"]["name"], "num_classes": self.num_classes,
                     "kwargs": dict(self.cfg["student"]["kwargs"]), "classes": self.class_names,
                     "config": dump_config(self.cfg)},
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "student": self.student.state_dict(),
            "loss_heads": self.model.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "balance": self.balancer.state_dict() if self.balancer is not None else None,
        }

    def save_checkpoint(self, tag: str | None = None) -> Path | None:
        """Write a training checkpoint (rank 0). Under DDP every rank must call it (the RNG states of all
        ranks are gathered so that a resumed run continues every rank's dropout stream exactly)."""
        rank_rngs = dist.all_gather_object(rng_state()) if self.world > 1 else None
        if not self.main:
            return None
        state = self.checkpoint_state()
        if rank_rngs is not None:
            state["rng_ranks"] = rank_rngs
        path = checkpoints.save(state, self._ckpt_dir(), tag or checkpoints.checkpoint_name(self.iteration))
        if tag is None:
            checkpoints.retain(self._ckpt_dir(), int(self.cfg["train"]["keep_last"]))
        log.info("saved checkpoint %s", path)
        return path

    def _resume(self, spec: str) -> None:
        path = checkpoints.resume_path(spec, self._ckpt_dir(), read_run_id(self.run_dir))
        if path is None:
            return
        state = checkpoints.load_training_checkpoint(path, model=self.cfg["student"]["name"],
                                                     num_classes=self.num_classes)
        self.run_id = state.get("run_id") or read_run_id(self.run_dir)  # the resumed run keeps its id
        checkpoints.restore_training_state(state, student=self.student, loss_heads=self.model.losses,
                                           optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        if self.balancer is not None:
            if state.get("balance"):
                self.balancer.load_state_dict(state["balance"])
                self.model.set_term_weights(self.balancer.weights)
            else:
                log.warning("resuming %s without balancing state (saved by a run without `balance`): the balancer "
                            "starts from the configured weights", path)
        restore_rng(state, rank=self.rank, world=self.world, seed=self.cfg["experiment"]["seed"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # ---------------------------------------------------------------------------------------- loop
    def fit(self, *, max_steps: int | None = None, finalize: bool = True) -> RunResult:
        """Train to ``schedule.iters`` (or for at most ``max_steps`` more steps); with ``finalize`` (the
        default) save the final checkpoint, validate, evaluate ``eval.final_split`` and export the student.
        ``c2vkd report`` uses ``max_steps`` with ``finalize=False``."""
        cfg, tr, d = self.cfg, self.cfg["train"], self.cfg["data"]
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            setup_logging(self.run_dir, main_process=True)  # (again: a previous fit detached train.log)
            write_run_id(self.run_dir, self.run_id)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            if self.resumed:  # the steps after the checkpoint are logged again: no record twice
                truncate_metrics(self.run_dir / "metrics.jsonl", self.iteration, final_iter=self.total_iters)
                # and the records up to it are this run's history too: a resumed run's result (e.g. the val curve
                # of its compare record) is the whole run's, not only what came after the resume
                self.history = read_metrics(self.run_dir / "metrics.jsonl", run_id=self.run_id)
        accum = int(tr["accum_steps"])
        batch = int(d["batch_size"])
        if batch % self.world:
            raise ValueError(f"data.batch_size={batch} is the total batch and must be divisible by the "
                             f"world size {self.world}")
        per_rank = batch // self.world
        loader = self.train_loader(per_rank, accum)
        run_log = RunLog(self.run_dir, main=self.main, device=self.device, run_id=self.run_id,
                         total=self.total_iters, start=self.iteration,
                         purge_step=self.iteration + 1 if self.resumed else None)
        self.stop_signals.install()
        if tr["progress"]:
            run_log.open_bar(self.total_iters, self.iteration)
        data_iter = iter(loader)
        val_every, ckpt_every = int(tr["val_interval"]), int(tr["ckpt_interval"])
        self.model.train()
        t_last, imgs_since = time.perf_counter(), 0
        stop_at = self.total_iters if max_steps is None else min(self.total_iters, self.iteration + int(max_steps))
        try:
            while self.iteration < stop_at:
                try:
                    terms_acc, skipped, grad_norm, n_img = self._train_step(data_iter, accum)
                except torch.OutOfMemoryError as e:
                    raise TrainingOutOfMemoryError(self._oom_message(e, per_rank, accum)) from e
                imgs_since += n_img
                lr_used = self.optimizer.param_groups[0]["lr"]  # the lr this step used (logged as such)
                self.scheduler.step()
                self.iteration += 1
                run_log.step()
                if self.iteration % int(tr["log_interval"]) == 0 or self.iteration == self.total_iters:
                    terms_acc = dist.mean_over_ranks(terms_acc, device=self.device)  # the global-batch value
                    now = time.perf_counter()
                    rec = {"iter": self.iteration, "lr": lr_used,
                           "loss": sum(v for k, v in terms_acc.items() if k.endswith("/w")),
                           "img_per_s": imgs_since / max(now - t_last, 1e-9), "grad_norm": grad_norm,
                           "skipped": skipped, **terms_acc}
                    if self.balancer is not None:  # the live weights, identical on every rank
                        rec.update({f"weight/{t}": w for t, w in self.balancer.weights.items()})
                    t_last, imgs_since = now, 0
                    self.history.append(rec)
                    run_log.train(rec)
                share_rec = self.probe.pop_share_record()
                if share_rec is not None:
                    self.history.append(share_rec)
                    run_log.grad_shares(share_rec)
                if val_every and self.iteration % val_every == 0 and self.iteration < self.total_iters:
                    self._validate(run_log)
                if ckpt_every and self.iteration % ckpt_every == 0 and self.iteration < self.total_iters:
                    self.save_checkpoint()
                signum = self.stop_signals.agreed(world=self.world, device=self.device)
                if signum:
                    log.warning("received signal %d: saving a checkpoint at iteration %d and stopping",
                                signum, self.iteration)
                    raise TrainingInterrupted(signum, self.iteration, self.save_checkpoint())
        except BaseException:
            # the loader's workers ignore SIGTERM: stop them here, so a failed run exits instead of waiting on
            # them at interpreter exit (data/workers.py)
            shutdown_iterator(data_iter)
            run_log.close()
            setup_logging(None, main_process=self.main)  # later messages are not this run's
            raise
        finally:
            run_log.close_bar()
            self.stop_signals.restore()
        if not finalize:
            run_log.close()
            setup_logging(None, main_process=self.main)
            return RunResult(self.run_dir, best_miou=self.best_miou, history=self.history)
        self.save_checkpoint()
        val = self._validate(run_log)
        result = RunResult(self.run_dir, best_miou=self.best_miou, history=self.history)
        split = cfg["eval"]["final_split"]
        if split:
            m = self.evaluate_split(split)
            result.final_metrics = {"split": split, "classes": self.class_names, **m.to_dict()}
            if self.main:
                (self.run_dir / f"eval_{split}.json").write_text(json.dumps(result.final_metrics, indent=1))
                log.info("final evaluation on %s:\n%s", split, format_table(m, self.class_names))
                run_log.record({"iter": self.iteration, "eval_split": split, "miou": m.miou})
        elif val is not None:
            result.final_metrics = val
        if self.main:
            save_student(self.run_dir / "student.safetensors", self.student, self.cfg["student"]["name"],
                         self.num_classes, self.cfg["student"]["kwargs"], self.class_names)
        run_log.close()
        # detach train.log: what a caller logs next (the demo's next stage, compare's summary) is not this run's
        setup_logging(None, main_process=self.main)
        dist.barrier()
        return result

    def train_loader(self, per_rank: int, accum: int):
        """This rank's endless training DataLoader, continuing at ``self.iteration`` (exact resume); with
        ``teacher.cache`` its batches also carry the cached teacher outputs (key ``teacher``)."""
        d = self.cfg["data"]
        train_set = self.train_set
        if self.teacher_cache is not None:
            train_set = CachedTeacherDataset(self.train_set, self.teacher_cache)  # workers read the cached views
        return build_dataloader(train_set, batch_size=per_rank, train=True, seed=self.cfg["experiment"]["seed"],
                                num_workers=d["num_workers"], rank=self.rank, world_size=self.world,
                                start_sample=self.iteration * per_rank * accum,
                                augment_pool=d["augment_pool"], pool_seed=d["augment_pool_seed"])

    def _train_step(self, data_iter, accum: int) -> tuple[dict[str, float], bool, float | None, int]:
        """One optimizer step over ``accum`` micro-batches: (terms averaged over micro-batches, skipped,
        grad norm, images seen by all ranks)."""
        tr = self.cfg["train"]
        terms_acc: dict[str, float] = {}
        skipped, n_img = False, 0
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            sample = next(data_iter)
            images = sample["image"].to(self.device, non_blocking=True)
            target = sample["label"].to(self.device, non_blocking=True)
            extra = ()
            if "teacher" in sample:  # cached teacher outputs of these views (teacher.cache)
                extra = ({k: v.to(self.device, non_blocking=True) for k, v in sample["teacher"].items()},)
            sync = nullcontext()
            if self.world > 1 and micro < accum - 1:
                sync = self.ddp_model.no_sync()  # type: ignore[operator]
            measure = micro == 0 and self.probe.due(self.iteration)
            self.model.record_graph_terms = measure
            with sync:
                with autocast_ctx(self.device, self.amp):
                    total, terms, _ = self.ddp_model(images, target, *extra)
                finite = torch.isfinite(total.detach()).to(torch.int32).reshape(1)
                if self.world > 1:  # every rank must take the same branch, or DDP's all-reduce hangs
                    dist.all_reduce_(finite, "min")
                if not bool(finite.item()):
                    if measure:
                        self.model.pop_graph_terms()
                    skipped = self._non_finite(terms, sample)
                    break
                if measure:  # extra backward per term (graph retained), before the training backward
                    new = self.probe.measure(self.iteration, self.model.pop_graph_terms(), terms,
                                             self.model.term_weights(), scale=float(self.scaler.get_scale())
                                             if self.scaler.is_enabled() else 1.0)
                    if new is not None:
                        self.model.set_term_weights(new)
                self.scaler.scale(total / accum).backward()
            for k, v in terms.items():
                terms_acc[k] = terms_acc.get(k, 0.0) + float(v) / accum
            n_img += images.shape[0] * self.world
        grad_norm = None
        if not skipped:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            clip = tr["grad_clip"]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")))
            if not math.isfinite(grad_norm) and self.amp != "fp16":
                skipped = self._non_finite({"grad_norm": torch.tensor(grad_norm)}, sample)
            if not skipped:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return terms_acc, skipped, grad_norm, n_img

    @property
    def measurements(self) -> list[dict[str, Any]]:
        return self.probe.measurements

    def optimizer_eps(self) -> float | None:
        """AdamW eps applied to the alignment heads (None for SGD)."""
        return group_eps(self.optimizer, "align")

    def _oom_message(self, err: BaseException, per_rank: int, accum: int) -> str:
        return oom_message(err, self.cfg, self.device, self.iteration, per_rank, accum)

    def _non_finite(self, terms: dict[str, torch.Tensor], sample: dict[str, Any]) -> bool:
        """True (skip the step) under ``train.nan_policy=skip``, else :class:`NonFiniteLossError`."""
        return handle_non_finite(terms, sample, iteration=self.iteration, policy=self.cfg["train"]["nan_policy"],
                                 dump_dir=self.run_dir if self.main else None)

    def evaluate_split(self, split: str):
        """The student on ``split`` with the config's eval settings, sharded over the ranks."""
        return evaluate_split(self.student, self.cfg, split, device=self.device, rank=self.rank, world=self.world,
                              progress=self.main and self.cfg["train"]["progress"],
                              max_batches=self.cfg["train"]["max_val_batches"])[0]

    def _validate(self, run_log: RunLog) -> dict[str, Any] | None:
        split = self.cfg["eval"]["split"]
        if not split:
            return None
        m = self.evaluate_split(split)
        self.model.train()
        rec = {"iter": self.iteration, "val_split": split, "miou": m.miou, "acc": m.acc, "macc": m.macc}
        self.history.append(rec)
        run_log.validation(rec)
        if self.main:
            if m.miou > self.best_miou:
                self.best_miou = m.miou
                save_student(self.run_dir / "best_student.safetensors", self.student, self.cfg["student"]["name"],
                             self.num_classes, self.cfg["student"]["kwargs"], self.class_names)
        return rec

