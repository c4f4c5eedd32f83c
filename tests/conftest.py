"""Shared fixtures: hermetic W&B (offline, everything under the test's tmp dir), a tiny teacher and a tiny corpus.

`make test` runs the suite in 2 pytest-xdist workers, a module to a worker (`--dist loadfile`, so a module's fixtures
are built once). The session fixtures below are built once for all workers (`shared_dir`: the first worker to need
one builds it under a file lock, the other waits and reads it), and each worker computes on its share of the cores
(`pytest_configure`), so two workers never oversubscribe the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import tracking_dirs

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under xdist, each worker's PyTorch (and every process it starts, through OMP_NUM_THREADS) gets its share of the
    cores: threads beyond the free cores do not speed a step up but stall it (docs/scale.md). The controller hands
    modules out in the collected order (LONGEST_FIRST below), not xdist's default of most tests first."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


# The longest modules (wall seconds per module in a 2-worker run, measured), longest first: run first, so under xdist
# no long module starts last while the other worker sits idle. Every other module (a few seconds each) keeps its place
# after them and fills the ends. xdist would reorder modules by their number of tests (`--loadscope-reorder`, its
# default): `pytest_configure` above keeps this order.
LONGEST_FIRST = (
    "test_scale.py",
    "test_recipes.py",
    "test_quality.py",
    "test_reliability.py",
    "test_verify.py",
    "test_eval.py",
    "test_multiprocess.py",
    "test_trust.py",
    "test_large_codebook.py",
    "test_pipeline_e2e.py",
    "test_trainer.py",
    "test_restart_records.py",
    "test_report_html.py",
    "test_codebook_properties.py",
    "test_sweep.py",
    "test_install.py",
    "test_byoc_e2e.py",
    "test_errors.py",
    "test_bitstream_properties.py",
    "test_ranks.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


def shared_dir(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """`name`'s directory, built once by `build(path)` for the whole test session, workers included: under xdist
    every worker's base temp dir sits in one session dir, where a file lock lets the first worker build and the
    others wait. A build that failed leaves no `.done` mark, so the next worker to ask builds it again (and fails
    the same way, in its own test)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's dir, shared by the workers' base dirs
    root = base / "shared" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root.parent / f"{name}.done").exists():
                if root.exists():
                    import shutil

                    shutil.rmtree(root)
                root.mkdir()
                build(root)
                (root.parent / f"{name}.done").touch()
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    return root


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

    return shared_dir(tmp_path_factory, "corpus", lambda d: build_corpus(d / "c", n=24, seed=0, progress=False)) / "c"


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    from siren.models.ssl import save_tiny_teacher

    return (
        shared_dir(tmp_path_factory, "teacher", lambda d: save_tiny_teacher(d / "tiny_hubert", seed=0)) / "tiny_hubert"
    )


@pytest.fixture(scope="session")
def codec_run(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    """A tiny codec run trained once for every file that only reads it: 6 steps, checkpoints at steps 3 and 6 with
    samples, an offline W&B run. The baseline of adapt tests, weights to init from, a W&B history to read back.
    Tests read it and never write into it (a run of their own goes under their tmp_path)."""
    from helpers import finished_wandb_records, isolated_tracking, stage_config

    from siren.train.trainer import Trainer

    def build(root: Path) -> None:
        steps = {"train.max_steps": 6, "train.checkpoint_every": 3, "tracking.mode": "offline"}
        with isolated_tracking(root):
            Trainer(stage_config("codec", corpus_dir, teacher_dir, root / "codec", **steps)).fit()
        (offline,) = (root / "codec" / "wandb").glob("offline-run-*/run-*.wandb")
        finished_wandb_records(offline)  # readers see the whole file

    return shared_dir(tmp_path_factory, "codec_run", build) / "codec"


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
