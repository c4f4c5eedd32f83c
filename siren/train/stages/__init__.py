"""The five stages on the one trainer; `make_stage` maps `stage:` to its class (unknown name → KeyError)."""

from __future__ import annotations

from siren.config.schema import SirenConfig


def stage_classes() -> dict:
    from siren.train.stages.adapt import AdaptStage
    from siren.train.stages.codec import CodecStage
    from siren.train.stages.distill import DistillStage
    from siren.train.stages.flow import FlowStage
    from siren.train.stages.vocoder import VocoderStage

    return {c.name: c for c in (CodecStage, FlowStage, VocoderStage, DistillStage, AdaptStage)}


def make_stage(cfg: SirenConfig):
    classes = stage_classes()
    if cfg.stage not in classes:
        raise KeyError(f"unknown stage {cfg.stage!r}; stages: {', '.join(classes)}")
    return classes[cfg.stage](cfg)
