"""Properties of the codebook window, read through `StepMetrics` as the trainer reads it: on any code layout (FSQ
streams of 1 to 16 dimensions, plain codebooks of 2 to 2^20 codes, 1 to 4 residual levels), through empty and masked
steps, more steps than the window holds and a resume mid-way, `CodebookWindow` with either storage (dense, and sparse
on either backend) logs what a direct count (numpy bincount) of the codes in the window gives: usage, perplexity, dead
codes, per-digit FSQ usage and perplexity, and drift against a baseline profile. The storages give the same metrics as
each other, and two ranks that each see part of every step log what one process that sees all of it logs."""

from __future__ import annotations

import io
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from siren.metrics import codebook
from siren.metrics.codebook import DENSE_MAX_CODES, CodebookWindow, level_names
from siren.metrics.drift import DriftReference
from siren.train.stages.base import MetricSources, StepOutput
from siren.train.step_metrics import StepMetrics

RATE = "rate/bps_entropy"
MAX_CODES = 2**20
# The dense storage holds window × rows × (widest codebook) float64 cells: it is compared on layouts up to this size
# (the window picks it for codebooks of at most `DENSE_MAX_CODES`); the sparse storage and the direct count on every one.
DENSE_CELLS = 2**20
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints the example to keep as a regression test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------------------- strategies
@st.composite
def fsq_levels(draw, most_codes: int = MAX_CODES) -> list[int]:
    """1 to 16 dimensions of ≥ 2 levels each, at most `most_codes` codes in all (one dimension may take nearly all)."""
    d = draw(st.integers(1, min(16, most_codes.bit_length() - 1)))
    levels, budget = [], most_codes
    for i in range(d):
        most = budget // 2 ** (d - i - 1)  # leave ≥ 2 levels for each dimension still to draw
        v = draw(st.one_of(st.integers(2, min(most, 8)), st.integers(2, most)))
        levels.append(v)
        budget //= v
    return draw(st.permutations(levels))


@st.composite
def layouts(draw, most_codes: int = MAX_CODES) -> tuple[dict[str, tuple[int, int]], dict[str, list[int]]]:
    """Code layout (stream → (codes per level, levels)) and FSQ digits (stream → levels per dimension), at most
    `most_codes` codes per level."""
    streams = draw(st.lists(st.sampled_from(["sem", "pro", "spk"]), min_size=1, max_size=3, unique=True))
    layout, digits = {}, {}
    for s in [x for x in ("sem", "pro", "spk") if x in streams]:
        L = draw(st.integers(1, 4))
        if draw(st.booleans()):
            digits[s] = draw(fsq_levels(most_codes))
            layout[s] = (math.prod(digits[s]), L)
        else:
            layout[s] = (draw(st.one_of(st.integers(2, 16), st.integers(2, most_codes))), L)
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
def _step_metrics(layout, digits, window: int, kind: str, profile, world: int = 1) -> StepMetrics:
    """`StepMetrics` as the trainer builds it, its window's storage forced to `kind`: "dense", or "numpy" / "torch"
    (the sparse storage on host arrays, as on a CPU, or on tensors, as on an accelerator)."""
    drift = DriftReference(profile, layout) if profile is not None else None
    sources = MetricSources(layout=layout, drift=drift, drift_rate=RATE if drift else None, digits=digits)
    sm = StepMetrics(sources, window, torch.device("cpu"), world=world, grad_accum=1)
    storage, backend = ("dense", None) if kind == "dense" else ("sparse", kind)
    sm.window = CodebookWindow(layout, window, digits=digits, drift=drift, storage=storage, backend=backend)
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
def scenarios(draw, most_codes: int = MAX_CODES):
    layout, digits = draw(layouts(most_codes))
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


# ------------------------------------------------------------------------- one window: either storage, any ranks
def _logged(sm: StepMetrics, sequence, split: bool = False) -> list[dict[str, float]]:
    """Per step the codebook and drift metrics `sm` logs."""
    rates = [(3.0 + t, 0.5) for t in range(len(sequence))]
    out = []
    for step, rate in zip(sequence, rates, strict=True):
        logged = _log_step(sm, step, rate, split)
        out.append({k: v for k, v in logged.items() if k.startswith(("codebook/", "drift/"))})
    return out


