"""Properties of the codebook windows, read through `StepMetrics` as the trainer reads them: on any code layout (FSQ
streams of 1 to 16 dimensions, plain codebooks of 2 to 2^20 codes, 1 to 4 residual levels), through empty and masked
steps, more steps than the window holds and a resume mid-way, the dense `CodebookWindow` and the sparse
`SparseCodebookWindow` (on either backend) log what a direct count (numpy bincount) of the codes in the window gives:
usage, perplexity, dead codes, per-digit FSQ usage and perplexity, and drift against a baseline profile."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from siren.metrics.codebook import CodebookWindow, level_names
from siren.metrics.drift import DriftReference
from siren.metrics.large_codebook import DENSE_MAX_CODES, SparseCodebookWindow
from siren.train.stages.base import MetricSources, StepOutput
from siren.train.step_metrics import StepMetrics

RATE = "rate/bps_entropy"
MAX_CODES = 2**20
# The dense window holds window × rows × (widest codebook) float64 cells: it is compared on layouts up to this size
# (the trainer gives it codebooks of at most `DENSE_MAX_CODES`); the sparse window and the direct count on every one.
DENSE_CELLS = 2**20
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints the example to keep as a regression test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------------------- strategies
@st.composite
def fsq_levels(draw) -> list[int]:
    """1 to 16 dimensions of ≥ 2 levels each, at most 2^20 codes in all (one dimension may take nearly all)."""
    d = draw(st.integers(1, 16))
    levels, budget = [], MAX_CODES
    for i in range(d):
        most = budget // 2 ** (d - i - 1)  # leave ≥ 2 levels for each dimension still to draw
        v = draw(st.one_of(st.integers(2, min(most, 8)), st.integers(2, most)))
        levels.append(v)
        budget //= v
    return draw(st.permutations(levels))


@st.composite
def layouts(draw) -> tuple[dict[str, tuple[int, int]], dict[str, list[int]]]:
    """Code layout (stream → (codes per level, levels)) and FSQ digits (stream → levels per dimension)."""
    streams = draw(st.lists(st.sampled_from(["sem", "pro", "spk"]), min_size=1, max_size=3, unique=True))
    layout, digits = {}, {}
    for s in [x for x in ("sem", "pro", "spk") if x in streams]:
        L = draw(st.integers(1, 4))
        if draw(st.booleans()):
            digits[s] = draw(fsq_levels())
            layout[s] = (math.prod(digits[s]), L)
        else:
            layout[s] = (draw(st.one_of(st.integers(2, 16), st.integers(2, MAX_CODES))), L)
    return layout, digits


def _code_arrays(K: int, shape: tuple[int, ...]):
    """Codes anywhere in [0, K), often among the first few (so the window holds repeats)."""
    return hnp.arrays(np.int64, shape, elements=st.one_of(st.integers(0, min(K, 5) - 1), st.integers(0, K - 1)))


@st.composite
def steps(draw, layout) -> list[dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    """Per step and stream (codes (B, T, L), or (B, L) for `spk`; mask (B, T) or None). B = 0 is an empty step."""
    out = []
    for _ in range(draw(st.integers(1, 7))):
        B, step = draw(st.integers(0, 3)), {}
        for s, (K, L) in layout.items():
            if s == "spk":  # one code per utterance and group, never masked
                step[s] = (draw(_code_arrays(K, (B, L))), None)
                continue
            T = draw(st.integers(0, 4))
            mask = draw(st.none() | hnp.arrays(np.bool_, (B, T)))
            step[s] = (draw(_code_arrays(K, (B, T, L))), mask)
        out.append(step)
    return out


@st.composite
def profiles(draw, layout) -> dict:
    """A baseline profile: per row a few codes with counts (possibly none), stored as the profile stores them."""
    hists = {}
    for s, (K, L) in layout.items():
        codes, counts = [], []
        for _ in range(L):
            c = draw(st.lists(st.integers(0, K - 1), max_size=5, unique=True))
            codes.append(c)
            counts.append([float(draw(st.integers(1, 9))) for _ in c])
        if K > DENSE_MAX_CODES:
            hists[s] = {"codes": codes, "counts": counts}
        else:
            dense = np.zeros((L, K))
            for lv in range(L):
                dense[lv, codes[lv]] = counts[lv]
            hists[s] = dense.tolist()
    bps = draw(st.floats(0, 1000, allow_nan=False))
    return {"layout": {s: list(v) for s, v in layout.items()}, "histograms": hists, "bps_entropy": bps}


# ------------------------------------------------------------------------------------------------ the direct count
def _entropy(counts: np.ndarray) -> float:
    n = counts.sum()
    p = counts[counts > 0] / max(n, 1.0)
    return float(-(p * np.log2(p)).sum())


def _js(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits from its definition (½ KL(p‖m) + ½ KL(q‖m)); an empty side counts as 0."""
    p, q = p_counts / max(p_counts.sum(), 1.0), q_counts / max(q_counts.sum(), 1.0)
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def _profile_row(profile: dict, s: str, lv: int) -> tuple[np.ndarray, np.ndarray]:
    """A baseline row's codes with a count, and their counts."""
    h = profile["histograms"][s]
    if isinstance(h, dict):
        return np.asarray(h["codes"][lv], np.int64), np.asarray(h["counts"][lv], np.float64)
    row = np.asarray(h[lv], np.float64)
    return np.flatnonzero(row), row[row > 0]


