"""Reliability: kills at random moments and during a checkpoint write, bad audio, NaN losses, W&B failures."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import warnings
from pathlib import Path

import mechanisms
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import ROOT, isolated_tracking, rewind, stage_config, train_cmd, with_fault
from safetensors.torch import load_file

from siren.data.manifest import read_manifest, write_manifest
from siren.errors import FrozenViolation, SirenError
from siren.train.tracking import read_metrics
from siren.train.trainer import Trainer, TrainingAborted

# No W&B in these runs: what is killed and resumed here is the checkpoint; a killed run's W&B run is resumed and
# compared with its metrics in tests/test_trust.py. (W&B's start costs each process ~2 s of CPU.)
OV = {"train.max_steps": 40, "train.checkpoint_every": 8, "samples.enabled": "false", "tracking.mode": "disabled"}
# The killed runs: the trainer's checkpoint and resume are the same whatever the stage, and the vocoder stage builds
# no HuBERT (each killed process starts ~2 s sooner). The codec stage's own kill and bitwise resume (its quantizers
# and entropy model) is tests/test_trainer.py's test_sigkill_and_resume_reproduces_losses_bitwise.
KILL_STAGE = "vocoder"


def _codec(corpus: Path, teacher: Path, tmp_path: Path, **overrides):
    """A tiny codec-stage config with its run dir at tmp_path/run and no audio samples."""
    return stage_config("codec", corpus, teacher, tmp_path / "run", **{"samples.enabled": "false", **overrides})


def _cmd(corpus, teacher, run: Path, **extra) -> list[str]:
    return train_cmd(KILL_STAGE, corpus, teacher, run, **{**OV, **extra})


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "checkpoints" / f"step_{step}" / "components").glob("*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def reference_run(corpus_dir, teacher_dir, tmp_path_factory):
    """The uninterrupted run, trained in this process: the weights are a function of the config and the seeds, not of
    the process that computed them (the killed runs compared with it are real processes)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    with isolated_tracking(run.parent):
        Trainer(stage_config(KILL_STAGE, corpus_dir, teacher_dir, run, **OV)).fit()
    return run


def _resume_to_the_end(corpus, teacher, run: Path) -> None:
    """The run after its last kill, resumed in this process: only the kills need a process of their own."""
    Trainer(stage_config(KILL_STAGE, corpus, teacher, run, **OV)).fit()


def _latest(run: Path) -> int:
    f = run / "checkpoints" / "latest"
    return int(f.read_text().strip().removeprefix("step_")) if f.is_file() else 0


