"""Throughput card: the adapt stage at real sizes on this machine, to plan compute from.

Real sizes: a HuBERT-base-sized teacher (`siren init-ssl --like hubert-base`: 768-d, 12 layers, random weights; speed
does not depend on them) and the `ultra200bps` factorizer, quantizers, entropy model and decoder, with its student
(TinyHubert at the preset's geometry). The baseline codec is that preset trained for one step (its weights do not
matter for speed either). Batch `BATCH` × `SEGMENT` s crops of the embedded TTS corpus, PyTorch's default threads.

Figures, a few steps each (the first `WARMUP` of every loop dropped), median over `REPEATS`:
  1. audio seconds trained per second, trainer (`loss.teacher_targets=crop`, the default)
  2. trainer step ÷ bare PyTorch loop (common.py's `bench_trainer_overhead`: same modules, batches and optimizer,
     steps interleaved one by one)
  3. the teacher's share of a trainer step (the teacher path, ssl → baseline factorizer → quantizers, on the crop)
  4. `teacher_targets`: `full` ÷ `crop` step time (bare loops of each, steps interleaved), and the one-off cost of
     `full`'s teacher cache (the teacher path over every train and val utterance, at the full Trainer's setup)

Run alone: `python benchmarks/bench_throughput.py [--write]` (--write inserts a section in BENCHMARKS.md); `make bench`
runs it with the other benches.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB__DISABLE_STATS", "true")

import torch  # noqa: E402

BATCH = 4
SEGMENT = 2.0  # seconds per crop
STEPS = 5  # per trainer loop (each trainer step is followed by a bare step)
WARMUP = 1
REPEATS = 3
MODE_STEPS = 3  # interleaved crop / full bare steps per repeat (after WARMUP)
TRAIN_UTTS, VAL_UTTS = 12, 2  # a subset of the corpus: the full mode's cache is filled over all of it


def _median(xs):
    return statistics.median(xs)


def subset(corpus: Path, out: Path) -> Path:
    """The first TRAIN_UTTS / VAL_UTTS rows of the corpus's manifests (the cache fill's cost grows with the corpus)."""
    from siren.data.manifest import read_manifest, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", TRAIN_UTTS), ("val", VAL_UTTS)):
        write_manifest(out / f"{split}.jsonl", read_manifest(corpus / f"{split}.jsonl")[:n])
    return out


def setup(work: Path, corpus: Path) -> dict:
    """The hubert-base-sized teacher, the preset's student, a config file extending the demo base with ultra200bps,
    and the baseline codec (ultra200bps, 1 step) → paths."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import stage_overrides

    from siren.config.loader import load_config
    from siren.models.ssl import save_random_teacher
    from siren.models.student_ssl import TinyHubert
    from siren.train.trainer import Trainer

    teacher = save_random_teacher(work / "hubert_base", like="hubert-base", seed=0)
    base = work / "ultra.yaml"
    base.write_text(
        f"extends: [{ROOT / 'configs/demo/base.yaml'}, {ROOT / 'configs/model/ultra200bps.yaml'}]\n"
        "tracking:\n  project: siren-bench\n"
    )
    s = load_config(base).student_ssl
    torch.manual_seed(0)
    student = work / "student_ultra"
    TinyHubert.from_config(
        s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size, s.conv_dim, teacher_dim=s.teacher_dim
    ).save_pretrained(student)
    common = {"samples.enabled": "false", "data.segment_seconds": SEGMENT, "train.batch_size": BATCH}
    baseline = work / "codec_ultra"
    ov = stage_overrides(
        "codec", corpus, teacher, baseline, **common, **{"train.max_steps": 1, "train.checkpoint_every": 1}
    )
    Trainer(load_config(base, ov)).fit()

    def make_cfg(mode: str):
        def build(run: Path, **extra):
            extra = {**common, "loss.teacher_targets": mode, "data.feature_cache": str(work / "cache"), **extra}
            return load_config(base, stage_overrides("adapt", corpus, teacher, run, **extra))

        return build

    return {"teacher": teacher, "student": student, "baseline": baseline, "make_cfg": make_cfg}


