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


_OFFSETS: dict[tuple, torch.Tensor] = {}


def _offsets(K: int, L: int, base: int, device: torch.device) -> torch.Tensor:
    key = (K, L, base, str(device))
    if key not in _OFFSETS:  # built once per layout and device: no arange per step
        _OFFSETS[key] = torch.arange(L, device=device) * K + base
    return _OFFSETS[key]


def stream_histograms(layout: Layout, codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Every stream's per-level histogram with one bincount: the concatenation, in layout order, of the flattened
    (L, K) count matrices that `histogram` gives per stream → (Σ L·K,) float64."""
    flat, base = [], 0
    for s, (K, L) in layout.items():
        c, mask = codes[s]
        c = c.detach()
        if c.dim() == 2:
            c = c.unsqueeze(1)
        idx = c + _offsets(K, L, base, c.device)
        flat.append((idx[mask.bool()] if mask is not None else idx).reshape(-1))
        base += L * K
    return torch.bincount(torch.cat(flat), minlength=base).to(torch.float64)


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of a count matrix (..., K) → (...)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


class PaddedLayout:
    """All levels of all streams as rows of one (R, Kmax) matrix (shorter codebooks zero-padded), so per-step metrics
    are a handful of tensor ops for every stream at once instead of a handful per stream and level."""

    def __init__(self, layout: Layout, device: torch.device | str = "cpu"):
        self.layout = dict(layout)
        self.kmax = max(K for K, _ in layout.values())
        self.rows = [(s, lv) for s, (_, L) in layout.items() for lv in level_names(s, L)]
        self.starts: dict[str, int] = {}
        row_k, flat_idx, r = [], [], 0
        for s, (K, L) in layout.items():
            self.starts[s] = r
            for _ in range(L):
                row_k.append(K)
                flat_idx += [r * self.kmax + k for k in range(K)]
                r += 1
        self.row_k = torch.tensor(row_k, dtype=torch.float64, device=device)  # (R,)
        self.flat_idx = torch.tensor(flat_idx, dtype=torch.long, device=device)  # flat stream-major → padded
        # (S, R) averaging matrix: per-stream mean over that stream's rows.
        self.stream_mean = torch.zeros(len(layout), r, dtype=torch.float64, device=device)
        for i, (st, (_, L)) in enumerate(layout.items()):
            self.stream_mean[i, self.starts[st] : self.starts[st] + L] = 1.0 / L

    def pad_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Concatenated per-stream (L, K) histograms, flattened → (R, Kmax)."""
        out = torch.zeros(len(self.rows) * self.kmax, dtype=torch.float64, device=flat.device)
        return out.index_copy_(0, self.flat_idx, flat.to(torch.float64)).view(len(self.rows), self.kmax)

    def pad(self, counts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pad_flat(torch.cat([counts[s].reshape(-1).to(torch.float64) for s in self.layout]))

    def unpad(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., R, Kmax) → stream → (..., L, K) views."""
        return {s: matrix[..., self.starts[s] : self.starts[s] + L, :K] for s, (K, L) in self.layout.items()}


class CodebookWindow:
    """Ring buffer of the last `window` steps' code counts; all tensors stay on `device`.

    Running window totals are kept by adding the new step and subtracting the evicted one (counts are integers in
    float64, so the sums are exact and equal after a resume), so a step costs O(R·Kmax), not O(window·R·Kmax).
    """

    def __init__(self, layout: Layout, window: int, device: torch.device | str = "cpu"):
        if window < 1:
            raise ValueError(f"train.codebook_window must be >= 1, got {window}")
        self.layout = dict(layout)
        self.padded = PaddedLayout(layout, device)
        self.window = window
        R, kmax = len(self.padded.rows), self.padded.kmax
        self.buf = torch.zeros(window, R, kmax, dtype=torch.float64, device=device)
        self.running = torch.zeros(R, kmax, dtype=torch.float64, device=device)
        self.pos = 0
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (p, entropy) of `running`, from vector()

    def push_flat(self, flat: torch.Tensor) -> None:
        """One step's counts, as the concatenation of the streams' flattened (L, K) histograms."""
        slot = self.buf[self.pos % self.window]
        self.running -= slot  # evict the oldest step, then write the new one into its slot in place
        slot.view(-1).index_copy_(0, self.padded.flat_idx, flat.to(torch.float64))
        self.running += slot
        self.pos += 1
        self.stats = None

    def push(self, counts: dict[str, torch.Tensor]) -> None:
        self.push_flat(torch.cat([counts[s].reshape(-1) for s in self.layout]))

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """Per-stream view of the ring buffer: stream → (window, L, K)."""
        return self.padded.unpad(self.buf)

    def state(self) -> dict:
        return {"buffers": {s: b.clone() for s, b in self.buffers.items()}, "pos": self.pos}

    def load(self, buffers: dict[str, torch.Tensor], pos: int) -> None:
        """Restore a saved window (resume); the running totals are rebuilt from the buffers."""
        for w in range(self.window):
            self.buf[w] = self.padded.pad({s: buffers[s][w] for s in self.layout})
        self.running = self.buf.sum(0)
        self.pos = pos
        self.stats = None

    def totals(self) -> dict[str, torch.Tensor]:
        """Counts over the window, per stream (L, K)."""
        return self.padded.unpad(self.running)

    def names(self) -> list[str]:
        """Metric names in the order of `vector()`."""
        return [f"codebook/{s}/{lv}/{kind}" for kind in ("usage", "perplexity", "dead") for s, lv in self.padded.rows]

    def vector(self) -> torch.Tensor:
        """All codebook metrics of all streams as one float64 vector (a few ops per step in total). Leaves the rows'
        distributions and entropies in `stats` for the drift metrics of the same step."""
        seen = (self.running > 0).sum(-1).to(torch.float64)
        k = self.padded.row_k
        p = self.running / self.running.sum(-1, keepdim=True).clamp_min(1)
        ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)
        self.stats = (p, ent)
        return torch.cat([seen / k, torch.exp2(ent), k - seen])

    def metrics(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names(), self.vector().unbind(), strict=True))
