"""2-process trainer ÷ 2-process bare DDP loop, interleaved step by step (run by `make bench` under `accelerate launch`
with launch/accelerate/cpu_ddp.yaml; not meant to be run alone).

Each rank builds two Trainers on the `adapt` stage: one runs its own loop (every per-step metric, the all-reduce, W&B
offline on rank 0), the other only lends its DDP-wrapped trainable core, modules and batches to a bare loop (the stage
step inside DDP, backward, clipping, AdamW; nothing else). As in the 1-process figure, one trainer step is followed by
one bare step, and the bare step's time is taken out of the next trainer step. Rank 0 writes the ratios to --out.
"""

from __future__ import annotations

import argparse
import json
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

from common import _BareLoop  # noqa: E402


class BareDDP(_BareLoop):
    """The bare loop with the stage step inside the Trainer's DDP-wrapped core: gradients sync in backward."""

    def forward(self, batch):
        return self.t.core(self.t.stage.step, self.t.frozen, batch)["out"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()

    from common import NoCheckpoint, cfg_for

    from siren.train.trainer import Trainer

    extra = {
        "baseline": a.baseline,
        "student_ssl.path": a.student,
        "train.max_steps": a.steps,
        "train.checkpoint_every": 10**6,
        "train.batch_size": a.batch,
    }
    corpus, teacher, work = Path(a.corpus), Path(a.teacher), Path(a.work)
    bare = BareDDP(Trainer(cfg_for("adapt", corpus, teacher, work / "bare", **extra)))
    tr = Trainer(cfg_for("adapt", corpus, teacher, work / "trainer", **extra))
    bare_times: list[float] = []
    step_times: list[float] = []
    real_train_step = tr._train_step

    def train_then_bare(step, preempt):
        t = time.perf_counter()
        out = real_train_step(step, preempt)
        step_times.append(time.perf_counter() - t)
        bare_times.append(bare.step(step))
        return out

    # Time the trainer's whole step (micro-batches, reduce, update, bookkeeping) via its one entry point, then the
    # bare step; logging happens after `_train_step` returns, so it is charged to the next trainer step here.
    tr._train_step = train_then_bare
    tr.checkpoint = NoCheckpoint()
    tr.fit()
    raw = [r["train/step_time_s"] for r in _metrics(work / "trainer")] if tr.is_main else []
    if tr.is_main:
        # step_time_s covers trainer step i + the bare step run inside it: subtract the bare step.
        siren_times = [raw[i] - bare_times[i] for i in range(len(raw))]
        pairs = list(zip(siren_times[a.warmup :], bare_times[a.warmup :], strict=True))
        ratio = statistics.median([s / b for s, b in pairs])
        Path(a.out).write_text(
            json.dumps({"trainer_over_bare": ratio, "step_ms": 1000 * statistics.median(siren_times[a.warmup :])})
        )
    return 0


def _metrics(run: Path):
    from siren.train.tracking import read_metrics

    return read_metrics(run / "metrics.jsonl")


if __name__ == "__main__":
    raise SystemExit(main())
