"""Drift of the adapted codes against the baseline profile (the profile a run adapts from, `siren.metrics.profile`).

`drift/<STREAM>/js` — Jensen–Shannon divergence (bits) of the window's code histogram vs the baseline profile's,
averaged over levels; `drift/<STREAM>/entropy_delta_bits` — entropy(window) − entropy(baseline), averaged over levels;
`drift/<STREAM>/agreement` — fraction of codes equal to the baseline's codes for the same audio; `drift/bps_delta`.
The window metrics (js, entropy delta, bps delta) are computed by the codebook window
(`siren.metrics.codebook.CodebookWindow`) from a `DriftReference`.
"""

from __future__ import annotations

import numpy as np
import torch

from siren.errors import LayoutMismatch


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
    if row.numel() != K:
        raise LayoutMismatch(f"baseline profile has {row.numel()} codes at level {level}, not {K}")
    nz = torch.nonzero(row).flatten()
    return nz, row[nz]


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
    """A baseline profile's code histograms, checked against the live code layout, as the codebook window reads them:
    the baseline's support only (O(codes it used), never O(K), whatever the size of the codebook), per code with a
    count its row (stream-major, level order), its code, and q (its share of the row's counts), and per row the entropy
    H(q) and Σ g(q/2) (g(x) = −x log2 x). Host numpy arrays; each storage of the window derives what it reads from them
    once, on its own device (`device` is accepted for the callers' sake; nothing is placed on it here)."""

    def __init__(self, profile: dict, layout: dict[str, tuple[int, int]], device: torch.device | str = "cpu"):
        prof_layout = {s: tuple(v) for s, v in profile["layout"].items()}
        want = {s: tuple(v) for s, v in layout.items()}
        if prof_layout != want:
            raise LayoutMismatch(
                f"baseline profile code layout {prof_layout} does not match this run's layout {want} "
                "(streams → (codebook size, levels)); drift would compare different codebooks"
            )
        self.layout = want
        self.bps_entropy = float(profile["bps_entropy"])
        codes, rows, qs, r = [], [], [], 0
        for s, (K, L) in want.items():
            for lvl in range(L):
                c, counts = level_counts(profile["histograms"][s], lvl, K)
                codes.append(c.numpy())
                rows.append(np.full(c.numel(), r, dtype=np.int64))
                qs.append((counts / counts.sum().clamp_min(1)).numpy())
                r += 1
        self.code, self.row, self.q = np.concatenate(codes), np.concatenate(rows), np.concatenate(qs)
        g = lambda x: -x * np.log2(np.maximum(x, 1e-300))  # noqa: E731
        self.entropy = np.bincount(self.row, g(self.q), r)  # (R,) H(q) in bits
        self.g_half_q = g(self.q / 2)  # per code, constant over the run
        self.half_q_entropy = np.bincount(self.row, self.g_half_q, r)

    def names(self) -> list[str]:
        return [f"drift/{s}/{k}" for k in ("js", "entropy_delta_bits") for s in self.layout] + ["drift/bps_delta"]
