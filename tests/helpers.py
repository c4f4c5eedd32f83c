"""Test helpers: tiny configs for every stage on the session corpus, and subprocess runs of `siren train`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from siren.config.loader import load_config

ROOT = Path(__file__).resolve().parents[1]


def stage_overrides(stage: str, corpus: Path, teacher: Path, run_dir: Path, **extra) -> list[str]:
    ov = {
        "stage": stage,
        "run_dir": str(run_dir),
        "data.train": str(corpus / "train.jsonl"),
        "data.val": str(corpus / "val.jsonl"),
        "data.segment_seconds": 1.0,
        "ssl.name": str(teacher),
        "train.batch_size": 4,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.min_free_mb": 1,
        "samples.num": 1,
        "samples.max_seconds": 1.0,
        "pipeline.flow": None,
        "pipeline.vocoder": None,
        "student_ssl.path": None,
        # W&B costs ~2 s of start-up per process. A test whose subject is what W&B records passes
        # `**{"tracking.mode": "offline"}`; the hermetic env (conftest.py) keeps such a run off any server.
        "tracking.mode": "disabled",
        # Codecs trained for a few steps have collapsed codebooks: verify's baseline floor (configs/verify/default.yaml)
        # would fail every one of them. It is off in these runs and exercised on its own in tests/test_verify.py.
        "verify.thresholds.min/code_entropy/sem/baseline": 0.0,
        "verify.thresholds.min/code_entropy/pro/baseline": 0.0,
    }
    ov.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in ov.items()]


def train_cmd(stage: str, corpus: Path, teacher: Path, run_dir: Path, **extra) -> list[str]:
    """`python -m siren train` on the demo base config with the tiny test overrides."""
    return [
        sys.executable,
        "-m",
        "siren",
        "train",
        "--config",
        str(ROOT / "configs/demo/base.yaml"),
        *stage_overrides(stage, corpus, teacher, run_dir, **extra),
    ]


def stage_config(stage: str, corpus: Path, teacher: Path, run_dir: Path, **extra):
    return load_config(ROOT / "configs/demo/base.yaml", stage_overrides(stage, corpus, teacher, run_dir, **extra))


def siren_train(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(env or os.environ)
    env.pop("WANDB_SERVICE", None)  # its own W&B service, as a real run
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "siren", "train", *args], env=env, cwd=ROOT, capture_output=True, text=True, **kw
    )


TRACKING_DIRS = (
    ("WANDB_DIR", "dir"),
    ("WANDB_DATA_DIR", "data"),
    ("WANDB_CACHE_DIR", "cache"),
    ("WANDB_CONFIG_DIR", "config"),
    ("SIREN_ARTIFACT_CACHE", "artifacts"),
)


def tracking_dirs(root: Path) -> dict[str, str]:
    """W&B's folders and SIREN's artifact index, all under `root` (made here): environment variable → folder."""
    out = {}
    for var, sub in TRACKING_DIRS:
        (Path(root) / sub).mkdir(parents=True, exist_ok=True)
        out[var] = str(Path(root) / sub)
    return out


@contextlib.contextmanager
def isolated_tracking(root: Path):
    """For module- and session-scoped fixtures (set up before the per-test hermetic W&B of conftest.py): offline W&B
    and the artifact index under `root`, undone on exit."""
    mp = pytest.MonkeyPatch()
    root = Path(root)
    try:
        for var, path in tracking_dirs(root).items():
            mp.setenv(var, path)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_API_KEY", raising=False)
        yield root
    finally:
        mp.undo()


def siren_main(args: list[str], monkeypatch) -> int:
    """`siren <args>` in this process through the CLI's `main` (the exit code `python -m siren` would exit with),
    with the logging set-up of a command's process (`basicConfig`, `captureWarnings`) left out: it would outlive
    the test in pytest's process."""
    import logging

    from siren.cli import main

    monkeypatch.setattr(logging, "basicConfig", lambda *a, **k: None)
    monkeypatch.setattr(logging, "captureWarnings", lambda capture: None)
    return main(list(args))


def with_fault(env: dict, fault: str) -> dict:
    """`env` for a subprocess that injects a test-only fault at start-up (tests/mechanisms.py FAULTS)."""
    return {
        **env,
        "SIREN_TEST_FAULT": fault,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "controls"), str(ROOT)]),
    }


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for the rendezvous of a 2-process launch)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch() -> list[str]:
    """The arguments after `python` of `accelerate launch` with 2 gloo CPU processes (cpu_ddp.yaml) on a free port."""
    return [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch/accelerate/cpu_ddp.yaml"),
        "--main_process_port",
        str(free_port()),
    ]


def launch_cmd(stage: str, corpus: Path, teacher: Path, run_dir: Path, **extra) -> list[str]:
    """`accelerate launch` with 2 gloo CPU processes (launch/accelerate/cpu_ddp.yaml) of `siren train` on a free port."""
    return [
        sys.executable,
        *accelerate_launch(),
        "-m",
        "siren",
        "train",
        "--config",
        str(ROOT / "configs/demo/base.yaml"),
        *stage_overrides(stage, corpus, teacher, run_dir, **extra),
    ]


def rewind(run: Path, step: int) -> None:
    """Make checkpoint `step` the run's newest, as if the run had been stopped there."""
    import shutil

    for p in (run / "checkpoints").glob("step_*"):
        if int(p.name.removeprefix("step_")) > step:
            shutil.rmtree(p)
    (run / "checkpoints" / "latest").write_text(f"step_{step}\n")


def fork_ranks(fn, world: int, *args) -> None:
    """`fn(rank, *args)` in `world` processes forked from this one, joined; a rank that raises fails the caller.
    Forked, not spawned: each rank starts with this process's torch already imported (a spawned one pays ~2.5 s of
    imports). A rank sets up its own process group; one that uses Accelerate resets the state it inherited
    (`reset_accelerate`)."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method="fork")


def reset_accelerate() -> None:
    """Forget the process-wide Accelerate state, so the next Trainer in this process may use another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------- offline W&B files
WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) framed chunks


def wandb_records(path: Path) -> list:
    """Every protobuf `Record` of an offline `run-*.wandb` file, read back from its bytes (W&B 0.31 has no Python
    reader): after the 7-byte `:W&B` header, chunks with a 7-byte header (checksum, little-endian length, type: 1 full,
    2 first, 3 middle, 4 last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, records, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


def finished_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of an offline run's .wandb file once W&B has written all of them. `run.finish()` returns when the
    W&B service has taken the run's exit; the service writes the file through a buffer that it flushes on its own
    time, so under load the file can still be short then (seen: a file with no run record yet). A finished run's
    last record is its `exit`."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
        except DecodeError:  # the last record is still being written
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record {timeout:.0f} s after the run finished"
        time.sleep(0.1)