def bench_modes(corpus: Path, env: dict, work: Path, repeats: int = REPEATS) -> dict:
    """`full` ÷ `crop` step time: a bare loop of each mode on the same batches, one step of each in turn; and the
    teacher cache `full` fills at its setup (timed around `fill_teacher`)."""
    from common import _BareLoop

    import siren.data.cache_fill as cache_fill
    from siren.train.trainer import Trainer

    extra = {
        "baseline": str(env["baseline"]),
        "student_ssl.path": str(env["student"]),
        "train.max_steps": 10**6,
        "train.checkpoint_every": 10**6,
    }
    from siren.data.manifest import read_manifest

    audio = sum(u.duration for split in ("train", "val") for u in read_manifest(corpus / f"{split}.jsonl"))
    fills: list[float] = []
    real_fill = cache_fill.fill_teacher

    def timed_fill(*a, **k):
        t = time.perf_counter()
        out = real_fill(*a, **k)
        fills.append(time.perf_counter() - t)
        return out

    ratios, crop_ms, full_ms = [], [], []
    cache_fill.fill_teacher = timed_fill
    try:
        for rep in range(repeats):
            # one cache for all repeats: the first full Trainer fills it (timed), the later ones read it
            mk = {m: env["make_cfg"](m) for m in ("crop", "full")}
            loops = {m: _BareLoop(Trainer(mk[m](work / f"{m}_{rep}", **extra))) for m in ("crop", "full")}
            times = {"crop": [], "full": []}
            for i in range(WARMUP + MODE_STEPS):
                for m, loop in loops.items():
                    times[m].append(loop.step(i))
            c, f = times["crop"][WARMUP:], times["full"][WARMUP:]
            ratios.append(_median([b / a for a, b in zip(c, f, strict=True)]))
            crop_ms.append(1000 * _median(c))
            full_ms.append(1000 * _median(f))
    finally:
        cache_fill.fill_teacher = real_fill
    if len(fills) != repeats:  # every full Trainer sets its cache up (the first fills it, the others find it)
        raise RuntimeError(f"the full-mode teacher cache was set up {len(fills)} times in {repeats} repeats")
    return {
        "full_over_crop": _median(ratios),
        "range": (min(ratios), max(ratios)),
        "crop_ms": _median(crop_ms),
        "full_ms": _median(full_ms),
        "fill_s": fills[0],
        "cached_setup_s": _median(fills[1:]) if len(fills) > 1 else float("nan"),
        "fill_audio_s": audio,
    }


def run(work: Path, corpus: Path, repeats: int = REPEATS) -> list[tuple[str, str, str]]:
    """All figures as (figure, value, goal) rows for BENCHMARKS.md."""
    from common import bench_trainer_overhead

    t0 = time.perf_counter()
    corpus = subset(corpus, work / "corpus_subset")
    env = setup(work, corpus)
    t_setup = time.perf_counter() - t0
    tr = bench_trainer_overhead(
        corpus,
        env["teacher"],
        env["baseline"],
        env["student"],
        work / "overhead",
        batch=BATCH,
        repeats=repeats,
        steps=STEPS,
        make_cfg=env["make_cfg"]("crop"),
        warmup=WARMUP,
        timed=("_crop_teacher",),
    )
    modes = bench_modes(corpus, env, work / "modes", repeats)
    audio = BATCH * SEGMENT
    size = f"adapt, ultra200bps + hubert-base-sized teacher, batch {BATCH} × {SEGMENT:.0f} s, {os.cpu_count()} threads"
    lo, hi = tr["trainer_over_bare_range"]
    mlo, mhi = modes["range"]
    return [
        (
            f"audio seconds trained per second ({size}; teacher_targets crop; {tr['step_ms'] / 1000:.2f} s/step)",
            f"{audio / (tr['step_ms'] / 1000):.2f}",
            "—",
        ),
        (
            f"trainer step ÷ bare PyTorch loop ({size}; {repeats} repeats of {STEPS - WARMUP - 1} step pairs ranged "
            f"{lo:.3f}–{hi:.3f})",
            f"{tr['trainer_over_bare']:.3f}",
            "≤ 1.03",
        ),
        (
            "teacher's share of a trainer step (teacher path on the crop: ssl → baseline factorizer → quantizers)",
            f"{100 * tr['frac/_crop_teacher']:.0f} %",
            "—",
        ),
        (
            f"teacher_targets full ÷ crop, step time (bare loops interleaved; median step crop "
            f"{modes['crop_ms'] / 1000:.2f} s, full {modes['full_ms'] / 1000:.2f} s; {repeats} repeats ranged "
            f"{mlo:.3f}–{mhi:.3f})",
            f"{modes['full_over_crop']:.3f}",
            "—",
        ),
        (
            f"teacher cache for full, one-off ({modes['fill_audio_s']:.0f} s of train + val audio, "
            f"{modes['fill_s'] / max(modes['fill_audio_s'], 1e-9):.3f} s per audio second; a later run finds it in "
            f"{modes['cached_setup_s']:.1f} s)",
            f"{modes['fill_s']:.1f} s",
            "—",
        ),
        ("set-up (teacher, student, 1-step ultra200bps baseline codec)", f"{t_setup:.0f} s", "—"),
    ]


def main() -> int:
    import argparse

    from common import bench_workdir

    from siren.data.corpus import build_corpus

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="insert the figures as a new section of BENCHMARKS.md")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--note", default="", help="a line printed under the section's command (e.g. the machine's load)")
    args = p.parse_args()
    t0 = time.time()
    with bench_workdir() as work:
        corpus = work / "corpus"
        build_corpus(corpus, n=48, seed=0, progress=False)
        rows = run(work, corpus, args.repeats)
    command = "python benchmarks/bench_throughput.py --write" + (
        f" --repeats {args.repeats}" if args.repeats != REPEATS else ""
    )
    if args.write:
        from common import write_section

        write_section(
            rows,
            f"throughput card (issue 22), {args.repeats} repeats",
            f"Command: `{command}` ({time.time() - t0:.0f} s)" + (f". {args.note}" if args.note else ""),
        )
    for a, b, c in rows:
        print(f"| {a} | {b} | {c} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
