"""Conditional flow matching (OT-CFM): conditioning at mel rate → log-mel by integrating a learned velocity field.

The flow works on normalised log-mel, x = (mel + 5) / 2.5 (log-mel of speech spans about −11.5..2, so x is roughly
unit scale like the N(0, I) source); `loss` takes and `sample` returns plain log-mel.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from siren.models.layers import ConvNeXtBlock, sinusoidal_embedding

MEL_SHIFT, MEL_SCALE = 5.0, 2.5


def normalize_mel(mel: torch.Tensor) -> torch.Tensor:
    return (mel + MEL_SHIFT) / MEL_SCALE


def denormalize_mel(x: torch.Tensor) -> torch.Tensor:
    return x * MEL_SCALE - MEL_SHIFT


class FlowMatching(nn.Module):
    """Velocity net v(x_t, t, cond): conv residual blocks with a sinusoidal time embedding added per block."""

    def __init__(
        self, n_mels: int, cond_dim: int, hidden_dim: int, num_blocks: int, kernel_size: int, sigma_min: float
    ):
        super().__init__()
        self.n_mels, self.cond_dim, self.sigma_min = n_mels, cond_dim, sigma_min
        self.in_proj = nn.Conv1d(n_mels + cond_dim, hidden_dim, kernel_size=1)
        self.time_mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.time_proj = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_blocks))
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(hidden_dim, 3 * hidden_dim, kernel_size, layer_scale=0.1) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, n_mels)
        self.hidden_dim = hidden_dim

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, n_mels, T) normalised, t (B,), cond (B, T, C) → v (B, n_mels, T)."""
        h = self.in_proj(torch.cat([x, cond.transpose(1, 2)], dim=1))
        temb = self.time_mlp(sinusoidal_embedding(t, self.hidden_dim))
        for proj, block in zip(self.time_proj, self.blocks, strict=True):
            h = block(h, proj(temb)[:, :, None])
        return self.out(self.norm(h.transpose(1, 2))).transpose(1, 2)

    def _check(self, cond: torch.Tensor, mel: torch.Tensor | None = None) -> None:
        if cond.dim() != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"expected cond (B, T, {self.cond_dim}), got {tuple(cond.shape)}")
        if mel is not None and (mel.shape[0], mel.shape[1], mel.shape[2]) != (
            cond.shape[0],
            self.n_mels,
            cond.shape[1],
        ):
            raise ValueError(f"mel {tuple(mel.shape)} does not match cond {tuple(cond.shape)} (want (B, n_mels, T))")

    def loss(self, mel: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """OT-CFM loss: x_t = (1 − (1 − σ)t)·x0 + t·x1, target x1 − (1 − σ)·x0. mel (B, n_mels, T), cond (B, T, C)."""
        self._check(cond, mel)
        x1 = normalize_mel(mel)
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        tt = t[:, None, None]
        xt = (1 - (1 - self.sigma_min) * tt) * x0 + tt * x1
        target = x1 - (1 - self.sigma_min) * x0
        return F.mse_loss(self.velocity(xt, t, cond), target)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        steps: int,
        solver: Literal["euler", "midpoint"] = "euler",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """cond (B, T, C) → log-mel (B, n_mels, T) by `steps` ODE steps from N(0, I) at t=0 to t=1."""
        self._check(cond)
        if steps < 1:
            raise ValueError(f"flow steps must be >= 1, got {steps}")
        if solver not in ("euler", "midpoint"):
            raise ValueError(f"unknown flow solver {solver!r}; use 'euler' or 'midpoint'")
        b, t_len, _ = cond.shape
        x = torch.randn((b, self.n_mels, t_len), generator=generator, device=cond.device, dtype=cond.dtype)
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((b,), i * dt, device=cond.device, dtype=cond.dtype)
            v = self.velocity(x, t, cond)
            if solver == "midpoint":
                v = self.velocity(x + 0.5 * dt * v, t + 0.5 * dt, cond)
            x = x + dt * v
        return denormalize_mel(x)
