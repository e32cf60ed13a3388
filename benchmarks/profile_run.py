"""Where a protocol run's time goes (issue 29): one real ``Trainer`` run of a camvid-p2 variant, N training steps
plus the validation and the final test a finished run does, with wall clocks wrapped around the engine's own
pieces from outside (instance attributes and module functions patched in this process only: the engine's hot
loop carries no timing code), then the arithmetic that extrapolates to the full schedule.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/profile_run.py --method none --steps 200 \\
        --set data.root=../shared/data/camvid
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/profile_run.py --method c2vkd-balanced --steps 200 \\
        --set data.root=../shared/data/camvid --set teacher.cache=runs/p2_cache

What is timed (seconds, main process wall clock):

* ``data wait``: the training loop waiting for its next batch (``next(loader)``); with ``data.num_workers`` > 0
  the loading and augmentation run in worker processes, whose own CPU time is reported separately
  (``data workers cpu``, read from /proc before they exit): on a shared core it is time the trainer does not get;
* ``student forward``: the student's ``forward`` (feature-tap hooks included);
* ``teacher cache decode``: ``TeacherCache.decode`` (the cached logits upsampled to the crop, taps cast);
* ``loss <name> forward``: each configured loss module's ``forward`` (all its terms);
* ``balancer probes``: ``GradientProbe.measure`` (one extra backward per balanced term, at the steps it is due);
* ``backward``: the training backward (``Tensor.backward``: the losses' and the student's together);
* ``optimizer step``; ``rest of the step`` (zero_grad, grad clipping, logging of terms, ``.item()`` syncs);
* ``validation`` / ``final test``: ``evaluate_split`` on ``eval.split`` / ``eval.final_split``, split into the
  student forward, the rest of ``predict_logits`` (the upsampling of the logits to the label size), the wait
  for batches and the confusion-matrix update (the remainder);
* ``checkpoint + export``: checkpoints, ``best_student`` / ``student`` safetensors.

The backward of each loss term cannot be told apart inside one backward, so at every ``--isolate-every``-th step
each loss module is run once more, off the clock, on detached copies of that step's inputs (forward, then
``autograd.grad`` to the student's outputs and the loss's own heads, nothing accumulated, RNG restored): its
backward time, and the student's backward is the training backward minus the losses' (estimated).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch


class Clock:
    """Named wall-clock accumulators; ``off()`` time (isolated re-runs) is subtracted from enclosing timers."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = defaultdict(list)
        self.excluded = 0.0

    def wrap(self, name: str | Callable[[], str], fn: Callable) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            ex0, t0 = self.excluded, time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                key = name() if callable(name) else name
                self.t[key].append(time.perf_counter() - t0 - (self.excluded - ex0))
        return timed

    def total(self, name: str) -> float:
        return sum(self.t.get(name, []))

    def count(self, name: str) -> int:
        return len(self.t.get(name, []))


