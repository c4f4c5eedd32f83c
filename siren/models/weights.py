"""Foreign checkpoints (docs/bring-your-own-codec.md): `.pt`/`.pth` (read with `weights_only=True`) or `.safetensors` into a module.

`weights_key` picks a nested dict (`model`, `state_dict`, `ema`, or a dotted path such as `model.ema`); `rename`
rewrites tensor names with regex → replacement rules, applied in order to every name; `allow_missing` and
`allow_unexpected` are fnmatch patterns of tolerated mismatches. Loading is strict: whatever is missing, unexpected
or mis-shaped and not allowed is ONE error listing all of it; every rename and every allowed mismatch is logged (an
allowed unexpected tensor is dropped). When the names differ only by a wrapper prefix (`module.` from DataParallel/DDP,
`_orig_mod.` from torch.compile) the error gives the exact `rename:` rule as YAML to paste. A saved buffer named after a
constructor argument (an FSQ's `levels`) that contradicts `args:` is its own error, naming the buffer and both values.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siren.models.io import StrictLoadError

log = logging.getLogger("siren")


def read_state(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from a foreign checkpoint file, descending into `key` (dotted) when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except SafetensorError as exc:
            raise StrictLoadError(f"cannot read {path} as safetensors: {exc}") from exc
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle with code, corrupt file: name the file and the safe-loading reason
            raise StrictLoadError(
                f"cannot read {path} with torch.load(weights_only=True): {exc}. Only tensors and plain containers "
                "are accepted; re-save the state_dict alone if the file pickles classes"
            ) from exc
    else:
        raise StrictLoadError(f"{path}: unknown weights format {suffix!r}; use .pt/.pth or .safetensors")
    if key:
        obj = _descend(obj, key, path)
    if not isinstance(obj, Mapping):
        raise StrictLoadError(
            f"{path}{f' [{key}]' if key else ''} is a {type(obj).__name__}, not a state dict; "
            f"set weights_key to the entry holding it{_keys_hint(obj)}"
        )
    flat = _flatten(obj)
    not_tensors = sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise StrictLoadError(
            f"{path}{f' [{key}]' if key else ''} holds non-tensor entries {not_tensors[:8]}"
            f"{' ...' if len(not_tensors) > 8 else ''}; set weights_key to the state dict inside it"
        )
    return flat


def _keys_hint(obj: Any) -> str:
    return f" (top-level keys: {', '.join(map(str, list(obj)[:12]))})" if isinstance(obj, Mapping) else ""


def _descend(obj: Any, key: str, path: Path) -> Any:
    """`key` as a literal entry first, else as a dotted path."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    cur, walked = obj, []
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            where = ".".join(walked) or "the top level"
            raise StrictLoadError(f"{path}: weights_key {key!r}: no entry {part!r} at {where}{_keys_hint(cur)}")
        cur = cur[part]
        walked.append(part)
    return cur


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts of tensors (as some trainers save submodules) → dotted names; a flat state dict is unchanged."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def apply_renames(state: dict[str, torch.Tensor], rules: Mapping[str, str], where: str) -> dict[str, torch.Tensor]:
    """Each rule (regex → replacement, `re.sub` on the full name) in order; every changed name is logged. Two names
    that rename to the same one are an error (one would silently overwrite the other)."""
    compiled = []
    for pattern, repl in rules.items():
        try:
            compiled.append((re.compile(pattern), repl))
        except re.error as exc:
            raise StrictLoadError(f"{where}: rename pattern {pattern!r} is not a valid regex: {exc}") from exc
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    renamed: list[str] = []
    for name, t in state.items():
        new = name
        for rx, repl in compiled:
            new = rx.sub(repl, new)
        if new in out:
            raise StrictLoadError(f"{where}: rename maps both {origin[new]!r} and {name!r} to {new!r}")
        if new != name:
            renamed.append(f"{name} -> {new}")
        out[new], origin[new] = t, name
    if renamed:
        log.info("%s: renamed %d tensor(s):\n  %s", where, len(renamed), "\n  ".join(renamed))
    for pattern, _ in compiled:
        if not any(pattern.search(n) for n in state):
            log.warning("%s: rename pattern %r matched no tensor name", where, pattern.pattern)
    return out


