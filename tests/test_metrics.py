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


def _codes(layout, g, n=5):
    """A step's codes: n utterances of 4 frames per stream (`spk`: one code per utterance and group), some masked."""
    out = {}
    for s, (K, L) in layout.items():
        if s == "spk":
            out[s] = (torch.randint(0, K, (n, L), generator=g), None)
        else:
            out[s] = (torch.randint(0, K, (n, 4, L), generator=g), torch.rand(n, 4, generator=g) > 0.3)
    return out


def _counts(layout, codes) -> dict[str, torch.Tensor]:
    return {s: histogram(c, m, layout[s][0]) for s, (c, m) in codes.items()}


def test_dense_window_totals_equal_brute_force_and_survive_reload():
    g = torch.Generator().manual_seed(0)
    layout = {"sem": (9, 2), "spk": (4, 3)}
    w = CodebookWindow(layout, window=3)
    assert w.storage == "dense"
    history = []
    for _ in range(7):
        codes = _codes(layout, g)
        history.append(_counts(layout, codes))
        metrics = w.step(codes)
        totals = w._counts.padded.unpad(w._counts.running)
        for s in layout:
            assert torch.equal(totals[s], sum(c[s] for c in history[-3:]))
    K, tot = 9, totals["sem"][0]
    seen = (tot > 0).sum().item()
    assert metrics["codebook/sem/l0/usage"] == seen / K
    assert metrics["codebook/sem/l0/dead"] == K - seen
    p = tot / tot.sum()
    ppl = math.exp(-sum(x * math.log(x) for x in p.tolist() if x > 0))
    assert metrics["codebook/sem/l0/perplexity"] == pytest.approx(ppl)
    assert set(metrics) >= {"codebook/spk/g2/usage", "codebook/sem/l1/dead"}
    w2 = CodebookWindow(layout, window=3)
    w2.load_state(w.state())
    assert torch.equal(w2._counts.running, w._counts.running) and w2.pos == w.pos == 7
    nxt = _codes(layout, g)
    assert w2.step(nxt) == w.step(nxt)


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
    with pytest.raises(LayoutMismatch, match="not 80"):
        DriftReference({**profile, "layout": {"sem": [80, 1]}}, {"sem": (80, 1)})
    ref = DriftReference(profile, {"sem": (81, 1)})
    for storage in ("dense", "sparse"):
        w = CodebookWindow({"sem": (81, 1)}, 2, drift=ref, storage=storage)
        m = w.step({"sem": (torch.arange(81).view(1, 81, 1), None)}, rate=90.0)  # every code once: the baseline's
        assert m["drift/sem/js"] == pytest.approx(0.0, abs=1e-12)
        assert m["drift/bps_delta"] == pytest.approx(-10.0)


def test_dense_step_tensor_is_the_streams_histograms():
    """The dense storage's tensor to reduce across ranks (summed) is the concatenation of the streams' (L, K)
    histograms of valid frames."""
    g = torch.Generator().manual_seed(1)
    layout = {"sem": (81, 2), "pro": (81, 1), "spk": (16, 4)}
    codes = {
        "sem": (torch.randint(0, 81, (3, 10, 2), generator=g), torch.rand(3, 10, generator=g) > 0.3),
        "pro": (torch.randint(0, 81, (3, 3, 1), generator=g), torch.rand(3, 3, generator=g) > 0.3),
        "spk": (torch.randint(0, 16, (3, 4), generator=g), None),
    }
    want = torch.cat([histogram(c, m, layout[s][0]).reshape(-1) for s, (c, m) in codes.items()])
    w = CodebookWindow(layout, 2)
    assert torch.equal(w.reduce(w.keys(codes)), want)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_drift_equals_per_level_brute_force(storage):
    g = torch.Generator().manual_seed(3)
    layout = {"sem": (9, 2), "spk": (4, 3)}
    hist = {s: torch.randint(0, 6, (L, K), generator=g).to(torch.float64) for s, (K, L) in layout.items()}
    hist["sem"][1, :4] = 0.0  # unused codes in the baseline
    profile = {
        "layout": {s: list(v) for s, v in layout.items()},
        "histograms": {s: h.tolist() for s, h in hist.items()},
        "bps_entropy": 100.0,
    }
    w = CodebookWindow(layout, window=2, drift=DriftReference(profile, layout), storage=storage)
    history = []
    for _ in range(3):
        codes = _codes(layout, g)
        history.append(_counts(layout, codes))
        got = w.step(codes, rate=103.5)
    for s in layout:
        tot = sum(c[s] for c in history[-2:])
        js = js_divergence_bits(tot, hist[s]).mean().item()
        dh = (entropy_bits(tot) - entropy_bits(hist[s])).mean().item()
        tol = 1e-12 if storage == "dense" else 1e-9  # the sparse sums round c·log2 c to 2^-32 bits per code
        assert got[f"drift/{s}/js"] == pytest.approx(js, abs=tol)
        assert got[f"drift/{s}/entropy_delta_bits"] == pytest.approx(dh, abs=tol)
    assert got["drift/bps_delta"] == pytest.approx(3.5)
