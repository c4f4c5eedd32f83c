"""`adapt` with 2 processes on CPU through `accelerate launch` (gloo): one run, rank 0 writes, counts merged."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, accelerate_launch, stage_overrides
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def baseline_and_student(codec_run, tmp_path_factory):
    """The session's tiny codec run as the baseline (read only) and a tiny student, under a root of this module."""
    root = tmp_path_factory.mktemp("mp")
    from siren.models.student_ssl import TinyHubert

    torch.manual_seed(0)
    TinyHubert.from_config(48, 2, 4, 96, 32, teacher_dim=64).save_pretrained(root / "student")
    return root, codec_run


def test_two_process_adapt(baseline_and_student, corpus_dir, teacher_dir, subprocess_env):
    root, codec = baseline_and_student
    run = root / "adapt_ddp"
    batch = 4
    args = stage_overrides(
        "adapt",
        corpus_dir,
        teacher_dir,
        run,
        baseline=str(codec),
        **{
            "student_ssl.path": str(root / "student"),
            "train.max_steps": 4,
            "train.checkpoint_every": 2,
            "tracking.mode": "offline",  # one W&B run for the two ranks
            "train.batch_size": batch,
            "samples.enabled": "false",
            "loss.teacher_targets": "full",  # whole-utterance targets from the cache that `siren cache` fills
        },
    )

    def launch(command: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            *accelerate_launch(),
            "-m",
            "siren",
            command,
            "--config",
            str(ROOT / "configs/demo/base.yaml"),
            *args,
        ]
        r = subprocess.run(cmd, env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "terminate called" not in r.stderr
        return r

    # `siren cache`: both processes fill the teacher cache, each its share of train and of val.
    r = launch("cache")
    counts = {
        (int(m[0]), m[1]): int(m[2]) for m in re.findall(r"rank (\d)/2 teacher (train|val): computed (\d+)", r.stdout)
    }
    assert set(counts) == {(0, "train"), (1, "train"), (0, "val"), (1, "val")}
    assert all(n > 0 for n in counts.values()) and abs(counts[0, "train"] - counts[1, "train"]) <= 1
    # The 2-process run finds everything cached: nothing is computed at start.
    r = launch("train")
    fills = re.findall(r"teacher cache \S+: (\d+) computed here, (\d+) reused", r.stderr)
    assert len(fills) == 4 and all(int(c) == 0 and int(k) > 0 for c, k in fills), fills

    # One run directory, one W&B run, only rank 0 wrote metrics (no duplicated steps).
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    meta = json.loads((run / "checkpoints" / "step_4" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert all(x["frozen/ok"] == 1.0 for x in rows)

    # The baseline profile: each rank profiled half of the reference subset and the sums were reduced, so it equals a
    # one-process profile of the whole subset (here all of val, fewer than data.profile_utts).
    from siren.metrics.profile import profile_checkpoint

    prof = json.loads((run / "baseline_profile.json").read_text())
    ref = profile_checkpoint(str(codec), str(corpus_dir / "val.jsonl"))
    assert prof["num_utts"] == ref["num_utts"] > 1 and prof["histograms"] == ref["histograms"]
    assert abs(prof["bps_entropy"] - ref["bps_entropy"]) < 1e-6 * ref["bps_entropy"]

    # Frozen fingerprints intact: the checkpoint's frozen tensors equal the baseline's.
    base = codec / "checkpoints" / (codec / "checkpoints" / "latest").read_text().strip() / "components"
    for name in ("decoder", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model"):
        a = load_file(base / f"{name}.safetensors")
        b = load_file(run / "checkpoints" / "step_4" / "components" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # Codebook counts are the sum over ranks: every utterance gives one speaker code per group, so one step's
    # merged spk histogram holds batch_size × 2 processes codes per group.
    window = torch.load(run / "checkpoints" / "step_4" / "trainer" / "codebook_window.pt")
    spk = window["buffers"]["spk"]  # (window, groups, K)
    per_step = spk.sum(-1)[: window["pos"]]
    assert torch.all(per_step == batch * 2), per_step
