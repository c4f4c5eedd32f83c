"""`siren features --config FILE [--manifest M ...] [--out DIR] [--model ssl|student_ssl]`: precompute frozen SSL
features into the feature cache, keyed by the model's fingerprint and layer (DESIGN §2, data layer)."""

from __future__ import annotations

import logging

from siren.errors import SirenError


def open_cache(cfg, module, root: str, model: str = "ssl"):
    from siren.data.features import FeatureCache, cache_key
    from siren.models.io import fingerprint

    fp = fingerprint(module)
    layer = cfg.ssl.layer if model == "ssl" else "head"
    return FeatureCache(root, cache_key(fp, layer), fingerprint=fp, layer=layer)


def run_features(args) -> int:
    import torch

    from siren.config import load_config
    from siren.data.manifest import read_manifest
    from siren.models.builders import build_component

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    root = args.out or cfg.data.feature_cache
    if not root:
        raise SirenError("no cache directory: pass --out DIR or set data.feature_cache")
    manifests = args.manifest or [m for m in (cfg.data.train, cfg.data.val) if m]
    if not manifests:
        raise SirenError("no manifest: pass --manifest or set data.train / data.val")
    module = build_component(args.model, cfg).eval()
    cache = open_cache(cfg, module, root, args.model)
    utts = [u for m in manifests for u in read_manifest(m)]
    with torch.no_grad():
        n = cache.compute(lambda wav: module(wav), utts, cfg.audio.sample_rate, progress=True)
    print(f"{cache.dir}: {n} computed, {len(utts) - n} already cached")
    return 0
