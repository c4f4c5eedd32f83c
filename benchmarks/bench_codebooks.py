"""Codebook + drift metric cost per training step for large implicit codebooks (DESIGN §7, §18): the dense window vs the
window training picks (`siren.metrics.large_codebook.make_window`: dense up to 2^12 codes per level, sparse above), at
2^8, 2^16 and 2^20 codes per level, on the same codes, interleaved step by step.

Per step: one sem stream, 1 level, an FSQ of 4-level dimensions (digit metrics included), batch 8 × 4 s at 25 Hz
(800 codes), window 50 steps, JS drift against a baseline of 20,000 codes — everything `StepMetrics` does for the
codebook after the all-reduce: codes → histogram or keys, push, metrics, drift, host copy. The cost is given as a
fraction of a tiny adapt step: `make bench` passes the step time it measured; standalone
(`python benchmarks/bench_codebooks.py [--step-ms MS]`) it is given on the command line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from siren.metrics.codebook import stream_histograms
from siren.metrics.drift import DriftReference
from siren.metrics.large_codebook import make_window

WINDOW, CODES_PER_STEP, STEPS, WARMUP = 50, 800, 60, 5


def _codes(K: int, g: torch.Generator) -> torch.Tensor:
    # Zipf-like use of the codebook: a few codes often, most rarely (as a trained FSQ does).
    u = torch.rand(8, CODES_PER_STEP // 8, 1, generator=g)
    return ((u**4) * K).long().clamp_max(K - 1)


class _Path:
    """One window (+ drift reference) doing a step's codebook metrics the way `StepMetrics.reduce` does."""

    def __init__(self, K: int, sparse: bool, profile: dict, device: str):
        layout = {"sem": (K, 1)}
        self.layout = layout
        self.window = make_window(layout, WINDOW, device, digits={"sem": [4] * (K.bit_length() // 2)}, sparse=sparse)
        self.drift = DriftReference(profile, layout, device, sparse=sparse)
        self.rate = torch.zeros((), dtype=torch.float64, device=device)

    def step(self, codes: torch.Tensor) -> None:
        w, c = self.window, {"sem": (codes, None)}
        if w.sparse:
            w.push(w.keys(c))
            drift = self.drift.from_rows(*w.drift_rows(self.drift), self.rate)
        else:
            w.push_flat(stream_histograms(self.layout, c))
        vec = w.vector()  # the dense drift reads the stats this leaves
        if not w.sparse:
            drift = self.drift.vector(w.running, self.rate, w.stats)
        torch.cat([vec, drift]).tolist()


def bench(K: int, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    ref = torch.zeros(K, dtype=torch.float64)
    ref.index_add_(0, _codes(K, g).reshape(-1).repeat(25), torch.ones(20000, dtype=torch.float64))
    nz = torch.nonzero(ref).flatten()
    profile = {
        "layout": {"sem": [K, 1]},
        "histograms": {"sem": {"codes": [nz.tolist()], "counts": [ref[nz].tolist()]}},
        "bps_entropy": 0.0,
    }
    steps = [_codes(K, g).to(device) for _ in range(STEPS)]
    chosen_sparse = make_window({"sem": (K, 1)}, 1).sparse
    paths = {"dense": _Path(K, False, profile, device), "sparse": _Path(K, True, profile, device)}
    times: dict[str, list[float]] = {n: [] for n in paths}
    for i, codes in enumerate(steps):  # interleaved: both see the machine at the same moment
        for name, p in paths.items():
            t = time.perf_counter()
            p.step(codes)
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t)
    out = {"K": K, "chosen": "sparse" if chosen_sparse else "dense"}
    for name, p in paths.items():
        out[f"{name}_ms"] = statistics.median(times[name]) * 1e3
        out[f"{name}_mb"] = p.window.nbytes() / 2**20
    out["chosen_ms"] = out[f"{out['chosen']}_ms"]
    return out


def run(step_ms: float, device: str = "cpu") -> list[tuple[str, str, str]]:
    """Rows for run_all: per (2^8, 2^16, 2^20) the chosen path's cost ÷ a tiny adapt step of `step_ms` ms."""
    rows = []
    for bits in (8, 16, 20):
        r = bench(2**bits, device)
        rows.append(
            (
                f"codebook+drift metrics per step ÷ tiny adapt step ({step_ms:.0f} ms), 2^{bits} codes/level ({device}; "
                f"window {WINDOW}, {CODES_PER_STEP} codes/step, {bits // 2} FSQ digits): chosen {r['chosen']}; "
                f"dense {r['dense_ms']:.2f} ms / {r['dense_mb']:.1f} MB = {100 * r['dense_ms'] / step_ms:.2f} %, "
                f"sparse {r['sparse_ms']:.2f} ms / {r['sparse_mb']:.1f} MB = {100 * r['sparse_ms'] / step_ms:.2f} %",
                f"{100 * r['chosen_ms'] / step_ms:.2f} %",
                "≤ 1 %",
            )
        )
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-ms", type=float, required=True, help="tiny adapt step time to compare with (ms)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for a, b, c in run(args.step_ms, args.device):
        print(f"| {a} | {b} | {c} |")
