"""Building blocks shared by several components: ConvNeXt-style 1-D blocks, a conformer block, the latent upsampler."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvNeXtBlock(nn.Module):
    """Depthwise conv → LayerNorm → pointwise MLP, residual, with layer scale. x (B, C, T) → (B, C, T)."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float = 1e-2):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the length is kept, got {kernel_size}")
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, intermediate_dim)
        self.pw2 = nn.Linear(intermediate_dim, dim)
        # Small layer scale keeps a deep stack close to identity at init (Vocos / ConvNeXt).
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T); optional cond (B, C, 1) or (B, C, T) is added before the depthwise conv."""
        h = x if cond is None else x + cond
        h = self.dwconv(h).transpose(1, 2)
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ConformerBlock(nn.Module):
    """Pre-norm conformer block: MHSA → depthwise-conv module → FFN, each residual. x (B, T, D) → (B, T, D)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dropout: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden dim {dim} is not divisible by num_heads {num_heads}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the length is kept, got {kernel_size}")
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.conv_norm = nn.LayerNorm(dim)
        self.conv_in = nn.Linear(dim, 2 * dim)
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        # GroupNorm(1) instead of BatchNorm: no running statistics, so padding and frozen eval mode cannot skew it.
        self.conv_act_norm = nn.GroupNorm(1, dim)
        self.conv_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn(h, h, h, need_weights=False)[0])
        h = F.glu(self.conv_in(self.conv_norm(x)), dim=-1).transpose(1, 2)
        h = F.silu(self.conv_act_norm(self.dwconv(h))).transpose(1, 2)
        x = x + self.dropout(self.conv_out(h))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class LatentUpsampler(nn.Module):
    """Quantized latents at their own rates → one sequence at mel rate (50 Hz).

    sem (B, Ts, Ds) is upsampled ×2 by a transposed conv; pro (B, Tp, Dp) is repeated ×8 and cropped/padded to 2·Ts;
    spk (B, Dk) is broadcast over time. The three projections are summed → (B, hidden_dim, 2·Ts).
    """

    def __init__(self, sem_dim: int, pro_dim: int, spk_dim: int, hidden_dim: int):
        super().__init__()
        self.sem_up = nn.ConvTranspose1d(sem_dim, hidden_dim, kernel_size=2, stride=2)
        self.pro_proj = nn.Linear(pro_dim, hidden_dim)
        self.spk_proj = nn.Linear(spk_dim, hidden_dim)

    def forward(self, sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor) -> torch.Tensor:
        if sem.dim() != 3 or pro.dim() != 3 or spk.dim() != 2:
            raise ValueError(
                f"expected sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk); got {tuple(sem.shape)}, "
                f"{tuple(pro.shape)}, {tuple(spk.shape)}"
            )
        t = 2 * sem.shape[1]
        h = self.sem_up(sem.transpose(1, 2))
        p = self.pro_proj(pro).repeat_interleave(8, dim=1)
        # Prosody frames cover 8 mel frames each; a partial last block is padded by repeating the last frame.
        if p.shape[1] < t:
            p = torch.cat([p, p[:, -1:].expand(-1, t - p.shape[1], -1)], dim=1)
        h = h + p[:, :t].transpose(1, 2)
        return h + self.spk_proj(spk)[:, :, None]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) in [0, 1] → (B, dim) sin/cos features (scaled by 1000 so [0, 1] spans many periods)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb
