"""Pieces the training stages share: masked losses and the frozen SSL features (live or from the feature cache)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from siren.config.schema import SirenConfig
from siren.errors import SirenError

log = logging.getLogger("siren")


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
            self.cfg, module, ctx.train_dataset, ctx.val_dataset, ctx.ranks, ctx.device, layer=self.cfg.ssl.layer
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
