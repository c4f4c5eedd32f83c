"""Codebook metrics for large implicit codebooks (FSQ with many dimensions: 2^16–2^20 codes per level), DESIGN §7/§18.

The dense `CodebookWindow` keeps a (window, rows, K) float64 ring of histograms: 50 steps × 2^20 codes is 400 MB per
level, and every step reads all K entries. `SparseCodebookWindow` keeps instead
- the window's codes, one flat key tensor per step (memory: window × codes per step), and
- one int32 count per code of the window (4 MB per 2^20-code level, never window × K), updated only at the codes that
  enter or leave the window, and per row exact integer sums: codes seen, N = Σ c and S = Σ c·log2 c in fixed point.
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
        self._row_digit = self.digits.row_table(len(self.rows))  # (R + 1,) digit-row index per row, −1 where none
        self._code_base = torch.cat([self.base, self.base.new_full((1,), self.trash)])  # key − this = code
        self._reset()

    def _reset(self) -> None:
        self.counts = torch.zeros(self.trash + 1, dtype=torch.int32, device=self.device)
        self.sums = torch.zeros(len(self.rows) + 1, 3, dtype=torch.long, device=self.device)  # per row: S, seen, N
        self.digit_counts = torch.zeros(self.digits.flat_size + 1, dtype=torch.long, device=self.device)
        self.ring: list[torch.Tensor | None] = [None] * self.window
        self.pos = 0

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
        old = self.ring[self.pos % self.window]
        n_old = 0 if old is None else old.numel()
        # N·log2 N · 2^32 must fit in int64: N ≤ window × the largest step.
        most = self.window * max(keys.numel(), n_old, 2)
        if most * math.log2(most) * _FIX >= 2**62:
            raise ValueError(
                f"codebook window of {self.window} steps × {keys.numel()} codes per step is too large for exact sums; "
                "lower train.codebook_window"
            )
        touched = keys if old is None else torch.cat([keys, old])
        sign = torch.ones_like(touched)
        sign[keys.numel() :] = -1
        before = self.counts[touched]
        self.counts.index_add_(0, touched, sign.to(torch.int32))
        after = self.counts[touched]
        # Every key once: sort, then the first of each run carries the change of its count.
        srt, order = torch.sort(touched)
        first = torch.ones_like(srt, dtype=torch.bool)
        first[1:] = srt[1:] != srt[:-1]
        b, a = before[order], after[order]
        d_s = (_fixed_xlogx(a) - _fixed_xlogx(b)) * first
        d_seen = ((a > 0).to(torch.long) - (b > 0).to(torch.long)) * first
        row = torch.searchsorted(self.ends, srt, right=True)  # trash → R
        self.sums.index_add_(0, row, torch.stack([d_s, d_seen, sign[order]], 1))
        if self.digits.rows:
            self._push_digits(srt, row, sign[order])
        self.ring[self.pos % self.window] = keys
        self.pos += 1

    def _push_digits(self, keys: torch.Tensor, row: torch.Tensor, sign: torch.Tensor) -> None:
        """Per-dimension digit counts of FSQ rows: (rows, dims, levels) bins, +1 / −1 per entering / leaving code."""
        d = self._row_digit[row]  # (n,) digit row or −1
        code = keys - self._code_base[row]
        idx = self.digits.flat_index(d.clamp_min(0), code)  # (n, dmax)
        idx = torch.where((d >= 0)[:, None], idx, torch.full_like(idx, self.digits.flat_size))
        self.digit_counts.index_add_(0, idx.reshape(-1), sign[:, None].expand_as(idx).reshape(-1))

    def nbytes(self) -> int:
        """Memory this window holds (counts, sums, digit bins and the ring of step keys)."""
        ring = sum(t.numel() * t.element_size() for t in self.ring if t is not None)
        own = (self.counts, self.sums, self.digit_counts)
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

    def _entropy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row S = Σ c·log2 c and N = Σ c as float64, and the entropy in bits of the window's histogram."""
        s = self.sums[:-1].to(torch.float64)
        S, n = s[:, 0] / _FIX, s[:, 2]
        ent = torch.where(n > 0, torch.log2(n.clamp_min(1)) - S / n.clamp_min(1), torch.zeros_like(n))
        return S, n, ent

    def vector(self) -> torch.Tensor:
        """All metrics in the order of `names()`, as one float64 vector on the device: O(rows), not O(K)."""
        _, _, ent = self._entropy()
        seen = self.sums[:-1, 1].to(torch.float64)
        out = torch.cat([seen / self.row_k, torch.exp2(ent), self.row_k - seen])
        if self.digits.rows:
            out = torch.cat([out, self.digits.vector(self.digit_counts[:-1].to(torch.float64))])
        return out

    def drift_rows(self, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: JS divergence (bits) of the window vs `ref` (a sparse `DriftReference`) and entropy(window) −
        entropy(baseline). O(baseline support), never O(K):
        H(m) = Σ_q g(q/2) + Σ_p g(p/2) + Σ_{p,q>0} [g(p/2 + q/2) − g(p/2) − g(q/2)], g(x) = −x log2 x, where
        Σ_p g(p/2) = (N log2 2N − S) / 2N follows from the row sums, and the last sum runs over the baseline's codes."""
        S, n, ent = self._entropy()
        c = self.counts[ref.keys].to(torch.float64)
        nr = n[ref.row].clamp_min(1)
        p, q = c / nr, ref.q
        both = _g(p / 2 + q / 2) - _g(p / 2) - _g(q / 2)
        cross = torch.zeros_like(n).index_add_(0, ref.row, both)
        n1 = n.clamp_min(1)
        half_p = torch.where(n > 0, (n1 * torch.log2(2 * n1) - S) / (2 * n1), torch.zeros_like(n))
        h_m = ref.half_q_entropy + half_p + cross
        js = (h_m - 0.5 * (ent + ref.entropy)).clamp_min(0.0)
        return js, ent - ref.entropy


def _g(x: torch.Tensor) -> torch.Tensor:
    return -x * torch.log2(x.clamp_min(1e-300))
