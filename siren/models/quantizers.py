"""Quantizers: FSQ, ResidualFSQ (semantic/prosody streams) and a product quantizer (speaker embedding)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from siren.models.precision import fp32_island


@dataclass
class QuantizedResult:
    """quantized: same shape as the input; codes: long indices; commit_loss: 0-dim; metrics: extra tensors to log."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


class FSQ(nn.Module):
    """Finite scalar quantization: each of d dims is bounded and rounded to one of `levels[i]` values in [-1, 1].

    z (..., d) → (quantized (..., d), indices (...) long in [0, prod(levels))).
    """

    def __init__(self, levels: list[int]):
        super().__init__()
        if not levels or any(int(lv) < 2 for lv in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {levels}")
        self.levels = [int(lv) for lv in levels]
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.long), dim=0)
        # Derived constants, not weights: kept out of the state dict so a checkpoint holds only learned tensors.
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", torch.floor(lv / 2), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """tanh bound so rounding lands on exactly `levels` integers; even levels are shifted by half a step."""
        eps = 1e-3
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with {self.dim} levels got last dim {z.shape[-1]}")
        q = round_ste(self.bound(z.float()))
        indices = ((q.detach() + self._half_width).long() * self._basis).sum(-1)
        return q / self._half_width, indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long → (..., d) values in [-1, 1]."""
        digits = (indices[..., None] // self._basis) % self._levels.long()
        return (digits.float() - self._half_width) / self._half_width


class ResidualFSQ(nn.Module):
    """in_proj (dim → d) → `num_residual` FSQ levels on the residual → out_proj (d → dim).

    Level l quantizes residual / s_l and contributes q_l · s_l with s_l = (levels − 1)^(−l), so each finer level
    resolves what the previous grid could not. x (B, T, dim) → QuantizedResult(quantized (B, T, dim), codes (B, T, L)).
    """

    def __init__(self, dim: int, levels: list[int], num_residual: int):
        super().__init__()
        if num_residual < 1:
            raise ValueError(f"num_residual must be >= 1, got {num_residual}")
        self.dim = dim
        self.fsq = FSQ(levels)
        self.in_proj = nn.Linear(dim, self.fsq.dim)
        self.out_proj = nn.Linear(self.fsq.dim, dim)
        lv = torch.tensor(self.fsq.levels, dtype=torch.float32)
        scales = torch.stack([(lv - 1) ** -float(i) for i in range(num_residual)])  # (L, d)
        self.register_buffer("scales", scales, persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    @property
    def num_levels(self) -> int:
        return self.scales.shape[0]

    @property
    def num_codebooks(self) -> int:
        return self.num_levels

    @property
    def digit_levels(self) -> list[int]:
        """A code is Σ_j digit_j · Π_{i<j} levels_i (digit 0 least significant): the levels of each dimension."""
        return list(self.fsq.levels)

    @property
    def bits_per_code(self) -> float:
        return math.log2(self.codebook_size)

    @fp32_island
    def forward(self, x: torch.Tensor) -> QuantizedResult:
        if x.shape[-1] != self.dim:
            raise ValueError(f"ResidualFSQ(dim={self.dim}) got input with last dim {x.shape[-1]}")
        z = self.in_proj(x)
        residual = z
        total = torch.zeros_like(z)
        codes = []
        for level in range(self.num_levels):
            scale = self.scales[level]
            q, idx = self.fsq(residual / scale)
            q = q * scale
            residual = residual - q.detach()
            total = total + q
            codes.append(idx)
        # FSQ needs no commitment term: the grid is fixed and the bound keeps z in range. A term pulling z towards its
        # grid point pulls everything towards the centre code at initialisation and collapses the codebook.
        return QuantizedResult(
            quantized=self.out_proj(total),
            codes=torch.stack(codes, dim=-1),
            commit_loss=z.new_zeros(()),
            metrics={"quant_error": (z - total).detach().abs().mean()},
        )

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, L) → the quantized projection-space value (B, T, d) before out_proj."""
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"expected codes (..., {self.num_levels}), got {tuple(codes.shape)}")
        return sum(self.fsq.indices_to_codes(codes[..., i]) * self.scales[i] for i in range(self.num_levels))

    @fp32_island
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, L) long → (B, T, dim), equal to forward's `quantized` for the same codes."""
        return self.out_proj(self.codes_to_latent(codes))


class ProductQuantizer(nn.Module):
    """(B, dim) split into `groups` sub-vectors; each snaps to its nearest of `codebook_size` codes (straight-through).

    commit_loss = codebook loss ‖sg(x) − q‖² + 0.25 · commitment ‖x − sg(q)‖².
    """

    commitment_weight = 0.25

    def __init__(self, dim: int, groups: int, codebook_size: int):
        super().__init__()
        if dim % groups != 0:
            raise ValueError(f"ProductQuantizer: dim {dim} is not divisible by groups {groups}")
        self.dim, self.groups, self._codebook_size = dim, groups, codebook_size
        sub = dim // groups
        self.codebooks = nn.Parameter(torch.randn(groups, codebook_size, sub) / math.sqrt(sub))

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def num_codebooks(self) -> int:
        return self.groups

    @property
    def bits_per_utterance(self) -> float:
        return self.groups * math.log2(self._codebook_size)

    @fp32_island
    def forward(self, x: torch.Tensor) -> QuantizedResult:
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"ProductQuantizer expects (B, {self.dim}), got {tuple(x.shape)}")
        xg = x.float().view(x.shape[0], self.groups, -1)  # (B, G, d)
        cb = self.codebooks
        dist = xg.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("bgd,gkd->bgk", xg, cb) + cb.pow(2).sum(-1)[None]
        codes = dist.argmin(-1)  # (B, G)
        q = self._lookup(codes)
        loss = F.mse_loss(q, xg.detach()) + self.commitment_weight * F.mse_loss(xg, q.detach())
        quantized = xg + (q - xg).detach()
        return QuantizedResult(
            quantized=quantized.reshape(x.shape[0], self.dim),
            codes=codes,
            commit_loss=loss,
            metrics={"quant_error": (xg - q).detach().abs().mean()},
        )

    def _lookup(self, codes: torch.Tensor) -> torch.Tensor:
        g = torch.arange(self.groups, device=codes.device)[None, :].expand_as(codes)
        return self.codebooks[g, codes]  # (B, G, d)

    @fp32_island
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, G) long → (B, dim), equal to forward's `quantized`."""
        if codes.dim() != 2 or codes.shape[-1] != self.groups:
            raise ValueError(f"expected codes (B, {self.groups}), got {tuple(codes.shape)}")
        return self._lookup(codes).reshape(codes.shape[0], self.dim)
