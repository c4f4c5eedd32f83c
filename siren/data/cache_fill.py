"""What the stages cache, through the one cache subsystem (`siren.data.cache`): frozen SSL features (codec, flow) and
the adapt stage's teacher latents and codes, for the train and val datasets. Used by `siren train` at start and by
`siren cache` (siren/train/cache_command.py: the same code, so a filled cache is simply found at start)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from siren.data.cache import Field, ShardCache
from siren.data.datasets import AudioDataset
from siren.ranks import Ranks

log = logging.getLogger("siren")

FEATURES = "ssl_features"  # batch key of cached SSL features
TEACHER = "teacher"  # batch key of cached teacher targets


def audio_key(ds: AudioDataset) -> dict:
    """How `ds.load_full` turns a file into the waveform the cache is computed from (the file itself is keyed by
    the cache's rows: path, size, mtime)."""
    return {"sample_rate": ds.sample_rate, "policy": ds.policy, "min_samples": ds.min_samples}


def module_key(module: nn.Module) -> dict:
    """What makes a frozen module's outputs what they are: its weights (fingerprint) and its architecture, i.e. the
    module tree with each layer's settings (`repr`: eps, strides, ...) and any transformers config (settings that no
    weight shape shows, such as the number of heads), but not where it was loaded from."""
    from siren.models.io import fingerprint

    configs, seen = [], set()
    for sub in module.modules():
        c = getattr(sub, "config", None)
        if hasattr(c, "to_dict") and id(c) not in seen:
            seen.add(id(c))
            # `_name_or_path` (where it was loaded from) and private/version fields change no value.
            configs.append(
                {k: v for k, v in c.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
            )
    arch = repr(module) + json.dumps(configs, sort_keys=True, default=str)
    return {"weights": fingerprint(module), "arch": hashlib.sha256(arch.encode()).hexdigest()}


def feature_cache(root, module: nn.Module, ds: AudioDataset, *, layer: int, batch_seconds: float) -> ShardCache:
    """The SSL feature cache of `module` for `ds`, keyed by everything that changes the values: the module (weights
    and architecture), its layer, how the audio is read, the batching (padding changes a padded forward's output) and
    the files (the cache's rows)."""
    key = {"model": module_key(module), "layer": layer, "audio": audio_key(ds), "batch_seconds": batch_seconds}
    return ShardCache(root, "features", key, [Field("features", "t", "float16")], ds.table, ds.rows)


# What `stage.teacher` runs: the teacher cache's values depend on these modules and on no other.
TEACHER_PATH = ("ssl", "teacher_factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer")


def teacher_key(modules: dict[str, nn.Module], layer: int, ds: AudioDataset) -> dict:
    """Key of the adapt stage's teacher cache: the teacher path's modules (weights and architecture, not the rest of
    the baseline checkpoint, nor the student being trained), the SSL layer and how the audio is read."""
    return {"modules": {n: module_key(modules[n]) for n in TEACHER_PATH}, "layer": layer, "audio": audio_key(ds)}


def _datasets(train: AudioDataset, val: AudioDataset | None) -> list[tuple[str, AudioDataset]]:
    return [("train", train)] + ([("val", val)] if val is not None else [])


def _ensure(cache: ShardCache, ds: AudioDataset, compute: Callable, ranks: Ranks, cfg, what: str) -> dict:
    rep = cache.ensure(
        ds.load_full,
        compute,
        ranks,
        batch_seconds=cfg.data.cache_batch_seconds,
        sample_rate=cfg.audio.sample_rate,
        verify=cfg.data.cache_verify,
    )
    log.info("%s cache %s: %d computed here, %d reused, %d entries", what, cache.dir, *rep.values())
    return rep


def fill_features(
    cfg, module: nn.Module, train: AudioDataset, val: AudioDataset | None, ranks: Ranks, device, *, layer
) -> dict[str, dict]:
    """Fill the feature cache of `module` for train and val and attach it to both datasets (batch key FEATURES)."""
    root = Path(cfg.data.feature_cache)
    reports = {}

    @torch.no_grad()
    def compute(wavs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n_max = max(w.shape[0] for w in wavs)
        batch = torch.zeros(len(wavs), n_max)
        for k, w in enumerate(wavs):
            batch[k, : w.shape[0]] = w
        out = module(batch.to(device)).float().cpu()
        return [{"features": out[k, : module.num_frames(w.shape[0])]} for k, w in enumerate(wavs)]

    for split, ds in _datasets(train, val):
        cache = feature_cache(root, module, ds, layer=layer, batch_seconds=cfg.data.cache_batch_seconds)
        reports[split] = _ensure(cache, ds, compute, ranks, cfg, "feature")
        seg = ds.segment_samples
        ds.attach(FEATURES, cache.view({"t": (cfg.audio.hop_length, module.num_frames(seg) if seg else None)}))
    return reports


def teacher_fields(layout: dict[str, tuple[int, int]]) -> list[Field]:
    code = "int16" if max(k for k, _ in layout.values()) <= 32767 else "int32"
    return [
        Field("sem_latent", "sem", "float16"),
        Field("pro_latent", "pro", "float16"),
        Field("spk_latent", "", "float16"),
        Field("sem_codes", "sem", code),
        Field("pro_codes", "pro", code),
        Field("spk_codes", "", code),
    ]


def fill_teacher(stage, modules, train: AudioDataset, val: AudioDataset | None, ranks: Ranks, device, root) -> dict:
    """Fill the adapt stage's teacher cache (latents and codes of the baseline's own path on whole utterances) for
    train and val, and attach crop-aligned views (batch key TEACHER) with `sem_valid`/`pro_valid` masks."""
    cfg = stage.cfg
    layout = stage.code_layout(modules)
    reports = {}

    @torch.no_grad()
    def compute(wavs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for w in wavs:  # one at a time: the teacher path is not padding-invariant
            t = stage.teacher(modules, w[None].to(device))
            out.append({k: v[0].float().cpu() if "latent" in k else v[0].cpu() for k, v in t.items()})
        return out

    for split, ds in _datasets(train, val):
        key = teacher_key(modules, cfg.ssl.layer, ds)
        cache = ShardCache(Path(root), "teacher", key, teacher_fields(layout), ds.table, ds.rows)
        reports[split] = _ensure(cache, ds, compute, ranks, cfg, "teacher")
        n_sem, n_pro = stage.frames_per_segment(modules, ds.segment_samples, device)
        geo = stage.geo  # samples per semantic / prosody frame, from the audio settings and the factorizer
        ds.attach(TEACHER, cache.view({"sem": (geo.sem_hop, n_sem), "pro": (geo.pro_hop, n_pro)}, valid=("sem", "pro")))
    return reports
