"""`siren cache --config X [--what features|teacher]`: fill, before training, the caches a `siren train` with X would
fill at start (the same code, every process its share), so a filled cache is simply found when training starts."""

from __future__ import annotations

import logging

import torch

from siren.checkpoints.layout import RunDir
from siren.data.cache_fill import fill_features, fill_teacher
from siren.data.datasets import AudioDataset
from siren.ranks import Ranks


def run_cache(args) -> int:
    """`siren cache --config X [--what features|teacher]`: fill the caches a `siren train` with X would use."""
    from accelerate import PartialState

    from siren.config import load_config
    from siren.errors import SirenError
    from siren.models.builders import build_component
    from siren.train.stages import make_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    what = args.what or ("teacher" if cfg.stage == "adapt" else "features")
    state = PartialState(cpu=not torch.cuda.is_available())
    ranks = Ranks.of(state)
    # Refusals first: they need no model, and a baseline that is not there yet is not what they are about.
    if what == "features":
        if not cfg.data.feature_cache:
            raise SirenError("no feature cache directory: set data.feature_cache")
        if cfg.stage not in ("codec", "flow", "distill"):
            raise SirenError(f"stage {cfg.stage} reads no SSL features from a cache; use --what teacher")
    else:
        if cfg.stage != "adapt":
            raise SirenError(f"--what teacher needs an adapt config (this one is stage {cfg.stage})")
        if cfg.loss.teacher_targets != "full":
            raise SirenError(
                f"loss.teacher_targets is {cfg.loss.teacher_targets!r}: adapt runs the teacher on each crop and "
                "reads no teacher cache, so there is nothing to fill; pass loss.teacher_targets=full (to the cache "
                "command and to the adapt run) to use whole-utterance targets from the cache"
            )
    # The rows a `siren train` with this config would read: the stage's modules give the shortest encodable clip.
    from siren.train.samples import clip_min_samples

    stage = make_stage(cfg)
    modules = {n: m.eval().to(state.device) for n, m in stage.build().items()}
    train, val = build_datasets(cfg, clip_min_samples(stage, modules))
    try:
        if what == "features":
            module = build_component("ssl", cfg).eval().to(state.device)
            reports = fill_features(cfg, module, train, val, ranks, state.device, layer=cfg.ssl.layer)
        else:
            root = cfg.data.feature_cache or RunDir(cfg.run_dir).cache
            reports = fill_teacher(stage, modules, train, val, ranks, state.device, root)
        for split, rep in reports.items():
            print(
                f"rank {ranks.rank}/{ranks.world} {what} {split}: computed {rep['computed']}, reused {rep['reused']}, "
                f"entries {rep['total']}",
                flush=True,
            )
    finally:
        state.wait_for_everyone()
        if state.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def build_datasets(cfg, min_samples: int = 0) -> tuple[AudioDataset, AudioDataset | None]:
    """The train and val datasets exactly as the trainer builds them (same rows → same cache keys)."""
    from siren.data.datasets import build_dataset

    return build_dataset(cfg, False, min_samples), build_dataset(cfg, True, min_samples) if cfg.data.val else None
