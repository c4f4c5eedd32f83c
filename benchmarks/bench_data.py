"""Data-path figures for `make bench` (docs/scale.md): 1M-row manifest start-up time and memory (training process and each
DataLoader worker), read amplification of crops before/after, cache fill throughput with 2 processes ÷ 1, and training
step time with cached vs live SSL features. `python benchmarks/bench_data.py` prints them; run_all.py adds them to its
table. Repeats and medians as in run_all.py; ratios are measured side by side in one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

ROWS = 1_000_000
FILES = 200  # distinct audio files behind the 1M rows (rows repeat paths; ids are unique)

# Run in a fresh interpreter: imports torch and siren, builds the dataset from MANIFEST, then iterates a 2-worker
# DataLoader; prints JSON. "Empty run" = the same script on a 1-row manifest.
_PROBE = r"""
import json, os, resource, sys, time
import torch
from siren.data.datasets import AudioDataset, collate
from siren.data.manifest import read_table

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def private():
    kb = 0
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith(("Private_Clean", "Private_Dirty")):
            kb += int(line.split()[1])
    return kb * 1024

class Probe(torch.utils.data.Dataset):
    # Loads real items (touching the manifest columns as training does) and reports the worker's private memory.
    def __init__(self, ds, n):
        self.ds, self.n = ds, n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        j = (i * 7919) % len(self.ds)
        self.ds[j]
        return private()

rss0 = rss()
t0 = time.perf_counter()
ds = AudioDataset(read_table(sys.argv[1], text=False), 16000, 32000, 8000)
ready = time.perf_counter() - t0
rss1 = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loader = torch.utils.data.DataLoader(Probe(ds, 2000), batch_size=50, num_workers=2, collate_fn=lambda x: max(x))
worker_private = max(loader)
print(json.dumps({"ready_s": ready, "rss_before": rss0, "rss_after": rss1, "peak": peak,
                  "worker_private": worker_private, "rows": len(ds)}))
