"""Codebook window and drift metrics: invariants against brute-force computations."""

from __future__ import annotations

import math

import pytest
import torch

from siren.errors import LayoutMismatch
from siren.metrics.codebook import CodebookWindow, entropy_bits, histogram
from siren.metrics.drift import DriftReference, agreement_counts, js_divergence_bits


def test_histogram_counts_only_valid_frames():
    codes = torch.tensor([[[0], [1], [1], [2]]])  # (B=1, T=4, L=1)
    mask = torch.tensor([[True, True, True, False]])
    h = histogram(codes, mask, 3)
    assert h.tolist() == [[1.0, 2.0, 0.0]]


def test_window_running_totals_equal_brute_force_and_survive_reload():
    g = torch.Generator().manual_seed(0)
    layout = {"sem": (9, 2), "spk": (4, 3)}
    w = CodebookWindow(layout, window=3)
    history = []
    for _ in range(7):
        counts = {s: torch.randint(0, 5, (L, K), generator=g).to(torch.float64) for s, (K, L) in layout.items()}
        history.append(counts)
        w.push(counts)
        for s in layout:
            brute = sum(c[s] for c in history[-3:])
            assert torch.equal(w.totals()[s], brute)
    metrics = w.metrics()
    K = 9
    seen = (w.totals()["sem"][0] > 0).sum().item()
    assert metrics["codebook/sem/l0/usage"].item() == seen / K
    assert metrics["codebook/sem/l0/dead"].item() == K - seen
    p = w.totals()["sem"][0] / w.totals()["sem"][0].sum()
    ppl = math.exp(-sum(x * math.log(x) for x in p.tolist() if x > 0))
    assert metrics["codebook/sem/l0/perplexity"].item() == pytest.approx(ppl)
    assert set(metrics) >= {"codebook/spk/g2/usage", "codebook/sem/l1/dead"}
    w2 = CodebookWindow(layout, window=3)
    w2.load(w.buffers, w.pos)
    assert all(torch.equal(w2.totals()[s], w.totals()[s]) for s in layout)


def test_js_and_entropy_bounds():
    a = torch.tensor([[5.0, 5.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 3.0, 3.0]])
    assert js_divergence_bits(a, a).item() == pytest.approx(0.0, abs=1e-12)
    assert js_divergence_bits(a, b).item() == pytest.approx(1.0)
    assert entropy_bits(a).item() == pytest.approx(1.0)


def test_agreement_counts():
    codes = torch.tensor([[[1], [2], [3]]])
    ref = torch.tensor([[[1], [0], [3]]])
    eq, tot = agreement_counts(codes, ref, torch.tensor([[True, True, False]]))
    assert (eq.item(), tot.item()) == (1.0, 2.0)


def test_drift_reference_rejects_other_layout():
    profile = {"layout": {"sem": [81, 1]}, "histograms": {"sem": [[1.0] * 81]}, "bps_entropy": 100.0}
    with pytest.raises(LayoutMismatch, match="layout"):
        DriftReference(profile, {"sem": (81, 2)})
    ref = DriftReference(profile, {"sem": (81, 1)})
    m = ref.metrics({"sem": torch.tensor([[1.0] * 81])}, torch.tensor(90.0))
    assert m["drift/sem/js"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["drift/bps_delta"].item() == pytest.approx(-10.0)


def test_stream_histograms_equal_per_stream_histograms():
    from siren.metrics.codebook import stream_histograms

    g = torch.Generator().manual_seed(1)
    layout = {"sem": (81, 2), "pro": (81, 1), "spk": (16, 4)}
    codes = {
        "sem": (torch.randint(0, 81, (3, 10, 2), generator=g), torch.rand(3, 10, generator=g) > 0.3),
        "pro": (torch.randint(0, 81, (3, 3, 1), generator=g), torch.rand(3, 3, generator=g) > 0.3),
        "spk": (torch.randint(0, 16, (3, 4), generator=g), None),
    }
    want = torch.cat([histogram(c, m, layout[s][0]).reshape(-1) for s, (c, m) in codes.items()])
    assert torch.equal(stream_histograms(layout, codes), want)


def test_drift_vector_equals_per_level_brute_force():
    g = torch.Generator().manual_seed(3)
    layout = {"sem": (9, 2), "spk": (4, 3)}
    hist = {s: torch.randint(0, 6, (L, K), generator=g).to(torch.float64) for s, (K, L) in layout.items()}
    hist["sem"][1, :4] = 0.0  # unused codes in the baseline
    profile = {
        "layout": {s: list(v) for s, v in layout.items()},
        "histograms": {s: h.tolist() for s, h in hist.items()},
        "bps_entropy": 100.0,
    }
    ref = DriftReference(profile, layout)
    w = CodebookWindow(layout, window=2)
    for _ in range(3):
        w.push({s: torch.randint(0, 4, (L, K), generator=g).to(torch.float64) for s, (K, L) in layout.items()})
    w.vector()  # leaves the window's (p, entropy) in w.stats
    bps = torch.tensor(103.5)
    fast = dict(zip(ref.names(), ref.vector(w.running, bps, w.stats).tolist(), strict=True))
    plain = dict(zip(ref.names(), ref.vector(w.running, bps).tolist(), strict=True))
    tot = w.totals()
    for s in layout:
        js = js_divergence_bits(tot[s], hist[s]).mean().item()
        dh = (entropy_bits(tot[s]) - entropy_bits(hist[s])).mean().item()
        for got in (fast, plain):
            assert got[f"drift/{s}/js"] == pytest.approx(js, abs=1e-12)
            assert got[f"drift/{s}/entropy_delta_bits"] == pytest.approx(dh, abs=1e-12)
    assert fast["drift/bps_delta"] == pytest.approx(3.5)
