"""Peak memory of the bitstream encoder at 2^16 codes per level, for 10 s and 60 s of codes.

Figures (goal in brackets):
  1. peak memory above the resident set while encoding 10 s and 60 s of codes (`encode_codes`: entropy model,
     probability tables, range coder, payload trimming), `tiny` entropy model with sem and pro FSQs of 2^16 codes
     (levels [4] × 8, one residual level), random weights and uniformly random codes (~16 bits per code)
  2. the peak at 60 s ÷ the peak at 10 s [≤ 1.5: the encoder works in windows, so duration does not show], beside the
     size of the float64 tables of the whole 60-s stream, which the encoder held at once before it worked in windows

Each encode runs in its own process (a fresh interpreter: no earlier allocation sets the peak), which resets the
kernel's peak-RSS counter (`/proc/self/clear_refs`, Linux) after building the model and the codes and reads VmHWM after
the encode; the figure is VmHWM minus the RSS at the reset.

Run alone: `python benchmarks/bench_bitstream_memory.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS = [4] * 8  # 2^16 codes per level
SECONDS = (10.0, 60.0)


def _status(key: str) -> float:
    """MiB of a /proc/self/status field (VmRSS, VmHWM)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def measure(seconds: float) -> dict:
    """Encode `seconds` of codes in this process; peak memory above the resident set at the start of the encode."""
    import torch

    from siren.coding.bitstream import encode_codes, model_id
    from siren.config.loader import load_config
    from siren.models.builders import build_component

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/model/tiny.yaml")
    cfg.sem_quantizer.levels = list(LEVELS)
    cfg.pro_quantizer.levels = list(LEVELS)
    torch.manual_seed(0)
    names = ("sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model")
    mods = {n: build_component(n, cfg).eval() for n in names}
    K = mods["sem_quantizer"].codebook_size
    n_pro = int(seconds * 16000 / 2560)  # whole prosody frames (6.25 Hz); 4 semantic frames each
    g = torch.Generator().manual_seed(0)
    sem = torch.randint(0, K, (1, 4 * n_pro, 1), generator=g)
    pro = torch.randint(0, K, (1, n_pro, 1), generator=g)
    spk = torch.randint(0, mods["spk_quantizer"].codebook_size, (1, cfg.spk_quantizer.groups), generator=g)
    model_id(mods)  # hashed once per model and cached: not the encoder's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss = _status("VmRSS")
    t = time.perf_counter()
    enc = encode_codes(mods, sem, pro, spk, 4 * n_pro * 640)
    elapsed = time.perf_counter() - t
    return {
        "seconds": seconds,
        "codes_per_level": K,
        "frames": 5 * n_pro,
        "peak_mib": _status("VmHWM") - rss,
        "rss_mib": rss,
        "encode_s": elapsed,
        "bytes": len(enc.data),
        "whole_stream_tables_mib": 5 * n_pro * K * 8 / 2**20,  # float64 probabilities of every frame at once
    }


def run() -> dict:
    """Both durations, each in a fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("bench_bitstream_memory needs Linux's resettable peak RSS (/proc/self/clear_refs)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = {}
    for secs in SECONDS:
        r = subprocess.run(
            [sys.executable, __file__, "--one", str(secs)], capture_output=True, text=True, env=env, check=True
        )
        out[secs] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def rows() -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows for BENCHMARKS.md."""
    m = run()
    a, b = m[SECONDS[0]], m[SECONDS[1]]
    k = f"2^{a['codes_per_level'].bit_length() - 1}"
    return [
        *[
            (
                f"bitstream encoder peak memory, {x['seconds']:.0f} s of codes at {k} codes per level "
                f"(tiny entropy model, {x['frames']} frames, {x['bytes']} bytes, encode {x['encode_s']:.1f} s, 1 thread)",
                f"{x['peak_mib']:.0f} MiB",
                "—",
            )
            for x in (a, b)
        ],
        (
            f"bitstream encoder peak memory, 60 s ÷ 10 s (the whole 60-s stream's float64 tables alone would be "
            f"{b['whole_stream_tables_mib']:.0f} MiB)",
            f"{b['peak_mib'] / a['peak_mib']:.2f}",
            "≤ 1.5",
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(float(sys.argv[2]))))
    else:
        for row in rows():
            print(" | ".join(row))
