"""Entropy model: a small causal transformer LM per code stream; bits per frame and probabilities for the range coder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siren.models.precision import fp32_island


@dataclass
class EntropyResult:
    """Per stream: logits (B, T, L, K), bits (B, T) per frame, total_bits (B,) over valid frames; loss: mean CE (nats)."""

    logits: dict[str, torch.Tensor]
    bits: dict[str, torch.Tensor]
    loss: torch.Tensor
    total_bits: dict[str, torch.Tensor]


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention. x (B, T, D) → (B, T, D)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"entropy model dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout.p if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p).transpose(1, 2).reshape(b, t, d)
        x = x + self.dropout(self.proj(h))
        return x + self.dropout(self.mlp(self.norm2(x)))


class StreamLM(nn.Module):
    """One stream: frame t sees the sum of the L code embeddings of frame t−1 (a learned BOS at t=0)."""

    def __init__(
        self,
        codebook_size: int,
        num_levels: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        dropout: float,
    ):
        super().__init__()
        self.codebook_size, self.num_levels, self.max_len = codebook_size, num_levels, max_len
        self.embed = nn.ModuleList(nn.Embedding(codebook_size, dim) for _ in range(num_levels))
        self.bos = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_levels * codebook_size)
        nn.init.normal_(self.bos, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def logits_for_next(self, prev: torch.Tensor) -> torch.Tensor:
        """prev (B, P, L): codes of frames 0..P−1 → logits (B, P+1, L, K) for frames 0..P."""
        b, p, _ = prev.shape
        if p + 1 > self.max_len:
            raise ValueError(f"entropy model max_len is {self.max_len} frames, got a sequence needing {p + 1}")
        x = self.bos.expand(b, 1, -1)
        if p:
            emb = sum(self.embed[i](prev[..., i]) for i in range(self.num_levels))
            x = torch.cat([x, emb], dim=1)
        x = x + self.pos.weight[: p + 1][None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).view(b, p + 1, self.num_levels, self.codebook_size)


class EntropyModel(nn.Module):
    """Causal LMs over code streams. `streams` maps name ("sem", "pro") → (codebook_size, num_levels)."""

    def __init__(
        self,
        streams: dict[str, tuple[int, int]],
        dim: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        dropout: float,
    ):
        super().__init__()
        self.layout = {name: (int(k), int(n)) for name, (k, n) in streams.items()}
        self.dropout = dropout
        self.streams = nn.ModuleDict(
            {name: StreamLM(k, n, dim, num_layers, num_heads, max_len, dropout) for name, (k, n) in self.layout.items()}
        )

    def _check(self, stream: str, codes: torch.Tensor) -> StreamLM:
        if stream not in self.streams:
            raise KeyError(f"entropy model has no stream {stream!r}; it has {sorted(self.streams)}")
        lm = self.streams[stream]
        if codes.dim() != 3 or codes.shape[-1] != lm.num_levels:
            raise ValueError(f"stream {stream!r}: expected codes (B, T, {lm.num_levels}), got {tuple(codes.shape)}")
        return lm

    @fp32_island
    def forward(self, codes: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor] | None = None) -> EntropyResult:
        """codes[s] (B, T, L) long; lengths[s] (B,) valid frames (all frames when None)."""
        logits, bits, total_bits = {}, {}, {}
        ce_sum, count = None, 0
        for name, c in codes.items():
            lm = self._check(name, c)
            b, t, n_levels = c.shape
            lg = lm.logits_for_next(c[:, :-1])  # (B, T, L, K): frame t predicted from frames < t
            logp = F.log_softmax(lg.float(), dim=-1).gather(-1, c[..., None]).squeeze(-1)  # (B, T, L)
            bits[name] = -logp.sum(-1) / math.log(2)
            if lengths is not None and name in lengths:
                valid = torch.arange(t, device=c.device)[None, :] < lengths[name].to(c.device)[:, None]
            else:
                valid = torch.ones(b, t, dtype=torch.bool, device=c.device)
            vf = valid.to(logp.dtype)
            total_bits[name] = (bits[name] * vf).sum(1)
            nll = -(logp.sum(-1) * vf).sum()
            ce_sum = nll if ce_sum is None else ce_sum + nll
            count = count + vf.sum() * n_levels
            logits[name] = lg
        if ce_sum is None:
            raise ValueError("entropy model got no code streams")
        loss = ce_sum / torch.as_tensor(count, dtype=ce_sum.dtype).clamp_min(1)
        return EntropyResult(logits=logits, bits=bits, loss=loss, total_bits=total_bits)

    @torch.no_grad()
    def next_probs(self, stream: str, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (B, t, L) codes of frames 0..t−1 (t may be 0) → (B, L, K) float64 probabilities for frame t.

        Deterministic for a given prefix (dropout must be off: call `.eval()`), which the range coder relies on.
        """
        lm = self._check(stream, prefix)
        if self.training and self.dropout > 0:
            raise RuntimeError("next_probs needs deterministic outputs: call entropy_model.eval() first (dropout > 0)")
        lg = lm.logits_for_next(prefix)[:, -1]
        return torch.softmax(lg.double(), dim=-1)