"""


def _write_audio(d: Path, n: int, seconds: float, sr: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        p = d / f"f{k:04d}.flac"
        sf.write(str(p), rng.normal(0, 0.1, int(seconds * sr)).astype(np.float32), sr)
        out.append(p)
    return out


def _manifest(path: Path, files: list[Path], rows: int, sr: int, seconds: float) -> Path:
    with path.open("w") as f:
        for i in range(rows):
            p = files[i % len(files)]
            f.write(
                json.dumps(
                    {
                        "id": f"spk{i % 2000}-{i:07d}",
                        "path": str(p),
                        "duration": seconds,
                        "speaker": f"spk{i % 2000}",
                        "text": "A TRANSCRIPT OF TYPICAL LENGTH FOR A READ SPEECH CORPUS UTTERANCE",
                        "sample_rate": sr,
                        "channels": 1,
                        "size": 12345,
                        "mtime": 1.7e9,
                    }
                )
                + "\n"
            )
    return path


def _probe(manifest: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _PROBE, str(manifest)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_startup(work: Path, repeats: int = 3) -> dict:
    """1M-row manifest → dataset ready; memory above an empty (1-row) run, in the process and in each worker."""
    files = _write_audio(work / "audio16k", FILES, 3.0, 16000)
    big = _manifest(work / "big.jsonl", files, ROWS, 16000, 3.0)
    small = _manifest(work / "small.jsonl", files, 1, 16000, 3.0)
    runs = []
    for _ in range(repeats):  # interleaved: empty run, then the 1M-row run
        e, b = _probe(small), _probe(big)
        runs.append(
            {
                "ready_s": b["ready_s"],
                "rss_over_empty": b["rss_after"] - e["rss_after"],
                "peak_over_empty": b["peak"] - e["peak"],
                "worker_over_empty": b["worker_private"] - e["worker_private"],
            }
        )
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"rows": ROWS, "repeats": repeats}


def bench_read_amplification(work: Path) -> dict:
    """Bytes decoded ÷ bytes used for 2-s crops of 15-s files: whole-file decode (before) vs crop reads (after)."""
    import torch

    from siren.data.audio import read_audio
    from siren.data.datasets import AudioDataset
    from siren.data.manifest import Utterance

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    out = {}
    for sr in (16000, 48000):
        files = _write_audio(work / f"amp{sr}", 8, 15.0, sr)
        utts = [Utterance(f"u{k}", str(p), 15.0, "s", sample_rate=sr, channels=1) for k, p in enumerate(files)]
        ds = AudioDataset(utts, 16000, 32000, 8000, seed=0)
        t_before, t_after, before_dec = [], [], 0
        for e in range(5):
            for i in range(len(ds)):
                t = time.perf_counter()
                whole = read_audio(files[i], 16000)  # what every crop cost before: the whole file
                t_before.append(time.perf_counter() - t)
                before_dec += whole.decoded_bytes
                t = time.perf_counter()
                ds[(e, i)]
                t_after.append(time.perf_counter() - t)
        out[sr] = {
            "before": before_dec / ds.used_bytes,
            "after": ds.decoded_bytes / ds.used_bytes,
            "ms_before": 1000 * statistics.median(t_before),
            "ms_after": 1000 * statistics.median(t_after),
        }
    torch.set_num_threads(threads)
    return out


def _cache_cmd(procs: int, cfg: Path, overrides: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "siren", "cache", "--config", str(cfg), *overrides]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch/accelerate/cpu_ddp.yaml"),
        "-m",
        "siren",
        "cache",
        "--config",
        str(cfg),
        *overrides,
    ]


def bench_cache_fill(corpus: Path, teacher: Path, work: Path, repeats: int = 3) -> dict:
    """Feature-cache fill throughput (entries/s of the fill phase, slowest rank) with 2 processes ÷ 1, side by side;
    1 thread per process so the 2 processes do not fight over the cores."""
    from siren.data.manifest import read_manifest, write_manifest

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    work.mkdir(parents=True, exist_ok=True)
    # The corpus rows 8 times over (unique ids, same files): enough entries that the fill, not start-up, is timed.
    base = read_manifest(corpus / "train.jsonl") + read_manifest(corpus / "val.jsonl")
    rows = [dataclasses.replace(u, id=f"{u.id}-{k}") for k in range(8) for u in base]
    write_manifest(work / "fill.jsonl", rows)
    ratios, tput = [], {1: [], 2: []}
    for rep in range(repeats):
        for procs in (1, 2):
            root = work / f"fill{rep}-{procs}"
            ov = [
                f"data.train={work / 'fill.jsonl'}",
                "data.val=",
                f"ssl.name={teacher}",
                f"data.feature_cache={root}",
                "stage=codec",
                f"run_dir={work / 'unused'}",
            ]
            r = subprocess.run(
                _cache_cmd(procs, ROOT / "configs/demo/base.yaml", ov), env=env, capture_output=True, text=True
            )
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-3000:])
            # "rank R computed N of M entries (...) in S s": per split, the fill ends with its slowest rank.
            lines = re.findall(r"cache (\S+): rank (\d+) computed (\d+) of (\d+) entries .* in ([\d.]+) s", r.stderr)
            per_dir: dict[str, list[tuple[int, float]]] = {}
            for d, _, n, _, s in lines:
                per_dir.setdefault(d, []).append((int(n), float(s)))
            entries = sum(sum(n for n, _ in v) for v in per_dir.values())
            seconds = sum(max(s for _, s in v) for v in per_dir.values())
            tput[procs].append(entries / seconds)
        ratios.append(tput[2][-1] / tput[1][-1])
    return {
        "two_over_one": statistics.median(ratios),
        "range": (min(ratios), max(ratios)),
        "utt_per_s_1": statistics.median(tput[1]),
        "utt_per_s_2": statistics.median(tput[2]),
        "repeats": repeats,
    }


def bench_cached_step(corpus: Path, teacher: Path, work: Path, repeats: int = 3, steps: int = 12) -> dict:
    """codec-stage step time reading cached features ÷ computing them live (median step, warm-up dropped)."""
    from siren.train.tracking import read_metrics
    from siren.train.trainer import Trainer

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import stage_config

    cache = work / "step_cache"
    times = {"live": [], "cached": []}
    for rep in range(repeats):
        for mode in ("live", "cached"):
            run = work / f"step-{mode}-{rep}"
            extra = {"data.feature_cache": str(cache)} if mode == "cached" else {}
            cfg = stage_config(
                "codec",
                corpus,
                teacher,
                run,
                **{
                    "samples.enabled": "false",
                    "data.segment_seconds": 2.0,
                    "train.batch_size": 8,
                    "train.max_steps": steps,
                    "train.checkpoint_every": 1000,
                    "tracking.mode": "disabled",
                    **extra,
                },
            )
            Trainer(cfg).fit()
            times[mode].append(
                statistics.median(r["train/step_time_s"] for r in read_metrics(run / "metrics.jsonl")[3:])
            )
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    return {"live_ms": 1000 * live, "cached_ms": 1000 * cached, "cached_over_live": cached / live, "repeats": repeats}


def rows(corpus: Path, teacher: Path, work: Path) -> list[tuple[str, str, str]]:
    """The figures as (figure, value, goal) rows for run_all.py's table."""
    st = bench_startup(work / "startup")
    amp = bench_read_amplification(work / "amp")
    fill = bench_cache_fill(corpus, teacher, work / "fill")
    step = bench_cached_step(corpus, teacher, work / "step")
    gib = 2**30
    out = [
        (
            f"{st['rows']:,}-row manifest → dataset ready (median of {st['repeats']})",
            f"{st['ready_s']:.1f} s",
            "≤ 10 s",
        ),
        (
            "training process memory above an empty run (1M rows; peak)",
            f"{st['peak_over_empty'] / gib:.2f} GiB",
            "≤ 1 GiB",
        ),
        (
            "each DataLoader worker's private memory above an empty run (1M rows)",
            f"{st['worker_over_empty'] / gib:.3f} GiB",
            "≤ 1 GiB",
        ),
    ]
    for sr, a in amp.items():
        out.append(
            (
                f"read amplification, 2-s crops of 15-s {sr // 1000} kHz files: before → after "
                f"({a['ms_before']:.1f} → {a['ms_after']:.1f} ms per item)",
                f"{a['before']:.1f} → {a['after']:.2f}",
                "≈ 1 after",
            )
        )
    out.append(
        (
            f"feature-cache fill throughput, 2 processes ÷ 1 (1 thread each; {fill['utt_per_s_1']:.1f} → "
            f"{fill['utt_per_s_2']:.1f} utt/s; repeats {fill['range'][0]:.2f}–{fill['range'][1]:.2f})",
            f"{fill['two_over_one']:.2f}",
            "≥ 1.8",
        )
    )
    out.append(
        (
            f"codec step time, cached ÷ live SSL features ({step['cached_ms']:.0f} vs {step['live_ms']:.0f} ms, batch 8)",
            f"{step['cached_over_live']:.2f}",
            "< 1",
        )
    )
    return out


def main() -> int:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import setup_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, teacher = setup_corpus(work)
        t0 = time.time()
        table = rows(corpus, teacher, work)
        print(f"bench_data: {time.time() - t0:.0f} s")
        print("| figure | value | goal |\n|---|---:|---|")
        for a, b, c in table:
            print(f"| {a} | {b} | {c} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