def _assert_same(got: list[dict], want: list[dict], what: str) -> None:
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert list(g) == list(w), f"{what}, step {t}: names {sorted(set(g) ^ set(w))}"
        bad = {k: (g[k], w[k]) for k in w if g[k] != pytest.approx(w[k], rel=1e-9, abs=1e-9)}
        assert not bad, f"{what}, step {t}: {bad}"


@st.composite
def small_scenarios(draw):
    """A scenario on a layout both storages hold (at most `DENSE_MAX_CODES` codes per level, ≤ `DENSE_CELLS` cells)."""
    layout, digits = draw(layouts(DENSE_MAX_CODES))
    window = draw(st.integers(1, 3))
    assume(window * sum(L for _, L in layout.values()) * max(K for K, _ in layout.values()) <= DENSE_CELLS)
    return layout, digits, window, draw(steps(layout)), draw(st.none() | profiles(layout)), draw(st.booleans())


def check_storages_agree(layout, digits, window, sequence, profile, split) -> None:
    """The window logs the same names and values whichever storage it holds its counts in."""
    dense = _logged(_step_metrics(layout, digits, window, "dense", profile), sequence, split)
    for kind in ("numpy", "torch"):
        _assert_same(_logged(_step_metrics(layout, digits, window, kind, profile), sequence, split), dense, kind)


@SETTINGS
@given(small_scenarios())
def test_the_window_logs_the_same_metrics_whichever_storage_it_picks(scenario):
    layout, digits, window, sequence, profile, split = scenario
    assert CodebookWindow(layout, window).storage == "dense"  # what it picks at these sizes; both are forced below
    event(f"drift: {profile is not None}, FSQ streams: {len(digits)}, evictions: {len(sequence) > window}")
    check_storages_agree(*scenario)


_REPEATS = (  # one stream whose codes repeat within a step and across steps: the counts must count each code once
    {"sem": (16, 2)},
    {},
    2,
    [{"sem": (np.array([[[1, 1], [1, 3], [2, 1]]]), None)} for _ in range(3)],
    None,
    False,
)


def test_storages_agree_fails_when_the_sparse_counts_count_a_code_per_occurrence(monkeypatch):
    """Control: the sparse storage changes each code's count-derived sums once per distinct code, at one occurrence
    (`mark`/`ids`); with every occurrence taken as that one, repeated codes are counted again and the storages differ."""
    real = codebook._SparseCounts._sign

    def every_occurrence_first(self, n_new, n_old):
        s32, s64, sf, ids = real(self, n_new, n_old)
        return s32, s64, sf, ids * 0

    check_storages_agree(*_REPEATS)
    monkeypatch.setattr(codebook._SparseCounts, "_sign", every_occurrence_first)
    with pytest.raises(AssertionError, match="numpy, step 0"):
        check_storages_agree(*_REPEATS)


class _InProcessRanks:
    """The collectives `StepMetrics` and the window use (sum all-reduce, pad across processes, gather), between
    `world` threads of one process, each holding the accelerator of its rank (`rank(r)`)."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def exchange(self, r: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[r] = t
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # nobody writes the next collective's slot before everyone has read this one's
        return got

    def rank(self, r: int):
        ranks = self

        class _Accelerator:
            def reduce(self, t, reduction="sum"):
                assert reduction == "sum"
                return sum(ranks.exchange(r, t))

            def pad_across_processes(self, t, dim=0, pad_index=0):
                n = max(x.shape[dim] for x in ranks.exchange(r, t))
                pad = torch.full((n - t.shape[0], *t.shape[1:]), pad_index, dtype=t.dtype)
                return torch.cat([t, pad])

            def gather(self, t):
                return torch.cat(ranks.exchange(r, t))

        return _Accelerator()


def _split_step(step, cuts: dict[str, int]):
    """A step's batch cut in two per stream (rank 0 takes the first `cuts[s]` utterances, rank 1 the rest)."""
    parts = [{}, {}]
    for s, (c, m) in step.items():
        k = min(cuts[s], c.shape[0])
        for r, sl in enumerate((slice(0, k), slice(k, c.shape[0]))):
            parts[r][s] = (c[sl], None if m is None else m[sl])
    return parts


