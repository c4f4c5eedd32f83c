"""Codebook + drift metric cost per training step, small and large implicit codebooks: the storage the codebook window
picks (`siren.metrics.codebook.CodebookWindow`: dense up to 2^12 codes per level, sparse above) at 2^8, 2^16 and 2^20
codes per level, and both storages forced beside it.

Per step: one sem stream, 1 level, an FSQ of 4-level dimensions (digit metrics included), batch 8 × 4 s at 25 Hz
(800 codes), window 50 steps, JS drift against a baseline of 20,000 codes. The cost is what the codebook metrics add
to the trainer's per-step metrics: a `StepMetrics` with the window (and the drift reference) adds one micro-batch (a
loss, the bit-rate ratio, the codes) and reduces it, host copy included, and so does its twin without codebook
metrics; cost = with − without. The two take turns going first (`_Path.step`) and the figures are over pairs of steps.

How the chosen path is timed (`in_training`): the way a training step pays it. A real tiny adapt run (the factory
`run_all` passes) trains for its `train.max_steps` (60 there); at the end of every step (after its own
`StepMetrics.reduce`) both StepMetrics do one step on that step's synthetic codes, timed with `time.perf_counter`, so
their memory accesses meet the caches as a training step leaves them. The figure is the median over pairs of steps of
(metric cost ÷ the steps' own time without the benchmark's work; a step's time = wall time between the ends of two
consecutive steps). The 2^20 codes of the synthetic window stand in for the run's codebook: a tiny codec run with a
real 2^20-code FSQ (`sem_quantizer.levels=[4]*10`) took ~11 s per step on the 2-core CPU machine, which would hide the
metrics' cost instead of measuring it.
Each storage is timed alone (`alone`: its steps back to back, not interleaved with anything — interleaving the dense
storage's 400 MB at 2^20 with the sparse one evicted the sparse one's caches), and reported beside it for comparison.
Standalone (`python benchmarks/bench_codebooks.py --step-ms MS`) there is no training run: both paths are timed alone
and divided by the given step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from siren.metrics.codebook import CodebookWindow
from siren.metrics.drift import DriftReference
from siren.train.stages.base import MetricSources, StepOutput
from siren.train.step_metrics import StepMetrics

WINDOW, CODES_PER_STEP, STEPS, WARMUP = 50, 800, 60, 5


def _codes(K: int, g: torch.Generator) -> torch.Tensor:
    # Zipf-like use of the codebook: a few codes often, most rarely (as a trained FSQ does).
    u = torch.rand(8, CODES_PER_STEP // 8, 1, generator=g)
    return ((u**4) * K).long().clamp_max(K - 1)


class _Path:
    """One `StepMetrics` (the trainer's per-step metrics) with a codebook window (+ drift reference) whose storage is
    forced ("dense" or "sparse"), and its twin without codebook metrics; a step adds one micro-batch (a loss, the
    bit-rate ratio, the codes) to each and reduces it, host copy included. Its cost is the difference: what the
    codebook metrics add."""

    def __init__(self, K: int, storage: str, profile: dict, device: str):
        layout = {"sem": (K, 1)}
        drift = DriftReference(profile, layout, device)
        digits = {"sem": [4] * (K.bit_length() // 2)}
        sources = MetricSources(layout=layout, drift=drift, drift_rate="rate/bps_entropy", digits=digits)
        self.metrics = StepMetrics(sources, WINDOW, torch.device(device), world=1, grad_accum=1)
        self.bare = StepMetrics(MetricSources(), WINDOW, torch.device(device), world=1, grad_accum=1)
        if self.metrics.window.storage != storage:
            self.metrics.window = CodebookWindow(layout, WINDOW, device, digits, drift, storage=storage)
        self.window = self.metrics.window
        one = torch.ones((), dtype=torch.float64, device=device)
        self.loss, self.rate, self.grad_norm = one, (one * 150, one), one
        self.turn = False  # whether the codebook metrics went first in the last step

    def step(self, codes: torch.Tensor) -> float:
        """One step through both; → seconds the codebook metrics added (with − without). The two take turns going
        first: whatever runs first after a training step runs slower for a while (caches and predictors refill), and
        a step pays that once whichever code it is, so it is no cost of the codebook metrics. Over an even number of
        steps the turns cancel it out of the median difference."""
        out = StepOutput(self.loss, {}, codes={"sem": (codes, None)}, ratios={"rate/bps_entropy": self.rate})
        self.turn = not self.turn
        order = (self.metrics, self.bare) if self.turn else (self.bare, self.metrics)
        took = []
        for m in order:
            t = time.perf_counter()
            m.add(out)
            m.reduce(None, self.grad_norm, {})
            took.append(time.perf_counter() - t)
        with_, without = took if self.turn else took[::-1]
        return with_ - without


def _profile_and_steps(K: int, n: int, device: str) -> tuple[dict, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ref = torch.zeros(K, dtype=torch.float64)
    ref.index_add_(0, _codes(K, g).reshape(-1).repeat(25), torch.ones(20000, dtype=torch.float64))
    nz = torch.nonzero(ref).flatten()
    profile = {
        "layout": {"sem": [K, 1]},
        "histograms": {"sem": {"codes": [nz.tolist()], "counts": [ref[nz].tolist()]}},
        "bps_entropy": 0.0,
    }
    return profile, [_codes(K, g).to(device) for _ in range(n)]


def alone(K: int, storage: str, device: str = "cpu") -> dict:
    """One storage's per-step time (median ms over `STEPS` − `WARMUP` steps), its steps back to back, and its
    memory."""
    profile, steps = _profile_and_steps(K, STEPS, device)
    p = _Path(K, storage, profile, device)
    times = [p.step(codes) for codes in steps]
    return {"ms": statistics.median(_pairs(times[WARMUP + 1 :])) * 1e3, "mb": p.window.nbytes() / 2**20}


def _pairs(xs: list[float]) -> list[float]:
    """Means of consecutive pairs (one step with the codebook metrics going first, one with them second)."""
    return [(xs[i] + xs[i + 1]) / 2 for i in range(0, len(xs) - 1, 2)]


def in_training(K: int, make_trainer, device: str = "cpu") -> dict:
    """The chosen storage's per-step work done at the end of every step of a real training run (`make_trainer()` → a
    `Trainer` ready to `fit`), timed per step; → median and range over steps of metric ÷ step, median step and metric
    ms. See the module docstring."""
    chosen = CodebookWindow({"sem": (K, 1)}, 1).storage
    tr = make_trainer()
    n = tr.cfg.train.max_steps
    profile, steps = _profile_and_steps(K, n, device)
    p = _Path(K, chosen, profile, device)
    real_reduce = tr.step_metrics.reduce
    metric_s: list[float] = []  # what the codebook metrics added
    ends: list[float] = []
    spent: list[float] = []  # the whole benchmark work (both StepMetrics), taken out of the step time

    def reduce_then_metrics(*a, **k):
        out = real_reduce(*a, **k)
        t = time.perf_counter()
        metric_s.append(p.step(steps[len(metric_s) % n]))
        t_end = time.perf_counter()
        ends.append(t_end)
        spent.append(t_end - t)
        return out

    tr.step_metrics.reduce = reduce_then_metrics
    tr.fit()
    # step i (i ≥ 1): from the end of step i − 1 to its own end, less the benchmark's work
    step_s = [ends[i] - ends[i - 1] - spent[i] for i in range(1, len(ends))]
    # per pair of steps (the codebook metrics once first, once second): metric ÷ step; skip the first WARMUP + 1
    # steps (step 0 has no step time), starting on a with-first step
    skip = WARMUP + 1 + (WARMUP + 1) % 2
    metric_p, step_p = _pairs(metric_s[skip:]), _pairs(step_s[skip - 1 :])
    fr = [m / s for m, s in zip(metric_p, step_p, strict=False)]
    return {
        "frac": statistics.median(fr),
        "frac_range": (min(fr), max(fr)),
        "metric_ms": statistics.median(metric_p) * 1e3,
        "step_ms": statistics.median(step_p) * 1e3,
        "steps": 2 * len(fr),
        "mb": p.window.nbytes() / 2**20,
        "chosen": chosen,
    }


def run(step_ms: float, device: str = "cpu", make_trainer=None, host: str = "tiny adapt") -> list[tuple[str, str, str]]:
    """Rows for run_all: per (2^8, 2^16, 2^20) the chosen path's cost ÷ step time — inside the steps of a real
    training run when `make_trainer` is given (run_all: tiny adapt runs; `host` names them in the row), else timed
    alone ÷ `step_ms` — and both storages timed alone ÷ `step_ms` beside it."""
    rows = []
    for bits in (8, 16, 20):
        K = 2**bits
        dense = alone(K, "dense", device)
        sparse = alone(K, "sparse", device)
        chosen = CodebookWindow({"sem": (K, 1)}, 1).storage
        alone_txt = (
            f"alone ÷ {step_ms:.0f} ms: dense {dense['ms']:.2f} ms / {dense['mb']:.1f} MB = "
            f"{100 * dense['ms'] / step_ms:.2f} %, sparse {sparse['ms']:.2f} ms / {sparse['mb']:.1f} MB = "
            f"{100 * sparse['ms'] / step_ms:.2f} %"
        )
        common = f"{bits // 2} FSQ digits; window {WINDOW}, {CODES_PER_STEP} codes/step, {device}"
        if make_trainer is not None:
            r = in_training(K, make_trainer, device)
            label = (
                f"codebook+drift metrics per step ÷ that step, 2^{bits} codes/level ({common}): chosen {chosen}, timed "
                f"at the end of each of {r['steps']} real {host} steps ({r['step_ms']:.0f} ms/step): "
                f"{r['metric_ms']:.2f} ms, per pair of steps ranged {100 * r['frac_range'][0]:.2f}–"
                f"{100 * r['frac_range'][1]:.2f} %; {alone_txt}"
            )
            figure = 100 * r["frac"]
        else:
            label = f"codebook+drift metrics per step ÷ tiny adapt step, 2^{bits} codes/level ({common}): chosen {chosen}, {alone_txt}"
            figure = 100 * (sparse if chosen == "sparse" else dense)["ms"] / step_ms
        rows.append((label, f"{figure:.2f} %", "≤ 1 %"))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-ms", type=float, required=True, help="tiny adapt step time to compare with (ms)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for a, b, c in run(args.step_ms, args.device):
        print(f"| {a} | {b} | {c} |")
