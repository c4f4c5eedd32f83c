"""Cost of `frozen/ok` every step (issue 13): the on-device checksum of every frozen tensor ÷ a training step [≤ 0.5 %].

An adapt-like set-up on the tiny preset: a codec-stage trainer with the SSL teacher and the decoder frozen. The check
is timed on its own (median of many calls, after warm-up) and divided by the median step time of the same trainer;
the full sha256 (checkpoints only) is timed too, for scale. `python benchmarks/bench_frozen_check.py` runs it alone.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(work: Path, corpus: Path, teacher: Path, steps: int = 12, calls: int = 200) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import stage_config

    from siren.train.trainer import Trainer

    cfg = stage_config(
        "codec",
        corpus,
        teacher,
        work / "frozen_bench",
        **{
            "trainable": "[factorizer,sem_quantizer,pro_quantizer,spk_quantizer,entropy_model]",
            "train.max_steps": steps,
            "train.checkpoint_every": 10**6,
            "samples.enabled": "false",
            "tracking.mode": "disabled",
            "train.batch_size": 8,
        },
    )
    trainer = Trainer(cfg)
    step_s = []
    for s in range(steps):
        t0 = time.perf_counter()
        trainer._train_step(s, preempt=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0)
    step = statistics.median(step_s[2:])
    guard = trainer.frozen_guard
    for _ in range(10):
        guard.check()
    check_s = []
    for _ in range(calls):
        t0 = time.perf_counter()
        guard.check()
        check_s.append(time.perf_counter() - t0)
    check = statistics.median(check_s)
    t0 = time.perf_counter()
    trainer.registry.check_frozen()
    sha = time.perf_counter() - t0
    trainer.finish()
    n_params = sum(t.numel() for _, t in guard.tensors)
    return {
        "step_ms": step * 1e3,
        "check_ms": check * 1e3,
        "sha256_ms": sha * 1e3,
        "check_over_step": check / step,
        "frozen_tensors": len(guard.tensors),
        "frozen_elements": n_params,
        "device": str(trainer.accelerator.device),
    }


def main() -> int:
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    from common import setup_corpus

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        corpus, teacher = setup_corpus(work)
        r = run(work, corpus, teacher)
    print(
        f"frozen/ok check: {r['check_ms']:.3f} ms for {r['frozen_tensors']} tensors ({r['frozen_elements']:,} elements) "
        f"on {r['device']}; step {r['step_ms']:.1f} ms → {100 * r['check_over_step']:.3f} % of a step (goal ≤ 0.5 %); "
        f"full sha256 {r['sha256_ms']:.1f} ms (checkpoints only)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
