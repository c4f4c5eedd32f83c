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

REPEATS = 5
WARMUP = 5  # steps dropped at the start of every timed loop


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


def make_student(work: Path) -> Path:
    from siren.models.student_ssl import TinyHubert

    torch.manual_seed(0)
    out = work / "student"
    TinyHubert.from_config(48, 2, 4, 96, 32, teacher_dim=64).save_pretrained(out)
    return out


class _Timer:
    """Wraps callables and sums their wall time per step (CPU: every op is synchronous, so wall time is the cost)."""

    def __init__(self):
        self.acc = 0.0
        self.per_step: list[float] = []

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc += time.perf_counter() - t

        return timed

    def end_step(self):
        self.per_step.append(self.acc)
        self.acc = 0.0


class NoCheckpoint:
    """Stands in for the trainer's checkpoint hook in timed loops: checkpoints are not part of a step."""

    frozen_ok = 1.0

    def __call__(self, step, metrics, **kwargs):
        return None


class _BareLoop:
    """The bare PyTorch loop: a stage step, backward, clipping and AdamW on a Trainer's modules, data and batches."""

    def __init__(self, built):
        built.tracker.finish()
        self.t = built
        groups = [
            {"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in built.optimizer.param_groups
        ]
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, betas=tuple(built.cfg.optim.betas))  # the trainer's groups and settings

    def forward(self, batch):
        return self.t.stage.step(self.t.modules, batch)

    def step(self, i: int) -> float:
        from siren.data.datasets import collate

        t0 = time.perf_counter()
        epoch, pos = divmod(i, self.t.batches.num_batches)
        self.t.dataset.set_epoch(epoch)
        batch = collate([self.t.dataset[k] for k in self.t.batches.epoch(epoch)[pos]])
        out = self.forward(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.t.cfg.train.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(out.loss.detach())
        return time.perf_counter() - t0


def bench_trainer_overhead(
    corpus: Path, teacher: Path, baseline: Path, student: Path, work: Path, batch: int, repeats: int, steps: int = 60
):
    """Adapt stage (the one with codebook *and* drift metrics): SIREN trainer vs a bare loop, step by step.

    The trainer logs every step (metrics.jsonl + W&B offline) and computes every per-step metric. The bare loop runs the
    same stage step on its own build of the same modules, on the same batches (same order and crops), with AdamW and
    gradient clipping, and nothing else: no Accelerate, metrics or W&B.

    The two run interleaved, one trainer step then one bare step, so both see the same machine at the same moment (this
    2-core VM's speed drifts by ±10 % over seconds). The bare step runs from the trainer's `tracker.log` call, after the
    trainer has read its step time; its own time is then subtracted from the next trainer step. Before each bare step
    the W&B queue is flushed, so the trainer is charged all of its W&B work (none of it overlaps the bare step).
    Per repeat the figure is the median over steps of trainer ÷ bare; the result is the median over repeats."""
    import siren.train.step_metrics as step_metrics_mod
    from siren.train.trainer import Trainer

    extra = {
        "baseline": str(baseline),
        "student_ssl.path": str(student),
        "train.max_steps": steps,
        "train.checkpoint_every": 10**6,
        "train.batch_size": batch,
    }
    ratios, metric_fracs, reduce_fracs, step_times = [], [], [], []
    for rep in range(repeats):
        # A Trainer only to build, load and pin a second copy of the modules and data; its loop is not used.
        bare = _BareLoop(Trainer(cfg_for("adapt", corpus, teacher, work / f"bare_{rep}", **extra)))
        tr = Trainer(cfg_for("adapt", corpus, teacher, work / f"trainer_{rep}", **extra))
        sm = tr.step_metrics
        assert sm.window is not None and sm.sources.drift is not None
        metric_t, reduce_t = _Timer(), _Timer()
        real_hist = step_metrics_mod.stream_histograms
        step_metrics_mod.stream_histograms = metric_t.wrap(real_hist)
        if sm.window.sparse:  # large codebooks: keys, push, summary and its host arithmetic instead of histograms
            for name in ("keys", "push", "summary", "finish"):
                setattr(sm.window, name, metric_t.wrap(getattr(sm.window, name)))
        else:  # (drift.vector calls from_rows itself: wrapped once, here)
            sm.window.push_flat = metric_t.wrap(sm.window.push_flat)
            sm.sources.drift.vector = metric_t.wrap(sm.sources.drift.vector)
            sm.window.vector = metric_t.wrap(sm.window.vector)
        real_reduce = sm.reduce

        def reduce_and_sync(*a, real_reduce=real_reduce, metric_t=metric_t, reduce_t=reduce_t, **k):
            t = time.perf_counter()
            out = real_reduce(*a, **k)  # includes the one host copy of the step
            reduce_t.acc += time.perf_counter() - t
            reduce_t.end_step()
            metric_t.end_step()
            return out

        bare_times: list[float] = []
        real_log = tr.tracker.log

        def log_then_bare(metrics, step, real_log=real_log, tr=tr, bare_times=bare_times, bare=bare):
            real_log(metrics, step)
            tr.tracker.flush()
            bare_times.append(bare.step(step - 1))

        sm.reduce = reduce_and_sync
        tr.tracker.log = log_then_bare
        tr.checkpoint = NoCheckpoint()  # checkpoints are not part of a step
        try:
            tr.fit()
        finally:
            step_metrics_mod.stream_histograms = real_hist
        raw = [r["train/step_time_s"] for r in _metrics(work / f"trainer_{rep}")]
        # Trainer step i (i ≥ 1) also contains the bare step run after step i − 1: take it out.
        siren_times = [raw[i] - bare_times[i - 1] for i in range(1, len(raw))]
        pairs = list(zip(siren_times[WARMUP:], bare_times[WARMUP + 1 :], strict=False))
        ratios.append(_median([a / b for a, b in pairs]))
        t_step = _median(siren_times[WARMUP:])
        step_times.append(t_step)
        metric_fracs.append(_median(metric_t.per_step[WARMUP:]) / t_step)
        reduce_fracs.append(_median(reduce_t.per_step[WARMUP:]) / t_step)
    return {
        "trainer_over_bare": _median(ratios),
        "trainer_over_bare_range": (min(ratios), max(ratios)),
        "ratios": ratios,
        "metrics_frac": _median(metric_fracs),
        "metrics_frac_range": (min(metric_fracs), max(metric_fracs)),
        "reduce_frac": _median(reduce_fracs),
        "step_ms": 1000 * _median(step_times),
        "repeats": repeats,
        "batch": batch,
    }


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

    from siren.coding.bitstream import _stream_probs
    from siren.data.audio import load_audio
    from siren.data.manifest import read_manifest
    from siren.models.codec import Codec
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
        (work / "b8").mkdir()
        (work / "b32").mkdir()
        os.environ["SIREN_ARTIFACT_CACHE"] = str(work / "artifacts")
        os.environ["WANDB_DIR"] = str(work / "wandb")
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
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
    marker = "<!-- make bench inserts the newest section below this line -->"
    doc = out.read_text() if out.exists() else f"# Benchmarks\n\n{marker}\n"
    if marker not in doc:
        doc = doc.rstrip("\n") + f"\n\n{marker}\n"
    head, tail = doc.split(marker, 1)
    out.write_text(head + marker + "\n" + "\n".join(text).lstrip("\n") + "\n" + tail)
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