def direct_metrics(layout, digits, in_window, profile, rate) -> dict[str, float]:
    """What the windows must report, from the codes of the steps in the window: per row a numpy bincount over the
    codes that occur (in the window or the baseline), so a 2^20-code row costs its support, not 2^20."""
    out: dict[str, float] = {}
    for s, (K, L) in layout.items():
        per_level = [[] for _ in range(L)]
        for step in in_window:
            c, mask = step[s]
            c = c[:, None, :] if c.ndim == 2 else c
            valid = c[mask] if mask is not None else c.reshape(-1, L)  # (frames, L)
            for lv in range(L):
                per_level[lv].append(valid[:, lv])
        js, delta = [], []
        for lv, name in enumerate(level_names(s, L)):
            codes = np.concatenate(per_level[lv]) if per_level[lv] else np.zeros(0, np.int64)
            q_codes, q_counts = _profile_row(profile, s, lv) if profile is not None else (np.zeros(0, np.int64), [])
            support = np.union1d(codes, q_codes)  # sorted: p and q side by side over the codes either uses
            counts = np.bincount(np.searchsorted(support, codes), minlength=support.size).astype(np.float64)
            seen = int((counts > 0).sum())
            out[f"codebook/{s}/{name}/usage"] = seen / K
            out[f"codebook/{s}/{name}/perplexity"] = 2.0 ** _entropy(counts)
            out[f"codebook/{s}/{name}/dead"] = float(K - seen)
            for j, v in enumerate(digits.get(s, [])):
                d = np.bincount((codes // math.prod(digits[s][:j])) % v, minlength=v).astype(np.float64)
                out[f"codebook/{s}/{name}/digit{j}/usage"] = int((d > 0).sum()) / v
                out[f"codebook/{s}/{name}/digit{j}/perplexity"] = 2.0 ** _entropy(d)
            if profile is not None:
                q = np.zeros(support.size)
                q[np.searchsorted(support, q_codes)] = q_counts
                js.append(_js(counts, q))
                delta.append(_entropy(counts) - _entropy(q))
        if profile is not None:
            out[f"drift/{s}/js"] = sum(js) / L
            out[f"drift/{s}/entropy_delta_bits"] = sum(delta) / L
    if profile is not None:
        out["drift/bps_delta"] = rate - profile["bps_entropy"]
    return out


# --------------------------------------------------------------------------------------------------- the windows
def _step_metrics(layout, digits, window: int, kind: str, profile) -> StepMetrics:
    """`StepMetrics` as the trainer builds it, its window forced to `kind`: "dense", or "numpy" / "torch" (the sparse
    window on host arrays, as on a CPU, or on tensors, as on an accelerator)."""
    sparse = kind != "dense"
    drift = DriftReference(profile, layout, sparse=sparse) if profile is not None else None
    sources = MetricSources(layout=layout, drift=drift, drift_rate=RATE if drift else None, digits=digits)
    sm = StepMetrics(sources, window, torch.device("cpu"), world=1, grad_accum=1)
    if sparse:
        sm.window = SparseCodebookWindow(layout, window, digits=digits, backend=kind)
    else:
        sm.window = CodebookWindow(layout, window, digits=digits)
    return sm


def _log_step(sm: StepMetrics, step, rate: tuple[float, float], split: bool) -> dict[str, float]:
    """One optimizer step, as one micro-batch or split in two along the batch (the window merges them)."""
    B = next(iter(step.values()))[0].shape[0]
    cuts = [slice(0, B // 2), slice(B // 2, B)] if split else [slice(0, B)]
    for i, sl in enumerate(cuts):
        codes = {
            s: (torch.from_numpy(c[sl]), None if m is None else torch.from_numpy(m[sl])) for s, (c, m) in step.items()
        }
        ratios = {RATE: (torch.tensor(rate[0] if i == 0 else 0.0), torch.tensor(rate[1] if i == 0 else 0.0))}
        sm.add(StepOutput(torch.tensor(1.0), {}, codes=codes, ratios=ratios))
    return sm.reduce(None, torch.tensor(0.0), {})


def _resumed(sm: StepMetrics, layout, digits, window, kind, profile) -> StepMetrics:
    """A new `StepMetrics` whose window is restored from `sm`'s state through a checkpoint file's bytes."""
    buf = io.BytesIO()
    torch.save(sm.window.state(), buf)
    buf.seek(0)
    new = _step_metrics(layout, digits, window, kind, profile)
    new.window.load_state(torch.load(buf, map_location="cpu"))
    return new


def check_windows(layout, digits, window, sequence, profile, resume_at, split, kinds=None) -> None:
    """Every window kind logs the direct count of its window's codes at every step."""
    R, kmax = sum(L for _, L in layout.values()), max(K for K, _ in layout.values())
    kinds = kinds or ["numpy", "torch"] + (["dense"] if window * R * kmax <= DENSE_CELLS else [])
    rates = [(3.0 + t, 0.5) for t in range(len(sequence))]
    wants = [
        direct_metrics(layout, digits, sequence[max(0, t + 1 - window) : t + 1], profile, a / b)
        for t, (a, b) in enumerate(rates)
    ]
    for kind in kinds:
        sm = _step_metrics(layout, digits, window, kind, profile)
        for t, (step, rate, want) in enumerate(zip(sequence, rates, wants, strict=True)):
            if t == resume_at:
                sm = _resumed(sm, layout, digits, window, kind, profile)
            logged = _log_step(sm, step, rate, split)
            got = {k: v for k, v in logged.items() if k.startswith(("codebook/", "drift/"))}
            assert set(got) == set(want), f"{kind} window, step {t}: names {sorted(set(got) ^ set(want))}"
            bad = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k], rel=1e-9, abs=1e-9)}
            assert not bad, f"{kind} window, step {t}: logged vs direct count {bad}"


@st.composite
def scenarios(draw):
    layout, digits = draw(layouts())
    sequence = draw(steps(layout))
    profile = draw(st.none() | profiles(layout))
    window = draw(st.integers(1, 3))  # small: sequences of up to 7 steps evict
    resume_at = draw(st.none() | st.integers(0, len(sequence) - 1))  # before that step (0: an empty window)
    return layout, digits, window, sequence, profile, resume_at, draw(st.booleans())


@SETTINGS
@given(scenarios())
def test_both_windows_report_the_direct_count_of_their_codes(scenario):
    layout, digits, window, sequence, profile, resume_at, _ = scenario
    # what the examples covered (`pytest --hypothesis-show-statistics`)
    R, kmax = sum(L for _, L in layout.values()), max(K for K, _ in layout.values())
    event(f"dense window compared: {window * R * kmax <= DENSE_CELLS}")
    event(f"a codebook above {DENSE_MAX_CODES} codes: {kmax > DENSE_MAX_CODES}")
    event(f"FSQ dimensions: {sorted({len(v) for v in digits.values()})}")
    event(f"evictions: {len(sequence) > window}, resume: {resume_at is not None}, drift: {profile is not None}")
    event(f"an empty step: {any(next(iter(s.values()))[0].shape[0] == 0 for s in sequence)}")
    check_windows(*scenario)


# ------------------------------------------------------------------------------------ regressions found on the way
def test_a_one_dimensional_fsq_stream_counts_its_digit():
    """Hypothesis' minimal example of the 1-D FSQ bug: the sparse window took a row whose low/high digit split has
    radix 1 (every 1-D FSQ) for a row without digits, so its codes went to the trash bin (usage 0, not 1/2), or with
    more levels past the bins (the reported broadcast crash)."""
    layout, digits = {"sem": (2, 1), "pro": (2, 1), "spk": (2, 1)}, {"pro": [2]}
    step = {
        "sem": (np.zeros((1, 0, 1), np.int64), None),
        "pro": (np.array([[[0]]]), None),
        "spk": (np.array([[0]]), None),
    }
    check_windows(layout, digits, 1, [step], None, resume_at=None, split=False)


def test_one_dimensional_fsq_of_2_20_levels_beside_sixteen_dimensions():
    """Digit bins are ragged, not padded to (rows, most dimensions, most levels): a 1-D FSQ of 2^20 levels beside a
    16-D one would otherwise need 2 × 16 × 2^20 bins (and the sparse window a 2^20 × 2^20 digit matrix)."""
    layout, digits = {"sem": (2**20, 1), "pro": (2**16, 1)}, {"sem": [2**20], "pro": [2] * 16}
    g = np.random.default_rng(1)
    sequence = [
        {"sem": (g.integers(0, 2**20, (2, 5, 1)), None), "pro": (g.integers(0, 2**16, (2, 5, 1)), None)}
        for _ in range(3)
    ]
    check_windows(layout, digits, 2, sequence, None, resume_at=None, split=False, kinds=["numpy", "torch"])