def load_foreign_weights(
    module: nn.Module,
    path: str | Path,
    *,
    key: str | None = None,
    rename: Mapping[str, str] | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    where: str = "weights",
    args: Mapping[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Strictly load a foreign checkpoint into `module`. Returns {"missing": [...], "unexpected": [...]} (the allowed
    ones). Mis-shaped tensors are never allowed: a shape or dtype-kind difference means a different architecture.
    `args`: the constructor arguments the module was built with; a saved buffer that contradicts one of them is an
    error of its own, naming the buffer and both values."""
    state = apply_renames(read_state(path, key), rename or {}, f"{where} ({path})")
    allow_missing, allow_unexpected = list(allow_missing), list(allow_unexpected)
    own = module.state_dict()
    contradictions = _buffer_contradictions(module, own, state, args or {})
    if contradictions:
        raise StrictLoadError(
            f"{where}: the checkpoint {path} was saved with other constructor arguments than `{where}.args`:\n"
            + "\n".join(f"  - {c}" for c in contradictions)
            + f"\nset `{where}.args` to the checkpoint's values (loading would mix two configurations)"
        )
    problems: list[str] = []
    allowed: dict[str, list[str]] = {"missing": [], "unexpected": []}
    for name in sorted(set(own) - set(state)):
        if any(fnmatch.fnmatchcase(name, p) for p in allow_missing):
            allowed["missing"].append(name)
        else:
            problems.append(f"missing: {name} {tuple(own[name].shape)}")
    for name in sorted(set(state) - set(own)):
        if any(fnmatch.fnmatchcase(name, p) for p in allow_unexpected):
            allowed["unexpected"].append(name)
        else:
            problems.append(f"unexpected: {name} {tuple(state[name].shape)}")
    for name in sorted(set(own) & set(state)):
        a, b = own[name], state[name]
        if a.shape != b.shape:
            problems.append(f"mis-shaped: {name} (module {tuple(a.shape)} vs file {tuple(b.shape)})")
        elif a.dtype.is_floating_point != b.dtype.is_floating_point:
            problems.append(f"wrong dtype: {name} (module {a.dtype} vs file {b.dtype})")
    if problems:
        hint = _rename_hint(sorted(set(own) - set(state)), sorted(set(state) - set(own)), where)
        raise StrictLoadError(
            f"{where}: loading {path} into {type(module).__module__}:{type(module).__qualname__} failed "
            f"({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems) + hint
        )
    for name in allowed["missing"]:
        log.warning("%s: missing tensor %s allowed by allow_missing (module keeps its own value)", where, name)
    for name in allowed["unexpected"]:
        log.warning("%s: unexpected tensor %s allowed by allow_unexpected: dropped, not loaded", where, name)
    # Copy with the module's dtype; allowed-missing tensors keep their current values.
    new_state = {n: state[n].to(own[n].dtype) if n in state else own[n] for n in own}
    module.load_state_dict(new_state, strict=True)
    log.info("%s: loaded %d tensor(s) from %s", where, len(own) - len(allowed["missing"]), path)
    return allowed


# Wrapper prefixes a saved state dict may carry: what adds them, so the error can say where the names came from.
_WRAPPERS = {"module.": "DataParallel/DistributedDataParallel", "_orig_mod.": "torch.compile"}


def _rename_hint(missing: list[str], unexpected: list[str], where: str) -> str:
    """When the file's names are the module's behind wrapper prefixes (`module.`, `_orig_mod.`, in any nesting), the
    exact `rename:` rule to paste; otherwise a general pointer to `rename:` when names differ."""
    if not missing or not unexpected:
        return ""
    prefixes: set[str] = set()
    want = set(missing)
    for name in unexpected:
        rest, prefix = name, ""
        while True:
            head = next((p for p in _WRAPPERS if rest.startswith(p)), None)
            if head is None:
                break
            rest, prefix = rest[len(head) :], prefix + head
        if prefix and rest in want:
            prefixes.add(prefix)
    if len(prefixes) != 1:
        return "\n(names differ: add `rename:` rules (regex: replacement) mapping the file's names to the module's)"
    prefix = prefixes.pop()
    added_by = " and ".join(v for k, v in _WRAPPERS.items() if k in prefix)
    rule = "^" + re.escape(prefix)
    # Single quotes in YAML keep the backslashes literal, so the regex is pasted exactly as shown.
    return (
        f"\nthe file's names carry the prefix {prefix!r} (added by {added_by}); add this to the config:\n"
        f"{where}:\n  rename:\n    '{rule}': ''\n"
    )


def _buffer_contradictions(
    module: nn.Module, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], args: Mapping[str, Any]
) -> list[str]:
    """Saved buffers that contradict a constructor argument: a buffer named like an argument (`levels`, `_levels`,
    `fsq.levels`) whose value differs from what the module built. Learned buffers (running statistics, EMA
    codebooks) are not named after arguments and are left to load."""
    buffers = {n for n, _ in module.named_buffers()} & set(own) & set(state)
    out = []
    for name in sorted(buffers):
        arg = name.rsplit(".", 1)[-1].lstrip("_")
        if arg not in args:
            continue
        built, saved = own[name], state[name]
        if built.shape == saved.shape and torch.equal(built, saved.to(built.dtype)):
            continue
        out.append(
            f"buffer `{name}`: checkpoint has {_show(saved)}, the module built from args.{arg} = {args[arg]} "
            f"has {_show(built)}"
        )
    return out


def _show(t: torch.Tensor) -> str:
    return str(t.tolist()) if t.numel() <= 16 else f"a {tuple(t.shape)} tensor"
