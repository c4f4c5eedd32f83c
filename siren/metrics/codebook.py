"""The codebook window: usage, perplexity, dead codes, FSQ digit statistics and drift of the last steps' codes.

A code layout maps a stream (`sem`, `pro`, `spk`) to (codebook_size K, number of levels/groups L); each (stream, level)
is a row. `CodebookWindow` is the one window for every layout. The trainer's per-step metrics
(`siren.train.step_metrics.StepMetrics`) drive it through four calls per step:

1. `keys(codes)`: a micro-batch's codes → flat keys (row base + code; masked frames → the `trash` key), on the codes'
   device, static shapes;
2. `reduce(keys, accelerator)`: this rank's keys of the step → the step's one tensor, reduced across ranks (see the
   storages below), so that what follows sees the codes of every rank, whatever the number of processes;
3. `push(step)`: adds the step to the window, evicting the step that falls out, and returns its readout: a float64
   tensor on the window's device of O(rows + digit bins) numbers, copied to the host with the step's other numbers;
4. `metrics(readout, rate)`: the host reading → `codebook/<STREAM>/<L>/{usage,perplexity,dead}`,
   `codebook/<STREAM>/<L>/digit<j>/{usage,perplexity}` for FSQ streams and, with a drift reference,
   `drift/<STREAM>/{js,entropy_delta_bits}` and `drift/bps_delta`.

The storage is chosen inside, by codebook size (`is_large`):
- dense, up to `DENSE_MAX_CODES` codes per level (`_DenseCounts`): a ring of the last steps' per-row histograms
  (window, rows, K) float64 and their running totals, on the device. A step's tensor is its (Σ L·K,) histogram,
  summed across ranks (all-reduce). Cheap and exact for small codebooks; 400 MB per level at 2^20 codes × 50 steps.
- sparse, above it (`_SparseCounts`): per code a count, per row exact integer sums, the window's keys per step. A
  step's tensor is its keys, gathered across ranks (a concatenation: the counts depend only on the multiset of codes,
  not on their order nor on how micro-batches and ranks split them). O(codes per step) a step, never O(K).
Either readout reduces to the same per-row numbers (codes seen, entropy, JS against the baseline, digit bins), and one
reading, `CodebookWindow.metrics`, turns them into every metric: a metric of those numbers is written once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from siren.metrics.drift import DriftReference

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


class PaddedLayout:
    """All levels of all streams as rows of one (R, Kmax) matrix (shorter codebooks zero-padded), so the dense
    storage's per-step metrics are a handful of tensor ops for every stream at once, not a handful per row."""

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
    most dimensions (a 1-D FSQ of 2^20 levels beside a 16-D one costs what each needs). Both storages of the codebook
    window fill it (`from_dense`, `_DigitSplit`) and it is read here (`vector_host`), once for both.
    `codebook/<STREAM>/<L>/digit<j>/usage` (fraction of the dimension's levels seen in the window) and
    `codebook/<STREAM>/<L>/digit<j>/perplexity`."""

    def __init__(self, layout: Layout, digits: dict[str, list[int]]):
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
        self._host = (np.asarray(seg_starts[:-1], np.int64), np.asarray(seg_levels, np.float64))  # for `vector_host`
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return [
            f"codebook/{s}/{lv}/digit{j}/{kind}"
            for kind in ("usage", "perplexity")
            for s, lv, _, levels in self.rows
            for j in range(len(levels))
        ]

    def vector_host(self, counts: np.ndarray) -> np.ndarray:
        """Flat ragged (flat_size,) float64 bin counts (host numpy) → usage then perplexity of every (row, dimension),
        in `names()` order (a few µs: segment sums by `reduceat`)."""
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
        """Digit bin counts from the dense storage's padded (R, Kmax) totals: one scatter of O(Σ K · dims) per call (the
        dense storage holds small codebooks only)."""
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


DENSE_MAX_CODES = 2**12  # above this many codes per level (any row) the window stores its counts sparsely
_FIX = 2.0**32  # S = Σ c·log2 c kept as an integer in units of 2^-32 bits (per-code rounding ≤ 2^-33)


def is_large(layout: Layout) -> bool:
    """Whether any stream of `layout` has more than `DENSE_MAX_CODES` codes per level (→ the sparse storage)."""
    return any(K > DENSE_MAX_CODES for K, _ in layout.values())


class CodebookWindow:
    """The last `window` steps' codes of every row of `layout` and their metrics (see the module docstring for the
    four calls of a step). `digits`: FSQ levels per stream (digit metrics). `drift`: the baseline
    (`siren.metrics.drift.DriftReference`) the drift metrics compare the window with, or None.

    `storage` forces "dense" or "sparse" (tests and benchmarks compare them); by default dense unless the layout
    `is_large`. `backend` (sparse storage only): "numpy" (host arrays, the default on a CPU device: a fraction of
    torch's per-operation cost at these sizes) or "torch" (tensors on `device`, the default elsewhere: the codes never
    leave the device)."""

    def __init__(
        self,
        layout: Layout,
        window: int,
        device: torch.device | str = "cpu",
        digits: dict[str, list[int]] | None = None,
        drift: DriftReference | None = None,
        storage: str | None = None,
        backend: str | None = None,
    ):
        if window < 1:
            raise ValueError(f"train.codebook_window must be >= 1, got {window}")
        storage = storage or ("sparse" if is_large(layout) else "dense")
        if storage not in ("dense", "sparse"):
            raise ValueError(f"codebook window storage must be 'dense' or 'sparse', got {storage!r}")
        if backend not in (None, "numpy", "torch"):
            raise ValueError(f"sparse codebook window backend must be 'numpy' or 'torch', got {backend!r}")
        self.layout, self.window, self.device = dict(layout), window, torch.device(device)
        if drift is not None and drift.layout != {s: tuple(v) for s, v in self.layout.items()}:
            raise ValueError(f"drift reference layout {drift.layout} is not the window's {self.layout}")
        self.drift, self.storage = drift, storage
        self.rows = [(s, lv) for s, (_, L) in self.layout.items() for lv in level_names(s, L)]
        row_k = np.array([K for K, L in self.layout.values() for _ in range(L)], dtype=np.int64)
        self.row_k = row_k.astype(np.float64).tolist()
        self.ends = np.cumsum(row_k)  # row r holds keys [base[r], ends[r]); the key ends[-1] is `trash`
        self.base = self.ends - row_k
        self.trash = int(self.ends[-1]) if row_k.size else 0
        self._key_base, r = {}, 0  # stream → (L,) first key of each level, on the window's device
        self.spans = []  # each stream's rows [a, b)
        for s, (_, L) in self.layout.items():
            self._key_base[s] = torch.as_tensor(self.base[r : r + L], device=self.device)
            self.spans.append((r, r + L))
            r += L
        self.digits = DigitLayout(self.layout, digits or {})
        self._names = [f"codebook/{s}/{lv}/{k}" for k in ("usage", "perplexity", "dead") for s, lv in self.rows]
        self._names += self.digits.names() + (drift.names() if drift is not None else [])
        self._drift_entropy = drift.entropy.tolist() if drift is not None else []
        self._counts = _DenseCounts(self) if storage == "dense" else _SparseCounts(self, backend)

    # ------------------------------------------------------------------------------------------- the step protocol
    def keys(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """A micro-batch's codes (stream → (codes (B, T, L) or (B, G), mask (B, T) or None)) → flat keys (n,) long on
        the codes' device, `trash` for masked frames. Static shapes: the mask is applied by `where`."""
        out = []
        for s in self.layout:
            c, mask = codes[s]
            c = c.detach()
            if c.dim() == 2:
                c = c.unsqueeze(1)
            k = c + self._key_base[s].to(c.device)
            if mask is not None:
                k = torch.where(mask.bool()[..., None], k, torch.full_like(k, self.trash))
            out.append(k.reshape(-1))
        return torch.cat(out)

    def reduce(self, keys: torch.Tensor, accelerator=None) -> torch.Tensor:
        """This rank's keys of the step (its micro-batches' `keys`, concatenated) → the step's tensor over every rank:
        a collective on `accelerator` (None: one process). The dense storage sums histograms, the sparse one gathers
        keys; either way the counts are those of all ranks' codes together."""
        return self._counts.reduce(keys.to(self.device), accelerator)

    def push(self, step: torch.Tensor) -> torch.Tensor:
        """Add a step (`reduce`'s tensor) to the window, evicting the step that falls out → its readout (float64 on
        the window's device), for `metrics`."""
        return self._counts.push(step)

    def metrics(self, readout, rate: float = 0.0) -> dict[str, float]:
        """The window's metrics from a readout (`push`'s, on the host: numpy or tensor) and the step's bit rate (the
        drift reference's `drift/bps_delta`), in `names()` order."""
        seen, ent, js, bins = self._counts.rows(np.asarray(readout, dtype=np.float64))
        k = self.row_k
        values = [a / b for a, b in zip(seen, k, strict=True)] + [2.0**e for e in ent]
        values += [b - a for a, b in zip(seen, k, strict=True)]
        if self.digits.rows:
            values += self.digits.vector_host(bins).tolist()
        if self.drift is not None:
            delta = [e - h for e, h in zip(ent, self._drift_entropy, strict=True)]
            values += [sum(v[a:b]) / (b - a) for v in (js, delta) for a, b in self.spans]  # means over levels
            values.append(rate - self.drift.bps_entropy)
        return dict(zip(self._names, values, strict=True))

    def step(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]], rate: float = 0.0) -> dict[str, float]:
        """One process's step through the four calls → its metrics (tests, benchmarks)."""
        return self.metrics(self.push(self.reduce(self.keys(codes))).cpu().numpy(), rate)

    # ------------------------------------------------------------------------------------------ names, state, size
    def names(self) -> list[str]:
        """Metric names in the order `metrics` gives them."""
        return list(self._names)

    @property
    def pos(self) -> int:
        """Steps pushed so far."""
        return self._counts.pos

    def state(self) -> dict:
        """What a checkpoint saves to resume the window exactly (the storage's own format)."""
        return self._counts.state()

    def load_state(self, state: dict) -> None:
        self._counts.load_state(state)

    def nbytes(self) -> int:
        """Memory the window holds."""
        return self._counts.nbytes()


