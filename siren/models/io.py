"""Component weights on disk: fingerprints, atomic safetensors saves, strict loads with a named allow-list."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from siren.errors import SirenError

log = logging.getLogger("siren")


class StrictLoadError(SirenError):
    """A component file does not match its module (missing/unexpected/mismatched tensors) or cannot be read."""


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def hash_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed `tensors` into the hash `h`, in name order: each one's name, dtype, shape and raw bytes."""
    for name, t in sorted(tensors.items()):
        t = t.cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # Byte view instead of .numpy(): works for bfloat16 and 0-dim tensors too.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(module: nn.Module) -> str:
    """sha256 hex over the state dict (parameters and persistent buffers): sorted names, dtype, shape, raw bytes."""
    h = hashlib.sha256()
    hash_tensors(h, _state(module))
    return h.hexdigest()


def save_component(module: nn.Module, path: str | Path) -> Path:
    """Write the state dict as safetensors atomically (temporary file in the same dir, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): tied/shared tensors would otherwise be refused by safetensors.
    tensors = {k: v.cpu().clone().contiguous() for k, v in _state(module).items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def load_component(module: nn.Module, path: str | Path, allow: Iterable[str] = ()) -> list[str]:
    """Strictly load `path` into `module`; returns the tensor names skipped because they match an `allow` pattern.

    Missing, unexpected and shape/dtype-mismatched tensors raise StrictLoadError listing all of them, unless the
    name matches an fnmatch pattern in `allow`: then the module keeps its current value and the skip is logged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"component file not found: {path}")
    try:
        stored = load_file(str(path))
    except SafetensorError as exc:
        raise StrictLoadError(f"cannot read component file {path} (corrupt or not safetensors): {exc}") from exc
    allow = list(allow)
    own = _state(module)
    problems, patched = [], []

    def report(name: str, what: str) -> None:
        if any(fnmatch.fnmatchcase(name, p) for p in allow):
            patched.append(name)
            log.warning("load %s: %s %s (allowed by allow-list; module value kept)", path, what, name)
        else:
            problems.append(f"{what}: {name}")

    for name in sorted(set(own) - set(stored)):
        report(name, "missing")
    for name in sorted(set(stored) - set(own)):
        report(name, "unexpected")
    new_state = dict(own)
    for name in sorted(set(own) & set(stored)):
        a, b = own[name], stored[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            report(name, f"mismatch (module {a.dtype}{tuple(a.shape)} vs file {b.dtype}{tuple(b.shape)})")
        else:
            new_state[name] = b
    if problems:
        # A module that changed its parameterisation can say which old format the file is in and what to do.
        explain = getattr(module, "explain_load_failure", None)
        why = explain(set(own) - set(stored), set(stored) - set(own)) if explain is not None else None
        raise StrictLoadError(
            f"strict load of {path} into {type(module).__name__} failed ({len(problems)}):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + (f"\n{why}" if why else "")
        )
    module.load_state_dict(new_state, strict=True)
    return patched
