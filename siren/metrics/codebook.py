"""Codebook statistics over a sliding window of steps, kept on the device (no host sync per tensor).

A code layout maps a stream (`sem`, `pro`, `spk`) to (codebook_size K, number of levels/groups L). Per step the trainer
turns codes into per-level histograms (`histogram`), sums them across processes with one all-reduce, and pushes them into
a `CodebookWindow`, whose `metrics()` gives `codebook/<STREAM>/<L>/{usage,perplexity,dead}` as 0-dim tensors.
"""

from __future__ import annotations

import torch

Layout = dict[str, tuple[int, int]]


def level_names(stream: str, num_levels: int) -> list[str]:
    """`l0, l1, ...` for residual levels; `g0, g1, ...` for speaker product-quantizer groups."""
    prefix = "g" if stream == "spk" else "l"
    return [f"{prefix}{i}" for i in range(num_levels)]


def histogram(codes: torch.Tensor, mask: torch.Tensor | None, codebook_size: int) -> torch.Tensor:
    """Per-level code counts. codes (B, T, L) or (B, L); mask (B, T) or None → (L, K) float64."""
    if codes.dim() == 2:
        codes = codes.unsqueeze(1)
    L = codes.shape[-1]
    offsets = torch.arange(L, device=codes.device) * codebook_size
    flat = codes + offsets
    if mask is not None:
        flat = flat[mask.bool()]
    counts = torch.bincount(flat.reshape(-1), minlength=L * codebook_size)
    return counts.view(L, codebook_size).to(torch.float64)


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a count matrix (..., K) → (...)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


class CodebookWindow:
    """Ring buffer of the last `window` steps' histograms per stream; all tensors stay on `device`."""

    def __init__(self, layout: Layout, window: int, device: torch.device | str = "cpu"):
        if window < 1:
            raise ValueError(f"train.codebook_window must be >= 1, got {window}")
        self.layout = dict(layout)
        self.window = window
        self.buffers = {
            s: torch.zeros(window, L, K, dtype=torch.float64, device=device) for s, (K, L) in layout.items()
        }
        self.pos = 0

    def push(self, counts: dict[str, torch.Tensor]) -> None:
        slot = self.pos % self.window
        for s, buf in self.buffers.items():
            buf[slot] = counts[s]
        self.pos += 1

    def totals(self) -> dict[str, torch.Tensor]:
        """Counts over the window, per stream (L, K)."""
        return {s: buf.sum(0) for s, buf in self.buffers.items()}

    def metrics(self) -> dict[str, torch.Tensor]:
        out = {}
        for s, counts in self.totals().items():
            K, L = self.layout[s]
            seen = (counts > 0).sum(-1).to(torch.float64)
            ppl = torch.exp2(entropy_bits(counts))
            for i, name in enumerate(level_names(s, L)):
                out[f"codebook/{s}/{name}/usage"] = seen[i] / K
                out[f"codebook/{s}/{name}/perplexity"] = ppl[i]
                out[f"codebook/{s}/{name}/dead"] = K - seen[i]
        return out
