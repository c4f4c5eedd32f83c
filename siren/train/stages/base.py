"""What a stage is: which components exist, which are trainable, the loss, and the samples it renders.

No stage has its own loop: the `Trainer` builds the stage's components, freezes them through the registry, and calls
`Stage.step` inside the DDP-wrapped forward of the trainable components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from siren.config.schema import SirenConfig

if TYPE_CHECKING:
    from siren.train.trainer import Trainer


@dataclass
class StepOutput:
    """What a stage returns per step. `codes`: stream → (codes (B, T, L) or (B, G), mask (B, T) or None)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # Sums to all-reduce across processes: name → (numerator, denominator); logged as numerator / denominator.
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Sample:
    """One rendered eval utterance: audio at 16 kHz and mels (n_mels, T) per variant ('original', 'adapted', ...)."""

    id: str
    audio: dict[str, torch.Tensor]
    mels: dict[str, torch.Tensor]


class Stage:
    name: str = ""
    components: tuple[str, ...] = ()  # built by this stage and saved in its checkpoints
    default_trainable: tuple[str, ...] = ()
    required_frozen: tuple[str, ...] = ()
    not_saved: tuple[str, ...] = ("ssl",)  # loaded by name (`ssl.name`), fingerprint recorded in meta.json instead

    def __init__(self, cfg: SirenConfig):
        self.cfg = cfg
        self.baseline_uri: str | None = None
        self.baseline_fingerprint: str | None = None

    # Components ------------------------------------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def code_layout(self, modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
        """Streams this stage produces codes for → (codebook size, levels). Empty for stages without codes."""
        return {}

    def setup(self, trainer: Trainer) -> None:
        """Runs once after freezing and before the first step (caches, baseline profile)."""

    def nominal_bps(self) -> float | None:
        return None

    def export(self, step_dir: Path, modules: dict[str, nn.Module]) -> None:
        """Extra files a checkpoint carries for use outside SIREN (rank 0, inside the not yet committed step dir)."""

    # Per step ----------------------------------------------------------------------------------------------------------
    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        raise NotImplementedError

    # Samples -----------------------------------------------------------------------------------------------------------
    def render(self, trainer: Trainer, modules: dict[str, nn.Module], utterances: list) -> list[Sample]:
        return []
