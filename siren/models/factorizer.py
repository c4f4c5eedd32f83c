"""Factorizer: SSL features (50 Hz) → semantic latents (25 Hz), prosody latents (6.25 Hz), a speaker embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siren.models.layers import ConformerBlock


@dataclass
class FactorizerOutput:
    """sem (B, T//2, sem_dim) at 25 Hz, pro (B, T//8, pro_dim) at 6.25 Hz, spk (B, spk_dim) per utterance."""

    sem: torch.Tensor
    pro: torch.Tensor
    spk: torch.Tensor


class Factorizer(nn.Module):
    """Shared conformer encoder at 50 Hz, then three branches: strided conv ÷2, strided convs ÷8, attention pooling."""

    # Feature frames per semantic / prosody frame (the frame geometry is derived from these, see models/roles.py).
    # Prosody frames span 8 input frames, so the input is cropped to a multiple of 8 (sem ÷2 and pro ÷8 then align).
    sem_downsample = 2
    pro_downsample = 8

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        num_blocks: int,
        num_heads: int,
        kernel_size: int,
        sem_dim: int,
        pro_dim: int,
        spk_dim: int,
        dropout: float,
    ):
        super().__init__()
        self.input_dim, self.sem_dim, self.pro_dim, self.spk_dim = input_dim, sem_dim, pro_dim, spk_dim
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_proj = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            ConformerBlock(hidden_dim, num_heads, kernel_size, dropout) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        # Semantic: one strided conv (kernel 2, stride 2) → exact ÷2, then a per-frame projection.
        self.sem_down = nn.Conv1d(hidden_dim, hidden_dim, kernel_size=2, stride=2)
        self.sem_proj = nn.Linear(hidden_dim, sem_dim)
        # Prosody: three kernel-2 stride-2 convs → ÷8 while mixing neighbouring frames at every scale.
        self.pro_down = nn.ModuleList(nn.Conv1d(hidden_dim, hidden_dim, kernel_size=2, stride=2) for _ in range(3))
        self.pro_proj = nn.Linear(hidden_dim, pro_dim)
        # Speaker: attentive statistics pooling (weighted mean and std over time) → projection.
        self.speaker_pool = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
        self.speaker_proj = nn.Linear(2 * hidden_dim, spk_dim)

    def forward(self, feats: torch.Tensor) -> FactorizerOutput:
        """feats (B, T, input_dim) → FactorizerOutput; T is cropped to a multiple of 8 first."""
        if feats.dim() != 3 or feats.shape[-1] != self.input_dim:
            raise ValueError(f"expected feats (B, T, {self.input_dim}), got {tuple(feats.shape)}")
        t = feats.shape[1] // self.pro_downsample * self.pro_downsample
        if t == 0:
            raise ValueError(f"need at least {self.pro_downsample} input frames, got {feats.shape[1]}")
        x = self.input_proj(self.input_norm(feats[:, :t]))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        h = x.transpose(1, 2)
        sem = self.sem_proj(F.gelu(self.sem_down(h)).transpose(1, 2))
        p = h
        for conv in self.pro_down:
            p = F.gelu(conv(p))
        pro = self.pro_proj(p.transpose(1, 2))
        w = torch.softmax(self.speaker_pool(x), dim=1)  # (B, T, 1)
        mean = (w * x).sum(1)
        std = ((w * x.pow(2)).sum(1) - mean.pow(2)).clamp_min(1e-6).sqrt()
        spk = self.speaker_proj(torch.cat([mean, std], dim=-1))
        return FactorizerOutput(sem=sem, pro=pro, spk=spk)
