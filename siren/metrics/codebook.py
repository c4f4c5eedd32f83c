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
        # Running window totals: add the new step, subtract the evicted one; a step costs O(L·K), not O(window·L·K).
        # Counts are integers in float64, so the running sums are exact (and equal after a resume).
        self.running = {s: torch.zeros(L, K, dtype=torch.float64, device=device) for s, (K, L) in layout.items()}
        self.pos = 0

    def push(self, counts: dict[str, torch.Tensor]) -> None:
        slot = self.pos % self.window
        for s, buf in self.buffers.items():
            self.running[s] += counts[s] - buf[slot]
            buf[slot] = counts[s]
        self.pos += 1

    def load(self, buffers: dict[str, torch.Tensor], pos: int) -> None:
        """Restore a saved window (resume); the running totals are rebuilt from the buffers."""
        for s in self.buffers:
            self.buffers[s].copy_(buffers[s])
            self.running[s] = self.buffers[s].sum(0)
        self.pos = pos

    def totals(self) -> dict[str, torch.Tensor]:
        """Counts over the window, per stream (L, K)."""
        return self.running

    def names(self) -> list[str]:
        """Metric names in the order of `vector()`."""
        out = []
        for s, (_, L) in self.layout.items():
            for kind in ("usage", "perplexity", "dead"):
                out += [f"codebook/{s}/{lv}/{kind}" for lv in level_names(s, L)]
        return out

    def vector(self) -> torch.Tensor:
        """All codebook metrics as one float64 vector (few ops per stream: it runs every step)."""
        parts = []
        for s, counts in self.running.items():
            K = self.layout[s][0]
            seen = (counts > 0).sum(-1).to(torch.float64)
            parts += [seen / K, torch.exp2(entropy_bits(counts)), K - seen]
        return torch.cat(parts)

    def metrics(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names(), self.vector().unbind(), strict=True))
