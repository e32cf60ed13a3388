"""Feature taps: read intermediate features through forward hooks, never by editing a model.

In the spirit of torchdistill's ForwardHookManager. A tap name is either an alias from the model's
``default_taps`` (``"feat"``, ``"layer4"``, ``"stage4"``...) or a module path from
``dict(model.named_modules())`` (``"backbone.layer3.5"``). Wrappers are looked through: DDP/DataParallel
(``.module``) and ``torch.compile`` (``._orig_mod``), so the same names work on a wrapped model.

Conventions:
* a module whose output is a tuple/list/dict (e.g. the ResNet backbone, HF blocks) yields its *first*
  tensor; tap a child module when you need another element;
* a module called several times in one forward (e.g. torchvision's shared ``relu`` in a Bottleneck)
  yields its *last* output;
* outputs are stored as produced (not detached, not copied): student features keep their graph for the
  losses. A conv/BN directly followed by an in-place ReLU (inside ResNet blocks, torchvision layout) is
  therefore seen after the ReLU (tap block/stage outputs, or clone in a hook of your own for the
  pre-activation value);
* DataParallel runs hooks in every replica and the last replica to finish wins: use DDP;
* everything stored is cleared when the root model's next forward starts (a forward pre-hook), so a tensor
  is never from a stale step. :meth:`FeatureTaps.pop` hands them over and clears at once (frees memory).

torch.compile: hooks are traced into the graph; adding or removing taps after compiling works (tested
with the eager backend) but makes dynamo re-trace, so create long-lived taps before the first call.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from c2vkd.registry import suggest
from c2vkd.utils.sizes import as_hw


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    seen = 0
    while seen < 8:  # wrappers nest at most a few levels (compile(DDP(model)))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
        seen += 1
    return model


def first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a tap reports for a module output (see module doc); None when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # includes transformers ModelOutput
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def resolve_tap(model: nn.Module, name: str) -> str:
    """Module path for a tap ``name`` (alias or path). KeyError with close matches when unknown."""
    target = unwrap_model(model)
    aliases: dict[str, str] = dict(getattr(target, "default_taps", {}) or {})
    modules = dict(target.named_modules())
    path = aliases.get(name, name)
    if name == "" or path == "":
        raise KeyError("the empty tap name is the whole model (its logits): read the model output instead")
    if path in modules:
        return path
    arch = getattr(target, "arch", type(target).__name__)
    alias_txt = ", ".join(f"{a} -> {p}" for a, p in aliases.items()) or "none"
    if name in aliases:  # alias declared but its module is gone: a model bug, say so
        raise KeyError(f"tap alias {name!r} of {arch} points at {path!r}, which is not a module of the model")
    raise KeyError(f"unknown feature tap {name!r} for {arch}.{suggest(name, [*aliases, *modules])} "
                   f"Aliases: {alias_txt}. Any module path also works; `c2vkd taps MODEL` lists them.")


class FeatureTaps:
    """Forward hooks storing the outputs of named modules.

    >>> taps = FeatureTaps(model, ["feat", "layer1"])
    >>> logits = model(x)
    >>> feats = taps.pop()          # {"feat": Tensor, "layer1": Tensor}; storage is now empty
    >>> taps.remove()               # or use ``with FeatureTaps(...) as taps:``
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        if isinstance(names, str):
            raise TypeError("names must be a list of tap names, not a string")
        self.model = unwrap_model(model)
        self.names: list[str] = list(dict.fromkeys(names))  # de-duplicated, order kept
        self.paths: dict[str, str] = {n: resolve_tap(self.model, n) for n in self.names}
        self._outputs: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        by_path: dict[str, list[str]] = {}
        for n, p in self.paths.items():
            by_path.setdefault(p, []).append(n)  # aliases of one module share a single hook
        self._handles: list[RemovableHandle] = [self.model.register_forward_pre_hook(self._clear)]
        for path, tap_names in by_path.items():
            self._handles.append(modules[path].register_forward_hook(self._make_hook(path, tuple(tap_names))))

    def _clear(self, module: nn.Module, args: Any) -> None:
        self._outputs.clear()

    def _make_hook(self, path: str, tap_names: tuple[str, ...]):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is None:
                raise TypeError(f"feature tap {tap_names[0]!r} ({path}): module output of type "
                                f"{type(output).__name__} holds no tensor")
            for n in tap_names:
                self._outputs[n] = t

        return hook

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """Features of the latest forward, in the order the names were given (a new dict)."""
        return {n: self._outputs[n] for n in self.names if n in self._outputs}

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the latest features and clear the storage. KeyError if a tap did not fire."""
        out = self.outputs
        missing = [n for n in self.names if n not in out]
        self._outputs.clear()
        if missing:
            raise KeyError(f"feature taps {missing} did not fire during the last forward "
                           f"(modules {[self.paths[n] for n in missing]} were not called; was a forward run?)")
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            raise KeyError(f"tap {name!r} holds no output (not requested, or no forward yet); have "
                           f"{sorted(self._outputs)}")
        return self._outputs[name]

    def remove(self) -> None:
        """Remove every hook (idempotent) and drop stored tensors."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTaps({', '.join(f'{n}={p}' for n, p in self.paths.items())})"


