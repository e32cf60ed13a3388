"""Experiment configuration: one YAML per experiment, `_base_` inheritance, `--set key=value` overrides.

Every key is validated against :data:`DEFAULTS` (the schema *and* the default values): an unknown key is
an error that names the file and suggests the closest valid key, a value of the wrong type is an error,
and nothing is dropped silently. Loss entries are checked for structure here; their names and arguments are
checked against the loss registry by ``c2vkd.engine.loss_config.validate_loss_args`` (CLI, compare, Trainer),
so this module stays the base layer (it imports no torch and no losses).

Resolution order: DEFAULTS <- base files (depth first, in list order) <- the file itself <- --set overrides.
Dicts merge key by key; lists and scalars replace. ``_base_`` paths are relative to the including file; a
bare name such as ``methods/c2vkd-paper.yaml`` that does not exist there is looked up in the configs shipped
with the package (``c2vkd/configs``), so user configs can inherit the presets without copying them.

``balance`` belongs to the method, like ``losses``: a file (or a ``c2vkd compare`` layer) that sets ``losses``
starts from the default ``balance`` (off) plus its own ``balance`` section, if any, so
``_base_: [demo.yaml, methods/kd.yaml]`` trains kd unbalanced even when demo.yaml inherits a balanced preset;
a balance dropped this way is logged.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from c2vkd.registry import suggest

log = logging.getLogger("c2vkd")

PACKAGE_CONFIGS = Path(__file__).parent / "configs"

# Types of keys whose default is null (any other key's type is its default's type).
NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "experiment.name": (str,), "data.root": (str,), "data.ignore_index": (int,), "data.num_classes": (int,),
    "data.augment_pool_seed": (int,), "student.pretrained": (str,), "teacher.name": (str,),
    "teacher.checkpoint": (str,), "teacher.cache": (str,), "train.grad_clip": (int, float),
    "train.max_val_batches": (int,),
}

# Keys holding file or folder paths: a run's saved config.yaml stores them absolute, so `eval`, `predict` and
# `export` work from any directory. Loss entries: string arguments named *checkpoint / *_path / *_dir.
PATH_KEYS = ("experiment.output_dir", "data.root", "student.pretrained", "teacher.checkpoint", "teacher.cache")

# Keys whose value is a free-form mapping (validated later by the component that consumes it).
OPEN_KEYS = {"student.kwargs", "teacher.kwargs", "balance.targets"}

DEFAULTS: dict[str, Any] = {
    "experiment": {
        "name": None,             # run directory is <output_dir>/<name>; null -> the config file's name
                                  # (configs/camvid_kd.yaml -> camvid_kd), "run" without a file
        "output_dir": "runs",
        "seed": 0,
        "deterministic": False,   # torch.use_deterministic_algorithms (slower; needed for bitwise resume on GPU)
        # Python modules imported before anything is built, so your own registered models / losses / dataset
        # formats (@MODELS.register, @LOSSES.register, DATASETS) can be named in this config: dotted module
        # names importable from PYTHONPATH (e.g. [my_project.models]) or paths to .py files (relative to
        # the working directory). Imported in every process (torchrun workers included).
        "imports": [],
    },
    "data": {
        "format": "folder",       # folder | camvid | camvid_segnet | cityscapes | ade20k | voc
        "root": None,
        "ignore_index": None,     # raw void value in the label files; null -> classes.json / format default
        "num_classes": None,      # null -> from the dataset; if set, must match it
        "splits": {"train": "train", "val": "val", "test": "test"},
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "train_transform": {
            "scale_range": [0.5, 2.0],
            "base_size": None,
            "crop_size": [512, 512],
            "flip": True,
            "jitter": 0.0,
        },
        "eval_transform": {"mode": "whole", "size": None},
        "batch_size": 8,
        "eval_batch_size": 1,
        "num_workers": 2,
        # Augmentation pool: 0 = fresh random augmentation every epoch. K > 0 = each training image only ever
        # gets one of K fixed augmented views (every view once per K epochs, in a seeded order), so the run sees
        # exactly N*K distinct samples and `c2vkd cache-teacher` can precompute the teacher on all of them.
        # 1 = one fixed view per image (what "no augmentation" means for a cacheable teacher).
        "augment_pool": 0,
        "augment_pool_seed": None,  # seed of the pool's views; null -> experiment.seed (an int lets several
                                    # experiment seeds share one pool, hence one teacher cache)
        # Pre-flight label values (data/preflight.py): auto = every label when cheap, else a sample (logged);
        # full = every label; off. Results are cached per file (size, mtime), so reruns decode nothing.
        "label_check": "auto",
    },
    "student": {
        "name": "segformer_b0",
        "pretrained": None,
        "kwargs": {},
        "sync_bn": False,         # DDP on CUDA: convert the student's BatchNorm layers to SyncBatchNorm
    },
    "teacher": {
        "name": None,             # null -> no teacher (supervised training)
        "checkpoint": None,       # trained teacher weights (c2vkd run checkpoint, export, or a supported format)
        # Distilling from a teacher without a checkpoint (random weights) is an error for train/distill unless
        # this is true (smoke tests, toy examples); diagnostics such as `c2vkd report` allow it with a warning.
        "allow_random_init": False,
        "kwargs": {},
        "channels_last": False,
        # Precision of the live teacher's forward: null = as train.amp; off | bf16 | fp16 = that autocast for the
        # teacher only (outputs cast back to the student's dtype). bf16 + channels_last make a live CNN teacher
        # cheaper (benchmarks/bench_throughput.py); the teacher cache does not run the teacher at all.
        "amp": None,
        # Folder written by `c2vkd cache-teacher`: when set, distillation reads the teacher's logits (and the
        # feature taps the losses need) from it instead of running the teacher. Needs data.augment_pool >= 1;
        # a cache made with another teacher / data / transform / pool is refused, a missing view is an error.
        "cache": None,
    },
    # Each entry: {name: <registered loss>, weight: float, ...loss args}. Supervised training = [ce].
    "losses": [{"name": "ce", "weight": 1.0}],
    "optim": {
        "name": "adamw",          # adamw | sgd
        "lr": 6.0e-5,
        "weight_decay": 0.01,
        "momentum": 0.9,          # sgd only
        "betas": [0.9, 0.999],    # adamw only
        "head_lr_mult": 1.0,      # lr multiplier for the student's decode head and KD alignment heads
        # KD alignment heads (VLFD's visual/linguistic heads, feature adapters) have their own parameter group:
        # null = same lr as the decode head (head_lr_mult) / the optimizer's eps. A head fed 1e-9 gradients is
        # frozen by AdamW's eps 1e-8: lower align_eps or raise align_lr_mult (see `c2vkd report`).
        "align_lr_mult": None,
        "align_eps": None,
        # Optimizer kernel: auto (fused where torch has one for the parameters' device and dtype, else the
        # multi-tensor one) | fused | foreach. Same update rule; fused is ~3x faster on CPU (AdamW, SegFormer-B0).
        "impl": "auto",
    },
    "schedule": {
        "iters": 1000,
        "warmup_iters": 0,
        "warmup_ratio": 1.0e-6,   # lr at step 0 = lr * warmup_ratio, linear up to lr at warmup_iters
        "power": 1.0,             # poly decay after warm-up
        "min_lr": 0.0,
    },
    "train": {
        "device": "auto",         # auto | cpu | cuda | cuda:N
        "amp": "off",             # off | bf16 | fp16
        # torch.compile (inductor) of the training forward and backward: off | student | all (the student and the
        # loss modules). Validation, checkpoints and exports use the plain student. No working compiler: logged
        # loudly, the run continues eager. Other rounding than eager: a different protocol (docs/benchmarks.md).
        "compile": "off",
        "grad_clip": None,        # max grad norm, null = off
        "accum_steps": 1,
        "log_interval": 10,
        "val_interval": 0,        # 0 = only at the end
        "ckpt_interval": 0,       # 0 = only at the end
        "keep_last": 3,
        "nan_policy": "stop",     # stop | skip
        "progress": True,
        "max_val_batches": None,  # limit validation batches (quick sanity runs)
        # every K-th step, measure each loss term's gradient norm on the student (one extra backward per term at
        # those steps only) and log grad_share/<term> to metrics.jsonl and TensorBoard; 0 = off
        "grad_share_interval": 0,
    },
    # Automatic term balancing (engine/balance.py): re-weight the targeted terms so that each gets its target
    # share of the student's gradient (sum of per-term gradient norms), from measured, detached norms.
    "balance": {
        "mode": "off",            # off | grad_norm
        "targets": {},            # {term: share in (0, 1)}, e.g. {vlfd_global: 0.1}; untargeted terms keep weights
        "interval": 10,           # re-estimate every K iterations after the warm-up
        "warmup": 20,             # measure at every one of the first W iterations (the moving average settles)
        "ema": 0.5,               # level smoothing of the log norm ratios (new value weighs 1 - ema)
        "trend": 0.05,            # trend smoothing (Holt); 0 = plain moving average (lags a falling ratio)
        "min_weight": 0.0,
        "max_weight": 1.0e8,
    },
    "eval": {
        "split": "val",           # split for periodic validation
        "final_split": "test",    # split evaluated at the end of training (null = skip)
        "mode": "whole",          # whole | slide | center_crop
        "window": None,           # [H, W] for slide / center_crop
        "stride": None,           # [H, W] for slide
        "scales": [1.0],
        "flip": False,
    },
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: 1e-3 is a float (1.1 needs a dot), only true/false are booleans."""