def worker_cpu(it: Any) -> float:
    """User + system CPU seconds of a DataLoader iterator's live worker processes (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for w in getattr(it, "_workers", []) or []:
        try:
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="src/c2vkd/configs/recipes/camvid_p2.yaml")
    ap.add_argument("--method", default="none", help="method preset (methods/<name>.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200, help="training steps profiled (of schedule.iters)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--isolate-every", type=int, default=10, help="re-run the losses in isolation every K steps")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: OMP_NUM_THREADS)")
    ap.add_argument("--no-eval", action="store_true", help="skip the validation and test passes")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import c2vkd.engine.evaluation as evaluation_mod
    import c2vkd.engine.trainer as trainer_mod
    import c2vkd.eval.inference as inference_mod
    from c2vkd.engine.trainer import Trainer
    from c2vkd.losses import LossInputs
    from c2vkd.runners.compare import variant_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="profile_run_"))
    cfg = variant_config(args.config, args.method, args.seed,
                         [*args.overrides, "train.progress=false", f"experiment.output_dir={work}"])
    if args.no_eval:
        cfg["eval"]["split"] = cfg["eval"]["final_split"] = None
    clock = Clock()
    phase = ["setup"]  # train | val | test
    t_setup = time.perf_counter()
    tr = Trainer(cfg, run_dir=work / "run")
    setup_s = time.perf_counter() - t_setup
    model = tr.model

    # --- training step pieces
    student = model.student
    student.forward = clock.wrap(lambda: f"{phase[0]}: student forward", student.forward)
    if model.teacher_cache is not None:
        model.teacher_cache.decode = clock.wrap("train: teacher cache decode", model.teacher_cache.decode)
    names = [e["name"] for e in cfg["losses"]]
    last_inputs: dict[str, LossInputs] = {}
    iso: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def isolate(name: str, module: torch.nn.Module, fn: Callable, inp: LossInputs) -> None:
        """The loss alone on detached copies of this step's inputs: forward and backward times."""
        t_off = time.perf_counter()
        rng = torch.get_rng_state()
        leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
        x = LossInputs(student_logits=leaf(inp.student_logits), target=inp.target,
                       teacher_logits=None if inp.teacher_logits is None else inp.teacher_logits.detach(),
                       student_feats={k: leaf(v) for k, v in inp.student_feats.items()},
                       teacher_feats={k: v.detach() for k, v in inp.teacher_feats.items()})
        t0 = time.perf_counter()
        out = fn(x)
        total = sum(module.weights[k] * v.float() for k, v in out.items() if module.weights[k] != 0)
        t1 = time.perf_counter()
        if isinstance(total, torch.Tensor) and total.requires_grad:
            wrt = [x.student_logits, *x.student_feats.values(), *[p for p in module.parameters() if p.requires_grad]]
            torch.autograd.grad(total, wrt, allow_unused=True)
        t2 = time.perf_counter()
        iso[name]["forward"].append(t1 - t0)
        iso[name]["backward"].append(t2 - t1)
        torch.set_rng_state(rng)
        clock.excluded += time.perf_counter() - t_off

    step_no = [0]
    for name, module in zip(names, model.losses):
        orig_fwd = module.forward
        fwd = clock.wrap(f"train: loss {name} forward", orig_fwd)

        def forward(inp: LossInputs, _fwd: Callable = fwd, _name: str = name, _m: torch.nn.Module = module,
                    _orig: Callable = orig_fwd) -> Any:
            out = _fwd(inp)
            if phase[0] == "train" and step_no[0] % args.isolate_every == 0:
                isolate(_name, _m, _orig, inp)
            return out
        module.forward = forward
    tr.probe.measure = clock.wrap("train: balancer probes", tr.probe.measure)
    tr.optimizer.step = clock.wrap("train: optimizer step", tr.optimizer.step)
    orig_backward = torch.Tensor.backward
    torch.Tensor.backward = clock.wrap("train: backward", orig_backward)  # type: ignore[method-assign]
    train_step = tr._train_step

    def step(*a: Any, **kw: Any) -> Any:
        phase[0] = "train"
        try:
            return train_step(*a, **kw)
        finally:
            step_no[0] += 1
    tr._train_step = clock.wrap("train: step", step)

    # --- data: the loop's wait for a batch; the workers' CPU time
    loaders: list[Any] = []
    orig_loader = tr.train_loader

    class TimedIter:
        def __init__(self, it: Any) -> None:
            self.it = it
            loaders.append(it)

        def __iter__(self) -> "TimedIter":
            return self

        def __next__(self) -> Any:
            t0 = time.perf_counter()
            try:
                return next(self.it)
            finally:
                clock.t[f"{phase[0]}: data wait"].append(time.perf_counter() - t0)

        def __getattr__(self, k: str) -> Any:
            return getattr(self.it, k)

    class TimedLoader:
        def __init__(self, loader: Any) -> None:
            self.loader = loader

        def __iter__(self) -> TimedIter:
            return TimedIter(iter(self.loader))

        def __len__(self) -> int:
            return len(self.loader)

    tr.train_loader = lambda *a, **kw: TimedLoader(orig_loader(*a, **kw))
    orig_build_loader = evaluation_mod.build_dataloader
    evaluation_mod.build_dataloader = lambda *a, **kw: TimedLoader(orig_build_loader(*a, **kw))
    inference_mod.predict_logits = clock.wrap(lambda: f"{phase[0]}: predict_logits", inference_mod.predict_logits)

    # --- validation, test, checkpoints, exports
    orig_eval = tr.evaluate_split
    child_cpu: dict[str, float] = defaultdict(float)

    def evaluate_split(split: str) -> Any:
        prev = phase[0]
        phase[0] = "val" if split == cfg["eval"]["split"] and prev == "train" else "test"
        c0 = children_cpu()
        try:
            return clock.wrap(f"{phase[0]}: total", orig_eval)(split)
        finally:
            child_cpu[phase[0]] += children_cpu() - c0
            phase[0] = "train" if phase[0] == "val" else prev
    tr.evaluate_split = evaluate_split
    tr.save_checkpoint = clock.wrap("checkpoint + export", tr.save_checkpoint)
    trainer_mod.save_student = clock.wrap("checkpoint + export", trainer_mod.save_student)

    # the training loader's workers: CPU time read just before fit's last step returns (they exit with fit)
    train_worker_cpu = [0.0]
    orig_stop_agreed = tr.stop_signals.agreed

    def agreed(*a: Any, **kw: Any) -> Any:
        if loaders and step_no[0] == args.steps:
            train_worker_cpu[0] = worker_cpu(loaders[0].it if hasattr(loaders[0], "it") else loaders[0])
        return orig_stop_agreed(*a, **kw)
    tr.stop_signals.agreed = agreed

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tr.fit(max_steps=args.steps, finalize=False)
    train_wall = time.perf_counter() - t0
    train_cpu = time.process_time() - cpu0
    phase[0] = "train"
    evals: dict[str, float] = {}
    if cfg["eval"]["split"]:
        tr._validate(_NullLog())
    if cfg["eval"]["final_split"]:
        tr.evaluate_split(cfg["eval"]["final_split"])
    torch.Tensor.backward = orig_backward  # type: ignore[method-assign]

    # --- the table
    n = args.steps
    iters = int(cfg["schedule"]["iters"])
    val_every = int(cfg["train"]["val_interval"])
    n_val = (len(range(val_every, iters, val_every)) + 1) if (val_every and cfg["eval"]["split"]) else (
        1 if cfg["eval"]["split"] else 0)
    n_test = 1 if cfg["eval"]["final_split"] else 0
    bal = tr.balancer
    probes_full = sum(bal.due(s) for s in range(iters)) if bal is not None else 0
    probes_prof = clock.count("train: balancer probes")
    rows: list[tuple[str, float]] = []  # (part, seconds over the full schedule)
    step_total = clock.total("train: step")
    per_step = lambda k: clock.total(k) / n  # noqa: E731
    loss_fw = {nm: clock.total(f"train: loss {nm} forward") / n for nm in names}
    loss_bw = {nm: statistics.mean(iso[nm]["backward"]) if iso[nm]["backward"] else 0.0 for nm in names}
    probe_each = clock.total("train: balancer probes") / probes_prof if probes_prof else 0.0
    bw = per_step("train: backward")
    student_bw = bw - sum(loss_bw.values())
    data_wait = per_step("train: data wait")
    parts = {
        "data: wait for the next batch (main process)": data_wait,
        "student forward": per_step("train: student forward"),
        "student backward (training backward - the losses' isolated backward)": student_bw,
        "teacher cache decode": per_step("train: teacher cache decode"),
    }
    for nm in names:
        parts[f"loss {nm}: forward"] = loss_fw[nm]
        parts[f"loss {nm}: backward (isolated)"] = loss_bw[nm]
    parts["optimizer step"] = per_step("train: optimizer step")
    known = sum(parts.values()) + clock.total("train: balancer probes") / n
    parts["rest of the step (zero_grad, clipping, term logging)"] = step_total / n - known
    for k, v in parts.items():
        rows.append((k, v * iters))
    rows.append((f"balancer probes ({probes_full} of {iters} steps, {probe_each * 1e3:.0f} ms each)",
                 probe_each * probes_full))
    loop_rest = (train_wall - step_total - clock.total("checkpoint + export")) / n
    rows.append(("training loop outside the step (scheduler, logging, signals)", loop_rest * iters))
    for ph, count in (("val", n_val), ("test", n_test)):
        if not clock.count(f"{ph}: total"):
            continue
        tot = clock.total(f"{ph}: total")
        fw = clock.total(f"{ph}: student forward")
        pl = clock.total(f"{ph}: predict_logits") - fw
        dw = clock.total(f"{ph}: data wait")
        label = "validation" if ph == "val" else "final test"
        rows.append((f"{label}: student forward ({count} x {fw:.1f} s)", fw * count))
        rows.append((f"{label}: logits upsampled to the label size ({count} x {pl:.1f} s)", pl * count))
        rows.append((f"{label}: wait for batches ({count} x {dw:.1f} s)", dw * count))
        rows.append((f"{label}: the rest (argmax, confusion matrix, loader start) ({count} x "
                     f"{tot - fw - pl - dw:.1f} s)", (tot - fw - pl - dw) * count))
        evals[ph] = tot
    ck = clock.total("checkpoint + export")
    n_ckpt = len(range(int(cfg["train"]["ckpt_interval"]), iters, int(cfg["train"]["ckpt_interval"]) or iters)) + 1
    rows.append((f"set-up (Trainer: data index, models, cache open) once", setup_s))
    total = sum(v for _, v in rows)
    print(f"\nprofile: {args.method}, {n} of {iters} steps measured, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}; train wall {train_wall:.1f} s (main CPU {train_cpu:.1f} s), "
          f"{step_total / n:.3f} s/step; checkpoints+exports measured {ck:.1f} s (not in the rows: "
          f"{n_ckpt} over the run)")
    print(f"data workers' CPU: training {train_worker_cpu[0]:.1f} s over {n} steps "
          f"({train_worker_cpu[0] / n * 1e3:.0f} ms/step, in other processes); "
          + ", ".join(f"{k} {v:.1f} s" for k, v in child_cpu.items()))
    for nm in names:
        if iso[nm]["forward"]:
            print(f"loss {nm} in isolation ({len(iso[nm]['forward'])} steps): forward "
                  f"{statistics.median(iso[nm]['forward']) * 1e3:.1f} ms, backward "
                  f"{statistics.median(iso[nm]['backward']) * 1e3:.1f} ms (medians)")
    print(f"\n| part ({args.method}, extrapolated to {iters} steps, {n_val} validations, {n_test} test) | s | "
          "share |\n|---|---:|---:|")
    for k, v in rows:
        print(f"| {k} | {v:.0f} | {100 * v / total:.1f} % |")
    print(f"| **total (extrapolated wall)** | **{total:.0f}** | |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "method": args.method, "steps": n, "iters": iters, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "setup_s": setup_s, "train_wall_s": train_wall, "train_cpu_s": train_cpu,
            "timers": {k: [sum(v), len(v)] for k, v in clock.t.items()},
            "isolated": {k: dict(v) for k, v in iso.items()}, "train_worker_cpu_s": train_worker_cpu[0],
            "eval_children_cpu_s": dict(child_cpu), "rows": rows, "total_s": total, "evals_s": evals,
        }, indent=1))
    return 0


class _NullLog:
    def validation(self, rec: dict) -> None:
        pass


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
