"""Codebook metrics for large implicit codebooks (FSQ with many dimensions: 2^16–2^20 codes per level), DESIGN §7/§18.

The dense `CodebookWindow` keeps a (window, rows, K) float64 ring of histograms: 50 steps × 2^20 codes is 400 MB per
level, and every step touches all K entries. `SparseCodebookWindow` keeps the window's *codes* instead — a
(window, rows, capacity) ring of code indices, −1 where a frame is invalid — so memory is window × codes per step,
independent of K. Every step sorts each row's window once (static shapes: no host sync, no `unique`), and reads
usage, perplexity, dead codes and the JS drift against a baseline from the sorted runs. The metric names and their
order are exactly `CodebookWindow.names()` (the DESIGN §7 keys) plus, for FSQ, per-dimension digit usage
(`codebook/<S>/<L>/digit<i>/usage`: fraction of that dimension's levels seen in the window).
"""

from __future__ import annotations

import torch

from siren.metrics.codebook import Layout, level_names


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return x * torch.log2(x.clamp_min(1e-300))


class SparseCodebookWindow:
    """Window of the last `window` steps' codes for every (stream, level) row of `layout`, on `device`.

    `push(rows)`: rows (R, N) long, −1 for invalid entries (R = rows of the layout in order). `capacity` grows when a
    step brings more codes than the ring holds (rare: batch shapes are fixed in training).
    """

    def __init__(
        self,
        layout: Layout,
        window: int,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        digits: dict[str, list[int]] | None = None,
    ):
        if window < 1:
            raise ValueError(f"train.codebook_window must be >= 1, got {window}")
        self.layout, self.window, self.device = dict(layout), window, torch.device(device)
        self.rows = [(s, lv) for s, (_, L) in self.layout.items() for lv in level_names(s, L)]
        self.row_k = torch.tensor(
            [K for _, (K, L) in self.layout.items() for _ in range(L)], dtype=torch.float64, device=self.device
        )
        self.ring = torch.full((window, len(self.rows), capacity), -1, dtype=torch.long, device=self.device)
        self.pos = 0
        self.digits = {s: list(v) for s, v in (digits or {}).items()}  # stream → FSQ levels per dimension
        self._ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------- filling
    def push(self, rows: torch.Tensor) -> None:
        if rows.shape[0] != len(self.rows):
            raise ValueError(f"expected ({len(self.rows)}, N) codes, got {tuple(rows.shape)}")
        n = rows.shape[1]
        if n > self.ring.shape[2]:
            grown = torch.full((self.window, len(self.rows), n), -1, dtype=torch.long, device=self.device)
            grown[..., : self.ring.shape[2]] = self.ring
            self.ring = grown
        slot = self.ring[self.pos % self.window]
        slot.fill_(-1)
        slot[:, :n] = rows.to(self.device)
        self.pos += 1

    @staticmethod
    def rows_from_codes(layout: Layout, codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """A step's codes (stream → (codes (B, T, L) or (B, G), mask)) → (R, N) rows with −1 for masked frames."""
        out = []
        n = max(c.shape[0] * (c.shape[1] if c.dim() == 3 else 1) for c, _ in codes.values())
        for s, (_, L) in layout.items():
            c, mask = codes[s]
            c = c.detach()
            if c.dim() == 2:
                c = c.unsqueeze(1)
            if mask is not None:
                c = torch.where(mask.bool()[..., None], c, torch.full_like(c, -1))
            flat = c.reshape(-1, L).T  # (L, B·T)
            out.append(torch.nn.functional.pad(flat, (0, n - flat.shape[1]), value=-1))
        return torch.cat(out)

    # ----------------------------------------------------------------------------------------------------- reading
    def _runs(self):
        """Sorted window per row → (sorted codes, first-of-run mask, count of each run at its first position, n)."""
        flat = self.ring.permute(1, 0, 2).reshape(len(self.rows), -1)
        s, _ = torch.sort(flat, dim=1)
        valid = s >= 0
        first = valid.clone()
        first[:, 1:] &= s[:, 1:] != s[:, :-1]
        seg = (torch.cumsum(first.to(torch.long), 1) - 1).clamp_min(0)
        counts = torch.zeros_like(s, dtype=torch.float64).scatter_add_(1, seg, valid.to(torch.float64))
        c_first = counts.gather(1, seg) * first
        return s, first, c_first, valid.sum(1).to(torch.float64)

    def names(self) -> list[str]:
        out = [f"codebook/{s}/{lv}/{kind}" for kind in ("usage", "perplexity", "dead") for s, lv in self.rows]
        for s, lv in self.rows:
            out += [f"codebook/{s}/{lv}/digit{i}/usage" for i in range(len(self.digits.get(s, [])))]
        return out

    def vector(self) -> torch.Tensor:
        """All metrics in the order of `names()`, as one float64 vector on the device."""
        s, first, c, n = self._runs()
        self._last = (s, first, c, n)
        seen = first.sum(1).to(torch.float64)
        ent = torch.log2(n.clamp_min(1)) - _xlogx(c).sum(1) / n.clamp_min(1)
        ent = torch.where(n > 0, ent, torch.zeros_like(ent))
        parts = [seen / self.row_k, torch.exp2(ent), self.row_k - seen]
        r = 0
        for st, (_, L) in self.layout.items():
            levels = self.digits.get(st)
            if levels:
                for i in range(r, r + L):
                    parts.append(self._digit_usage(s[i], first[i], levels))
            r += L
        return torch.cat(parts)

    def _digit_usage(self, codes: torch.Tensor, first: torch.Tensor, levels: list[int]) -> torch.Tensor:
        """Fraction of each FSQ dimension's levels seen among the window's codes → (d,)."""
        lv = torch.tensor(levels, device=codes.device)
        basis = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0)
        digits = (codes.clamp_min(0)[:, None] // basis) % lv  # (M, d)
        lmax = int(max(levels))
        hit = torch.zeros(len(levels), lmax, device=codes.device, dtype=torch.float64)
        hit.scatter_add_(1, digits.T, first.to(torch.float64)[None].expand(len(levels), -1))
        return (hit > 0).sum(1).to(torch.float64) / lv.to(torch.float64)

    # ----------------------------------------------------------------------------------------------------- drift
    def set_reference(self, histograms: dict[str, list[dict[int, float]] | torch.Tensor]) -> None:
        """Baseline code counts per stream: a dense (L, K) tensor or, for large K, per level a {code: count} dict.
        Stored sparse: per row the sorted codes, their probabilities, and Σ g(q/2) over the support."""
        idx_rows, p_rows = [], []
        for s, (_, L) in self.layout.items():
            h = histograms[s]
            for lvl in range(L):
                if isinstance(h, torch.Tensor):
                    row = h[lvl].to(torch.float64)
                    nz = torch.nonzero(row).flatten()
                    idx, cnt = nz, row[nz]
                else:
                    items = sorted((int(k), float(v)) for k, v in h[lvl].items() if v > 0)
                    idx = torch.tensor([k for k, _ in items], dtype=torch.long)
                    cnt = torch.tensor([v for _, v in items], dtype=torch.float64)
                idx_rows.append(idx)
                p_rows.append(cnt / cnt.sum().clamp_min(1))
        m = max(1, max(len(i) for i in idx_rows))
        big = torch.iinfo(torch.long).max
        qi = torch.full((len(idx_rows), m), big, dtype=torch.long)
        qp = torch.zeros(len(idx_rows), m, dtype=torch.float64)
        for r, (i, p) in enumerate(zip(idx_rows, p_rows, strict=True)):
            qi[r, : len(i)], qp[r, : len(i)] = i.to(torch.long), p
        q_ent = -_xlogx(qp).sum(1)
        c_q = -_xlogx(qp / 2).sum(1)
        self._ref = (qi.to(self.device), qp.to(self.device), torch.stack([q_ent, c_q]).to(self.device))

    def drift_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: JS divergence (bits) of the window vs the reference, and entropy(window) − entropy(reference).
        Uses the sorted runs of the last `vector()` call. H(m) = Σ_{q>0} g(q/2) + Σ_{p>0} [g(p/2 + q/2) − g(q/2)]."""
        if self._ref is None:
            raise RuntimeError("SparseCodebookWindow.drift_rows before set_reference")
        s, first, c, n = self._last
        qi, qp, (q_ent, c_q) = self._ref
        pos = torch.searchsorted(qi, s.contiguous()).clamp_max(qi.shape[1] - 1)
        q_at = torch.where(qi.gather(1, pos) == s, qp.gather(1, pos), torch.zeros_like(c)) * first
        p = c / n.clamp_min(1)[:, None]
        g = lambda x: -_xlogx(x)  # noqa: E731
        h_m = c_q + (first * (g(p / 2 + q_at / 2) - g(q_at / 2))).sum(1)
        ent = torch.where(n > 0, torch.log2(n.clamp_min(1)) - _xlogx(c).sum(1) / n.clamp_min(1), torch.zeros_like(n))
        js = (h_m - 0.5 * (ent + q_ent)).clamp_min(0.0)
        return js, ent - q_ent