# YAML 1.2 booleans only: YAML 1.1 reads on/off/yes/no as booleans, which breaks keys such as cwd's `on`.
_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key."""


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config file: as given, relative to the including file, or among the packaged configs."""
    p = Path(name)
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if relative_to is not None:
            candidates.append(relative_to / p)
        candidates += [p, PACKAGE_CONFIGS / p]
        if p.suffix == "":
            candidates.append(PACKAGE_CONFIGS / f"{p}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(str(q.relative_to(PACKAGE_CONFIGS)) for q in PACKAGE_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"config file {name!r} not found (looked in: {', '.join(map(str, candidates))}).{suggest(str(name), shipped)}")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge: dicts merge recursively, everything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(s) for s in (*seen, path))
        raise ConfigError(f"circular _base_ inheritance: {chain}")
    data = _load_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for b in bases:
        bp = resolve_config_path(b, relative_to=path.parent)
        base_cfg = _load_with_bases(bp, (*seen, path))
        validate(base_cfg, source=str(bp), partial=True)
        merged = merge_method_layer(merged, base_cfg, source=str(bp))
    validate(data, source=str(path), partial=True)
    return merge_method_layer(merged, data, source=str(path))


def merge_method_layer(base: dict[str, Any], layer: dict[str, Any], *, source: str,
                       announce: bool = True) -> dict[str, Any]:
    """``merge(base, layer)``, except that a layer setting ``losses`` defines the method anew: the inherited
    ``balance`` (tuned for other terms: its targets name another method's losses) is reset to the defaults,
    and the layer's own ``balance``, if any, merges into those. A non-default balance dropped
    without replacement is logged (``announce``; off for ``c2vkd compare``'s preset layers, where it is the
    documented rule and would repeat for every variant)."""
    if "losses" in layer and "balance" in base:
        if announce and "balance" not in layer and merge(DEFAULTS["balance"], base["balance"]) != DEFAULTS["balance"]:
            log.info("%s sets losses without balance: the inherited balance %s is dropped (balance belongs to "
                     "the method; repeat it under `balance:` in %s to keep it)", source, base["balance"], source)
        base = {**base, "balance": copy.deepcopy(DEFAULTS["balance"])}
    return merge(base, layer)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.0.c=value' -> (['a','b','0','c'], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = _yaml_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = cfg
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(node, part, here)]
            elif isinstance(node, dict):
                if part not in node:
                    if _is_open(parts[:i]):  # new key inside a free-form section (e.g. student.kwargs)
                        node[part] = {}
                    else:
                        raise ConfigError(f"--set {item}: unknown key {here!r}.{suggest(part, list(node))}")
                node = node[part]
            else:
                raise ConfigError(f"--set {item}: {here!r} is a {type(node).__name__}, not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(parts))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item}: {'.'.join(parts[:-1])!r} is a {type(node).__name__}, not a section")
    return cfg