def check_two_ranks(layout, digits, window, sequence, profile, cuts, kind) -> None:
    """Two ranks, each given its part of every step, log (both of them) what one process given all of it logs."""
    want = _logged(_step_metrics(layout, digits, window, kind, profile), sequence)
    ranks = _InProcessRanks(2)

    def run(r: int) -> list[dict[str, float]]:
        sm = _step_metrics(layout, digits, window, kind, profile, world=2)
        out = []
        for t, step in enumerate(sequence):
            codes = {s: (torch.from_numpy(c), None if m is None else torch.from_numpy(m)) for s, (c, m) in
                     _split_step(step, cuts[t])[r].items()}  # fmt: skip
            rate = (torch.tensor(3.0 + t if r == 0 else 0.0), torch.tensor(0.5 if r == 0 else 0.0))
            sm.add(StepOutput(torch.tensor(1.0), {}, codes=codes, ratios={RATE: rate}))
            logged = sm.reduce(ranks.rank(r), torch.tensor(0.0), {})
            out.append({k: v for k, v in logged.items() if k.startswith(("codebook/", "drift/"))})
        return out

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(run, (0, 1)))
    for r in (0, 1):
        _assert_same(got[r], want, f"{kind} storage, rank {r} of 2 vs one process")


@st.composite
def two_rank_scenarios(draw):
    most_codes = draw(st.sampled_from([DENSE_MAX_CODES, MAX_CODES]))  # half of them on layouts both storages hold
    layout, digits, window, sequence, profile, _, _ = draw(scenarios(most_codes))
    cuts = [{s: draw(st.integers(0, 3)) for s in layout} for _ in sequence]
    R, kmax = sum(L for _, L in layout.values()), max(K for K, _ in layout.values())
    kinds = ["numpy", "torch"] + (["dense"] * 2 if window * R * kmax <= DENSE_CELLS else [])
    return layout, digits, window, sequence, profile, cuts, draw(st.sampled_from(kinds))


@SETTINGS
@given(two_rank_scenarios())
def test_two_ranks_log_what_one_window_over_the_whole_stream_logs(scenario):
    event(f"storage: {scenario[-1]}")
    check_two_ranks(*scenario)


def test_two_ranks_fail_without_the_reduction_across_ranks(monkeypatch):
    """Control: with `CodebookWindow.reduce` keeping each rank's own codes (no collective), rank 0 logs half."""
    layout, digits = {"sem": (16, 1), "spk": (2**13, 1)}, {"sem": [4, 4]}
    g = np.random.default_rng(0)
    sequence = [
        {"sem": (g.integers(0, 16, (4, 3, 1)), None), "spk": (g.integers(0, 2**13, (4, 1)), None)} for _ in range(2)
    ]
    cuts = [{"sem": 2, "spk": 2}] * 2
    real = CodebookWindow.reduce
    for kind in ("dense", "numpy"):
        check_two_ranks({"sem": (16, 1)}, digits, 2, [{"sem": s["sem"]} for s in sequence], None, cuts, kind)
    check_two_ranks(layout, digits, 2, sequence, None, cuts, "numpy")
    monkeypatch.setattr(CodebookWindow, "reduce", lambda self, keys, accelerator=None: real(self, keys, None))
    for kind in ("dense", "numpy"):
        with pytest.raises(AssertionError, match="rank 0 of 2 vs one process"):
            check_two_ranks({"sem": (16, 1)}, digits, 2, [{"sem": s["sem"]} for s in sequence], None, cuts, kind)


def test_two_ranks_fail_without_the_sparse_gather(monkeypatch):
    """Control of `sparse_window_gather` (tests/mechanisms.py), the step metrics handing the window this rank's keys
    without the collective: rank 0 logs its own half of the global batch. The launched 2-process codec run of
    tests/test_large_codebook.py relies on the same mechanism; this is its negative control, without a launch."""
    import mechanisms

    g = np.random.default_rng(1)
    layout, digits = {"spk": (2**13, 1)}, {}
    sequence = [{"spk": (g.integers(0, 2**13, (4, 1)), None)} for _ in range(2)]
    cuts = [{"spk": 2}] * 2
    check_two_ranks(layout, digits, 2, sequence, None, cuts, "numpy")
    mechanisms.disable("sparse_window_gather", monkeypatch)
    with pytest.raises(AssertionError, match="rank 0 of 2 vs one process"):
        check_two_ranks(layout, digits, 2, sequence, None, cuts, "numpy")
