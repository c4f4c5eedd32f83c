"""The five stages on the one trainer; `make_stage` maps `stage:` to its class. Which stages exist, and what each
builds, trains and keeps frozen, is declared once in `siren.config.stages`; this package holds their step code."""

from __future__ import annotations

from siren.config.schema import SirenConfig
from siren.config.stages import STAGE_SPECS


def stage_classes() -> dict:
    from siren.train.stages.adapt import AdaptStage
    from siren.train.stages.codec import CodecStage
    from siren.train.stages.distill import DistillStage
    from siren.train.stages.flow import FlowStage
    from siren.train.stages.vocoder import VocoderStage

    classes = {c.spec.name: c for c in (CodecStage, FlowStage, VocoderStage, DistillStage, AdaptStage)}
    if set(classes) != set(STAGE_SPECS):
        raise RuntimeError(f"stage classes {sorted(classes)} do not match the registry's stages {sorted(STAGE_SPECS)}")
    return classes


def make_stage(cfg: SirenConfig):
    classes = stage_classes()
    if cfg.stage not in classes:
        raise KeyError(f"unknown stage {cfg.stage!r}; stages: {', '.join(classes)}")
    return classes[cfg.stage](cfg)
