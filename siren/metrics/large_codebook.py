"""Codebook metrics for large implicit codebooks (FSQ with many dimensions: 2^16–2^20 codes per level), DESIGN §7/§18.

The dense `CodebookWindow` keeps a (window, rows, K) float64 ring of histograms: 50 steps × 2^20 codes is 400 MB per
level, and every step reads all K entries. `SparseCodebookWindow` keeps instead
- the window's codes, one flat key tensor per step (memory: window × codes per step), and
- one int32 count per code (4 MB per 2^20-code level, never window × K) and one int32 scratch mark per code (to count
  each touched code once without sorting), updated only at the codes that enter or leave the window, and per row exact
  integer sums: codes seen, N = Σ c and S = Σ c·log2 c in fixed point (c·log2 c from a lookup table over counts).
So a step costs O(codes in the step + codes evicted), never O(K): usage = seen / K, dead = K − seen, entropy =
log2 N − S / N. The sums are integers, so the metrics depend only on the window's counts — not on the order of codes,
on how a step was split into micro-batches or ranks, or on a resume. All shapes are static: no host sync.

`make_window` picks: the dense window up to `DENSE_MAX_CODES` codes per level (where it is cheap and exact), the sparse
one above. Both give the same metric names (`CodebookWindow.names()`) and values.
"""

from __future__ import annotations

import math

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


def _fixed_xlogx(c: torch.Tensor) -> torch.Tensor:
    """round(c · log2 c · 2^32) as int64 for integer counts c ≥ 0 (0 for c ∈ {0, 1})."""
    x = c.to(torch.float64)
    return torch.round(x * torch.log2(x.clamp_min(1.0)) * _FIX).to(torch.long)


