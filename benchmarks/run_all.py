"""`make bench`: ratios measured side by side in one run, repeated, median reported; appended to BENCHMARKS.md.

Figures (goal in brackets):
  1. trainer step time (all per-step metrics, W&B offline) ÷ bare PyTorch loop, same model/batch/optimizer [≤ 1.03],
     adapt stage, steps interleaved one by one (see `bench_trainer_overhead`), at batch 8 and batch 32
  2. per-step codebook + drift metric time ÷ step time [≤ 1 %]
  3. bitstream bytes ÷ entropy-model estimate on the eval set [≤ 1.01]: one stream and per file; header apart
  4. encode / decode speed in × real time, 1 CPU thread, `tiny` and `ultra200bps` presets (8 flow steps)
  5. data loader throughput ÷ training consumption [≫ 1]
  6. data path at scale (bench_data.py): 1M-row start-up [≤ 10 s] and memory [≤ 1 GiB], read amplification,
     cache fill with 2 processes ÷ 1 [≥ 1.8], step time with cached vs live features
  7. bitstream encoder peak memory at 2^16 codes per level, 10 s and 60 s of codes (bench_bitstream_memory.py),
     60 s ÷ 10 s [≤ 1.5]
  8. throughput card (bench_throughput.py): adapt at real sizes (HuBERT-base-sized teacher, ultra200bps) — audio
     seconds trained per second, trainer ÷ bare loop, the teacher's share of a step, teacher_targets full ÷ crop and
     full's one-off cache
  9. a checkpoint's mel images (bench_samples.py): a process saving 8 of them with siren's writer ÷ with matplotlib
     [< 1], CPU and wall
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB__DISABLE_STATS", "true")

import torch  # noqa: E402
from common import (  # noqa: E402
    REPEATS,
    NoCheckpoint,
    _median,
    _metrics,
    bench_trainer_overhead,
    bench_workdir,
    cfg_for,
    make_student,
    setup_corpus,
    write_section,
)


def bench_trainer_overhead_ddp(
    corpus: Path, teacher: Path, baseline: Path, student: Path, work: Path, batch: int, repeats: int
) -> dict:
    """The same figure with 2 gloo processes: 2-process trainer ÷ 2-process bare DDP loop (benchmarks/bench_ddp.py)."""
    import json
    import socket

    ratios, steps = [], []
    for rep in range(repeats):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = work / f"ddp_{rep}.json"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "launch/accelerate/cpu_ddp.yaml"), "--main_process_port", str(port),
            str(ROOT / "benchmarks/bench_ddp.py"),
            "--corpus", str(corpus), "--teacher", str(teacher), "--baseline", str(baseline), "--student", str(student),
            "--work", str(work / f"ddp_{rep}"), "--out", str(out), "--batch", str(batch),
        ]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"2-process bench failed:\n{r.stderr[-3000:]}")
        res = json.loads(out.read_text())
        ratios.append(res["trainer_over_bare"])
        steps.append(res["step_ms"])
    return {
        "trainer_over_bare": _median(ratios),
        "trainer_over_bare_range": (min(ratios), max(ratios)),
        "step_ms": _median(steps),
        "repeats": repeats,
        "batch": batch,
    }


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

    from siren.codec import Codec
    from siren.coding.bitstream import _stream_probs
    from siren.data.audio import load_audio
    from siren.data.manifest import read_manifest
    from siren.train.trainer import Trainer

    run = work / "codec_bits"
    Trainer(cfg_for("codec", corpus, teacher, run, **{"train.max_steps": 300, "train.checkpoint_every": 300})).fit()
    codec = Codec.from_checkpoint(str(run), use_pipeline=False)
    fam = constriction.stream.model.Categorical(perfect=False)
    stream = constriction.stream.queue.RangeEncoder()
    payload = estimate = header = seconds = 0.0
    files = 0
    for u in read_manifest(corpus / "val.jsonl"):
        codes = codec.encode(load_audio(u.path))
        enc = codec.to_encoded(codes)
        payload += enc.payload_bits
        estimate += enc.estimate_bits
        header += enc.header_bits
        seconds += enc.seconds
        files += 1
        for name, c in (("sem", codes.sem), ("pro", codes.pro)):
            for t in range(c.shape[1]):
                probs = _stream_probs(codec.components["entropy_model"], name, c, t)
                stream.encode(c[0, t].numpy().astype(np.int32), fam, probs)
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
    from siren.models.analysis import analyse
    from siren.models.builders import build_component

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
    with bench_workdir() as work:
        (work / "b8").mkdir()
        (work / "b32").mkdir()
        corpus, teacher = setup_corpus(work)
        bs = bench_bitstream(corpus, teacher, work)  # trains the codec that adapt below uses as its baseline
        student = make_student(work)
        # The tiny preset's step is short (worst case for a fixed per-step cost); batch 32 is a 3× longer step.
        tr = bench_trainer_overhead(
            corpus, teacher, work / "codec_bits", student, work / "b8", batch=8, repeats=REPEATS
        )
        tr32 = bench_trainer_overhead(corpus, teacher, work / "codec_bits", student, work / "b32", batch=32, repeats=3)
        ddp = bench_trainer_overhead_ddp(corpus, teacher, work / "codec_bits", student, work, batch=8, repeats=3)
        ld = bench_loader(corpus, teacher, work)
        speed = {p: bench_codec_speed(p, corpus, teacher, work) for p in ("tiny", "ultra200bps")}
        from bench_codec import run as bench_codec_run  # the codec as a product (issue 14)

        product = bench_codec_run(work, corpus, teacher)
        from bench_codebooks import run as bench_codebooks_run  # large implicit codebooks (issue 12)

        from siren.train.trainer import Trainer

        def adapt_trainer(n=iter(range(10**6))):  # a fresh tiny adapt run (batch 8) for each timed codebook size
            t = Trainer(
                cfg_for(
                    "adapt", corpus, teacher, work / f"codebooks_{next(n)}", baseline=str(work / "codec_bits"),
                    **{"student_ssl.path": str(student), "train.max_steps": 60, "train.checkpoint_every": 10**6},
                )
            )  # fmt: skip
            t.checkpoint = NoCheckpoint()
            return t

        # timed inside real tiny adapt steps; the dense path alone ÷ the adapt step measured above, beside it
        codebooks = bench_codebooks_run(tr["step_ms"], make_trainer=adapt_trainer)
        from bench_frozen_check import run as bench_frozen_run  # frozen/ok every step (issue 13)

        frozen = bench_frozen_run(work, corpus, teacher)
        # Data path at scale (benchmarks/bench_data.py): start-up, memory, read amplification, cache fill, cached step.
        from bench_data import rows as data_rows

        data = data_rows(corpus, teacher, work / "data")
        # The bitstream encoder's peak memory at 2^16 codes per level (benchmarks/bench_bitstream_memory.py).
        from bench_bitstream_memory import rows as bitstream_memory_rows

        bitstream_memory = bitstream_memory_rows()
        # The adapt stage at real sizes: HuBERT-base-sized teacher, ultra200bps (benchmarks/bench_throughput.py).
        from bench_throughput import run as throughput_rows

        throughput = throughput_rows(work / "throughput", corpus)
        # A checkpoint's mel images, as whole processes: siren's writer ÷ the matplotlib one (bench_samples.py).
        from bench_samples import run as samples_rows

        samples = samples_rows(REPEATS, 8)
    rows = [
        (
            f"frozen/ok check every step ÷ step time ({frozen['frozen_tensors']} frozen tensors, "
            f"{frozen['check_ms']:.3f} ms vs {frozen['step_ms']:.0f} ms/step on {frozen['device']}; full sha256 "
            f"{frozen['sha256_ms']:.0f} ms at checkpoints only)",
            f"{100 * frozen['check_over_step']:.3f} %",
            "≤ 0.5 %",
        ),
        *[
            (
                f"trainer step ÷ bare PyTorch loop (adapt, tiny, batch {t['batch']} × 2 s, {t['step_ms']:.0f} ms/step; "
                f"metrics and W&B offline every step; {t['repeats']} repeats ranged {t['trainer_over_bare_range'][0]:.3f}"
                f"–{t['trainer_over_bare_range'][1]:.3f})",
                f"{t['trainer_over_bare']:.3f}",
                "≤ 1.03",
            )
            for t in (tr, tr32)
        ],
        (
            f"2-process trainer step ÷ 2-process bare DDP loop (adapt, tiny, batch 8 per process, gloo on CPU, "
            f"{ddp['step_ms']:.0f} ms/step; {ddp['repeats']} repeats ranged {ddp['trainer_over_bare_range'][0]:.3f}"
            f"–{ddp['trainer_over_bare_range'][1]:.3f})",
            f"{ddp['trainer_over_bare']:.3f}",
            "≤ 1.03",
        ),
        *[
            (
                f"per-step codebook + drift metrics ÷ step time (adapt, batch {t['batch']}; repeats ranged "
                f"{100 * t['metrics_frac_range'][0]:.2f}–{100 * t['metrics_frac_range'][1]:.2f} %)",
                f"{100 * t['metrics_frac']:.2f} %",
                "≤ 1 %",
            )
            for t in (tr, tr32)
        ],
        (
            "the whole per-step metric reduction (loss terms, codebook, drift, the one host copy) ÷ step time, batch 8",
            f"{100 * tr['reduce_frac']:.2f} %",
            "—",
        ),
        (
            "trainer's fixed cost per step (trainer − bare, batch 8; W&B's background work charged in full)",
            f"{tr['step_ms'] * (1 - 1 / tr['trainer_over_bare']):.1f} ms",
            "—",
        ),
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
    rows += data
    rows += bitstream_memory
    for p, s in speed.items():
        feats = "hubert-base-sized teacher features" if p == "ultra200bps" else "its tiny teacher's features"
        rows.append((f"encode speed, {p}, {feats}, 1 thread (× real time)", f"{s['encode_xrt']:.1f}", "—"))
        rows.append((f"decode speed, {p}, 8 flow steps, 1 thread (× real time)", f"{s['decode_xrt']:.1f}", "—"))
    rows += [(k.split(" [")[0], v, k.split(" [")[1][:-1] if " [" in k else "—") for k, v in product.items()]
    rows += codebooks
    rows += throughput
    rows += samples
    write_section(
        rows,
        None,
        f"Command: `make bench` (median of {REPEATS} repeats, ratios measured side by side; {time.time() - t0:.0f} s)",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
