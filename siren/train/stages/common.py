"""Pieces the stages share: masks, the codec's analysis path, loading components from a checkpoint URI."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from siren.config.loader import config_from_dict
from siren.config.schema import SirenConfig
from siren.errors import SirenError
from siren.models.builders import build_component
from siren.models.io import fingerprint
from siren.models.roles import FrameGeometry

log = logging.getLogger("siren")


def frame_mask(lengths: torch.Tensor, hop: int, num_frames: int) -> torch.Tensor:
    """(B,) valid samples → (B, num_frames) bool, True where the frame lies inside the valid audio."""
    valid = torch.div(lengths, hop, rounding_mode="floor")
    return torch.arange(num_frames, device=lengths.device)[None, :] < valid[:, None]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred/target (B, C, T), mask (B, T) → mean absolute error over valid frames."""
    m = mask[:, None, :].to(pred.dtype)
    return ((pred - target).abs() * m).sum() / (m.sum() * pred.shape[1]).clamp_min(1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """pred/target (B, T, D) or (B, D); mask (B, T) or None."""
    if mask is None:
        return F.mse_loss(pred, target)
    m = mask[..., None].to(pred.dtype)
    return (((pred - target) ** 2) * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1)


@dataclass
class Analysis:
    """The codec's analysis path on a batch: factorizer output and the three quantizer results."""

    fact: object
    sem: object
    pro: object
    spk: object


def analyse(modules: dict[str, nn.Module], feats: torch.Tensor) -> Analysis:
    """feats (B, T, D) → factorizer → sem/pro/spk quantizers."""
    fact = modules["factorizer"](feats)
    return Analysis(
        fact=fact,
        sem=modules["sem_quantizer"](fact.sem),
        pro=modules["pro_quantizer"](fact.pro),
        spk=modules["spk_quantizer"](fact.spk),
    )


def code_layout(modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    return {
        "sem": (modules["sem_quantizer"].codebook_size, modules["sem_quantizer"].num_levels),
        "pro": (modules["pro_quantizer"].codebook_size, modules["pro_quantizer"].num_levels),
        "spk": (modules["spk_quantizer"].codebook_size, modules["spk_quantizer"].num_codebooks),
    }


def layout_bps(geo: FrameGeometry, modules: dict[str, nn.Module]) -> float:
    """Nominal sem + pro bit/s from the quantizers' own layout and the frame geometry."""
    sq, pq = modules["sem_quantizer"], modules["pro_quantizer"]
    return geo.sem_rate * sq.num_levels * sq.bits_per_code + geo.pro_rate * pq.num_levels * pq.bits_per_code


def stream_masks(lengths: torch.Tensor, an: Analysis, geo: FrameGeometry) -> dict[str, torch.Tensor]:
    return {
        "sem": frame_mask(lengths, geo.sem_hop, an.sem.codes.shape[1]),
        "pro": frame_mask(lengths, geo.pro_hop, an.pro.codes.shape[1]),
    }


def stream_codes(an: Analysis, masks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The codes a step reports for codebook metrics: stream → (codes, valid-frame mask or None for speaker codes)."""
    return {"sem": (an.sem.codes, masks["sem"]), "pro": (an.pro.codes, masks["pro"]), "spk": (an.spk.codes, None)}


def entropy_rate(ent, masks: dict[str, torch.Tensor], geo: FrameGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, seconds) over valid frames of the sem and pro streams, as sums (so they can be reduced across ranks)."""
    bits = sum((ent.bits[s] * masks[s].to(ent.bits[s].dtype)).sum() for s in ("sem", "pro"))
    seconds = masks["sem"].sum().to(torch.float64) * geo.sem_hop / geo.sample_rate
    return bits.to(torch.float64), seconds


class FrozenFeatures:
    """Frozen SSL features for a batch: computed on the fly, or cut from the feature cache when `data.feature_cache`
    is set (filled at set-up for train and val, each rank its share; read in DataLoader workers)."""

    def __init__(self, cfg: SirenConfig):
        self.cfg = cfg

    def setup(self, ctx, module: nn.Module) -> None:
        if not self.cfg.data.feature_cache:
            return
        from siren.data.cache_fill import fill_features

        fill_features(
            self.cfg, module, ctx.train_dataset, ctx.val_dataset, ctx.dist, ctx.device, layer=self.cfg.ssl.layer
        )

    def __call__(self, module: nn.Module, batch: dict) -> torch.Tensor:
        """(B, T, D) for batch["wav"] (B, N)."""
        from siren.data.cache_fill import FEATURES

        wav = batch["wav"]
        if FEATURES not in batch:
            with torch.no_grad():
                return module(wav)
        feats = batch[FEATURES]["features"]
        T = module.num_frames(wav.shape[-1])
        if feats.shape[1] != T:
            raise SirenError(f"cached features have {feats.shape[1]} frames per item, the model gives {T}")
        return feats.to(wav.device, non_blocking=True).float()


# ------------------------------------------------------------------------------------------------- checkpoint loading
@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict
    cfg: SirenConfig
    modules: dict[str, nn.Module]


def load_checkpoint(uri: str, names: list[str], *, ssl_cfg_from: SirenConfig | None = None) -> LoadedCheckpoint:
    """Build `names` with the checkpoint's own saved config and load them strictly from `uri`.

    `ssl` is not stored in checkpoints: it is loaded by name and its fingerprint must equal the one the checkpoint
    recorded (so a baseline is never paired with a different teacher).
    """
    from siren.artifacts import resolve_checkpoint
    from siren.train.checkpoint import available_components, load_components, read_meta

    path = resolve_checkpoint(uri)
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"], f"{path}/meta.json")
    if ssl_cfg_from is not None:
        cfg.ssl = ssl_cfg_from.ssl
    # Weights come from this checkpoint: build the student from its recorded architecture, not from its source path.
    cfg.student_ssl.path = None
    stored = set(available_components(path))
    want = [n for n in names if n != "ssl"]
    missing = [n for n in want if n not in stored]
    if missing:
        raise SirenError(
            f"checkpoint {path} (stage {meta.get('stage')}) has no {', '.join(missing)}; it holds "
            f"{', '.join(sorted(stored))}"
        )
    modules: dict[str, nn.Module] = {}
    if "ssl" in names:
        modules["ssl"] = build_component("ssl", cfg)
        check_ssl_fingerprint(modules["ssl"], meta, cfg.ssl.name, str(path))
    for n in want:  # targets are re-imported from the saved config; the weights come from the checkpoint
        modules[n] = build_component(n, cfg, load_weights=False)
    check_recorded_classes(modules, meta, str(path))
    load_components(path, {n: modules[n] for n in want})
    return LoadedCheckpoint(path=Path(path), meta=meta, cfg=cfg, modules=modules)


def check_recorded_classes(modules: dict[str, nn.Module], meta: dict, where: str) -> None:
    """The classes rebuilt from a checkpoint's config are the ones its meta.json recorded (`targets`)."""
    from siren.models.plugins import class_path

    recorded = meta.get("targets") or {}
    differ = [
        f"{n}: recorded {recorded[n]['class']}, built {class_path(m)}"
        for n, m in modules.items()
        if n in recorded and recorded[n].get("class") != class_path(m)
    ]
    if differ:
        raise SirenError(f"checkpoint {where} was saved from other classes than its config now builds: {differ}")


def check_ssl_fingerprint(ssl: nn.Module, meta: dict, name: str, where: str) -> None:
    want = meta.get("fingerprints", {}).get("ssl")
    if want is None:
        return
    got = fingerprint(ssl)
    if got != want:
        raise SirenError(
            f"the SSL model at ssl.name={name} (fingerprint {got[:12]}) is not the one {where} was trained with "
            f"(fingerprint {want[:12]})"
        )