def test_random_kills_resume_to_identical_weights(reference_run, corpus_dir, teacher_dir, tmp_path, subprocess_env):
    """Three SIGKILLs at random moments, then a run to the end: the weights equal the uninterrupted run's."""
    rng = random.Random(7)
    run = tmp_path / "run"
    resumed_from = []
    # SIGKILLs at random moments: after a random checkpoint of the remaining run, plus a random delay.
    for target in sorted(rng.sample([0, 8, 16, 24], 3)):
        resumed_from.append(_latest(run))
        proc = subprocess.Popen(
            _cmd(corpus_dir, teacher_dir, run),
            cwd=ROOT,
            env=subprocess_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        t0 = time.time()
        while not ((run / "metrics.jsonl").is_file() and _latest(run) >= target):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() - t0 < 180, "timed out waiting for the run to reach its kill point"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        for p in (run / "checkpoints").glob("step_*") if (run / "checkpoints").exists() else []:
            assert (p / "meta.json").is_file()  # a visible step dir is always complete
    resumed_from.append(_latest(run))
    assert 0 < resumed_from[-1] < 40, resumed_from  # the last run resumed mid-way, not from scratch
    _resume_to_the_end(corpus_dir, teacher_dir, run)
    a, b = _weights(reference_run, 40), _weights(run, 40)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    losses = [x["train/loss"] for x in read_metrics(run / "metrics.jsonl")]
    assert losses == [x["train/loss"] for x in read_metrics(reference_run / "metrics.jsonl")]


def test_kill_during_checkpoint_write_resumes_from_last_complete(
    reference_run, corpus_dir, teacher_dir, tmp_path, subprocess_env
):
    run = tmp_path / "run"
    env = with_fault(subprocess_env, "slow_checkpoint_write:16")  # hold the write of step 16 open
    proc = subprocess.Popen(
        _cmd(corpus_dir, teacher_dir, run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    t0 = time.time()
    # Wait until step 16's weights are being written (wherever the writer puts them), then kill mid-write.
    while not list((run / "checkpoints").glob("*step_16*/components/*.safetensors")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 120, "timed out waiting for the checkpoint write"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _latest(run) == 8  # the newest complete checkpoint; the interrupted one never became one
    assert not (run / "checkpoints" / "step_16").exists()
    _resume_to_the_end(corpus_dir, teacher_dir, run)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial dir was cleaned up
    a, b = _weights(reference_run, 40), _weights(run, 40)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_a_resume_restores_the_whole_trainer_state(reference_run, corpus_dir, teacher_dir, tmp_path):
    """The mechanism under the kill tests above, in this process: the reference run, stopped after its checkpoint at
    step 32 and resumed, ends on its own weights (Adam's moments, the LR schedule and the random streams come back with
    the weights, not only the weights)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    rewind(run, 32)
    with isolated_tracking(tmp_path / "copy"):  # a copy of the shared run: its artifact index is not the original's
        _resume_to_the_end(corpus_dir, teacher_dir, run)
    a, b = _weights(reference_run, 40), _weights(run, 40)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_a_step_write_that_never_committed_is_not_a_checkpoint(tmp_path):
    """The mechanism under the kill-during-write test above, in this process: a step is written into a temporary
    directory that becomes step_N, and `latest`, only once complete; a writer that dies before that leaves the step
    before it as the newest checkpoint and nothing a resume could take for one."""
    from siren.checkpoints import layout as ckpt
    from siren.checkpoints.meta import CheckpointMeta

    for step, dies in ((8, False), (16, True)):
        tmp = ckpt.begin_step(tmp_path, step)
        (tmp / "components" / "decoder.safetensors").write_bytes(b"half of a tensor")
        if not dies:
            ckpt.commit_step(
                tmp_path, tmp, step, CheckpointMeta(step=step, stage="vocoder", config={}, fingerprints={})
            )
    latest = (ckpt.checkpoints_dir(tmp_path) / "latest").read_text().strip()
    assert latest == "step_8", f"`latest` names {latest} although step 16 was never completed"
    assert ckpt.list_steps(tmp_path) == [8] and not ckpt.step_dir(tmp_path, 16).exists()
    assert ckpt.clean_partial(tmp_path) == [".tmp-step_16"]


def _bad_manifest(corpus: Path, out: Path) -> tuple[Path, int]:
    good = read_manifest(corpus / "train.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    sr = 16000
    bad = {}
    (out / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 20)
    bad["corrupt"] = out / "corrupt.wav"
    (out / "empty.wav").write_bytes(b"")
    bad["empty"] = out / "empty.wav"
    sf.write(out / "full.wav", np.random.default_rng(0).normal(0, 0.1, sr * 2).astype("float32"), sr)
    data = (out / "full.wav").read_bytes()
    (out / "truncated.wav").write_bytes(data[:60])
    bad["truncated"] = out / "truncated.wav"
    nan = np.random.default_rng(1).normal(0, 0.1, sr * 2).astype("float32")
    nan[::4000] = np.nan  # throughout: crops read only their frames, and every crop must meet one
    sf.write(out / "nan.wav", nan, sr, subtype="FLOAT")
    bad["nan"] = out / "nan.wav"
    sf.write(out / "short.wav", np.zeros(800, dtype="float32"), sr)
    bad["short"] = out / "short.wav"
    bad["missing"] = out / "does_not_exist.wav"
    sf.write(out / "sr8k.wav", np.random.default_rng(2).normal(0, 0.1, 8000 * 2).astype("float32"), 8000)
    bad["sr8k"] = out / "sr8k.wav"
    sf.write(out / "stereo.wav", np.random.default_rng(3).normal(0, 0.1, (sr * 2, 2)).astype("float32"), sr)
    bad["stereo"] = out / "stereo.wav"
    from siren.data.manifest import Utterance

    extra = [Utterance(id=k, path=str(p), duration=2.0, speaker="bad") for k, p in bad.items()]
    path = out / "train.jsonl"
    write_manifest(path, good + extra)
    return path, len(bad)


def test_bad_audio_is_skipped_counted_and_training_continues(corpus_dir, teacher_dir, tmp_path):
    manifest, n_bad = _bad_manifest(corpus_dir, tmp_path / "bad")
    cfg = _codec(
        corpus_dir,
        teacher_dir,
        tmp_path,
        **{
            "data.train": str(manifest),
            "train.max_steps": 8,
            "train.checkpoint_every": 8,
            "train.batch_size": 8,
        },
    )
    tr = Trainer(cfg)
    assert not tr.dataset.skipped  # start-up trusts the manifest: every bad file is found when it is loaded
    tr.fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 8 and all(np.isfinite(r["train/loss"]) for r in rows)
    # Every file but the stereo one (mixed down under the default resample_down) was met, replaced and counted.
    assert rows[-1]["data/skipped"] == n_bad - 1
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_8" / "meta.json").read_text())
    skipped = {Path(p).name for p in meta["data"]["load_failed"] + meta["data"]["excluded"]}
    assert {"nan.wav", "sr8k.wav", "corrupt.wav", "does_not_exist.wav"} <= skipped and "stereo.wav" not in skipped


def test_format_mismatch_is_converted_when_asked(corpus_dir, teacher_dir, tmp_path):
    manifest, n_bad = _bad_manifest(corpus_dir, tmp_path / "bad")
    cfg = _codec(
        corpus_dir,
        teacher_dir,
        tmp_path,
        **{"data.train": str(manifest), "data.on_format_mismatch": "convert", "train.max_steps": 1},
    )
    tr = Trainer(cfg)
    i = next(i for i, u in enumerate(tr.dataset.utterances) if u.id == "sr8k")
    item = tr.dataset[i]
    assert item["replaced_from"] is None and item["wav"].dim() == 1
    assert item["length"] == 16000  # 2 s at 8 kHz → 32000 samples at 16 kHz, cropped to the 1 s segment
    skip = _codec(corpus_dir, teacher_dir, tmp_path / "s", **{"data.train": str(manifest), "train.max_steps": 1})
    tr.tracker.finish()
    tr = Trainer(skip)  # the default, resample_down: narrowband is replaced, not upsampled
    replaced = tr.dataset[i]["replaced_from"] or ""
    assert replaced.endswith("sr8k.wav"), "the narrowband file was not replaced"
    assert "narrowband" in tr.dataset.skipped[str(manifest.parent / "sr8k.wav")]
    tr.tracker.finish()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_step_is_skipped_then_run_aborts(corpus_dir, teacher_dir, tmp_path, poison):
    cfg = _codec(
        corpus_dir,
        teacher_dir,
        tmp_path,
        **{"train.max_steps": 10, "train.checkpoint_every": 100, "train.max_bad_steps": 3, "samples.enabled": "false"},
    )
    tr = Trainer(cfg)
    step = tr.stage.step
    calls = {"n": 0}
    before = {}

    def poisoned(modules, batch):
        calls["n"] += 1
        out = step(modules, batch)
        if calls["n"] == 2:
            before.update({k: v.clone() for k, v in modules["decoder"].state_dict().items()})
        if calls["n"] >= 2:
            out.loss = out.loss * poison
        return out

    tr.stage.step = poisoned
    with pytest.raises(TrainingAborted, match="max_bad_steps=3"):
        tr.fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/skipped_step"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    after = tr.modules["decoder"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped steps did not touch the weights


def test_wandb_init_failure_does_not_stop_training(corpus_dir, teacher_dir, tmp_path, monkeypatch):
    import wandb

    def boom(*a, **k):
        raise RuntimeError("no W&B for you")

    monkeypatch.setattr(wandb, "init", boom)
    cfg = _codec(
        corpus_dir,
        teacher_dir,
        tmp_path,
        **{"train.max_steps": 3, "train.checkpoint_every": 3, "samples.enabled": "false", "tracking.mode": "offline"},
    )
    with pytest.warns(UserWarning, match="W&B disabled"):
        Trainer(cfg).fit()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3


def test_wandb_failing_mid_run_does_not_stop_training(corpus_dir, teacher_dir, tmp_path):
    cfg = _codec(
        corpus_dir,
        teacher_dir,
        tmp_path,
        **{"train.max_steps": 4, "train.checkpoint_every": 4, "samples.enabled": "false", "tracking.mode": "offline"},
    )
    tr = Trainer(cfg)
    assert tr.tracker.run is not None
    real_log = tr.tracker.run.log
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("lost W&B")
        return real_log(*a, **k)

    tr.tracker.run.log = flaky
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr.fit()
    assert any("lost W&B" in str(x.message) for x in w)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_frozen_weight_changed_during_training_is_a_hard_error(corpus_dir, teacher_dir, tmp_path):
    cfg = _codec(
        corpus_dir,
        teacher_dir,
        tmp_path,
        **{
            "trainable": "[factorizer,sem_quantizer,pro_quantizer,spk_quantizer,entropy_model]",
            "train.max_steps": 4,
            "train.checkpoint_every": 4,
            "train.frozen_check_every": 0,  # the sha256 at checkpoints alone (the per-step check: test_trust.py)
        },
    )
    trainer = Trainer(cfg)
    assert "decoder" in trainer.plan.frozen
    step = trainer.stage.step
    calls = {"n": 0}

    def tampering_step(modules, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(modules["decoder"].parameters()).add_(1e-3)
        return step(modules, batch)

    trainer.stage.step = tampering_step
    with pytest.raises(FrozenViolation, match="decoder"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints" / "step_4").exists()  # nothing is saved past the violation


def test_unwritable_run_dir_fails_before_training(corpus_dir, teacher_dir, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        run = blocker / "run"  # a path under a regular file cannot be created, even by root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        run = ro / "run"
    with pytest.raises(SirenError, match="not writable"):
        Trainer(stage_config("codec", corpus_dir, teacher_dir, run))


def test_disk_space_checked_before_training(corpus_dir, teacher_dir, tmp_path):
    with pytest.raises(SirenError, match="free"):
        Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "r", **{"train.min_free_mb": 10**9}))


# ------------------------------------------------------------------------------------------------ negative controls
# Every test above, rerun with the mechanism it tests switched off (tests/mechanisms.py), must fail, and fail on its own
# check: (test, mechanism, pattern the failure must match).
CONTROLS = [
    ("test_a_resume_restores_the_whole_trainer_state", "resume_trainer_state", r"resumed weights differ"),
    ("test_a_step_write_that_never_committed_is_not_a_checkpoint", "atomic_checkpoint", r"never completed"),
    ("test_bad_audio_is_skipped_counted_and_training_continues", "bad_audio_skip", r"LibsndfileError|Error opening"),
    ("test_format_mismatch_is_converted_when_asked", "bad_audio_skip", r"narrowband file was not replaced"),
    ("test_nonfinite_loss_step_is_skipped_then_run_aborts", "nonfinite_step_skip", r"DID NOT RAISE"),
    ("test_wandb_init_failure_does_not_stop_training", "wandb_guard", r"RuntimeError: no W&B for you|DID NOT WARN"),
    ("test_wandb_failing_mid_run_does_not_stop_training", "wandb_guard", r"ConnectionError: lost W&B"),
    ("test_frozen_weight_changed_during_training_is_a_hard_error", "frozen_check", r"DID NOT RAISE"),
    (
        "test_unwritable_run_dir_fails_before_training",
        "run_dir_preflight",
        r"DID NOT RAISE|NotADirectoryError|FileExistsError|PermissionError",
    ),
    ("test_disk_space_checked_before_training", "run_dir_preflight", r"DID NOT RAISE"),
]


def test_every_reliability_test_has_a_control():
    tests = {n for n, f in globals().items() if n.startswith("test_") and callable(f) and n not in _NOT_CONTROLLED}
    assert tests == {t for t, _, _ in CONTROLS}


_NOT_CONTROLLED = {
    "test_every_reliability_test_has_a_control",
    "test_fails_with_mechanism_disabled",
    # Killed processes: their mechanisms (`resume_trainer_state`, `atomic_checkpoint`) are switched off in the two
    # in-process tests above, which then fail. Without them these fail too (measured: the resumed weights differ; the
    # killed write's step 16 is `latest`), but each such control costs a launch and a kill.
    "test_random_kills_resume_to_identical_weights",
    "test_kill_during_checkpoint_write_resumes_from_last_complete",
}


@pytest.mark.parametrize(
    "test_name, mechanism, failure", CONTROLS, ids=[f"{t[5:]}-without-{m}" for t, m, _ in CONTROLS]
)
def test_fails_with_mechanism_disabled(test_name, mechanism, failure, request, monkeypatch):
    mechanisms.assert_fails_without(
        globals()[test_name], mechanism, failure, request, monkeypatch, {"poison": float("nan")}
    )
