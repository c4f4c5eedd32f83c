"""What the benchmarks share: the corpus and teacher they train on, the tiny configs, the interleaved trainer ÷ bare
loop measurement, and the writer of BENCHMARKS.md sections (newest first, under the marker)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def bench_workdir():
    """A temporary work directory for one benchmark run, with the artifact index and W&B's files inside it (so a run
    leaves nothing behind); removed on exit."""
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        os.environ["SIREN_ARTIFACT_CACHE"] = str(work / "artifacts")
        os.environ["WANDB_DIR"] = str(work / "wandb")
        yield work


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
    corpus: Path,
    teacher: Path,
    baseline: Path,
    student: Path,
    work: Path,
    batch: int,
    repeats: int,
    steps: int = 60,
    *,
    make_cfg=None,
    warmup: int = WARMUP,
    timed: tuple[str, ...] = (),
):
    """Adapt stage (the one with codebook *and* drift metrics): SIREN trainer vs a bare loop, step by step.

    The trainer logs every step (metrics.jsonl + W&B offline) and computes every per-step metric. The bare loop runs the
    same stage step on its own build of the same modules, on the same batches (same order and crops), with AdamW and
    gradient clipping, and nothing else: no Accelerate, metrics or W&B.

    The two run interleaved, one trainer step then one bare step, so both see the same machine at the same moment (this
    2-core VM's speed drifts by ±10 % over seconds). The bare step runs from the trainer's `tracker.log` call, after the
    trainer has read its step time; its own time is then subtracted from the next trainer step. Before each bare step
    the W&B queue is flushed, so the trainer is charged all of its W&B work (none of it overlaps the bare step).
    Per repeat the figure is the median over steps of trainer ÷ bare; the result is the median over repeats.

    `make_cfg(run_dir, **overrides)` builds the config (default: `cfg_for("adapt", corpus, teacher, ...)`, the tiny
    preset); the first `warmup` steps of each repeat are dropped; each stage method named in `timed` is timed inside
    the trainer's steps and reported as `frac/NAME`, its median share of the step time."""
    import siren.train.step_metrics as step_metrics_mod
    from siren.train.trainer import Trainer

    if make_cfg is None:

        def make_cfg(run, **extra):
            return cfg_for("adapt", corpus, teacher, run, **extra)

    extra = {
        "baseline": str(baseline),
        "student_ssl.path": str(student),
        "train.max_steps": steps,
        "train.checkpoint_every": 10**6,
        "train.batch_size": batch,
    }
    ratios, metric_fracs, reduce_fracs, step_times = [], [], [], []
    stage_fracs: dict[str, list[float]] = {name: [] for name in timed}
    for rep in range(repeats):
        # A Trainer only to build, load and pin a second copy of the modules and data; its loop is not used.
        bare = _BareLoop(Trainer(make_cfg(work / f"bare_{rep}", **extra)))
        tr = Trainer(make_cfg(work / f"trainer_{rep}", **extra))
        sm = tr.step_metrics
        assert sm.window is not None and sm.sources.drift is not None
        metric_t, reduce_t = _Timer(), _Timer()
        stage_t = {name: _Timer() for name in timed}
        for name, timer in stage_t.items():
            setattr(tr.stage, name, timer.wrap(getattr(tr.stage, name)))
        real_hist = getattr(step_metrics_mod, "stream_histograms", None)
        if not hasattr(sm.window, "sparse"):  # one CodebookWindow: its four calls of a step (keys, reduce, push,
            for name in ("keys", "reduce", "push", "metrics"):  # metrics: drift included) are the metric work
                setattr(sm.window, name, metric_t.wrap(getattr(sm.window, name)))
        elif sm.window.sparse:  # large codebooks: keys, push, summary and its host arithmetic instead of histograms
            for name in ("keys", "push", "summary", "finish"):
                setattr(sm.window, name, metric_t.wrap(getattr(sm.window, name)))
        else:  # (drift.vector calls from_rows itself: wrapped once, here)
            step_metrics_mod.stream_histograms = metric_t.wrap(real_hist)
            sm.window.push_flat = metric_t.wrap(sm.window.push_flat)
            sm.sources.drift.vector = metric_t.wrap(sm.sources.drift.vector)
            sm.window.vector = metric_t.wrap(sm.window.vector)
        real_reduce = sm.reduce

        def reduce_and_sync(*a, real_reduce=real_reduce, metric_t=metric_t, reduce_t=reduce_t, stage_t=stage_t, **k):
            t = time.perf_counter()
            out = real_reduce(*a, **k)  # includes the one host copy of the step
            reduce_t.acc += time.perf_counter() - t
            reduce_t.end_step()
            metric_t.end_step()
            for timer in stage_t.values():
                timer.end_step()
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
            if real_hist is not None:
                step_metrics_mod.stream_histograms = real_hist
        raw = [r["train/step_time_s"] for r in _metrics(work / f"trainer_{rep}")]
        # Trainer step i (i ≥ 1) also contains the bare step run after step i − 1: take it out.
        siren_times = [raw[i] - bare_times[i - 1] for i in range(1, len(raw))]
        pairs = list(zip(siren_times[warmup:], bare_times[warmup + 1 :], strict=False))
        ratios.append(_median([a / b for a, b in pairs]))
        t_step = _median(siren_times[warmup:])
        step_times.append(t_step)
        metric_fracs.append(_median(metric_t.per_step[warmup:]) / t_step)
        reduce_fracs.append(_median(reduce_t.per_step[warmup:]) / t_step)
        for name, timer in stage_t.items():
            stage_fracs[name].append(_median(timer.per_step[warmup:]) / t_step)
    return {
        **{f"frac/{name}": _median(v) for name, v in stage_fracs.items()},
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


def _metrics(run: Path):
    from siren.train.tracking import read_metrics

    return read_metrics(run / "metrics.jsonl")


def write_section(rows: list[tuple[str, str, str]], title: str | None, command_line: str) -> None:
    """Insert a dated section (date, commit, machine, the command line, the figures) in BENCHMARKS.md under the
    marker, newest first, and print it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    text = [
        f"\n## {date} — {title + ' — ' if title else ''}commit {commit.strip()} — {machine}",
        "",
        command_line,
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
