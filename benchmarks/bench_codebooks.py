"""Codebook + drift metric cost for large implicit codebooks (DESIGN §7, §18): dense window vs sparse window at
2^8, 2^16 and 2^20 codes per level, side by side on the same codes.

Per step: one sem stream, 1 level, batch 8 × 4 s at 25 Hz (800 codes), window 50 steps, JS drift against a baseline
histogram of 20,000 codes. `python benchmarks/bench_codebooks.py` prints a table; `run()` returns rows for run_all.
"""

from __future__ import annotations

import statistics
import time

import torch

from siren.metrics.codebook import CodebookWindow, stream_histograms
from siren.metrics.drift import DriftReference
from siren.metrics.large_codebook import SparseCodebookWindow

WINDOW, CODES_PER_STEP, STEPS = 50, 800, 30


def _codes(K: int, g: torch.Generator) -> dict:
    # Zipf-like use of the codebook: a few codes often, most rarely (as a trained FSQ does).
    u = torch.rand(8, CODES_PER_STEP // 8, 1, generator=g)
    return {"sem": ((u**4) * K).long().clamp_max(K - 1)}


def _time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:]) * 1e3


def bench(K: int, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    layout = {"sem": (K, 1)}
    ref = torch.zeros(1, K, dtype=torch.float64)
    ref[0].index_add_(0, _codes(K, g)["sem"].reshape(-1).repeat(25), torch.ones(20000, dtype=torch.float64))
    steps = [_codes(K, g) for _ in range(STEPS)]
    out: dict = {"K": K}

    sparse = SparseCodebookWindow(layout, WINDOW, device, capacity=CODES_PER_STEP)
    sparse.set_reference({"sem": ref})
    it = iter(range(10**9))

    def sparse_step():
        c = steps[next(it) % STEPS]["sem"].to(device)
        sparse.push(SparseCodebookWindow.rows_from_codes(layout, {"sem": (c, None)}))
        torch.cat([sparse.vector(), *sparse.drift_rows()]).tolist()

    out["sparse_ms"] = _time(sparse_step, STEPS)
    out["sparse_mb"] = sparse.ring.numel() * 8 / 2**20 + sum(t.numel() * t.element_size() for t in sparse._ref) / 2**20

    dense_mb = (WINDOW + 1) * K * 8 / 2**20
    out["dense_mb"] = dense_mb
    try:
        dense = CodebookWindow(layout, WINDOW, device)
        prof = {"layout": {"sem": [K, 1]}, "histograms": {"sem": ref.tolist()}, "bps_entropy": 0.0}
        drift = DriftReference(prof, layout, device)
        it2 = iter(range(10**9))

        def dense_step():
            c = steps[next(it2) % STEPS]["sem"].to(device)
            dense.push_flat(stream_histograms(layout, {"sem": (c, None)}))
            torch.cat(
                [dense.vector(), drift.vector(dense.running, torch.zeros((), device=device), dense.stats)]
            ).tolist()

        out["dense_ms"] = _time(dense_step, STEPS)
    except RuntimeError as exc:  # out of memory: reported, not hidden
        out["dense_ms"] = float("nan")
        out["dense_error"] = str(exc)[:80]
    return out


def run(device: str = "cpu") -> list[tuple[str, str, str]]:
    rows = []
    for bits in (8, 16, 20):
        r = bench(2**bits, device)
        rows.append(
            (
                f"codebook+drift metrics per step at 2^{bits} codes/level ({device}; window {WINDOW}, "
                f"{CODES_PER_STEP} codes/step): dense {r['dense_ms']:.2f} ms / {r['dense_mb']:.1f} MB, "
                f"sparse {r['sparse_ms']:.2f} ms / {r['sparse_mb']:.2f} MB",
                f"{r['dense_ms'] / r['sparse_ms']:.1f}× faster, {r['dense_mb'] / r['sparse_mb']:.0f}× less memory",
                "bounded memory",
            )
        )
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    for a, b, _ in run("cuda" if torch.cuda.is_available() else "cpu"):
        print(f"| {a} | {b} |")
