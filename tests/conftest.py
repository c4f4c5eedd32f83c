"""Shared fixtures: hermetic W&B (offline, everything under the test's tmp dir), a tiny teacher and a tiny corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import tracking_dirs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hermetic_wandb(tmp_path, monkeypatch):
    wb = tmp_path / "_wandb"
    for var, path in tracking_dirs(wb).items():
        monkeypatch.setenv(var, path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(wb / "no-netrc"))
    yield


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A 24-utterance corpus from the Debian voices (built once per session)."""
    from siren.data.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(out, n=24, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    from siren.models.ssl import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny_hubert", seed=0)


@pytest.fixture(scope="session")
def codec_run(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    """A tiny codec run trained once for every file that only reads it: 6 steps, checkpoints at steps 3 and 6 with
    samples, an offline W&B run. The baseline of adapt tests, weights to init from, a W&B history to read back.
    Tests read it and never write into it (a run of their own goes under their tmp_path)."""
    from helpers import isolated_tracking, stage_config

    from siren.train.trainer import Trainer

    run = tmp_path_factory.mktemp("runs") / "codec"
    with isolated_tracking(run.parent):
        Trainer(
            stage_config("codec", corpus_dir, teacher_dir, run, **{"train.max_steps": 6, "train.checkpoint_every": 3})
        ).fit()
    return run


@pytest.fixture
def subprocess_env(hermetic_wandb) -> dict:
    """Environment for `python -m siren` subprocesses: hermetic W&B (set above), the repo on the path."""
    env = dict(os.environ)
    # Each subprocess runs its own W&B service, as a real run does: one shared with this test process would write
    # the subprocess's offline files after the subprocess has exited.
    env.pop("WANDB_SERVICE", None)
    env["PYTHONPATH"] = str(ROOT)
    if env.get("SIREN_TEST_DISABLE"):  # a negative control: the subprocess switches the mechanism off at start-up
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "controls"), str(ROOT)])
    return env


def siren_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "siren", *args]
