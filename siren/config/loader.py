"""Load YAML configs: `extends:` chains, dotted `key=value` overrides, validation against the typed schema.

All problems of one file are collected and raised together as a `ConfigError`, each naming the key; an unknown key
names the closest valid key, a wrong type names the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from siren.config.migrations import SCHEMA_VERSION, migrate
from siren.config.schema import SirenConfig
from siren.errors import SirenError


class ConfigError(SirenError, ValueError):
    """One or more problems in a config; `problems` lists them, the message shows them all."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------------------------------ reading files
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """Merge `top` into a copy of `base`; mappings merge recursively, everything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and resolve its `extends:` chain (paths relative to the file; later keys win)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError([f"`extends` cycle: {cycle}"], str(path))
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(["`extends` must be a path or a list of paths"], str(path))
    merged: dict = {}
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise ConfigError([f"`extends: {parent}` not found (looked for {parent_path})"], str(path))
        merged = deep_merge(merged, load_tree(parent_path, (*_chain, path)))
    return deep_merge(merged, data)


# ---------------------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value parsed as YAML, so `1e-4`, `true`, `[1,2]` and `null` work)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form key=value"], "command line")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError([f"override {text!r} has an empty key"], "command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    tree = dict(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for k in keys[:-1]:
            child = node.get(k)
            child = dict(child) if isinstance(child, dict) else {}
            node[k] = child
            node = child
        node[keys[-1]] = value
    return tree


# --------------------------------------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of str to {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`; returns the converted value (ints are accepted for floats)."""
    if tp is Any:  # free-form (a foreign constructor's `args`): checked against its signature when built
        return value
    origin = get_origin(tp)
    bad = f"{key}: value {value!r} has type {type(value).__name__}, expected {_type_name(tp)}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(bad)
            return None
        return _build(tp, value, key + ".", problems)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
        problems.append(bad)
        return None
    if origin is Literal:
        if isinstance(value, bool) and ("no" if value is False else "yes") in get_args(tp):
            value = "no" if value is False else "yes"  # YAML 1.1 reads an unquoted `no` as false
        if value not in get_args(tp):
            problems.append(f"{key}: value {value!r} is not {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(bad)
            return None
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(bad)
            return None
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(bad)
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
            return None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad)
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(bad)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _check_bound(f: dataclasses.Field, value: Any, key: str, problems: list[str]) -> None:
    """The lower bound a schema field declares (`siren.config.schema.at_least`), on a converted number."""
    if "low" not in f.metadata or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, strictly = f.metadata["low"], f.metadata["strictly"]
    if value < low or (strictly and value == low) or value != value:  # NaN is never in range
        problems.append(f"`{key}` must be {'>' if strictly else '>='} {low}, got {value!r}")


def bound_problem(key: str, value: Any) -> str | None:
    """Why `value` is out of the range the schema declares for dotted `key`, or None (in range, an unbounded field,
    or not a schema key: other checks name those)."""
    cls: Any = SirenConfig
    *sections, leaf = key.split(".")
    for part in sections:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(part)
        if cls is None:
            return None
    if not dataclasses.is_dataclass(cls):
        return None
    declared = next((f for f in dataclasses.fields(cls) if f.name == leaf), None)
    problems: list[str] = []
    if declared is not None:
        _check_bound(declared, value, key, problems)
    return problems[0] if problems else None


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"unknown key `{prefix}{key}`{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], prefix + key, problems)
        _check_bound(fields[key], kwargs[key], prefix + key, problems)
    if problems:
        return None
    return cls(**kwargs)


def validate(tree: dict, source: str = "config") -> SirenConfig:
    problems: list[str] = []
    cfg = _build(SirenConfig, tree, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, base: str | Path | None = None
) -> SirenConfig:
    """Load, merge (`extends`), override and validate a config file; its relative paths are made absolute against
    `base` (default: the current directory, where the command was started), once, here (`resolve_paths`)."""
    tree = apply_overrides(load_tree(path), list(overrides))
    # A file without `schema_version` was written against the current schema; one with an older version migrates.
    cfg = validate(migrate(tree, str(path), default_version=SCHEMA_VERSION), str(path))
    return resolve_paths(cfg, Path.cwd() if base is None else Path(base))


# Config keys that hold a filesystem path (outputs and inputs alike), and those that hold a checkpoint URI (a path or
# `wandb:ENTITY/PROJECT/NAME:ALIAS`). `ssl.name` is a path only when it names something on disk (else a hub id).
PATH_KEYS = ("run_dir", "data.train", "data.val", "data.feature_cache", "verify.data", "verify.real_clip")
URI_KEYS = ("baseline", "pipeline.flow", "pipeline.vocoder", "student_ssl.path")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?!\\|/)")  # wandb:..., not C:\ or file paths


def resolve_paths(cfg: SirenConfig, base: Path) -> SirenConfig:
    """Make every relative path of `cfg` absolute against `base`, so a run records where its data, checkpoints and
    outputs are, and every later command (verify, decode, `Codec.from_checkpoint`, a resume) finds them from any
    directory. Absolute paths, URIs and empty values are kept. Returns `cfg` (resolved in place: it was just loaded)."""
    from siren.config.stages import COMPONENTS

    def absolute(value: str) -> str:
        return str((base / Path(value).expanduser()).resolve()) if not Path(value).expanduser().is_absolute() else value

    def visit(key: str, how: str) -> None:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, leaf)
        if not isinstance(value, str) or not value:
            return
        if how == "uri" and _URI_SCHEME.match(value):
            return
        if how == "maybe" and not (base / value).exists():
            return
        setattr(node, leaf, absolute(value))

    for key in PATH_KEYS:
        visit(key, "path")
    for key in URI_KEYS:
        visit(key, "uri")
    visit("ssl.name", "maybe")
    for name in COMPONENTS:
        visit(f"{name}.weights", "path")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: SirenConfig) -> str:
    # a `target:` section shows what was built, not unread preset keys
    return yaml.safe_dump(built_tree(to_dict(cfg)), sort_keys=False)


def config_from_dict(tree: dict, source: str = "saved config") -> SirenConfig:
    """Rebuild a config saved in a checkpoint's meta.json / config.yaml; one without `schema_version` is version 0
    (written before versions existed) and is migrated, each change logged."""
    return validate(migrate(tree, source, default_version=0), source)


# Keys of a component section that SIREN itself reads whatever class the section builds (where the teacher and a saved
# student live, the teacher layer the feature cache is keyed by, the flow's sampling settings). Every other native key
# is read only by SIREN's own class, so a `target:` section that kept it would show numbers nothing used.
SIREN_READS: dict[str, tuple[str, ...]] = {
    "ssl": ("name", "layer"),
    "student_ssl": ("path",),
    "flow": ("steps", "solver"),
}


def built_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree (`to_dict`) as what was built: a component section with `target:` keeps the source keys (target,
    args, adapter, adapter_args, weights, weights_key, rename, allow_*) and `SIREN_READS`, not the native preset
    fields its class never read; sections without `target:` and the rest of the tree are unchanged."""
    from siren.config.schema import ComponentSource
    from siren.config.stages import COMPONENTS

    source = [f.name for f in dataclasses.fields(ComponentSource)]
    out = dict(tree)
    for name in COMPONENTS:
        section = tree.get(name)
        if isinstance(section, dict) and section.get("target"):
            keep = (*source, *SIREN_READS.get(name, ()))
            out[name] = {k: section[k] for k in keep if k in section}
    return out
