"""Drift of the adapted codes against the baseline (DESIGN §7, §8), on the device.

`drift/<STREAM>/js` — Jensen–Shannon divergence (bits) of the window's code histogram vs the baseline profile's,
averaged over levels; `drift/<STREAM>/entropy_delta_bits` — entropy(window) − entropy(baseline), averaged over levels;
`drift/<STREAM>/agreement` — fraction of codes equal to the baseline's codes for the same audio; `drift/bps_delta`.
"""

from __future__ import annotations

import numpy as np
import torch

from siren.errors import LayoutMismatch
from siren.metrics.codebook import PaddedLayout, entropy_bits
from siren.metrics.large_codebook import is_large


def level_counts(hist, level: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of a profile histogram → (codes with a count, their counts float64). `hist` is dense (L × K nested
    lists) or sparse (`{"codes": [[...] per level], "counts": [[...] per level]}`, for large codebooks)."""
    if isinstance(hist, dict):
        codes = torch.tensor(hist["codes"][level], dtype=torch.long)
        counts = torch.tensor(hist["counts"][level], dtype=torch.float64)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise LayoutMismatch(f"baseline profile has codes outside [0, {K}) at level {level}")
        return codes, counts
    row = torch.tensor(hist[level], dtype=torch.float64)
    nz = torch.nonzero(row).flatten()
    return nz, row[nz]


def dense_histogram(hist, K: int, L: int) -> torch.Tensor:
    """A profile histogram (dense or sparse, see `level_counts`) as a dense (L, K) float64 tensor."""
    if not isinstance(hist, dict):
        return torch.tensor(hist, dtype=torch.float64)
    out = torch.zeros(L, K, dtype=torch.float64)
    for lvl in range(L):
        codes, counts = level_counts(hist, lvl, K)
        out[lvl].index_add_(0, codes, counts)
    return out


def js_divergence_bits(p_counts: torch.Tensor, q_counts: torch.Tensor) -> torch.Tensor:
    """JS divergence in bits between rows of two count matrices (L, K) → (L,). 0 = identical, 1 = disjoint."""
    p_counts, q_counts = p_counts.to(torch.float64), q_counts.to(torch.float64)
    p = p_counts / p_counts.sum(-1, keepdim=True).clamp_min(1)
    q = q_counts / q_counts.sum(-1, keepdim=True).clamp_min(1)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log2(a.clamp_min(1e-30)) - torch.log2(b.clamp_min(1e-30)))).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def agreement(codes: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Fraction of equal codes. codes/ref (B, T, L) or (B, L); mask (B, T) → 0-dim float64 tensor."""
    eq = (codes == ref).to(torch.float64)
    if mask is not None:
        m = mask.to(torch.float64).unsqueeze(-1).expand_as(eq)
        return (eq * m).sum() / m.sum().clamp_min(1)
    return eq.mean()


def agreement_counts(codes: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(equal, total) as a float64 (2,) tensor, so agreement can be summed across processes before dividing."""
    eq = (codes == ref).to(torch.float64)
    if mask is not None:
        m = mask.to(torch.float64).unsqueeze(-1).expand_as(eq)
        return torch.stack([(eq * m).sum(), m.sum()])
    return torch.stack([eq.sum(), torch.tensor(float(eq.numel()), dtype=torch.float64, device=eq.device)])


class DriftReference:
    """Baseline histograms (from the baseline profile) on the device, checked against the live code layout."""

    def __init__(
        self,
        profile: dict,
        layout: dict[str, tuple[int, int]],
        device: torch.device | str = "cpu",
        sparse: bool | None = None,
    ):
        prof_layout = {s: tuple(v) for s, v in profile["layout"].items()}
        want = {s: tuple(v) for s, v in layout.items()}
        if prof_layout != want:
            raise LayoutMismatch(
                f"baseline profile code layout {prof_layout} does not match this run's layout {want} "
                "(streams → (codebook size, levels)); drift would compare different codebooks"
            )
        self.layout = want
        self.bps_entropy = float(profile["bps_entropy"])
        # (S, R) averaging matrix: per-stream mean over that stream's levels.
        n_rows = sum(L for _, L in want.values())
        self.stream_mean = torch.zeros(len(want), n_rows, dtype=torch.float64)
        r = 0
        for i, (_, L) in enumerate(want.values()):
            self.stream_mean[i, r : r + L] = 1.0 / L
            r += L
        self.stream_mean = self.stream_mean.to(device)
        self.sparse = is_large(want) if sparse is None else sparse
        if self.sparse:  # the baseline's codes only: O(its support), never O(K) (`SparseCodebookWindow.summary`)
            self._build_sparse(profile["histograms"])
            return
        self.padded = PaddedLayout(want, device)
        hist = {s: dense_histogram(profile["histograms"][s], K, L) for s, (K, L) in want.items()}
        self.hist = self.padded.pad(hist).to(device)  # (R, Kmax)
        self.entropy = entropy_bits(self.hist)  # (R,)
        self.q = self.hist / self.hist.sum(-1, keepdim=True).clamp_min(1)

    def _build_sparse(self, histograms: dict) -> None:
        """Host (numpy) arrays for `SparseCodebookWindow`, which moves them to its own backend: per baseline code with
        a count its window key (row base + code), row, q/2 and g(q/2); per row the entropy H(q) and Σ g(q/2)."""
        keys, rows, qs, base, r = [], [], [], 0, 0
        for s, (K, L) in self.layout.items():
            for lvl in range(L):
                codes, counts = level_counts(histograms[s], lvl, K)
                keys.append(codes.numpy() + base)
                rows.append(np.full(codes.numel(), r, dtype=np.int64))
                qs.append((counts / counts.sum().clamp_min(1)).numpy())
                base, r = base + K, r + 1
        self.keys, self.row, q = np.concatenate(keys), np.concatenate(rows), np.concatenate(qs)
        g = lambda x: -x * np.log2(np.maximum(x, 1e-300))  # noqa: E731
        self.entropy = np.bincount(self.row, g(q), r)
        self.half_q, self.g_half_q = q / 2, g(q / 2)  # per code, constant over the run
        self.half_q_entropy = np.bincount(self.row, self.g_half_q, r)
        self.stream_mean_host = self.stream_mean.cpu().numpy()

    def names(self) -> list[str]:
        return [f"drift/{s}/{k}" for k in ("js", "entropy_delta_bits") for s in self.layout] + ["drift/bps_delta"]

    def vector(
        self,
        window_running: torch.Tensor,
        bps_entropy: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Drift metrics in the order of `names()`; `window_running` is the window's padded (R, Kmax) totals and
        `stats` its rows' (distribution, entropy) when already computed (`CodebookWindow.stats`).

        JS(p, q) = H((p + q) / 2) − (H(p) + H(q)) / 2, which reuses the entropies the codebook metrics need anyway."""
        if self.sparse:
            raise RuntimeError("a sparse DriftReference is read by SparseCodebookWindow.finish, not here")
        if stats is None:
            p = window_running / window_running.sum(-1, keepdim=True).clamp_min(1)
            stats = (p, -(p * torch.log2(p.clamp_min(1e-30))).sum(-1))
        p, ent = stats
        m = 0.5 * (p + self.q)
        h_m = -(m * torch.log2(m.clamp_min(1e-30))).sum(-1)
        js = (h_m - 0.5 * (ent + self.entropy)).clamp_min(0.0)
        return self.from_rows(js, ent - self.entropy, bps_entropy)

    def from_rows(self, js: torch.Tensor, entropy_delta: torch.Tensor, bps_entropy: torch.Tensor) -> torch.Tensor:
        """Per-row JS and entropy delta (R,) → the drift metrics in the order of `names()` (means over levels)."""
        per_row = torch.stack([js, entropy_delta])
        per_stream = per_row @ self.stream_mean.T  # (2, S): mean over each stream's levels
        bps = (bps_entropy.to(torch.float64).reshape(1) - self.bps_entropy).to(per_stream.device)
        return torch.cat([per_stream.reshape(-1), bps])

    def metrics(self, window_totals: dict[str, torch.Tensor], bps_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
        vec = self.vector(self.padded.pad(window_totals), bps_entropy)
        return dict(zip(self.names(), vec.unbind(), strict=True))