def _is_open(parts: list[str]) -> bool:
    return ".".join(parts) in OPEN_KEYS


def _list_index(node: list, part: str, where: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise ConfigError(f"{where}: expected a list index, got {part!r}") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"{where}: index {idx} out of range (list has {len(node)} items)")
    return idx


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):  # an iteration count of 5.5 is a typo, not 5
        return _is_int(value)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)) and default and all(_is_int(v) for v in default):
        return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)  # sizes such as crop_size
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def import_plugins(modules: Any, source: str = "config") -> list[Any]:
    """Import the ``experiment.imports`` modules (dotted names or ``.py`` paths); errors are ConfigErrors.

    Importing is idempotent (Python caches modules), so calling this for every file and override is cheap."""
    import hashlib
    import importlib
    import importlib.util
    import sys

    if modules is None:
        return []
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m.strip() for m in modules):
        raise ConfigError(f"{source}: experiment.imports must be a list of module names or .py paths, got {modules!r}")
    loaded = []
    for name in modules:
        try:
            if name.endswith(".py"):
                path = Path(name).expanduser().resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                mod_name = f"c2vkd_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
                if mod_name not in sys.modules:
                    spec = importlib.util.spec_from_file_location(mod_name, path)
                    assert spec is not None and spec.loader is not None
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[mod_name] = module
                    try:
                        spec.loader.exec_module(module)
                    except BaseException:
                        del sys.modules[mod_name]
                        raise
                loaded.append(sys.modules[mod_name])
            else:
                loaded.append(importlib.import_module(name))
        except Exception as e:
            raise ConfigError(f"{source}: experiment.imports: cannot import {name!r}: {type(e).__name__}: {e} "
                              "(module names must be importable from PYTHONPATH; .py paths are relative to the "
                              "working directory)") from e
    return loaded


