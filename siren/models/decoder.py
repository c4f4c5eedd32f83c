"""Decoder: quantized latents → log-mel. The training-time reconstruction head that judges the factorizer."""

from __future__ import annotations

import torch
from torch import nn

from siren.models.layers import ConvNeXtBlock, LatentUpsampler


class Decoder(nn.Module):
    """sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk) → log-mel (B, n_mels, 2·Ts)."""

    def __init__(
        self, sem_dim: int, pro_dim: int, spk_dim: int, hidden_dim: int, num_blocks: int, kernel_size: int, n_mels: int
    ):
        super().__init__()
        self.upsample = LatentUpsampler(sem_dim, pro_dim, spk_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(hidden_dim, 3 * hidden_dim, kernel_size, layer_scale=0.1) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, n_mels)
        # Start near a typical log-mel level (silence ≈ −11.5, speech ≈ −4) so early training is not spent on the bias.
        nn.init.constant_(self.out.bias, -5.0)

    def forward(self, sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        h = self.upsample(sem, pro, spk)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h.transpose(1, 2))).transpose(1, 2)
