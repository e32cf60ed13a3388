"""Checkpoint I/O: atomic writes with a checksum sidecar, safe loading (weights_only=True, never pickle).

A checkpoint ``X.pt`` is written to ``X.pt.tmp``, fsynced and renamed, then ``X.pt.sha256`` is written the
same way. Loading verifies the checksum when the sidecar exists, so a truncated or corrupted file is
detected instead of half-loaded."""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model; the message names the file."""


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 with the usual 022)."""
    try:  # Linux: read it without changing it (os.umask(0) would briefly affect other threads' new files)
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def replace_with_default_mode(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` after giving ``tmp`` the mode of an ordinary new file: writers that create
    files 0600 (safetensors) end up with the same mode as checkpoints and JSON files."""
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON summaries, markers) atomically: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _fsync_write(path, lambda f: f.write(text.encode()))
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save atomically and write a sha256 sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _fsync_write(path, lambda f: torch.save(obj, f))
    digest = sha256_file(path)
    _fsync_write(path.with_name(path.name + ".sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    return path


def verify(path: str | Path) -> bool:
    """True when the sidecar checksum matches (or there is no sidecar but the file exists)."""
    path = Path(path)
    if not path.is_file():
        return False
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return True
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    return expected == sha256_file(path)


def _has_safetensors_header(path: Path) -> bool:
    """safetensors layout: an 8-byte little-endian header length, then the JSON header (torch.save's zip and
    legacy pickle files never have '{' at byte 8)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a .pt/.pth (weights_only=True) or .safetensors file (by its suffix, or by its header under another
    name); checksum-verified when a sidecar exists."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not verify(path):
        raise CheckpointError(f"checkpoint {path} does not match its checksum ({path.name}.sha256): "
                              "the file is truncated or corrupted")
    if path.suffix == ".safetensors" or _has_safetensors_header(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises several types for bad headers
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol chatter about a file we refuse anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError...
        raise CheckpointError(unreadable_message(path, e)) from None


def unreadable_message(path: Path, err: BaseException) -> str:
    """Our message for a checkpoint torch cannot load safely. PyTorch's own text suggests re-running with the
    unsafe loader, which would execute whatever code a pickled file carries, so only its diagnosis is kept."""
    text = str(err)
    detail = ""
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1]
        detail = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
    elif "weights_only" not in text:
        detail = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    detail = detail.split(" Please ")[0].split(" Check the documentation")[0]  # torch's how-to-allowlist advice
    reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return (f"cannot read checkpoint {path} ({reason}). It is truncated or corrupt, not a PyTorch checkpoint, or "
            "holds pickled Python objects besides tensors: c2vkd loads only tensors and plain containers "
            "(weights_only=True) and never unpickles code, so such a file is refused. Save the weights as a state dict "
            "(torch.save(model.state_dict(), path)) or as .safetensors and use that file")