def validate(cfg: dict[str, Any], *, source: str = "config", partial: bool = False,
             schema: dict[str, Any] = DEFAULTS, prefix: str = "") -> None:
    """Reject unknown keys (with a suggestion) and values whose type differs from the default's.

    At the top level, ``experiment.imports`` is imported first so that plugin losses validate."""
    if prefix == "" and isinstance(cfg.get("experiment"), dict) and cfg["experiment"].get("imports"):
        import_plugins(cfg["experiment"]["imports"], source)
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if prefix == "" and key == "_base_":
            continue
        if key not in schema:
            raise ConfigError(f"{source}: unknown key {full!r}.{suggest(key, list(schema))} "
                              f"Valid keys here: {', '.join(schema)}")
        default = schema[key]
        if full in OPEN_KEYS:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: {full} must be a mapping, got {value!r}")
            continue
        if full == "losses":
            _validate_losses(value, source)
            continue
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full} must be a mapping, got {value!r}")
            validate(value, source=source, partial=partial, schema=default, prefix=f"{full}.")
        elif full in NULLABLE_TYPES:
            kinds = NULLABLE_TYPES[full]
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                names = " or ".join("an integer" if k is int else "a number" if k is float else "a string"
                                    for k in kinds)
                raise ConfigError(f"{source}: {full} = {value!r} must be {names} or null")
        elif not _type_ok(default, value):
            if _is_int(default) or (isinstance(default, list) and default and all(_is_int(v) for v in default)):
                what = "an integer" if _is_int(default) else "a list of integers"
                raise ConfigError(f"{source}: {full} = {value!r} must be {what} (default {default!r})")
            raise ConfigError(f"{source}: {full} = {value!r} has type {type(value).__name__}, "
                              f"expected {type(default).__name__} (default {default!r})")


def _validate_losses(value: Any, source: str) -> None:
    """Structure only: a list of mappings with a ``name``. Whether the names are registered losses and their
    arguments fit the constructors is checked by ``c2vkd.engine.loss_config.validate_loss_args`` (the config
    is the base layer and does not import the losses)."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: losses must be a list of {{name: ..., weight: ...}} entries")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{source}: losses[{i}] must be a mapping with a 'name' key, got {entry!r}")


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                layers: list[str | Path] | None = None) -> dict[str, Any]:
    """Load a YAML experiment (or only DEFAULTS when path is None), apply --set overrides, validate.

    ``layers`` are further YAML files merged after the experiment and before the overrides (``c2vkd compare``
    layers a method preset such as ``methods/kd.yaml`` on top of the experiment this way); a layer that sets
    ``losses`` starts from the default ``balance`` unless it sets its own (:func:`merge_method_layer`)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = merge(cfg, _load_with_bases(resolve_config_path(path)))
    for layer in layers or []:
        # A method preset owns the method: its losses and its loss balancing. The experiment's own `balance`
        # (e.g. inherited from a balanced preset) must not leak into another method.
        lp = resolve_config_path(layer)
        cfg = merge_method_layer(cfg, _load_with_bases(lp), source=str(lp), announce=False)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        validate(cfg, source="--set overrides")
    validate(cfg, source=str(path) if path else "defaults")
    if cfg["experiment"]["name"] is None:  # runs of different config files never share runs/run
        cfg["experiment"]["name"] = Path(path).stem if path is not None else "run"
    return cfg


def absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with every path (:data:`PATH_KEYS`, ``.py`` entries of ``experiment.imports``, loss
    arguments named ``*checkpoint`` / ``*_path`` / ``*_dir``) absolute, relative to the working directory.
    Symlinks are kept (no resolve), ``~`` is expanded."""
    import os

    def absolute(p: Any) -> Any:
        return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and p else p

    out = copy.deepcopy(cfg)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = absolute(out[section][key])
    exp = out.get("experiment", {})
    if isinstance(exp.get("imports"), list):
        exp["imports"] = [absolute(m) if isinstance(m, str) and m.endswith(".py") else m for m in exp["imports"]]
    for entry in out.get("losses") or []:
        for k, v in list(entry.items()):
            if isinstance(v, str) and (k.endswith("checkpoint") or k.endswith("_path") or k.endswith("_dir")):
                entry[k] = absolute(v)
    return out


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node
