"""Negative controls for the reliability suite: each reliability mechanism, and a way to switch it off.

`disable(name)` replaces the code of one mechanism with the naive version a framework without it would have. The
reliability tests are rerun with each mechanism off (`test_reliability.py::test_fails_with_mechanism_disabled`) and must
fail, so a test that would pass without its mechanism cannot hide in the suite. Subprocesses (`python -m siren train`)
get the same switch through `tests/controls/sitecustomize.py`, activated by `SIREN_TEST_DISABLE=<name>`.

`inject(fault)` does the same for test-only faults (`SIREN_TEST_FAULT=<name>:<arg>`), e.g. a checkpoint write held open so
that a test can kill the process in the middle of it. Production code carries no fault hooks.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import soundfile as sf
import torch

ENV = "SIREN_TEST_DISABLE"
FAULT_ENV = "SIREN_TEST_FAULT"
CONTROLS_DIR = Path(__file__).resolve().parent / "controls"


# ---------------------------------------------------------------------------------------------- naive replacements
def _inplace_begin_step(run_dir, step):
    """Write straight into step_N and point `latest` at it first (no temp dir, no rename, no meta-last)."""
    from siren.train import checkpoint as ckpt

    final = ckpt.step_dir(run_dir, step)
    (final / "components").mkdir(parents=True, exist_ok=True)
    (ckpt.checkpoints_dir(run_dir) / "latest").write_text(final.name + "\n")
    return final


def _inplace_commit_step(run_dir, tmp, step, meta):
    import json

    (Path(tmp) / "meta.json").write_text(json.dumps(meta))
    return Path(tmp)


def _no_trainer_state(self, path):
    """Resume restores the component weights only: optimizer moments, scheduler and RNG start afresh."""


def _trusting_read_audio(path, sample_rate, *, policy="convert", crop=None, min_samples=0):
    """Decode the whole file, check nothing, raise whatever libsndfile raises (no AudioError, so no replacement)."""
    from siren.data.audio import Decoded

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data).mean(dim=1)
    if sr != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, orig_freq=int(sr), new_freq=int(sample_rate))
    start, num = crop(wav.shape[0]) if crop else (0, wav.shape[0])
    return Decoded(
        wav=wav[start : start + num].contiguous(), offset=start, total=wav.shape[0], decoded_bytes=data.size * 4
    )


def _always_finite(metrics):
    return True


def _unguarded(self, why):
    """W&B errors are not caught: re-raise the exception being handled."""
    raise sys.exc_info()[1]


def _unguarded_log(self, metrics, step):
    """Log to W&B directly from the training loop, unprotected (no background thread, no error handling)."""
    import json

    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    if self.run is not None:
        self.run.log(metrics, step=step)


def _no_check(self, *a, **k):
    return None


def _no_preflight(run_dir, min_free_mb):
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # creates the run dir, checks nothing


# target: "module:attribute.path"
MECHANISMS: dict[str, list[tuple[str, Callable]]] = {
    "atomic_checkpoint": [
        ("siren.train.checkpoint:begin_step", _inplace_begin_step),
        ("siren.train.checkpoint:commit_step", _inplace_commit_step),
    ],
    "resume_trainer_state": [("siren.train.trainer:Trainer._restore_trainer_state", _no_trainer_state)],
    "bad_audio_skip": [("siren.data.datasets:read_audio", _trusting_read_audio)],
    "nonfinite_step_skip": [("siren.train.trainer:Trainer._step_is_finite", staticmethod(_always_finite))],
    "wandb_guard": [
        ("siren.train.tracking:Tracker._disable", _unguarded),
        ("siren.train.tracking:Tracker.log", _unguarded_log),
    ],
    "frozen_check": [("siren.train.registry:Registry.check_frozen", _no_check)],
    "run_dir_preflight": [("siren.train.trainer:preflight_run_dir", _no_preflight)],
}


def _owner(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, name


def disable(name: str, monkeypatch=None) -> None:
    """Switch mechanism `name` off in this process (through `monkeypatch` when given, so it is undone after a test)."""
    if name not in MECHANISMS:
        raise KeyError(f"unknown mechanism {name!r}; known: {', '.join(MECHANISMS)}")
    for target, replacement in MECHANISMS[name]:
        owner, attr = _owner(target)
        if not hasattr(owner, attr):
            raise AttributeError(f"{target} does not exist: the control for {name!r} is stale")
        if monkeypatch is not None:
            monkeypatch.setattr(owner, attr, replacement)
        else:
            setattr(owner, attr, replacement)


# ----------------------------------------------------------------------------------------------------------- faults
def _slow_checkpoint_write(arg: str) -> None:
    """`slow_checkpoint_write:N`: after step N's component files are written, sleep 60 s before the commit."""
    import re
    import time

    from siren.train import checkpoint as ckpt

    real = ckpt.save_components

    def slow(tmp, components):
        real(tmp, components)
        m = re.search(r"step_(\d+)$", Path(tmp).name)
        if m and int(m.group(1)) == int(arg):
            time.sleep(60)

    ckpt.save_components = slow


FAULTS: dict[str, Callable[[str], None]] = {"slow_checkpoint_write": _slow_checkpoint_write}


def inject(spec: str) -> None:
    name, _, arg = spec.partition(":")
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    FAULTS[name](arg)
