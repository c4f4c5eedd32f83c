"""Schema versions of saved configs and the table that brings an old one up to the current schema.

Every dumped config (a run's `config.yaml`, the `config` of each checkpoint's `meta.json`) carries `schema_version`.
A saved config without one was written before versions existed (version 0). `migrate` applies `MIGRATIONS[v]`
(version v → v + 1) in order until the tree is current; each step returns what it changed, and every change is logged
once per source, so an old checkpoint loads and says exactly what was renamed, moved or filled in. A version newer
than this code knows is an error: guessing what a future schema meant would be a silent lie.

A migration is frozen in time: it writes literal values (the defaults *of that change*), never the schema's current
defaults, which may move on later.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from siren.errors import SirenError

log = logging.getLogger("siren")

SCHEMA_VERSION = 3

# The component sections of version 0 and the keys issue 12 added to each (where a component comes from, docs/bring-your-own-codec.md).
_V0_COMPONENTS = (
    "ssl",
    "student_ssl",
    "factorizer",
    "sem_quantizer",
    "pro_quantizer",
    "spk_quantizer",
    "entropy_model",
    "decoder",
    "fuser",
    "flow",
    "vocoder",
)
_V1_COMPONENT_SOURCE = {
    "target": None,
    "args": {},
    "adapter": None,
    "adapter_args": {},
    "weights": None,
    "weights_key": None,
    "rename": {},
    "allow_missing": [],
    "allow_unexpected": [],
}
# Keys added by issues 12-13 outside the component sections, with the value that reproduces version 0's behaviour.
_V1_ADDED = {
    ("train", "status_every"): 50,
    ("train", "frozen_check_every"): 1,
    ("train", "hang_timeout_s"): 1800.0,
    ("tracking", "upload_trainer_state"): False,
    ("data", "cache_batch_seconds"): 0.0,
    ("data", "cache_verify"): True,
    ("data", "profile_utts"): 256,
    ("loss", "teacher_targets"): "full",
}


class SchemaVersionError(SirenError):
    """A saved config whose schema version this code cannot read."""


def _add(tree: dict, section: str, key: str, value, changes: list[str]) -> None:
    node = tree.get(section)
    if not isinstance(node, dict):  # an absent section is filled by the schema's defaults; nothing to add
        return
    if key not in node:
        node[key] = copy.deepcopy(value)
        changes.append(f"added `{section}.{key}: {value!r}`")


def _v0_to_v1(tree: dict) -> list[str]:
    """Version 0 → 1: component-source keys, status/hang/frozen-check settings, trainer-state upload, the cache and
    profile settings and the teacher-target choice, the version itself."""
    changes: list[str] = []
    for section in _V0_COMPONENTS:
        for key, value in _V1_COMPONENT_SOURCE.items():
            _add(tree, section, key, value, changes)
    for (section, key), value in _V1_ADDED.items():
        _add(tree, section, key, value, changes)
    return changes


def _v1_to_v2(tree: dict) -> list[str]:
    """Version 1 → 2: the optimizer implementation, `auto` (PyTorch's default, what version 1 used)."""
    changes: list[str] = []
    _add(tree, "optim", "impl", "auto", changes)
    return changes


def _v2_to_v3(tree: dict) -> list[str]:
    """Version 2 → 3: `train.global_batch_size`, null (the batch stays `train.batch_size` per process, as before)."""
    changes: list[str] = []
    _add(tree, "train", "global_batch_size", None, changes)
    return changes


# from-version → function that edits the tree in place to the next version and returns the changes it made.
MIGRATIONS: dict[int, Callable[[dict], list[str]]] = {0: _v0_to_v1, 1: _v1_to_v2, 2: _v2_to_v3}

_logged: set[tuple[str, int]] = set()


def schema_version_of(tree: dict, default: int, source: str) -> int:
    version = tree.get("schema_version", default)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise SchemaVersionError(f"{source}: `schema_version` must be a non-negative integer, got {version!r}")
    return version


def migrate(tree: dict, source: str = "saved config", *, default_version: int = 0) -> dict:
    """Return a copy of config `tree` at `SCHEMA_VERSION`, logging each change once per `source`.

    `default_version` is the version of a tree that carries none: 0 for a saved config (written before versions
    existed), `SCHEMA_VERSION` for a config file a person wrote against the current schema.
    """
    version = schema_version_of(tree, default_version, source)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{source} has config schema_version {version}, but this SIREN reads versions up to {SCHEMA_VERSION}: "
            "it was written by a newer SIREN; upgrade SIREN to load it"
        )
    tree = copy.deepcopy(tree)
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise SchemaVersionError(f"{source}: no migration from config schema_version {version}")
        changes = MIGRATIONS[version](tree)
        if (source, version) not in _logged:
            _logged.add((source, version))
            log.warning(
                "%s: config schema_version %d -> %d (%d change(s))%s",
                source,
                version,
                version + 1,
                len(changes),
                "".join(f"\n  - {c}" for c in changes),
            )
        version += 1
    tree["schema_version"] = SCHEMA_VERSION
    return tree