@dataclass(frozen=True)
class TapInfo:
    """One tappable module: path, its aliases (comma-joined, may be empty), output shape and stride.

    stride = input height / output height (float: odd inputs give non-integer ratios)."""

    name: str
    alias: str
    shape: tuple[int, ...]
    stride: float


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    for t in model.buffers():
        return t.device, (t.dtype if t.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


class _EvalNoGrad:
    """Eval mode + no_grad for a dummy forward, restoring every submodule's own train/eval flag after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode


def probe_shapes(model: nn.Module, names: Iterable[str], input_hw: int | Sequence[int] = (512, 512),
                 batch: int = 2) -> dict[str, tuple[int, ...]]:
    """Shapes of the named taps for a dummy ``[batch, 3, H, W]`` input (used to size alignment heads).

    Runs in eval mode under no_grad on the model's device and dtype; every submodule's train/eval flag is
    restored afterwards (a frozen teacher inside a training student stays as it was).
    """
    names = list(names)
    target = unwrap_model(model)
    device, dtype = _model_device_dtype(target)
    h, w = as_hw(input_hw)
    with FeatureTaps(target, names) as taps, _EvalNoGrad(target):
        target(torch.zeros(batch, 3, h, w, device=device, dtype=dtype))
        feats = taps.pop()
    return {n: tuple(int(s) for s in feats[n].shape) for n in names}


def list_taps(model: nn.Module, input_hw: int | Sequence[int] = (512, 512), device: str | torch.device = "cpu",
              *, max_depth: int | None = None, batch: int = 1) -> list[TapInfo]:
    """Every module whose output is a 4-D tensor, in call order, from one dummy forward (eval, no_grad).

    Modules returning tuples/lists (e.g. the ResNet backbone itself) are not listed; their tensor
    children are. ``max_depth`` keeps paths with at most that many dots + 1 components (1 = top level).
    The model is moved to ``device`` for the call and moved back.
    """
    target = unwrap_model(model)
    h, w = as_hw(input_hw)
    old_device, dtype = _model_device_dtype(target)
    device = torch.device(device)
    aliases: dict[str, list[str]] = {}
    for a, p in (getattr(target, "default_taps", {}) or {}).items():
        aliases.setdefault(p, []).append(a)
    order: dict[str, None] = {}  # modules in the order their forward *starts* (parents before children)
    shapes: dict[str, tuple[int, ...]] = {}  # last call's output shape
    handles: list[RemovableHandle] = []

    def make_hooks(path: str):
        def pre_hook(module: nn.Module, args: Any) -> None:
            order.setdefault(path)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                shapes[path] = tuple(int(s) for s in output.shape)

        return pre_hook, hook

    for path, module in target.named_modules():
        if path == "" or (max_depth is not None and path.count(".") + 1 > max_depth):
            continue
        pre_hook, hook = make_hooks(path)
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(hook))
    moved = device != old_device
    try:
        if moved:
            target.to(device)
        with _EvalNoGrad(target):
            target(torch.zeros(batch, 3, h, w, device=device, dtype=dtype))
    finally:
        for hd in handles:
            hd.remove()
        if moved:
            target.to(old_device)
    return [TapInfo(p, ",".join(aliases.get(p, [])), shapes[p], h / shapes[p][-2]) for p in order if p in shapes]


def _fmt_stride(s: float) -> str:
    return str(int(s)) if math.isclose(s, round(s)) else f"{s:.2f}"


def format_taps(taps: Sequence[TapInfo], *, title: str | None = None, aliased_only: bool = False) -> str:
    """Plain-text table of :func:`list_taps` rows (module path, alias, shape with B, stride)."""
    rows = [t for t in taps if t.alias or not aliased_only]
    header = ("module", "alias", "shape", "stride")
    body = [(t.name, t.alias, "[B, " + ", ".join(map(str, t.shape[1:])) + "]", _fmt_stride(t.stride)) for t in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(wd) for c, wd in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * wd for wd in widths))
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)
