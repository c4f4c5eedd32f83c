"""Codebook metrics for large implicit codebooks (FSQ with many dimensions: 2^16–2^20 codes per level), DESIGN §7/§18.

The dense `CodebookWindow` keeps a (window, rows, K) float64 ring of histograms: 50 steps × 2^20 codes is 400 MB per
level, and every step reads all K entries. `SparseCodebookWindow` keeps instead
- the window's codes, one flat key array per step (memory: window × codes per step),
- per code an int32 count and an int32 scratch mark (8 MB per 2^20-code level, never window × K), touched only at the
  codes that enter or leave the window, and per row exact integer sums: codes seen, N = Σ c and S = Σ c·log2 c in
  fixed point (c·log2 c from a lookup table over counts),
- for FSQ streams, per row a histogram of the codes' low and high digit groups (about 2√K bins when the levels allow,
  `_DigitSplit`), folded into per-dimension digit histograms when read.
So a step costs O(codes in the step + codes evicted), never O(K); JS drift adds O(min(baseline support, codes in the
window)). The sums are integers, so the metrics depend only on
the window's counts — not on the order of codes, on how a step was split into micro-batches or ranks, or on a resume.

Where it runs. A step is ~25 array operations on a few thousand elements plus ~20 on a few numbers per row, so on a
CPU its cost is per-operation overhead and cache misses, not arithmetic. With a CPU device the window's arrays are
numpy arrays (a fraction of torch's per-op cost at these sizes; `make bench` measures it); on an accelerator they are
device tensors and the codes never leave the device. One algorithm, written once against `_NumpyOps` / `_TorchOps`.
`summary()` reduces the window to O(rows) numbers that travel in the step's one host copy (on the CPU: after it, from
the step's codes), and `finish()` turns them into the metrics on the host (`StepMetrics.reduce`).

`make_window` picks: the dense window up to `DENSE_MAX_CODES` codes per level (where it is cheap and exact), the sparse
one above. Both give the same metric names (`CodebookWindow.names()`) and values.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from siren.metrics.codebook import CodebookWindow, DigitLayout, Layout, level_names

DENSE_MAX_CODES = 2**12  # above this many codes per level the sparse window is used
_FIX = 2.0**32  # S = Σ c·log2 c kept as an integer in units of 2^-32 bits (per-code rounding ≤ 2^-33)


def is_large(layout: Layout) -> bool:
    """Whether any stream of `layout` has more than `DENSE_MAX_CODES` codes per level."""
    return any(K > DENSE_MAX_CODES for K, _ in layout.values())


def make_window(
    layout: Layout,
    window: int,
    device: torch.device | str = "cpu",
    digits: dict[str, list[int]] | None = None,
    sparse: bool | None = None,
) -> CodebookWindow | SparseCodebookWindow:
    """The codebook window for `layout`: sparse when `sparse`, or (None) when the layout `is_large`."""
    if sparse is None:
        sparse = is_large(layout)
    cls = SparseCodebookWindow if sparse else CodebookWindow
    return cls(layout, window, device, digits=digits)


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


class SparseCodebookWindow:
    """Window of the last `window` steps' codes for every (stream, level) row of `layout`.

    A code of row r has the flat key `base[r] + code`; an invalid (masked) frame has the key `trash` (counted in an
    extra row that no metric reads). `keys(codes)` makes a step's keys on the codes' device, `push(keys)` adds them,
    `summary(ref)` reduces the window to O(rows) numbers, `finish(summary, ref, rate)` gives the metrics on the host.
    `backend`: "numpy" (host arrays) or "torch" (tensors on `device`); default numpy on a CPU device, else torch.
    """

    sparse = True

    def __init__(
        self,
        layout: Layout,
        window: int,
        device: torch.device | str = "cpu",
        digits: dict[str, list[int]] | None = None,
        backend: str | None = None,
    ):
        if window < 1:
            raise ValueError(f"train.codebook_window must be >= 1, got {window}")
        self.layout, self.window, self.device = dict(layout), window, torch.device(device)
        backend = backend or ("numpy" if self.device.type == "cpu" else "torch")
        if backend not in ("numpy", "torch"):
            raise ValueError(f"sparse codebook window backend must be 'numpy' or 'torch', got {backend!r}")
        self.xp = (_NumpyOps if backend == "numpy" else _TorchOps)(self.device)
        self.host = self.xp.host
        self.rows = [(s, lv) for s, (_, L) in self.layout.items() for lv in level_names(s, L)]
        row_k = [K for K, L in self.layout.values() for _ in range(L)]
        self._row_k = [float(k) for k in row_k]
        ends = np.cumsum(np.array(row_k, dtype=np.int64))
        base = ends - np.array(row_k, dtype=np.int64)  # (R,) first key of each row
        self.trash = int(ends[-1]) if len(row_k) else 0
        self.ends = self.xp.asarray(ends, "int64")  # row r holds keys [base[r], ends[r]); keys ≥ ends[-1] are trash
        self._key_base, r = {}, 0  # stream → (L,) first key of each level, on the device the codes come from
        for s, (_, L) in self.layout.items():
            self._key_base[s] = torch.as_tensor(base[r : r + L], device=self.device)
            r += L
        self.digits = DigitLayout(self.layout, digits or {})
        self._split = _DigitSplit(self.digits, np.append(base, self.trash), self.xp)
        self._spans, r = [], 0  # each stream's rows [a, b)
        for _, L in self.layout.values():
            self._spans.append((r, r + L))
            r += L
        self._ref_cache: tuple = (None, {})  # (the drift reference, what was derived from it; held, so no id reuse)
        self._reset()

    def _reset(self) -> None:
        xp = self.xp
        # Per key its count and a scratch mark (picks one occurrence of each key in a push), side by side: a push
        # meets each key's cache line once, not twice (random access into 2 × 4 MB at 2^20 codes is most of its cost).
        self._count_mark = xp.zeros((self.trash + 1, 2), "int32")
        self.counts, self.mark = self._count_mark[:, 0], self._count_mark[:, 1]
        self.sums = xp.zeros((3, len(self.rows) + 1), "int64")  # S, seen, N per row (+ trash)
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
    def keys(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """A step's (or micro-batch's) codes (stream → (codes (B, T, L) or (B, G), mask (B, T) or None)) → flat keys
        (n,) long on the codes' device, `trash` for masked frames. Static shapes: the mask is applied by `where`."""
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

    def push(self, keys) -> None:
        """Add one step's keys (n,) (a tensor or array) and evict the step that falls out of the window:
        O(n + evicted), never O(K). Each distinct touched key changes its count once, by its net change."""
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
        if self.digits.rows:  # FSQ digits: the entering codes' low/high digit groups counted in, the leaving out
            self.digit_counts += self._split.histogram(touched, row, sign_f)

    def nbytes(self) -> int:
        """Memory this window holds (counts, sums, digit-group bins and their fold, and the ring of step keys)."""
        arrays = [self._count_mark, self.sums, self.digit_counts, self._table, self._split.src, self._split.tgt]
        arrays += [a for a in (self._ref_cache[1].get("dense_half_q"),) if a is not None]
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
            self.push(k)

    # ----------------------------------------------------------------------------------------------------- reading
    def names(self) -> list[str]:
        out = [f"codebook/{s}/{lv}/{kind}" for kind in ("usage", "perplexity", "dead") for s, lv in self.rows]
        return out + self.digits.names()

    def _derived(self, ref, name: str, build):
        """`build()` once per drift reference (a new reference drops what was derived from the old one)."""
        if self._ref_cache[0] is not ref:
            self._ref_cache = (ref, {})
        cache = self._ref_cache[1]
        if name not in cache:
            cache[name] = build()
        return cache[name]

    def _ref(self, ref):
        """A sparse `DriftReference`'s per-code arrays (window keys, rows, q/2, g(q/2)) in this window's backend."""
        arrays = (ref.keys, "int64"), (ref.row, "int64"), (ref.half_q, "float64"), (ref.g_half_q, "float64")
        return self._derived(ref, "arrays", lambda: tuple(self.xp.asarray(a, t) for a, t in arrays))

    def summary(self, ref=None):
        """The window as O(rows) float64 numbers, in this window's backend: per row S = Σ c·log2 c, codes seen and
        N = Σ c, then (with a sparse drift reference `ref`) per row the cross term (`_cross`), then the digit bins.
        `finish` reads it."""
        xp, R = self.xp, len(self.rows)
        s = xp.cast(self.sums[:, :R], "float64")
        parts = [s[0] / _FIX, s[1], s[2]]
        if ref is not None:
            parts.append(self._cross(ref, 2.0 * xp.clamp_min(s[2], 1.0)))
        if self.digits.rows:
            parts.append(self._split.digit_bins(self.digit_counts))
        return xp.cat(parts)

    def _cross(self, ref, two_n):
        """Per row Σ_{p,q>0} [g(p/2 + q/2) − g(p/2) − g(q/2)] (g(x) = −x log2 x; a code absent from the window adds
        exactly 0), over whichever is smaller: the baseline's codes (its support), or the window's codes — then each
        occurrence adds its code's term ÷ the code's count, so each code present adds it once. So a step costs
        O(min(baseline support, codes in the window)), never O(K)."""
        xp, R = self.xp, len(self.rows)
        keys, row, half_q, g_half_q = self._ref(ref)
        if keys.shape[0] <= self._ring_n:
            half_p = xp.cast(self.counts[keys], "float64") / two_n[row]  # p/2 at the baseline's codes
            return xp.bincount(row, _g(xp, half_p + half_q) - _g(xp, half_p) - g_half_q, R)
        steps = [self.ring[(self.pos + i) % self.window] for i in range(self.window)]  # oldest first: fixed order
        occ = xp.cat([k for k in steps if k is not None])
        occ_row = xp.searchsorted(self.ends, occ, right=True)  # trash → R, dropped below
        c = xp.cast(self.counts[occ], "float64")  # ≥ 1: every code in the ring is counted
        half_q = self._dense_half_q(ref)[occ]  # 0 where the baseline never used the code
        half_p = c / xp.cat([two_n, two_n[:1]])[occ_row]
        both = (_g(xp, half_p + half_q) - _g(xp, half_p) - _g(xp, half_q)) / c
        return xp.bincount(occ_row, both, R + 1)[:R]

    def _dense_half_q(self, ref):
        """q/2 of the baseline per window key (0 where it has none; one float64 per code, built when first needed)."""

        def build():
            keys, _, half_q, _ = self._ref(ref)
            dense = self.xp.zeros(self.trash + 1, "float64")
            dense[keys] = half_q
            return dense

        return self._derived(ref, "dense_half_q", build)

    def finish(self, summary: np.ndarray, ref=None, bps_entropy: float = 0.0) -> tuple[list, list | None]:
        """Host arithmetic on a `summary` (numpy): the codebook metrics in `names()` order and, with `ref`, the drift
        metrics in `ref.names()` order (JS of each row's window histogram vs the baseline's, entropy delta, averaged
        over each stream's levels; bit/s delta). H(m) = Σ_q g(q/2) + Σ_p g(p/2) + cross, where
        Σ_p g(p/2) = (N log2 2N − S) / 2N follows from the row sums. Per row in Python floats: a handful of rows."""
        R = len(self.rows)
        head = summary[: (4 if ref is not None else 3) * R].tolist()
        S, seen, n = head[:R], head[R : 2 * R], head[2 * R : 3 * R]
        ent = [math.log2(x) - a / x if x > 0 else 0.0 for a, x in zip(S, n, strict=True)]
        book = [a / k for a, k in zip(seen, self._row_k, strict=True)]
        book += [2.0**e for e in ent] + [k - a for a, k in zip(seen, self._row_k, strict=True)]
        drift = None
        if ref is not None:
            cross = head[3 * R :]
            H, Hq = self._derived(ref, "rows", lambda: (ref.entropy.tolist(), ref.half_q_entropy.tolist()))
            js, delta = [], []
            for r in range(R):
                x = n[r]
                half_p = (x * math.log2(2 * x) - S[r]) / (2 * x) if x > 0 else 0.0
                js.append(max(Hq[r] + half_p + cross[r] - 0.5 * (ent[r] + H[r]), 0.0))
                delta.append(ent[r] - H[r])
            drift = [
                sum(v[a:b]) / (b - a) for v in (js, delta) for a, b in self._spans
            ]  # means over each stream's levels
            drift.append(bps_entropy - ref.bps_entropy)
        if self.digits.rows:  # the same reading as the dense window's
            book += self.digits.vector_host(summary[(4 if ref is not None else 3) * R :]).tolist()
        return book, drift

    def vector(self) -> np.ndarray:
        """All codebook metrics in the order of `names()` (host float64)."""
        return np.asarray(self.finish(np.asarray(self.xp.to_host(self.summary())))[0])

    def drift_vector(self, ref, bps_entropy: float) -> np.ndarray:
        """The drift metrics against a sparse `DriftReference` in the order of `ref.names()` (host float64)."""
        return np.asarray(self.finish(np.asarray(self.xp.to_host(self.summary(ref))), ref, bps_entropy)[1])


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
