"""How each logit loss spreads its gradient over the class channels: real data, real teacher, real student.

For N training batches of a recipe (default camvid-p3: CamVid, 11 classes, SegFormer-B0 student, the DeepLabV3+-R18
teacher through its cache), the step's ``LossInputs`` are built by the engine itself (a real ``Trainer``, as
benchmarks/profile_run.py builds one; its ``Distiller`` runs the student and decodes the cached teacher logits), then
each logit loss is run alone on detached float32 copies of the student's logits, and the gradient of its term with
respect to the logits tensor it reads is summed (|grad|, L1) over batch and space per class channel:

    share_k = sum_{b,h,w} |dL/dz_{b,k,h,w}| / sum_{b,k,h,w} |dL/dz_{b,k,h,w}|

(summed over the N batches before the division), next to each class's pixel frequency in the batches' labels and in
the teacher's argmax, and the ratio share / label frequency (1 = the loss weights the channel like its pixels).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/class_gradient_share.py \\
        --set data.root=../shared/data/camvid --set teacher.cache=runs/p2_cache            # trained `none` student
    ... python benchmarks/class_gradient_share.py --student init --set ...                  # the seed's initialisation

The losses, each with its own preset's settings (read from the packaged preset files, so they follow the presets):

* ``ce`` (methods/none.yaml): cross-entropy on the student's logits upsampled to the crop (``student_logits``);
* ``kd`` (methods/kd.yaml): pixel-wise KL over the classes, T 1, ``at: stride`` (the ``logits`` taps, 1/4 of the
  crop for both models here), ``mask_ignore: false``;
* ``pdd`` (the ``pdd`` entry of methods/c2vkd-balanced.yaml): PDD's default preset at input resolution (the
  upsampled ``student_logits``; labels used for the target class, void pixels excluded);
* ``cwd`` (the ``on: logits`` entry of methods/cwd.yaml): channel-wise KL, a softmax over the h*w positions per
  class channel, T 4, ``at: stride``. The preset's other terms (CWD on features, pixel KD, adversarial) are
  not logit-only channel losses and are left out (``kd`` is measured on its own).

Where the gradient is taken. Each loss receives either ``student_logits`` (crop size, 128x128: ce, pdd) or the
``logits`` tap (32x32: kd, cwd); the table's shares are of the gradient with respect to that tensor. As the
upsampled logits are a bilinear resize of the tap (per channel, linear), the gradient of the crop-level losses is
also pulled back to the tap (the common tensor through which every loss reaches the student) and reported in the
JSON (``shares_at_tap``) and, for the rare classes, in the second table; cancellations inside a 4x4 neighbourhood
make it differ slightly from the crop-level share.

The student's forward, as the engine runs it: under the recipe's autocast (``train.amp``, bf16 for camvid-p3), in
train mode (BatchNorm on the batch's statistics, as in a training step) but with dropout and drop-path off
(``--mode train``, the default; deterministic), or wholly in eval mode (``--mode eval``: BatchNorm running stats).
The losses then run outside autocast on float32 copies of the (bf16) logits, so the loss values are the training
step's (every loss computes in float32 anyway) and the gradients are float32 rather than the bf16 gradients of a
bf16 run. The teacher's logits are the cache's (decoded to the crop and cast to the student's dtype, as in
training). Batches: the first N of the seed's training stream (data order and augmentation of every camvid-p3
run of that seed), each of ``data.batch_size`` crops; loading runs in the main process (``data.num_workers=0``,
which does not change the samples: every view is seeded).

Weights. A share is scale-free: the weighted gradient (x the preset weight: ce 1, kd 1, pdd 1, cwd 3) has the
same shares; the totals (sum |grad| per batch, raw and x weight) say how large each loss's gradient is.

Frequencies: label frequency over valid (non-void) label pixels at the crop; teacher-argmax frequency over all crop
pixels (kd without mask_ignore and cwd see every pixel, void included). "Rare" classes: label frequency below
``--rare`` (5 %) in these batches.

Nothing here could not be reached cleanly: every loss reads one student tensor of the ``LossInputs``. What is not
measured: how the logits' gradient then spreads inside the student (through the classifier and decoder).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_CONFIG = "src/c2vkd/configs/recipes/camvid_p3.yaml"
DEFAULT_STUDENT = "runs/p3/none/seed0/student.safetensors"
# (loss label, preset file, how to pick the entry from the preset's losses)
LOSS_PRESETS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ce", "none", {"name": "ce"}),
    ("kd", "kd", {"name": "kd"}),
    ("pdd", "c2vkd-balanced", {"name": "pdd"}),
    ("cwd", "cwd", {"name": "cwd", "on": "logits"}),
)


# ----------------------------------------------------------------------------------------------- pure helpers
def channel_abs_sums(grad: torch.Tensor) -> torch.Tensor:
    """|grad| summed over every dim but the channel dim 1: [B, K, ...] -> [K] (float64)."""
    if grad.ndim < 2:
        raise ValueError(f"channel_abs_sums: expected [B, K, ...], got shape {tuple(grad.shape)}")
    dims = [d for d in range(grad.ndim) if d != 1]
    return grad.detach().abs().to(torch.float64).sum(dim=dims)


def shares(sums: torch.Tensor) -> torch.Tensor:
    """Per-channel sums [K] -> fractions of their total (all zeros when the total is 0)."""
    sums = sums.to(torch.float64)
    total = sums.sum()
    return sums / total if total > 0 else torch.zeros_like(sums)


def class_counts(labels: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """Pixel count per class [K] (float64) of a label / argmax map of any shape; ``ignore_index`` not counted."""
    flat = labels.reshape(-1).long()
    if ignore_index is not None:
        flat = flat[flat != ignore_index]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise ValueError(f"class_counts: labels outside [0, {num_classes}) that are not ignore_index={ignore_index}")
    return torch.bincount(flat, minlength=num_classes).to(torch.float64)


def share_ratio(share: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """share / frequency per class; NaN where the class has no pixels."""
    share, freq = share.to(torch.float64), freq.to(torch.float64)
    return torch.where(freq > 0, share / freq.clamp_min(1e-300), torch.full_like(share, float("nan")))


def rare_classes(freq: torch.Tensor, threshold: float) -> list[int]:
    """Indices of the classes whose frequency is below ``threshold`` (a fraction)."""
    return [k for k, f in enumerate(freq.tolist()) if f < threshold]


def group_sum(values: torch.Tensor, idx: Sequence[int]) -> float:
    """The sum of ``values`` over the classes ``idx``."""
    return float(values[list(idx)].sum()) if len(idx) else 0.0


# ----------------------------------------------------------------------------------------------- measurement
def _preset_entry(preset: str, match: dict[str, Any]) -> dict[str, Any]:
    import c2vkd
    from c2vkd.config import _load_yaml  # the package's YAML 1.2 loader: `on:` is a key, not True

    path = Path(c2vkd.__file__).parent / "configs" / "methods" / f"{preset}.yaml"
    entries = _load_yaml(path).get("losses", [])
    hits = [e for e in entries if all(e.get(k, "logits" if k == "on" else None) == v for k, v in match.items())]
    if len(hits) != 1:
        raise SystemExit(f"{path}: expected one losses entry matching {match}, found {len(hits)}")
    return dict(hits[0])


def _student_mode(student: torch.nn.Module, mode: str) -> None:
    if mode == "eval":
        student.eval()
        return
    student.train()
    for m in student.modules():  # dropout and drop-path off: BatchNorm on batch statistics, deterministic
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or "droppath" in type(m).__name__.lower():
            m.eval()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from c2vkd.engine.runtime import autocast_ctx
    from c2vkd.engine.trainer import Trainer
    from c2vkd.engine.weights import load_model_weights
    from c2vkd.losses import LossInputs
    from c2vkd.runners.compare import variant_config

    entries = [(label, preset, _preset_entry(preset, match)) for label, preset, match in LOSS_PRESETS]
    batch = [] if args.batch is None else [f"data.batch_size={args.batch}"]
    overrides = ["data.num_workers=0", *batch, *args.overrides,
                 "train.progress=false", "train.grad_share_interval=0", "balance.mode=off"]
    with tempfile.TemporaryDirectory(prefix="class_grad_share_") as work:
        cfg = variant_config(args.config, "kd", args.seed, [*overrides, f"experiment.output_dir={work}"])
        cfg["losses"] = [e for _, _, e in entries]
        tr = Trainer(cfg, run_dir=Path(work) / "run")
        model, student = tr.model, tr.student
        K, ignore = tr.num_classes, tr.ignore_index
        if args.student != "init":
            load_model_weights(student, args.student, name=cfg["student"]["name"], num_classes=K)
        model.train()
        _student_mode(student, args.mode)

        captured: list[LossInputs] = []
        first = model.losses[0]
        orig_forward = first.forward

        def capture(inp: LossInputs) -> Any:
            captured.append(inp)
            return orig_forward(inp)
        first.forward = capture

        labels = [e["name"] for e in cfg["losses"]]
        acc = {lb: {"input": torch.zeros(K, dtype=torch.float64), "tap": torch.zeros(K, dtype=torch.float64),
                    "per_batch": [], "raw": [], "tensor": None} for lb in labels}
        label_n = torch.zeros(K, dtype=torch.float64)
        teacher_n = torch.zeros(K, dtype=torch.float64)
        batch_size = int(cfg["data"]["batch_size"])
        loader = tr.train_loader(batch_size, 1)
        data_iter = iter(loader)
        try:
            for _ in range(args.batches):
                sample = next(data_iter)
                images = sample["image"].to(tr.device)
                target = sample["label"].to(tr.device)
                extra = ({k: v.to(tr.device) for k, v in sample["teacher"].items()},) if "teacher" in sample else ()
                captured.clear()
                with torch.no_grad(), autocast_ctx(tr.device, tr.amp):
                    model(images, target, *extra)
                inp = captured[0]
                label_n += class_counts(target, K, ignore)
                teacher_n += class_counts(inp.teacher_logits.float().argmax(1), K)
                tap = inp.student_feats.get("logits")
                crop_hw = tuple(inp.student_logits.shape[-2:])
                for lb, module in zip(labels, model.losses):
                    leaf_in = inp.student_logits.detach().float().requires_grad_(True)
                    leaf_tap = tap.detach().float().requires_grad_(True) if tap is not None else None
                    x = LossInputs(student_logits=leaf_in, target=inp.target,
                                   teacher_logits=inp.teacher_logits.detach(),
                                   student_feats={} if leaf_tap is None else {"logits": leaf_tap},
                                   teacher_feats={k: v.detach() for k, v in inp.teacher_feats.items()})
                    out = module(x)
                    if len(out) != 1:
                        raise SystemExit(f"loss {lb}: expected one term, got {list(out)}")
                    raw = next(iter(out.values())).float()
                    wrt = [leaf_in] + ([leaf_tap] if leaf_tap is not None else [])
                    grads = torch.autograd.grad(raw, wrt, allow_unused=True)
                    used = [(n, g) for n, g in zip(("input", "tap"), grads) if g is not None]
                    if len(used) != 1:
                        raise SystemExit(f"loss {lb}: its gradient reaches {[n for n, _ in used]} of the student's "
                                         "logits tensors; this script expects exactly one")
                    where, g = used[0]
                    acc[lb]["tensor"] = (f"student_logits {crop_hw[0]}x{crop_hw[1]}" if where == "input" else
                                         f"logits tap {tuple(leaf_tap.shape[-2:])[0]}x{tuple(leaf_tap.shape[-2:])[1]}")
                    s = channel_abs_sums(g)
                    acc[lb]["input"] += s
                    acc[lb]["per_batch"].append(s)
                    acc[lb]["raw"].append(float(raw.detach()))
                    if where == "input" and leaf_tap is not None:
                        # the same gradient pulled back through the model's own bilinear resize to the tap
                        t2 = tap.detach().float().requires_grad_(True)
                        (g_tap,) = torch.autograd.grad(student._resize_logits(t2, crop_hw), t2, g)
                        acc[lb]["tap"] += channel_abs_sums(g_tap)
                    else:
                        acc[lb]["tap"] += s
        finally:
            first.forward = orig_forward
            del data_iter
        classes = list(tr.class_names)
        weights = {lb: float(m.weights[next(iter(m.weights))]) for lb, m in zip(labels, model.losses)}
        loss_cfgs = {lb: e for lb, (_, _, e) in zip(labels, entries)}
        presets = {lb: p for lb, (_, p, _) in zip(labels, entries)}
        device, amp = str(tr.device), tr.amp
        del tr, model, student

    label_f = label_n / label_n.sum()
    teacher_f = teacher_n / teacher_n.sum()
    rare = rare_classes(label_f, args.rare)
    res: dict[str, Any] = {
        "config": args.config, "overrides": args.overrides, "student": args.student, "mode": args.mode,
        "seed": args.seed, "batches": args.batches, "batch": batch_size, "device": device, "amp": amp,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "classes": classes,
        "label_pixels": label_n.tolist(), "label_freq": label_f.tolist(), "teacher_argmax_freq": teacher_f.tolist(),
        "rare_threshold": args.rare, "rare_classes": [classes[k] for k in rare], "losses": {},
    }
    for lb in labels:
        a = acc[lb]
        sh, sh_tap = shares(a["input"]), shares(a["tap"])
        rare_pb = [group_sum(shares(s), rare) for s in a["per_batch"]]
        res["losses"][lb] = {
            "preset": presets[lb], "entry": loss_cfgs[lb], "weight": weights[lb], "grad_wrt": a["tensor"],
            "shares": sh.tolist(), "ratio": share_ratio(sh, label_f).tolist(), "shares_at_tap": sh_tap.tolist(),
            "abs_grad_per_batch": float(a["input"].sum()) / args.batches,
            "abs_grad_per_batch_weighted": weights[lb] * float(a["input"].sum()) / args.batches,
            "abs_grad_per_batch_at_tap": float(a["tap"].sum()) / args.batches,
            "loss_mean": sum(a["raw"]) / len(a["raw"]),
            "rare_share": group_sum(sh, rare), "rare_share_at_tap": group_sum(sh_tap, rare),
            "rare_share_per_batch": rare_pb,
        }
    return res


def render(res: dict[str, Any]) -> str:
    classes, losses = res["classes"], res["losses"]
    names = list(losses)
    lf, tf = res["label_freq"], res["teacher_argmax_freq"]
    rare = [classes.index(c) for c in res["rare_classes"]]
    out = [f"student: {res['student']} ({res['mode']} mode, {res['amp'] or 'fp32'} forward); {res['batches']} "
           f"batches x {res['batch']} crops, seed {res['seed']}; gradient w.r.t.: "
           + ", ".join(f"{n} {losses[n]['grad_wrt']}" for n in names), "",
           "| class | label px | teacher argmax px | " + " | ".join(f"{n} share (/freq)" for n in names) + " |",
           "|---|---:|---:|" + "---:|" * len(names)]
    for k, c in enumerate(classes):
        cells = [f"{100 * losses[n]['shares'][k]:.1f} % ({losses[n]['ratio'][k]:.2f}x)" for n in names]
        mark = " *" if k in rare else ""
        out.append(f"| {c}{mark} | {100 * lf[k]:.1f} % | {100 * tf[k]:.1f} % | " + " | ".join(cells) + " |")
    tot = [f"{L['abs_grad_per_batch']:.3g}; {L['abs_grad_per_batch_weighted']:.3g} (w {L['weight']:g})"
           for L in (losses[n] for n in names)]
    out.append("| sum \\|grad\\| per batch (raw; x weight) | | | " + " | ".join(tot) + " |")
    rl, rt = group_sum(torch.tensor(lf), rare), group_sum(torch.tensor(tf), rare)
    out += ["", f"rare classes (* : label px < {100 * res['rare_threshold']:g} %): {', '.join(res['rare_classes'])}; "
            f"{100 * rl:.1f} % of label pixels, {100 * rt:.1f} % of teacher-argmax pixels", "",
            "| loss | rare share | share / label freq | batches min-max | rare share at the logits tap | "
            "rare \\|grad\\| per batch x weight |", "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        L = losses[n]
        pb = L["rare_share_per_batch"]
        out.append(f"| {n} | {100 * L['rare_share']:.1f} % | {L['rare_share'] / rl if rl else float('nan'):.2f}x | "
                   f"{100 * min(pb):.1f}-{100 * max(pb):.1f} % | {100 * L['rare_share_at_tap']:.1f} % | "
                   f"{L['rare_share'] * L['abs_grad_per_batch_weighted']:.3g} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--student", default=DEFAULT_STUDENT,
                    help="student weights (a c2vkd export / checkpoint), or 'init' for the seed's random init")
    ap.add_argument("--mode", choices=("train", "eval"), default="train",
                    help="student forward: train mode without dropout / drop-path (default), or eval mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None, help="crops per batch (default: the recipe's, 8)")
    ap.add_argument("--rare", type=float, default=0.05, help="a class is rare below this label-pixel fraction")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)
    res = measure(args)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
