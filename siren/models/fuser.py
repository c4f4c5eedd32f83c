"""Fuser: quantized latents (sem, pro, spk) → conditioning sequence at mel rate for the flow-matching model."""

from __future__ import annotations

import torch
from torch import nn

from siren.models.layers import ConvNeXtBlock, LatentUpsampler


class Fuser(nn.Module):
    """sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk) → cond (B, 2·Ts, cond_dim)."""

    def __init__(
        self,
        sem_dim: int,
        pro_dim: int,
        spk_dim: int,
        hidden_dim: int,
        cond_dim: int,
        num_blocks: int,
        kernel_size: int,
    ):
        super().__init__()
        self.cond_dim = cond_dim
        self.upsample = LatentUpsampler(sem_dim, pro_dim, spk_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(hidden_dim, 3 * hidden_dim, kernel_size, layer_scale=0.1) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, cond_dim)

    def forward(self, sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        h = self.upsample(sem, pro, spk)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h.transpose(1, 2)))
