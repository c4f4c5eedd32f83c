"""Large implicit codebooks (DESIGN §7, §18): the sparse window gives the dense window's metrics exactly, JS drift
equal to the dense reference, per-dimension FSQ digit usage, and memory that does not grow with the codebook."""

from __future__ import annotations

import math

import torch

from siren.metrics.codebook import CodebookWindow, stream_histograms
from siren.metrics.drift import DriftReference
from siren.metrics.large_codebook import SparseCodebookWindow

LAYOUT = {"sem": (81, 2), "pro": (27, 1), "spk": (16, 4)}


def _step(g: torch.Generator):
    sem = torch.randint(0, 81, (3, 10, 2), generator=g) % (5 + int(torch.randint(0, 70, (1,), generator=g)))
    pro = torch.randint(0, 27, (3, 3, 1), generator=g)
    mask_s = torch.rand(3, 10, generator=g) > 0.2
    spk = torch.randint(0, 16, (3, 4), generator=g)
    return {"sem": (sem, mask_s), "pro": (pro, None), "spk": (spk, None)}


def test_sparse_window_equals_dense_window_and_drift_through_evictions():
    g = torch.Generator().manual_seed(0)
    dense = CodebookWindow(LAYOUT, window=4)
    sparse = SparseCodebookWindow(LAYOUT, window=4, capacity=8)  # grows on the first push
    ref_counts = {s: torch.randint(0, 5, (L, K), generator=g).to(torch.float64) for s, (K, L) in LAYOUT.items()}
    profile = {
        "layout": {s: list(v) for s, v in LAYOUT.items()},
        "histograms": {s: h.tolist() for s, h in ref_counts.items()},
        "bps_entropy": 0.0,
    }
    drift = DriftReference(profile, LAYOUT)
    sparse.set_reference(ref_counts)
    for _ in range(7):  # more steps than the window: evictions happen
        codes = _step(g)
        dense.push_flat(stream_histograms(LAYOUT, codes))
        sparse.push(SparseCodebookWindow.rows_from_codes(LAYOUT, codes))
        dv, sv = dense.vector(), sparse.vector()
        assert dense.names() == sparse.names()
        assert torch.allclose(dv, sv, atol=1e-9), (dv - sv).abs().max()
        js, dent = sparse.drift_rows()
        want = drift.vector(dense.running, torch.zeros(()), dense.stats)
        # DriftReference averages rows per stream: do the same with the sparse rows.
        per_stream = torch.stack([js, dent]) @ drift.padded.stream_mean.T
        assert torch.allclose(per_stream.reshape(-1), want[:-1], atol=1e-9)


def test_fsq_digit_usage_counts_the_levels_seen_per_dimension():
    levels = [5, 4, 3]
    K = math.prod(levels)
    w = SparseCodebookWindow({"sem": (K, 1)}, window=2, digits={"sem": levels})
    # codes whose digits (d0 + 5·d1 + 20·d2) cover d0 ∈ {0, 4}, d1 ∈ {1}, d2 ∈ {0, 1, 2}
    codes = torch.tensor([[0 + 5 * 1 + 20 * 0, 4 + 5 * 1 + 20 * 1, 0 + 5 * 1 + 20 * 2, -1]])
    w.push(codes)
    vec = dict(zip(w.names(), w.vector().tolist(), strict=True))
    assert vec["codebook/sem/l0/digit0/usage"] == 2 / 5
    assert vec["codebook/sem/l0/digit1/usage"] == 1 / 4
    assert vec["codebook/sem/l0/digit2/usage"] == 3 / 3
    assert vec["codebook/sem/l0/usage"] == 3 / K and vec["codebook/sem/l0/dead"] == K - 3


def test_sparse_window_memory_does_not_grow_with_the_codebook():
    small = SparseCodebookWindow({"sem": (2**8, 1)}, window=50, capacity=800)
    huge = SparseCodebookWindow({"sem": (2**20, 1)}, window=50, capacity=800)
    assert small.ring.numel() == huge.ring.numel() == 50 * 800
    huge.push(torch.randint(0, 2**20, (1, 800)))
    vec = dict(zip(huge.names(), huge.vector().tolist(), strict=True))
    assert 0 < vec["codebook/sem/l0/usage"] <= 800 / 2**20
