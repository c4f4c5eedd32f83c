"""`train.global_batch_size` keeps results independent of the process count: one process and two gloo processes
train on the same utterances per step and log the same losses (the per-process `train.batch_size` alone does not)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import ROOT, launch_cmd, reset_accelerate, stage_config

STEPS = 3
COMMON = {
    "train.max_steps": STEPS,
    "train.checkpoint_every": STEPS,
    "train.global_batch_size": 8,
    "samples.enabled": "false",
    "tracking.mode": "disabled",
}


def _losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("stage", ["vocoder"])
def test_one_and_two_processes_log_the_same_losses(stage, corpus_dir, teacher_dir, tmp_path, subprocess_env):
    from siren.train.trainer import Trainer

    one = tmp_path / "one"
    reset_accelerate()
    Trainer(stage_config(stage, corpus_dir, teacher_dir, one, **COMMON)).fit()
    reset_accelerate()
    two = tmp_path / "two"
    cmd = launch_cmd(stage, corpus_dir, teacher_dir, two, **COMMON)
    r = subprocess.run(cmd, env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((two / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["train"]["batch_size"] == 4  # 8 over 2 processes
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == STEPS
    # Step 1 is before any update: the same utterances give the same loss (to float rounding; with the per-process
    # batch alone the two runs would see 8 and 16 utterances). Later steps drift apart only by rounding, which Adam's
    # normalised first updates amplify (measured: 0.08 % at step 2, 4 % at step 3 on the tiny vocoder).
    assert b[0] == pytest.approx(a[0], rel=1e-5), (a, b)
    assert b == pytest.approx(a, rel=0.1), (a, b)
