"""What a stage is: which components exist, which are trainable, the loss, and the samples it renders.

No stage has its own loop: the `Trainer` builds the stage's components, freezes them through the registry, and calls
`Stage.step` inside the DDP-wrapped forward of the trainable components.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from siren.config.schema import SirenConfig
from siren.config.stages import StageSpec
from siren.models.roles import fsq_digit_levels

if TYPE_CHECKING:
    from siren.metrics.drift import DriftReference
    from siren.train.context import StageContext


@dataclass
class StepOutput:
    """What a stage returns per step. `codes`: stream → (codes (B, T, L) or (B, G), mask (B, T) or None)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # Sums to all-reduce across processes: name → (numerator, denominator); logged as numerator / denominator.
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class MetricSources:
    """What a stage hands to the trainer for per-step metrics.

    `layout`: stream → (codebook size, levels) of the codes its steps report (empty: no codebook metrics);
    `digits`: for streams whose codes are FSQ mixed-radix numbers, the FSQ levels per dimension;
    `drift`: the baseline's code statistics, and `drift_rate` the ratio (a key of `StepOutput.ratios`) holding the
    live bit/s that `drift/bps_delta` compares with the baseline's.
    """

    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    drift: DriftReference | None = None
    digits: dict[str, list[int]] = field(default_factory=dict)  # FSQ stream → levels per dimension (digit metrics)
    drift_rate: str | None = None

    def __post_init__(self):
        if self.drift is not None and not self.drift_rate:
            raise ValueError("MetricSources: a drift reference needs drift_rate, the ratio key holding bit/s")


@dataclass
class Sample:
    """One rendered eval utterance: audio at 16 kHz and mels (n_mels, T) per variant ('original', 'adapted', ...)."""

    id: str
    audio: dict[str, torch.Tensor]
    mels: dict[str, torch.Tensor]
    # variant → the path that rendered it (e.g. "flow-vocoder", "decoder_head"); every variant but "original" has one,
    # and it is part of each file name and W&B column, so a sample can never be mistaken for another path's output.
    paths: dict[str, str] = field(default_factory=dict)


class Stage:
    """One training stage. A subclass sets `spec` (its entry in `siren.config.stages.STAGE_SPECS`); its name and
    component lists are read from there, never restated."""

    spec: StageSpec
    name: str
    components: tuple[str, ...]  # built by this stage
    default_trainable: tuple[str, ...]
    required_frozen: tuple[str, ...]
    pipeline_roles: tuple[str, ...]  # `pipeline.*` checkpoints its samples render through
    not_saved: tuple[str, ...]  # loaded by name (`ssl.name`), fingerprint recorded in meta.json instead

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.name, cls.components, cls.default_trainable = spec.name, spec.components, spec.trainable
            cls.required_frozen, cls.pipeline_roles, cls.not_saved = (
                spec.required_frozen,
                spec.pipeline_roles,
                spec.not_saved,
            )

    def __init__(self, cfg: SirenConfig):
        # The stage's own copy: building resolves into it (a baseline's component classes, the student's
        # architecture) and never into the config the caller loaded. The trainer runs, saves and dumps this one.
        self.cfg = copy.deepcopy(cfg)
        self.baseline_uri: str | None = None
        self.baseline_fingerprint: str | None = None
        self.consumed: dict[str, dict] = {}  # role → checkpoint record (siren.checkpoints.lineage.checkpoint_record)

    # Components ------------------------------------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def code_layout(self, modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
        """Streams this stage produces codes for → (codebook size, levels). Empty for stages without codes."""
        return {}

    def setup(self, ctx: StageContext, modules: dict[str, nn.Module]) -> None:
        """Runs once on every rank after freezing and before the first step (caches, baseline profile). Work is split
        with `ctx.shard` and combined with `ctx.gather`; nothing long runs on one rank while the others wait."""

    def metric_sources(self, modules: dict[str, nn.Module]) -> MetricSources:
        """The per-step metric sources this stage hands to the trainer: its code layout and, if any, a drift reference."""
        return MetricSources(layout=self.code_layout(modules), digits=self.code_digits(modules))

    def code_digits(self, modules: dict[str, nn.Module]) -> dict[str, list[int]]:
        """Streams whose quantizer (`<stream>_quantizer`) reports `digit_levels` (FSQ: codes are mixed-radix numbers
        of per-dimension digits) → those levels, for the per-dimension digit metrics."""
        out = {}
        for s in self.code_layout(modules):
            levels = fsq_digit_levels(f"{s}_quantizer", modules.get(f"{s}_quantizer"))
            if levels:
                out[s] = [int(v) for v in levels]
        return out

    def lineage(self) -> dict:
        """What this stage consumed, for `meta.json`: the baseline's URI, resolved step dir and fingerprint."""
        base = self.consumed.get("baseline", {})
        return {
            "baseline": {"uri": self.baseline_uri, "fingerprint": self.baseline_fingerprint, "path": base.get("path")}
        }

    def code_language(self, modules: dict[str, nn.Module]) -> str | None:
        """The code language this stage's codes are in (or, for `flow`, the one it reads); None without codes."""
        from siren.checkpoints.lineage import code_language_id
        from siren.config.stages import CODE_LANGUAGE_PARTS

        if all(n in modules for n in CODE_LANGUAGE_PARTS):
            return code_language_id(modules)
        return None

    def nominal_bps(self) -> float | None:
        return None

    def export(self, step_dir: Path, modules: dict[str, nn.Module]) -> None:
        """Extra files a checkpoint carries for use outside SIREN (rank 0, inside the not yet committed step dir)."""

    # Per step ----------------------------------------------------------------------------------------------------------
    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        raise NotImplementedError

    # Samples -----------------------------------------------------------------------------------------------------------
    def render(self, renderer, modules: dict[str, nn.Module], utterances: list) -> list[Sample]:
        """`renderer`: the samples hook (cfg, device, modules, the pipeline checkpoints)."""
        return []
