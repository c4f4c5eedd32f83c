"""Codebook statistics over a sliding window of steps, kept on the device (no host sync per tensor).

A code layout maps a stream (`sem`, `pro`, `spk`) to (codebook_size K, number of levels/groups L). Per step the trainer
turns codes into per-level histograms (`histogram`), sums them across processes with one all-reduce, and pushes them into
a `CodebookWindow`, whose `metrics()` gives `codebook/<STREAM>/<L>/{usage,perplexity,dead}` as 0-dim tensors.
"""

from __future__ import annotations

import math

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
    Σ_j digit_j · Π_{i<j} levels_i, digit 0 least significant (`siren.models.quantizers.FSQ`). Counts live in one flat
    (rows, dmax, lmax) bin tensor (+1 trash bin) so both codebook windows share the names and the reading.
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
        self.dmax = max((len(x[3]) for x in self.rows), default=1)
        self.lmax = max((max(x[3]) for x in self.rows), default=1)
        self.flat_size = len(self.rows) * self.dmax * self.lmax
        lv = torch.ones(max(len(self.rows), 1), self.dmax, dtype=torch.long)
        for i, (_, _, _, levels) in enumerate(self.rows):
            lv[i, : len(levels)] = torch.tensor(levels)
        self.levels = lv.to(device)  # (Rd, dmax), 1 for padding dims (digit always 0, never read)
        self.basis = torch.cumprod(torch.cat([torch.ones_like(lv[:, :1]), lv[:, :-1]], 1), 1).to(device)
        valid = [i * self.dmax + j for i, (_, _, _, levels) in enumerate(self.rows) for j in range(len(levels))]
        self.valid = torch.tensor(valid, dtype=torch.long, device=device)
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    def row_tables(self, base: torch.Tensor) -> torch.Tensor:
        """Per layout row (its first key in `base` (R + 1,), the last row being trash) one float64 row of
        [base, 1/basis_0 … 1/basis_dmax, levels_0 … levels_(dmax−1), first bin of each dim] (`SparseCodebookWindow`).
        Rows without digits get 1/basis 0 (digits 0) and bins past `flat_size`, which no metric reads."""
        d, dev = self.dmax, self.levels.device
        t = torch.zeros(base.numel(), 1 + (d + 1) + 2 * d, dtype=torch.float64, device=dev)
        t[:, 0] = base.to(torch.float64)
        t[:, d + 2 : 2 * d + 2] = 1.0
        j = torch.arange(d, device=dev, dtype=torch.float64)
        t[:, 2 * d + 2 :] = self.flat_size + j * self.lmax
        for i, (_, _, r, _) in enumerate(self.rows):
            lv = self.levels[i].to(torch.float64)
            basis = torch.cat([self.basis[i].to(torch.float64), (self.basis[i, -1] * self.levels[i, -1]).reshape(1)])
            t[r, 1 : d + 2] = 1.0 / basis
            t[r, d + 2 : 2 * d + 2] = lv
            t[r, 2 * d + 2 :] = (i * d + j) * self.lmax
        return t

    def flat_index(self, drow: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Bins of codes (n,) of digit rows drow (n,) → (n, dmax) flat indices into the (Rd, dmax, lmax) bins."""
        lv, basis = self.levels[drow], self.basis[drow]
        digit = (code[:, None] // basis) % lv
        j = torch.arange(self.dmax, device=code.device)
        return (drow[:, None] * self.dmax + j) * self.lmax + digit

    def names(self) -> list[str]:
        return [
            f"codebook/{s}/{lv}/digit{j}/{kind}"
            for kind in ("usage", "perplexity")
            for s, lv, _, levels in self.rows
            for j in range(len(levels))
        ]

    def vector(self, counts: torch.Tensor) -> torch.Tensor:
        """Flat (Rd·dmax·lmax,) float64 bin counts → usage then perplexity of every (row, dim), in `names()` order."""
        c = counts.view(len(self.rows), self.dmax, self.lmax)
        usage = (c > 0).sum(-1).to(torch.float64) / self.levels
        ppl = torch.exp2(entropy_bits(c))
        return torch.cat([usage.reshape(-1)[self.valid], ppl.reshape(-1)[self.valid]])

    def from_dense(self, running: torch.Tensor) -> torch.Tensor:
        """Digit bin counts from a dense window's padded (R, Kmax) totals: O(Rd · K · dims), for small K only."""
        if self._dense is None:
            kmax = running.shape[1]
            src, tgt = [], []
            for i, (_, _, r, levels) in enumerate(self.rows):
                K = math.prod(levels)
                codes = torch.arange(K, device=running.device)
                idx = self.flat_index(torch.full_like(codes, i), codes)  # (K, dmax)
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
