"""Foreign components by import path (docs/bring-your-own-codec.md): `target: "pkg.mod:Name"`, `args`, optional `adapter`.

A component section with `target` builds that class with `args` as keyword arguments; the arguments are checked
against the constructor's signature first, so a typo is one error naming the argument and the closest valid one, not
a TypeError from deep inside someone else's `__init__`. An `adapter` wraps the built module to its role:
`Adapter(module, **adapter_args)`. The class (and adapter) of every built component is recorded in `meta.json`
(`targets`), and re-imported from the saved config when a checkpoint is loaded.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from siren.errors import SirenError


class ComponentError(SirenError, ValueError):
    """A component section names a class that cannot be imported or built with the given arguments."""


def import_target(path: str, where: str) -> Any:
    """`"pkg.mod:Name"` (or `"pkg.mod:Outer.Inner"`) → the object; errors name the module path and what is missing."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ComponentError(f"{where}: {path!r} is not an import path of the form 'package.module:Name'")
    mod_name, attr = path.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ComponentError(
            f"{where}: cannot import module {mod_name!r} (for {path!r}): {exc}; is its package installed or on "
            "PYTHONPATH?"
        ) from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ComponentError(f"{where}: module {mod_name!r} has no {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj


def check_args(fn: Any, args: dict[str, Any], where: str, skip: int = 0) -> None:
    """Every key of `args` is a keyword parameter of `fn` and every required parameter is given; one error listing
    all problems otherwise. `skip`: leading positional parameters supplied by SIREN (an adapter's wrapped module)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ComponentError(f"{where}: cannot read the signature of {fn!r}: {exc}") from exc
    params = list(sig.parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = None  # **kwargs: any name is accepted
    else:
        accepted = [
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
    problems = []
    if not isinstance(args, dict):
        raise ComponentError(f"{where}: args must be a mapping of keyword arguments, got {type(args).__name__}")
    if accepted is not None:
        for key in args:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
                hint = f"did you mean `{close[0]}`?" if close else f"valid: {', '.join(accepted) or '(none)'}"
                problems.append(f"unknown argument `{key}`; {hint}")
    for p in params:
        required = p.default is inspect.Parameter.empty and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if required and p.name not in args:
            problems.append(f"missing required argument `{p.name}`")
    if problems:
        name = getattr(fn, "__qualname__", repr(fn))
        raise ComponentError(f"{where} ({name}): " + "; ".join(problems))


def build_target(where: str, target: str, args: dict[str, Any]) -> nn.Module:
    """Import `target`, check `args` against its signature, build it; the result must be an nn.Module."""
    cls = import_target(target, where)
    check_args(cls, args, where)
    module = cls(**args)
    if not isinstance(module, nn.Module):
        raise ComponentError(f"{where}: {target} built a {type(module).__name__}, not a torch.nn.Module")
    return module


def wrap_adapter(where: str, module: nn.Module, adapter: str, adapter_args: dict[str, Any]) -> nn.Module:
    """`Adapter(module, **adapter_args)`; the adapter must be an nn.Module holding the wrapped module."""
    cls = import_target(adapter, f"{where}.adapter")
    check_args(cls, adapter_args, f"{where}.adapter_args", skip=1)
    wrapped = cls(module, **adapter_args)
    if not isinstance(wrapped, nn.Module):
        raise ComponentError(f"{where}.adapter: {adapter} built a {type(wrapped).__name__}, not a torch.nn.Module")
    if not any(m is module for m in wrapped.modules()):
        raise ComponentError(
            f"{where}.adapter: {adapter} does not keep the wrapped module as a submodule, so its weights would not "
            "be saved, frozen or fingerprinted"
        )
    return wrapped


def class_path(obj: Any) -> str:
    """`module:QualName` of an object's class (the form `target:` takes)."""
    t = obj if isinstance(obj, type) else type(obj)
    return f"{t.__module__}:{t.__qualname__}"


def describe(section: Any, module: nn.Module) -> dict[str, Any]:
    """What `meta.json` records for a built component: its class, the target/adapter it came from, and args."""
    return {
        "class": class_path(module),
        "target": getattr(section, "target", None),
        "adapter": getattr(section, "adapter", None),
        "args": dict(getattr(section, "args", {}) or {}),
    }
