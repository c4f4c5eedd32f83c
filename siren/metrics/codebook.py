"""Codebook statistics over a sliding window of steps, kept on the device (no host sync per tensor).

A code layout maps a stream (`sem`, `pro`, `spk`) to (codebook_size K, number of levels/groups L). Per step the trainer
turns codes into per-level histograms (`histogram`), sums them across processes with one all-reduce, and pushes them into
a `CodebookWindow`, whose `metrics()` gives `codebook/<STREAM>/<L>/{usage,perplexity,dead}` as 0-dim tensors.
"""

from __future__ import annotations

import math

import numpy as np
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


class DigitLayout:
    """Per-dimension digit statistics of FSQ streams: a code of an FSQ with `levels` (d dims) is the mixed-radix number
    Σ_j digit_j · Π_{i<j} levels_i, digit 0 least significant (`siren.models.quantizers.FSQ`). The digit histograms of
    all (row, dimension) pairs are one flat ragged bin vector: dimension j of digit row i owns `levels_j` bins starting
    at `starts[i][j]`, so its size is Σ levels over rows and dimensions — never padded to the widest dimension or the
    most dimensions (a 1-D FSQ of 2^20 levels beside a 16-D one costs what each needs). Both codebook windows fill it
    and read it here, so they share the names and the reading.
    `codebook/<STREAM>/<L>/digit<j>/usage` (fraction of the dimension's levels seen in the window) and
    `codebook/<STREAM>/<L>/digit<j>/perplexity`."""

    def __init__(self, layout: Layout, digits: dict[str, list[int]], device: torch.device | str = "cpu"):
        self.levels_by_stream = {s: [int(v) for v in lv] for s, lv in digits.items() if lv}
        for s, lv in self.levels_by_stream.items():
            if s not in layout:
                raise ValueError(f"FSQ digit levels given for stream {s!r}, which is not in the code layout {layout}")
            if math.prod(lv) != layout[s][0] or min(lv) < 2:
                raise ValueError(
                    f"FSQ levels {lv} of stream {s!r} do not make its codebook of {layout[s][0]} codes (product)"
                )
        self.rows: list[tuple[str, str, int, list[int]]] = []  # (stream, level name, layout row, levels)
        r = 0
        for s, (_, L) in layout.items():
            for i, lv in enumerate(level_names(s, L)):
                if s in self.levels_by_stream:
                    self.rows.append((s, lv, r + i, self.levels_by_stream[s]))
            r += L
        seg_levels = [v for *_, levels in self.rows for v in levels]  # one segment per (row, dimension), row-major
        seg_starts = np.cumsum([0, *seg_levels]).tolist()
        self.starts: list[list[int]] = []  # per digit row: first bin of each dimension
        n = 0
        for *_, levels in self.rows:
            self.starts.append(seg_starts[n : n + len(levels)])
            n += len(levels)
        self.flat_size = int(seg_starts[-1])
        self.levels = torch.tensor(seg_levels, dtype=torch.float64, device=device)  # (segments,)
        sizes = torch.tensor(seg_levels, dtype=torch.long)
        # (flat_size,): each bin's segment
        self.segment = torch.repeat_interleave(torch.arange(len(seg_levels)), sizes).to(device)
        self._host = (np.asarray(seg_starts[:-1], np.int64), np.asarray(seg_levels, np.float64))  # for `vector_host`
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return [
            f"codebook/{s}/{lv}/digit{j}/{kind}"
            for kind in ("usage", "perplexity")
            for s, lv, _, levels in self.rows
            for j in range(len(levels))
        ]

    def vector(self, counts: torch.Tensor) -> torch.Tensor:
        """Flat ragged (flat_size,) float64 bin counts → usage then perplexity of every (row, dim), in `names()`
        order."""
        seg, n = self.segment.to(counts.device), self.levels.numel()

        def per_segment(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.float64, device=counts.device).index_add_(0, seg, x)

        usage = per_segment((counts > 0).to(torch.float64)) / self.levels.to(counts.device)
        p = counts / per_segment(counts).clamp_min(1)[seg]
        ppl = torch.exp2(per_segment(-(p * torch.log2(p.clamp_min(1e-30)))))
        return torch.cat([usage, ppl])

    def vector_host(self, counts: np.ndarray) -> np.ndarray:
        """`vector` on host numpy bins (the sparse window's reading, a few µs: segment sums by `reduceat`)."""
        starts, levels = self._host
        usage = np.add.reduceat((counts > 0).astype(np.float64), starts) / levels
        p = counts / np.repeat(np.maximum(np.add.reduceat(counts, starts), 1.0), levels.astype(np.int64))
        ppl = np.exp2(np.add.reduceat(-(p * np.log2(np.maximum(p, 1e-30))), starts))
        return np.concatenate([usage, ppl])

    def digits_of(self, i: int, code: torch.Tensor) -> torch.Tensor:
        """Bins of codes (n,) of digit row i → (n, d) flat indices into the ragged bins (one per dimension)."""
        levels = self.rows[i][3]
        basis = torch.tensor([math.prod(levels[:j]) for j in range(len(levels))], device=code.device)
        lv = torch.tensor(levels, device=code.device)
        start = torch.tensor(self.starts[i], device=code.device)
        return start + (code[:, None] // basis) % lv

    def from_dense(self, running: torch.Tensor) -> torch.Tensor:
        """Digit bin counts from a dense window's padded (R, Kmax) totals: one scatter of O(Σ K · dims) per call (the
        dense window holds small codebooks only)."""
        if self._dense is None:
            kmax, src, tgt = running.shape[1], [], []
            for i, (_, _, r, levels) in enumerate(self.rows):
                codes = torch.arange(math.prod(levels), device=running.device)
                idx = self.digits_of(i, codes)  # (K, d)
                src.append((r * kmax + codes)[:, None].expand_as(idx).reshape(-1))
                tgt.append(idx.reshape(-1))
            self._dense = (torch.cat(src), torch.cat(tgt))
        src, tgt = self._dense
        out = torch.zeros(self.flat_size, dtype=torch.float64, device=running.device)
        return out.index_add_(0, tgt, running.reshape(-1)[src])


class CodebookWindow:
    """Ring buffer of the last `window` steps' code counts; all tensors stay on `device`.

    Running window totals are kept by adding the new step and subtracting the evicted one (counts are integers in
    float64, so the sums are exact and equal after a resume), so a step costs O(R·Kmax), not O(window·R·Kmax).
    """

    sparse = False

    def __init__(
        self,
        layout: Layout,
        window: int,
        device: torch.device | str = "cpu",
        digits: dict[str, list[int]] | None = None,
    ):
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
        self.digits = DigitLayout(layout, digits or {}, device)

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

    def nbytes(self) -> int:
        """Memory this window holds (the ring of histograms and their running totals)."""
        return sum(t.numel() * t.element_size() for t in (self.buf, self.running))

    def load_state(self, state: dict) -> None:
        if "buffers" not in state:
            raise ValueError("codebook window state is a sparse window's; this run's codebooks use the dense window")
        self.load({s: b.to(self.buf.device) for s, b in state["buffers"].items()}, state["pos"])

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
        out = [f"codebook/{s}/{lv}/{kind}" for kind in ("usage", "perplexity", "dead") for s, lv in self.padded.rows]
        return out + self.digits.names()

    def vector(self) -> torch.Tensor:
        """All codebook metrics of all streams as one float64 vector (a few ops per step in total). Leaves the rows'
        distributions and entropies in `stats` for the drift metrics of the same step."""
        seen = (self.running > 0).sum(-1).to(torch.float64)
        k = self.padded.row_k
        p = self.running / self.running.sum(-1, keepdim=True).clamp_min(1)
        ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)
        self.stats = (p, ent)
        out = torch.cat([seen / k, torch.exp2(ent), k - seen])
        if self.digits.rows:
            out = torch.cat([out, self.digits.vector(self.digits.from_dense(self.running))])
        return out

    def metrics(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names(), self.vector().unbind(), strict=True))