class SparseCodebookWindow:
    """Window of the last `window` steps' codes for every (stream, level) row of `layout`, on `device`.

    A code of row r has the flat key `base[r] + code`; an invalid (masked) frame has the key `trash` (counted in an
    extra row that no metric reads). `keys(codes)` makes a step's keys, `push(keys)` adds them.
    """

    sparse = True

    def __init__(
        self,
        layout: Layout,
        window: int,
        device: torch.device | str = "cpu",
        digits: dict[str, list[int]] | None = None,
    ):
        if window < 1:
            raise ValueError(f"train.codebook_window must be >= 1, got {window}")
        self.layout, self.window, self.device = dict(layout), window, torch.device(device)
        self.rows = [(s, lv) for s, (_, L) in self.layout.items() for lv in level_names(s, L)]
        row_k = [K for K, L in self.layout.values() for _ in range(L)]
        self.row_k = torch.tensor(row_k, dtype=torch.float64, device=self.device)
        ends = torch.tensor(row_k, dtype=torch.long, device=self.device).cumsum(0)
        self.base = ends - self.row_k.to(torch.long)  # (R,) first key of each row
        self.ends = ends
        self.trash = int(ends[-1]) if len(row_k) else 0
        self._stream_base = {}
        r = 0
        for s, (_, L) in self.layout.items():
            self._stream_base[s] = self.base[r : r + L]
            r += L
        self.digits = DigitLayout(self.layout, digits or {}, self.device)
        # Per row (+ the trash row): its FSQ digit levels, bases and first bin, as one gather per step; rows without
        # digits (and trash) point at an extra bin row that no metric reads.
        self._digit_tab = self.digits.row_tables(torch.cat([self.base, self.base.new_full((1,), self.trash)]))
        self._reset()

    def _reset(self) -> None:
        self.counts = torch.zeros(self.trash + 1, dtype=torch.int32, device=self.device)
        self.mark = torch.zeros(self.trash + 1, dtype=torch.int32, device=self.device)  # scratch: dedupe per push
        self.sums = torch.zeros(len(self.rows) + 1, 3, dtype=torch.long, device=self.device)  # per row: S, seen, N
        bins = self.digits.flat_size + self.digits.dmax * self.digits.lmax  # + the bins of rows without digits
        self.digit_counts = torch.zeros(bins, dtype=torch.long, device=self.device)
        self.ring: list[torch.Tensor | None] = [None] * self.window
        self.pos = 0
        self._table = torch.zeros(1, 2, dtype=torch.long, device=self.device)  # count c → (fixed c·log2 c, c > 0)
        self._signs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _count_table(self, most: int) -> torch.Tensor:
        """Lookup table c → (round(c·log2 c · 2^32), c > 0) for every count a window can hold (c ≤ `most`)."""
        if most >= self._table.shape[0]:
            if most * math.log2(max(most, 2)) * _FIX >= 2**62:  # Σ c·log2 c ≤ N·log2 N must fit in int64
                raise ValueError(
                    f"a codebook window of {self.window} steps × up to {most // self.window} codes per step is too "
                    "large for its exact sums; lower train.codebook_window"
                )
            c = torch.arange(2 * most + 1, dtype=torch.float64, device=self.device)  # headroom: grows rarely
            fx = torch.round(c * torch.log2(c.clamp_min(1.0)) * _FIX).to(torch.long)
            self._table = torch.stack([fx, (c > 0).to(torch.long)], 1)
        return self._table

    def _sign(self, n_new: int, n_old: int) -> tuple[torch.Tensor, ...]:
        """+1 for the n_new entering keys, −1 for the n_old leaving ones (int32 for the counts, int64 for the sums, and
        repeated per digit for the digit bins), and occurrence ids 0…m−1 (int32); cached per shape."""
        key = (n_new, n_old)
        if key not in self._signs:
            s = torch.ones(n_new + n_old, dtype=torch.long, device=self.device)
            s[n_new:] = -1
            ids = torch.arange(n_new + n_old, dtype=torch.int32, device=self.device)
            self._signs[key] = (s.to(torch.int32), s, ids, s.repeat_interleave(self.digits.dmax))
        return self._signs[key]

    # ------------------------------------------------------------------------------------------------------- filling
    def keys(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """A step's (or micro-batch's) codes (stream → (codes (B, T, L) or (B, G), mask (B, T) or None)) → flat keys
        (n,) long, `trash` for masked frames. Static shapes: the mask is applied by `where`, not by indexing."""
        out = []
        for s in self.layout:
            c, mask = codes[s]
            c = c.detach()
            if c.dim() == 2:
                c = c.unsqueeze(1)
            k = c + self._stream_base[s].to(c.device)
            if mask is not None:
                k = torch.where(mask.bool()[..., None], k, torch.full_like(k, self.trash))
            out.append(k.reshape(-1))
        return torch.cat(out).to(self.device)

    def push(self, keys: torch.Tensor) -> None:
        """Add one step's keys (n,) and evict the step that falls out of the window: O(n + evicted), never O(K)."""
        keys = keys.to(self.device, torch.long).reshape(-1)
        slot = self.pos % self.window
        old = self.ring[slot]
        self.ring[slot] = keys
        self.pos += 1
        self._stats = None
        n_old = 0 if old is None else old.numel()
        table = self._count_table(self.window * max(t.numel() for t in self.ring if t is not None))
        touched = keys if old is None else torch.cat([keys, old])
        sign32, sign, ids, sign_digits = self._sign(keys.numel(), n_old)
        # Each key's change is counted once: at the occurrence whose id a scatter left in `mark` (any one of them).
        self.mark.scatter_(0, touched, ids)
        first = self.mark.index_select(0, touched) == ids
        before = self.counts.index_select(0, touched)
        self.counts.index_add_(0, touched, sign32)
        after = self.counts.index_select(0, touched)
        d = (table.index_select(0, after) - table.index_select(0, before)) * first[
            :, None
        ]  # (m, 2): change of fixed c·log2 c and of "seen"
        row = torch.searchsorted(self.ends, touched, right=True)  # trash → R
        self.sums.index_add_(0, row, torch.cat([d, sign[:, None]], 1))
        if self.digits.rows:  # per-dimension digit bins, +1 / −1 per entering / leaving code
            self.digit_counts.index_add_(0, self._digit_bins(touched, row), sign_digits)

    def _digit_bins(self, keys: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Bins (m·dmax,) of the FSQ digits of keys (m,) in rows (m,). With F_j = ⌊code / basis_j⌋ (basis_dmax = K),
        digit_j = F_j − levels_j · F_(j+1); float64 is exact here and far faster than int64 division, and the
        +0.5 keeps every quotient ≥ 2^-21 away from an integer, so rounding of 1/basis never flips a floor."""
        d = self.digits.dmax
        tab = self._digit_tab.index_select(0, row)  # (m, 1 + (d + 1) + d + d): base, 1/basis_0..d, levels, first bins
        code = keys.to(torch.float64) - tab[:, 0] + 0.5
        F = torch.floor(code[:, None] * tab[:, 1 : d + 2])
        digit = F[:, :d] - tab[:, d + 2 : 2 * d + 2] * F[:, 1:]
        return (tab[:, 2 * d + 2 :] + digit).to(torch.long).reshape(-1)

    def nbytes(self) -> int:
        """Memory this window holds (counts, sums, digit bins and the ring of step keys)."""
        ring = sum(t.numel() * t.element_size() for t in self.ring if t is not None)
        own = (self.counts, self.mark, self.sums, self.digit_counts, self._table)
        return ring + sum(t.numel() * t.element_size() for t in own)

    def state(self) -> dict:
        """The ring of step keys, oldest first, and the step count: everything else is rebuilt from it."""
        steps = [self.ring[(self.pos + i) % self.window] for i in range(self.window)]
        return {"sparse_keys": [t.clone() for t in steps if t is not None], "pos": self.pos}

    def load_state(self, state: dict) -> None:
        """Restore a saved window (resume): the counts and sums are rebuilt exactly (integers) from the keys."""
        if "sparse_keys" not in state:
            raise ValueError("codebook window state is a dense window's; this run's codebooks need the sparse window")
        self._reset()
        steps = state["sparse_keys"]
        self.pos = int(state["pos"]) - len(steps)
        for k in steps:
            self.push(k.to(self.device))

    # ----------------------------------------------------------------------------------------------------- reading
    def names(self) -> list[str]:
        out = [f"codebook/{s}/{lv}/{kind}" for kind in ("usage", "perplexity", "dead") for s, lv in self.rows]
        return out + self.digits.names()

    def _entropy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row S = Σ c·log2 c, N = Σ c and codes seen as float64, and the entropy in bits of the window's
        histogram (kept until the next push, for the drift of the same step)."""
        if self._stats is None:
            s = self.sums[:-1].to(torch.float64)
            S, seen, n = s[:, 0] / _FIX, s[:, 1], s[:, 2]
            n1 = n.clamp_min(1)
            ent = torch.where(n > 0, torch.log2(n1) - S / n1, torch.zeros_like(n))
            self._stats = (S, n, seen, ent)
        return self._stats

    def vector(self) -> torch.Tensor:
        """All metrics in the order of `names()`, as one float64 vector on the device: O(rows), not O(K)."""
        _, _, seen, ent = self._entropy()
        out = torch.cat([seen / self.row_k, torch.exp2(ent), self.row_k - seen])
        if self.digits.rows:
            out = torch.cat([out, self.digits.vector(self.digit_counts[: self.digits.flat_size].to(torch.float64))])
        return out

    def drift_rows(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: JS divergence (bits) of the window vs `ref` (a sparse `DriftReference`) and entropy(window) −
        entropy(baseline). O(baseline support), never O(K):
        H(m) = Σ_q g(q/2) + Σ_p g(p/2) + Σ_{p,q>0} [g(p/2 + q/2) − g(p/2) − g(q/2)], g(x) = −x log2 x, where
        Σ_p g(p/2) = (N log2 2N − S) / 2N follows from the row sums, and the last sum runs over the baseline's codes."""
        S, n, _, ent = self._entropy()
        n1 = n.clamp_min(1)
        half_p = self.counts.index_select(0, ref.keys) / (2 * n1).index_select(0, ref.row)  # p/2 at baseline codes
        both = _g(half_p + ref.half_q) - _g(half_p) - ref.g_half_q
        cross = torch.zeros_like(n).index_add_(0, ref.row, both)
        half_p = torch.where(n > 0, (n1 * torch.log2(2 * n1) - S) / (2 * n1), torch.zeros_like(n))
        h_m = ref.half_q_entropy + half_p + cross
        js = (h_m - 0.5 * (ent + ref.entropy)).clamp_min(0.0)
        return js, ent - ref.entropy


def _g(x: torch.Tensor) -> torch.Tensor:
    return -x * torch.log2(x.clamp_min(1e-300))
