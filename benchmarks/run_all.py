"""`make bench`: ratios measured side by side in one run, repeated, median reported; appended to BENCHMARKS.md.

Figures (goal in brackets):
  1. trainer step time (all per-step metrics, W&B offline) ÷ bare PyTorch loop, same model/batch/optimizer [≤ 1.03]
  2. per-step codebook + drift metric time ÷ step time [≤ 1 %]
  3. bitstream bytes ÷ entropy-model estimate on the eval set [≤ 1.01]: one stream and per file; header apart
  4. encode / decode speed in × real time, 1 CPU thread, `tiny` and `ultra200bps` presets (8 flow steps)
  5. data loader throughput ÷ training consumption [≫ 1]
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB__DISABLE_STATS", "true")

import torch  # noqa: E402

REPEATS = 3


def _median(xs):
    return statistics.median(xs)


def setup_corpus(work: Path) -> tuple[Path, Path]:
    from siren.data.corpus import build_corpus
    from siren.models.ssl import save_tiny_teacher

    corpus = work / "corpus"
    build_corpus(corpus, n=48, seed=0, progress=False)
    teacher = save_tiny_teacher(work / "teacher", seed=0)
    return corpus, teacher


def cfg_for(stage: str, corpus: Path, teacher: Path, run: Path, **extra):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import stage_config

    return stage_config(
        stage,
        corpus,
        teacher,
        run,
        **{"samples.enabled": "false", "data.segment_seconds": 2.0, "train.batch_size": 8, **extra},
    )


def bench_trainer_overhead(corpus: Path, teacher: Path, work: Path, steps: int = 30) -> dict:
    """Median step time of the SIREN trainer (metrics every step, W&B offline) vs a bare loop on the same stage."""
    from siren.data.datasets import collate
    from siren.train.trainer import Trainer

    ratios, metric_fracs = [], []
    for rep in range(REPEATS):
        run = work / f"trainer_{rep}"
        cfg = cfg_for("codec", corpus, teacher, run, **{"train.max_steps": steps, "train.checkpoint_every": 10**6})
        tr = Trainer(cfg)
        # Time the metric reduction inside the real loop.
        orig = tr._reduce_metrics
        mtimes = []

        def timed(out, gn, _orig=orig, _mt=mtimes):
            t = time.perf_counter()
            v, n = _orig(out, gn)
            v.tolist()
            _mt.append(time.perf_counter() - t)
            return v, n

        tr._reduce_metrics = timed
        tr.save = lambda step, metrics: None  # checkpoints are not part of a step
        tr.fit()
        rows = [r["train/step_time_s"] for r in _metrics(run)][5:]
        t_siren = _median(rows)
        metric_fracs.append(_median(mtimes[5:]) / t_siren)

        # Bare loop: same stage modules, same data, AdamW, no accelerate / metrics / W&B.
        cfg = cfg_for("codec", corpus, teacher, work / f"bare_{rep}", **{"train.max_steps": steps})
        torch.manual_seed(0)
        from siren.train.stages import make_stage

        stage = make_stage(cfg)
        mods = stage.build()
        mods["ssl"].eval().requires_grad_(False)
        params = [p for n, m in mods.items() if n != "ssl" for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        ds = tr.dataset
        times = []
        for i in range(steps):
            idx = [(i * 8 + j) % len(ds) for j in range(8)]
            t = time.perf_counter()
            batch = collate([ds[k] for k in idx])
            out = stage.step(mods, batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            float(out.loss)
            times.append(time.perf_counter() - t)
        ratios.append(t_siren / _median(times[5:]))
    return {"trainer_over_bare": _median(ratios), "metrics_frac": _median(metric_fracs), "repeats": REPEATS}


def _metrics(run: Path):
    from siren.train.tracking import read_metrics

    return read_metrics(run / "metrics.jsonl")


def bench_loader(corpus: Path, teacher: Path, work: Path) -> dict:
    """Batches/s the data loader delivers vs batches/s training consumes (codec stage, batch 8 × 2 s)."""
    from siren.data.datasets import collate
    from siren.train.trainer import Trainer

    run = work / "loader"
    cfg = cfg_for("codec", corpus, teacher, run, **{"train.max_steps": 12, "train.checkpoint_every": 10**6})
    tr = Trainer(cfg)
    tr.save = lambda step, metrics: None
    tr.fit()
    step_time = _median([r["train/step_time_s"] for r in _metrics(run)][3:])
    n = 20
    t = time.perf_counter()
    for i in range(n):
        collate([tr.dataset[(i * 8 + j) % len(tr.dataset)] for j in range(8)])
    load_time = (time.perf_counter() - t) / n
    return {"loader_over_consumption": step_time / load_time}


def bench_bitstream(corpus: Path, teacher: Path, work: Path) -> dict:
    """Real bytes vs the entropy model's estimate on the eval set, with a codec trained for 300 steps.

    Two figures: per file (each utterance its own .siren payload, so each pays the range coder's final flush) and one
    continuous stream of all utterances (the coder's own efficiency). The fixed header is reported apart.
    """
    import constriction
    import numpy as np

    from siren.coding.bitstream import _stream_probs, encode_codes, load_codec
    from siren.data.audio import load_audio
    from siren.data.manifest import read_manifest
    from siren.train.stages.common import analyse
    from siren.train.trainer import Trainer

    run = work / "codec_bits"
    Trainer(cfg_for("codec", corpus, teacher, run, **{"train.max_steps": 300, "train.checkpoint_every": 300})).fit()
    ck = load_codec(str(run))
    fam = constriction.stream.model.Categorical(perfect=False)
    stream = constriction.stream.queue.RangeEncoder()
    payload = estimate = header = seconds = 0.0
    files = 0
    for u in read_manifest(corpus / "val.jsonl"):
        wav = load_audio(u.path)
        n = wav.shape[-1] - wav.shape[-1] % 2560
        with torch.no_grad():
            an = analyse(ck.modules, ck.modules["features"](wav[None, :n]))
        enc = encode_codes(ck.modules, an.sem.codes, an.pro.codes, an.spk.codes, n)
        payload += enc.payload_bits
        estimate += enc.estimate_bits
        header += enc.header_bits
        seconds += enc.seconds
        files += 1
        for name, codes in (("sem", an.sem.codes), ("pro", an.pro.codes)):
            for t in range(codes.shape[1]):
                probs = _stream_probs(ck.modules["entropy_model"], name, codes, t)
                stream.encode(codes[0, t].numpy().astype(np.int32), fam, probs)
    stream_bits = 32 * len(stream.get_compressed())
    return {
        "payload_over_estimate": payload / estimate,
        "stream_over_estimate": stream_bits / estimate,
        "header_bits_per_file": header / files,
        "seconds": seconds,
        "files": files,
        "estimate_bps": estimate / seconds,
        "flush_bits_per_file": (payload - estimate) / files,
    }


def bench_codec_speed(preset: str, corpus: Path, teacher: Path, work: Path) -> dict:
    """Encode (wav → bits) and decode (bits → wav, 8 flow steps) in × real time, one thread, untrained weights."""
    from siren.coding.bitstream import decode_codes, encode_codes
    from siren.config.loader import load_config
    from siren.models.builders import build_component
    from siren.train.stages.common import analyse

    torch.set_num_threads(1)
    cfg = load_config(ROOT / f"configs/model/{preset}.yaml")
    if preset == "ultra200bps":
        from transformers import HubertConfig, HubertModel

        from siren.models.ssl import SSLFeatureExtractor

        torch.manual_seed(0)
        ssl = SSLFeatureExtractor(HubertModel(HubertConfig()), layer=cfg.ssl.layer)  # hubert-base sized, random
    else:
        cfg.ssl.name = str(teacher)
        ssl = build_component("ssl", cfg)
    mods = {"features": ssl}
    for n in (
        "factorizer",
        "sem_quantizer",
        "pro_quantizer",
        "spk_quantizer",
        "entropy_model",
        "fuser",
        "flow",
        "vocoder",
    ):
        mods[n] = build_component(n, cfg, ssl_dim=ssl.dim)
    for m in mods.values():
        m.eval()
    secs = 4.0
    wav = torch.randn(1, int(16000 * secs)) * 0.1
    enc_t, dec_t = [], []
    with torch.no_grad():
        for _ in range(REPEATS):
            t = time.perf_counter()
            an = analyse(mods, mods["features"](wav))
            enc = encode_codes(mods, an.sem.codes, an.pro.codes, an.spk.codes, wav.shape[-1])
            enc_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            sem, pro, spk, _ = decode_codes(mods, enc.data)
            lat = (
                mods["sem_quantizer"].decode_codes(sem),
                mods["pro_quantizer"].decode_codes(pro),
                mods["spk_quantizer"].decode_codes(spk),
            )
            mel = mods["flow"].sample(mods["fuser"](*lat), steps=8, solver="euler")
            mods["vocoder"](mel)
            dec_t.append(time.perf_counter() - t)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"encode_xrt": secs / _median(enc_t), "decode_xrt": secs / _median(dec_t)}


def main() -> int:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        os.environ["SIREN_ARTIFACT_CACHE"] = str(work / "artifacts")
        os.environ["WANDB_DIR"] = str(work / "wandb")
        corpus, teacher = setup_corpus(work)
        tr = bench_trainer_overhead(corpus, teacher, work)
        ld = bench_loader(corpus, teacher, work)
        bs = bench_bitstream(corpus, teacher, work)
        speed = {p: bench_codec_speed(p, corpus, teacher, work) for p in ("tiny", "ultra200bps")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    rows = [
        (
            "trainer step ÷ bare PyTorch loop (codec tiny, batch 8 × 2 s, metrics every step, W&B offline)",
            f"{tr['trainer_over_bare']:.3f}",
            "≤ 1.03",
        ),
        ("per-step codebook + drift metrics ÷ step time", f"{100 * tr['metrics_frac']:.2f} %", "≤ 1 %"),
        (
            f"bitstream ÷ entropy-model estimate, one continuous stream (eval set: {bs['files']} files, "
            f"{bs['seconds']:.0f} s, estimate {bs['estimate_bps']:.0f} bit/s)",
            f"{bs['stream_over_estimate']:.4f}",
            "≤ 1.01",
        ),
        (
            f"bitstream payload ÷ estimate, per file (each file pays the coder's final flush: "
            f"{bs['flush_bits_per_file']:.0f} bits/file on average)",
            f"{bs['payload_over_estimate']:.4f}",
            "≤ 1.01",
        ),
        ("fixed header + CRC per file (reported apart)", f"{bs['header_bits_per_file']:.0f} bits", "—"),
        ("data loader throughput ÷ training consumption", f"{ld['loader_over_consumption']:.1f}", "≫ 1"),
    ]
    for p, s in speed.items():
        rows.append((f"encode speed, {p}, 1 thread (× real time)", f"{s['encode_xrt']:.1f}", "—"))
        rows.append((f"decode speed, {p}, 8 flow steps, 1 thread (× real time)", f"{s['decode_xrt']:.1f}", "—"))
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    text = [
        f"\n## {date} — commit {commit.strip()} — {machine}",
        "",
        f"Command: `make bench` (median of {REPEATS} repeats, ratios measured side by side; {time.time() - t0:.0f} s)",
        "",
        "| figure | value | goal |",
        "|---|---:|---|",
    ]
    text += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out = ROOT / "BENCHMARKS.md"
    if not out.exists():
        out.write_text("# Benchmarks\n\nAppended by `make bench` (benchmarks/run_all.py). Newest last.\n")
    with open(out, "a") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
