"""`CheckpointMeta`: the schema of a step directory's `meta.json`, written by the trainer and the importer.

A step's `meta.json` says what the checkpoint is (stage, step, the config that built it, each component's fingerprint
and class), what it consumed (baseline, `init_from`, SSL teacher: see `siren.checkpoints.lineage`), the code language
its codes are in, how it was trained (frozen and trainable components, process count, precision, W&B run) and what
data it left out. `CheckpointMeta.from_dict` is the one reader: a file missing a required field, or holding a field
of the wrong kind or one this version does not know, is refused with an error naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siren.errors import SirenError


class MetaError(SirenError):
    """A `meta.json` that does not follow the checkpoint schema."""


def _no_best() -> dict:
    return {"step": None, "value": None}


def _no_data() -> dict:
    return {"excluded": [], "load_failures": 0, "load_failed": []}


@dataclass(frozen=True)
class CheckpointMeta:
    """One checkpoint's `meta.json`. Required: `step`, `stage`, `config`, `fingerprints`; the rest has defaults."""

    step: int
    stage: str
    config: dict  # the full config the components were built from (`siren.config.to_dict`)
    fingerprints: dict  # component → sha256 of its tensors (`siren.models.io.fingerprint`)
    run_name: str | None = None
    targets: dict = field(default_factory=dict)  # component → {"class": "pkg.mod:Name", ...} it was saved from
    frozen: list = field(default_factory=list)
    frozen_fingerprints: dict = field(default_factory=dict)
    trainable: list = field(default_factory=list)
    code_layout: dict = field(default_factory=dict)  # stream → [codebook size, levels]
    baseline: dict | None = None  # {"uri", "fingerprint", "path"} of the baseline codec (adapt, flow)
    consumed: dict = field(default_factory=dict)  # role → checkpoint record (`lineage.checkpoint_record`)
    ssl: dict | None = None  # the SSL teacher's record, with its fingerprint
    code_language: str | None = None  # `lineage.code_language_id` of the codes this checkpoint speaks (or reads)
    imported: dict | None = None  # `siren import`: where each component's weights came from
    wandb: dict = field(default_factory=dict)  # {"id", "project", "entity", "mode"}
    metrics: dict = field(default_factory=dict)  # the finite metrics of the step it was saved at
    best: dict = field(default_factory=_no_best)  # {"step", "value"} of the best checkpoint so far
    version: str | None = None  # SIREN's version that wrote it
    world_size: int = 1
    mixed_precision: str | None = None
    data: dict = field(default_factory=_no_data)  # utterances excluded and files that failed to load

    # ------------------------------------------------------------------------------------------------ reading/writing
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str | Path = "meta.json") -> CheckpointMeta:
        if not isinstance(raw, Mapping):
            raise MetaError(f"{where}: meta.json holds a {type(raw).__name__}, not an object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise MetaError(f"{where}: unknown field(s) {', '.join(unknown)} (a newer SIREN wrote it?)")
        missing = [n for n, f in known.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in raw]  # fmt: skip
        if missing:
            raise MetaError(f"{where}: missing field(s) {', '.join(missing)}")
        kinds = {"step": int, "stage": str, "config": dict, "fingerprints": dict, "world_size": int}
        for n, kind in kinds.items():
            if n in raw and (not isinstance(raw[n], kind) or isinstance(raw[n], bool)):
                raise MetaError(f"{where}: field {n} is {raw[n]!r}, not a {kind.__name__}")
        return cls(**dict(raw))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)