class _DenseCounts:
    """Dense storage: a ring buffer of the last `window` steps' per-row histograms, (window, R, Kmax) float64 on the
    device, and their running totals, kept by adding the new step and subtracting the evicted one (counts are
    integers in float64, so the sums are exact and equal after a resume): a step costs O(R·Kmax), not
    O(window·R·Kmax). The readout, computed on the device: per row the codes seen, the entropy (bits), with a drift
    reference the JS divergence JS(p, q) = H((p + q) / 2) − (H(p) + H(q)) / 2 against the baseline's histogram, then
    the FSQ digit bins."""

    def __init__(self, w: CodebookWindow):
        self.w, device = w, w.device
        self.padded = PaddedLayout(w.layout, device)
        R, kmax = len(self.padded.rows), self.padded.kmax
        self.buf = torch.zeros(w.window, R, kmax, dtype=torch.float64, device=device)
        self.running = torch.zeros(R, kmax, dtype=torch.float64, device=device)
        self.pos = 0
        self.q = self.hq = None
        if w.drift is not None:  # the baseline's distribution per row, padded like the window, and its entropy
            ref = w.drift
            q = torch.zeros(R * kmax, dtype=torch.float64)
            q[torch.from_numpy(ref.row * kmax + ref.code)] = torch.from_numpy(ref.q)
            self.q = q.view(R, kmax).to(device)
            self.hq = torch.from_numpy(ref.entropy).to(device)

    def reduce(self, keys: torch.Tensor, accelerator) -> torch.Tensor:
        hist = torch.bincount(keys, minlength=self.w.trash + 1)[: self.w.trash].to(torch.float64)
        return hist if accelerator is None else accelerator.reduce(hist, reduction="sum")

    def push(self, hist: torch.Tensor) -> torch.Tensor:
        """A step's histogram, the concatenation of the streams' flattened (L, K) counts → the readout."""
        slot = self.buf[self.pos % self.w.window]
        self.running -= slot  # evict the oldest step, then write the new one into its slot in place
        slot.view(-1).index_copy_(0, self.padded.flat_idx, hist.to(torch.float64))
        self.running += slot
        self.pos += 1
        run = self.running
        seen = (run > 0).sum(-1).to(torch.float64)
        p = run / run.sum(-1, keepdim=True).clamp_min(1)
        ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)
        parts = [seen, ent]
        if self.q is not None:
            m = 0.5 * (p + self.q)
            h_m = -(m * torch.log2(m.clamp_min(1e-30))).sum(-1)
            parts.append((h_m - 0.5 * (ent + self.hq)).clamp_min(0.0))
        if self.w.digits.rows:
            parts.append(self.w.digits.from_dense(run))
        return torch.cat(parts)

    def rows(self, readout: np.ndarray) -> tuple[list, list, list | None, np.ndarray]:
        R = len(self.padded.rows)
        n = 3 if self.q is not None else 2
        head = readout[: n * R].tolist()
        return head[:R], head[R : 2 * R], head[2 * R :] if self.q is not None else None, readout[n * R :]

    def state(self) -> dict:
        """Per stream the ring of histograms (window, L, K) and the step count."""
        return {"buffers": {s: b.clone() for s, b in self.padded.unpad(self.buf).items()}, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        """Restore a saved window (resume); the running totals are rebuilt from the buffers."""
        if "buffers" not in state:
            raise ValueError("codebook window state is a sparse window's; this run's codebooks use the dense window")
        buffers = {s: b.to(self.buf.device) for s, b in state["buffers"].items()}
        for i in range(self.w.window):
            self.buf[i] = self.padded.pad({s: buffers[s][i] for s in self.w.layout})
        self.running = self.buf.sum(0)
        self.pos = int(state["pos"])

    def nbytes(self) -> int:
        """The ring of histograms and their running totals."""
        return sum(t.numel() * t.element_size() for t in (self.buf, self.running))


class _NumpyOps:
    """The window's array operations on host numpy arrays (CPU training)."""

    host = True

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, x, dtype: str) -> np.ndarray:
        if torch.is_tensor(x):
            x = x.detach().cpu().numpy()
        return np.ascontiguousarray(x, dtype=dtype)

    def zeros(self, shape, dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def cat(self, xs) -> np.ndarray:
        return np.concatenate(xs)

    def add_at(self, a, idx, v) -> None:
        np.add.at(a, idx, v)

    def bincount(self, x, weights=None, n: int = 0) -> np.ndarray:
        return np.bincount(x, weights, n)

    def searchsorted(self, sorted_, v, right: bool) -> np.ndarray:
        return np.searchsorted(sorted_, v, side="right" if right else "left")

    def cast(self, x, dtype: str) -> np.ndarray:
        return x.astype(dtype)

    log2 = staticmethod(np.log2)

    def clamp_min(self, x, v: float) -> np.ndarray:
        return np.maximum(x, v)

    def minimum(self, a, b) -> np.ndarray:
        return np.minimum(a, b)

    def to_host(self, x) -> np.ndarray:
        return x


class _TorchOps(_NumpyOps):
    """The same operations on device tensors (accelerator training: the codes stay on the device)."""

    host = False

    def asarray(self, x, dtype: str) -> torch.Tensor:
        return torch.as_tensor(x).to(self.device, getattr(torch, dtype)).contiguous()

    def zeros(self, shape, dtype: str) -> torch.Tensor:
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device)

    def cat(self, xs) -> torch.Tensor:
        return torch.cat(list(xs))

    def add_at(self, a, idx, v) -> None:
        a.index_add_(0, idx, v)

    def bincount(self, x, weights=None, n: int = 0) -> torch.Tensor:
        return torch.bincount(x, weights, n)

    def searchsorted(self, sorted_, v, right: bool) -> torch.Tensor:
        return torch.searchsorted(sorted_, v, right=right)

    def cast(self, x, dtype: str) -> torch.Tensor:
        return x.to(getattr(torch, dtype))

    log2 = staticmethod(torch.log2)

    def clamp_min(self, x, v: float) -> torch.Tensor:
        return x.clamp_min(v)

    def minimum(self, a, b) -> torch.Tensor:
        return torch.minimum(a, b)

    def to_host(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()


class _SparseCounts:
    """Sparse storage, for large implicit codebooks (FSQ with many dimensions: 2^16–2^20 codes per level). It keeps
    - the window's keys, one flat array per step (memory: window × codes per step),
    - per code an int32 count and an int32 scratch mark (8 MB per 2^20-code level, never window × K), touched only at
      the codes that enter or leave the window, and per row exact integer sums: codes seen, N = Σ c and
      S = Σ c·log2 c in fixed point (c·log2 c from a lookup table over counts),
    - for FSQ streams, per row a histogram of the codes' low and high digit groups (about 2√K bins when the levels
      allow, `_DigitSplit`), folded into per-dimension digit histograms when read.
    So a step costs O(codes in the step + codes evicted), never O(K); JS drift adds O(min(baseline support, codes in
    the window)). The sums are integers, so the metrics depend only on the window's counts: not on the order of codes,
    on how a step was split into micro-batches or ranks, or on a resume.

    A step is ~25 array operations on a few thousand elements plus ~20 on a few numbers per row, so on a CPU its cost
    is per-operation overhead and cache misses, not arithmetic: with the numpy backend the arrays are numpy arrays,
    with the torch backend device tensors. One algorithm, written once against `_NumpyOps` / `_TorchOps`. The readout
    (`summary`): per row S, codes seen and N, with a drift reference per row the cross term (`_cross`), then the digit
    bins; `rows` turns it into the window's per-row numbers on the host."""

    def __init__(self, w: CodebookWindow, backend: str | None):
        self.w, self.window = w, w.window
        backend = backend or ("numpy" if w.device.type == "cpu" else "torch")
        self.xp = (_NumpyOps if backend == "numpy" else _TorchOps)(w.device)
        self.host = self.xp.host
        self.trash, R = w.trash, len(w.rows)
        self.ends = self.xp.asarray(w.ends, "int64")
        self._split = _DigitSplit(w.digits, np.append(w.base, self.trash), self.xp)
        self._ref = None
        self._dense_q = None  # q/2 of the baseline per key, built when first needed (`_cross`)
        if w.drift is not None:  # per baseline code: its window key, row, q/2 and g(q/2), in this backend
            ref, xp = w.drift, self.xp
            keys = w.base[ref.row] + ref.code
            self._ref = (
                xp.asarray(keys, "int64"),
                xp.asarray(ref.row, "int64"),
                xp.asarray(ref.q / 2, "float64"),
                xp.asarray(ref.g_half_q, "float64"),
            )
            self._hq = ref.entropy.tolist(), ref.half_q_entropy.tolist()
        self._rows = R
        self._reset()

    def _reset(self) -> None:
        xp = self.xp
        # Per key its count and a scratch mark (picks one occurrence of each key in a push), side by side: a push
        # meets each key's cache line once, not twice (random access into 2 × 4 MB at 2^20 codes is most of its cost).
        self._count_mark = xp.zeros((self.trash + 1, 2), "int32")
        self.counts, self.mark = self._count_mark[:, 0], self._count_mark[:, 1]
        self.sums = xp.zeros((3, self._rows + 1), "int64")  # S, seen, N per row (+ trash)
        self.digit_counts = xp.zeros(self._split.n_bins, "float64")  # the window's low/high digit-group histogram
        self.ring: list = [None] * self.window  # per step: its keys
        self.pos = self._most = self._ring_n = 0  # steps pushed, most codes in one step, codes in the ring
        self._table = xp.zeros((2, 1), "int64")  # count c → fixed c·log2 c, c > 0
        self._signs: dict[tuple[int, int], object] = {}

    def _count_table(self, most: int):
        """Lookup tables c → round(c·log2 c · 2^32) and c → (c > 0) for every count a window can hold (c ≤ `most`)."""
        if most >= self._table.shape[1]:
            if most * math.log2(max(most, 2)) * _FIX >= 2**62:  # Σ c·log2 c ≤ N·log2 N must fit in int64
                raise ValueError(
                    f"a codebook window of {self.window} steps × up to {most // self.window} codes per step is too "
                    "large for its exact sums; lower train.codebook_window"
                )
            c = np.arange(2 * most + 1, dtype=np.float64)  # headroom: grows rarely
            fx = np.round(c * np.log2(np.maximum(c, 1.0)) * _FIX).astype(np.int64)
            self._table = self.xp.asarray(np.stack([fx, (c > 0).astype(np.int64)]), "int64")
        return self._table

    def _sign(self, n_new: int, n_old: int) -> tuple:
        """+1 for the n_new entering keys, −1 for the n_old leaving ones (int32 for the counts, int64 for the sums,
        float64 for bincount weights), and occurrence ids 0…n−1 (int32); cached per shape (at most 16 shapes)."""
        key = (n_new, n_old)
        if key not in self._signs:
            if len(self._signs) >= 16:  # steps of varying size (variable-length batches): keep the cache bounded
                self._signs.clear()
            s = np.r_[np.ones(n_new, np.int64), -np.ones(n_old, np.int64)]
            xp = self.xp
            ids = np.arange(s.size)
            self._signs[key] = (
                xp.asarray(s, "int32"),
                xp.asarray(s, "int64"),
                xp.asarray(s, "float64"),
                xp.asarray(ids, "int32"),
            )
        return self._signs[key]

    # ------------------------------------------------------------------------------------------------------- filling
    def reduce(self, keys: torch.Tensor, accelerator) -> torch.Tensor:
        """Every rank's keys, concatenated (padded with `trash`, which no metric reads)."""
        if accelerator is None:
            return keys
        return accelerator.gather(accelerator.pad_across_processes(keys, dim=0, pad_index=self.trash))

    def push(self, keys) -> torch.Tensor:
        """Add one step's keys (n,) and evict the step that falls out of the window → the readout (`summary`)."""
        self._push(keys)
        out = self.summary()
        return torch.from_numpy(out) if self.host else out

    def _push(self, keys) -> None:
        """O(n + evicted), never O(K). Each distinct touched key changes its count once, by its net change."""
        xp = self.xp
        keys = xp.asarray(keys, "int64").reshape(-1)
        slot = self.pos % self.window
        old = self.ring[slot]
        self.ring[slot] = keys
        self._ring_n += keys.shape[0] - (0 if old is None else old.shape[0])
        self.pos += 1
        self._most = max(self._most, keys.shape[0])  # most codes in one step so far: bounds any count in the window
        table = self._count_table(self.window * self._most)
        touched = keys if old is None else xp.cat([keys, old])
        sign32, sign64, sign_f, ids = self._sign(keys.shape[0], touched.shape[0] - keys.shape[0])
        # Each key's change is counted once: at the occurrence whose id the scatter left in `mark` (any one of them).
        self.mark[touched] = ids
        first = self.mark[touched] == ids
        before = self.counts[touched]
        xp.add_at(self.counts, touched, sign32)
        after = self.counts[touched]
        row = xp.searchsorted(self.ends, touched, right=True)  # trash → R
        for j in range(2):  # per row: change of the fixed-point Σ c·log2 c, and of the codes seen
            xp.add_at(self.sums[j], row, (table[j][after] - table[j][before]) * first)
        xp.add_at(self.sums[2], row, sign64)  # N
        if self.w.digits.rows:  # FSQ digits: the entering codes' low/high digit groups counted in, the leaving out
            self.digit_counts += self._split.histogram(touched, row, sign_f)

    def nbytes(self) -> int:
        """Counts, sums, digit-group bins and their fold, and the ring of step keys."""
        arrays = [self._count_mark, self.sums, self.digit_counts, self._table, self._split.src, self._split.tgt]
        arrays += [a for a in (self._dense_q,) if a is not None]
        arrays += [t for t in self.ring if t is not None]
        return sum(int(t.nbytes) for t in arrays)

    def state(self) -> dict:
        """The ring of step keys, oldest first, and the step count: everything else is rebuilt from it."""
        steps = [self.ring[(self.pos + i) % self.window] for i in range(self.window)]
        return {"sparse_keys": [torch.tensor(self.xp.to_host(t)) for t in steps if t is not None], "pos": self.pos}

    def load_state(self, state: dict) -> None:
        """Restore a saved window (resume): the counts and sums are rebuilt exactly (integers) from the keys."""
        if "sparse_keys" not in state:
            raise ValueError("codebook window state is a dense window's; this run's codebooks need the sparse window")
        self._reset()
        steps = state["sparse_keys"]
        self.pos = int(state["pos"]) - len(steps)
        for k in steps:
            self._push(k)

    # ----------------------------------------------------------------------------------------------------- reading
    def summary(self):
        """The window as O(rows) float64 numbers, in this backend: per row S = Σ c·log2 c, codes seen and N = Σ c,
        then (with a drift reference) per row the cross term (`_cross`), then the digit bins."""
        xp, R = self.xp, self._rows
        s = xp.cast(self.sums[:, :R], "float64")
        parts = [s[0] / _FIX, s[1], s[2]]
        if self._ref is not None:
            parts.append(self._cross(2.0 * xp.clamp_min(s[2], 1.0)))
        if self.w.digits.rows:
            parts.append(self._split.digit_bins(self.digit_counts))
        return xp.cat(parts)

    def _cross(self, two_n):
        """Per row Σ_{p,q>0} [g(p/2 + q/2) − g(p/2) − g(q/2)] (g(x) = −x log2 x; a code absent from the window adds
        exactly 0), over whichever is smaller: the baseline's codes (its support), or the window's codes — then each
        occurrence adds its code's term ÷ the code's count, so each code present adds it once. So a step costs
        O(min(baseline support, codes in the window)), never O(K)."""
        xp, R = self.xp, self._rows
        keys, row, half_q, g_half_q = self._ref
        if keys.shape[0] <= self._ring_n:
            half_p = xp.cast(self.counts[keys], "float64") / two_n[row]  # p/2 at the baseline's codes
            return xp.bincount(row, _g(xp, half_p + half_q) - _g(xp, half_p) - g_half_q, R)
        steps = [self.ring[(self.pos + i) % self.window] for i in range(self.window)]  # oldest first: fixed order
        occ = xp.cat([k for k in steps if k is not None])
        occ_row = xp.searchsorted(self.ends, occ, right=True)  # trash → R, dropped below
        c = xp.cast(self.counts[occ], "float64")  # ≥ 1: every code in the ring is counted
        if self._dense_q is None:  # q/2 of the baseline per window key (0 where it has none; one float64 per code)
            self._dense_q = xp.zeros(self.trash + 1, "float64")
            self._dense_q[keys] = half_q
        hq = self._dense_q[occ]  # 0 where the baseline never used the code
        half_p = c / xp.cat([two_n, two_n[:1]])[occ_row]
        both = (_g(xp, half_p + hq) - _g(xp, half_p) - _g(xp, hq)) / c
        return xp.bincount(occ_row, both, R + 1)[:R]

    def rows(self, readout: np.ndarray) -> tuple[list, list, list | None, np.ndarray]:
        """Host arithmetic on a readout: per row codes seen, entropy and (with a drift reference) the JS divergence
        against the baseline, then the digit bins. H(m) = Σ_q g(q/2) + Σ_p g(p/2) + cross, where
        Σ_p g(p/2) = (N log2 2N − S) / 2N follows from the row sums. In Python floats: a handful of rows."""
        R, drift = self._rows, self._ref is not None
        head = readout[: (4 if drift else 3) * R].tolist()
        S, seen, n = head[:R], head[R : 2 * R], head[2 * R : 3 * R]
        ent = [math.log2(x) - a / x if x > 0 else 0.0 for a, x in zip(S, n, strict=True)]
        js = None
        if drift:
            cross, (H, Hq) = head[3 * R :], self._hq
            js = []
            for r in range(R):
                x = n[r]
                half_p = (x * math.log2(2 * x) - S[r]) / (2 * x) if x > 0 else 0.0
                js.append(max(Hq[r] + half_p + cross[r] - 0.5 * (ent[r] + H[r]), 0.0))
        return seen, ent, js, readout[(4 if drift else 3) * R :]


class _DigitSplit:
    """Per-dimension digit counts of FSQ codes without per-digit work per code. An FSQ code of d digits (mixed radix,
    digit 0 least significant) splits as code = high · B + low with B = Π of its first m levels (m chosen so that the
    larger of B and K / B is smallest: about √K when the levels allow). Per step each touched code adds ±1 to one low
    bin and one high bin of its row: 2 bins per code instead of d, and B + K / B bins per row instead of K.
    `digit_bins` folds the window's low/high histograms into `DigitLayout`'s ragged digit histograms with one
    precomputed scatter: each low (high) bin adds to one digit bin per dimension of its part — B · m + K / B · (d − m)
    entries per row, no per-code work and no (bins × digit bins) matrix, whatever the levels (one dimension of 2^20
    levels included)."""

    def __init__(self, digits: DigitLayout, base: np.ndarray, xp):
        self.xp, self.digits = xp, digits
        R = len(base) - 1  # layout rows; base[R] is the trash key
        # per layout row (+ trash): first key, radix B, low cap, high cap, first low bin, first high bin
        tab = np.zeros((R + 1, 6), dtype=np.int64)
        tab[:, 0] = base
        has_digits = np.zeros(R + 1, dtype=bool)
        spans: list[list] = []  # per FSQ stream: its stream, first and end digit-row index, levels
        for i, (s, _, _, levels) in enumerate(digits.rows):
            if spans and spans[-1][0] == s:
                spans[-1][2] = i + 1
            else:
                spans.append([s, i, i + 1, levels])
        src: list[np.ndarray] = []  # low/high bins, each once per dimension of its part
        tgt: list[np.ndarray] = []  # the ragged digit bin (`DigitLayout`) each of them adds to
        n = 0
        for _, i0, i1, levels in spans:
            K, d = math.prod(levels), len(levels)
            prefix = [math.prod(levels[:m]) for m in range(d + 1)]
            m = min(range(d + 1), key=lambda m: (max(prefix[m], K // prefix[m]), m))
            B, H = prefix[m], K // prefix[m]
            rows = [digits.rows[i][2] for i in range(i0, i1)]
            has_digits[rows] = True
            tab[rows, 1], tab[rows, 2], tab[rows, 3] = B, B - 1, H - 1
            low = slice(n, n + B * len(rows))
            high = slice(low.stop, low.stop + H * len(rows))
            tab[rows, 4] = low.start + B * np.arange(len(rows))
            tab[rows, 5] = high.start + H * np.arange(len(rows))
            n = high.stop
            for k, i in enumerate(range(i0, i1)):  # where each low/high bin of the row adds, per dimension
                for first, part, j0 in ((low.start + k * B, levels[:m], 0), (high.start + k * H, levels[m:], m)):
                    x = np.arange(math.prod(part))
                    for j, v in enumerate(part):
                        src.append(first + x)
                        tgt.append(digits.starts[i][j0 + j] + (x // math.prod(part[:j])) % v)
        # Rows without digits (and trash) are marked as such, not by their radix (a 1-D FSQ's radix B is 1 too): low
        # and high capped at 0, both in the last bin, which no metric reads.
        tab[~has_digits, 1] = 1
        tab[~has_digits, 2:4] = 0
        tab[~has_digits, 4:6] = n
        self.n_bins = n + 1
        self.tab = xp.asarray(tab, "int64")
        self.src = xp.asarray(np.concatenate(src) if src else np.zeros(0, np.int64), "int64")
        self.tgt = xp.asarray(np.concatenate(tgt) if tgt else np.zeros(0, np.int64), "int64")

    def histogram(self, keys, row, sign):
        """±1 (`sign`, float64) per key (n,) of layout row `row` (n,; trash keys: R) into the low and high bins of
        its row → (n_bins,) float64 change."""
        xp = self.xp
        t = self.tab[row]  # (n, 6)
        code = keys - t[:, 0]
        high = code // t[:, 1]
        low = xp.minimum(code - high * t[:, 1], t[:, 2])
        high = xp.minimum(high, t[:, 3])
        return xp.bincount(xp.cat([t[:, 4] + low, t[:, 5] + high]), xp.cat([sign, sign]), self.n_bins)

    def digit_bins(self, counts):
        """The window's low/high histogram (n_bins,) → its ragged digit histograms (`DigitLayout`), (flat_size,):
        one gather and one bincount over (B · m + K / B · (d − m)) entries per row."""
        return self.xp.bincount(self.tgt, counts[self.src], self.digits.flat_size)


def _g(xp, x):
    return -x * xp.log2(xp.clamp_min(x, 1e-300))
