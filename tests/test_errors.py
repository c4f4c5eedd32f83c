"""One error root, one line, once: every user-facing error derives from `SirenError`; the CLI prints it as one
`error:` line with exit code 2, and under a launcher only rank 0 prints it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest
from helpers import ROOT, accelerate_launch, stage_overrides

import siren
from siren.cli import main
from siren.errors import SirenError

# Exceptions that never reach a user: raised and caught inside one module to record a per-utterance failure.
INTERNAL = {"siren.evaluation.CodingFailed", "siren.metrics.quality.MetricFailed"}


def test_every_error_siren_defines_derives_from_the_one_root():
    found, stray = [], []
    for info in pkgutil.walk_packages(siren.__path__, "siren."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                qual = f"{info.name}.{name}"
                found.append(qual)
                if not issubclass(obj, SirenError) and qual not in INTERNAL:
                    stray.append(qual)
    assert len(found) > 15  # the walk saw the package's errors (config, manifest, audio, checkpoint, ...)
    assert stray == []


def _bad_config(corpus_dir, teacher_dir, tmp_path, **bad) -> list[str]:
    return [
        "train",
        "--config",
        str(ROOT / "configs/demo/base.yaml"),
        *stage_overrides("codec", corpus_dir, teacher_dir, tmp_path / "run", **{"tracking.mode": "disabled", **bad}),
    ]


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"ssl.layer": 99}, "ssl.layer=99 is out of range"),
        ({"factorizer.input_dim": 100}, "factorizer.input_dim=100 but the SSL features are"),
        ({"entropy_model.num_heads": 5}, "entropy_model: "),
    ],
)
def test_a_config_value_the_models_cannot_take_is_one_error_line(
    corpus_dir, teacher_dir, tmp_path, capsys, monkeypatch, bad, says
):
    monkeypatch.delenv("RANK", raising=False)
    assert main(_bad_config(corpus_dir, teacher_dir, tmp_path, **bad)) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_only_rank_zero_prints_a_user_error(corpus_dir, teacher_dir, tmp_path, capsys, monkeypatch):
    args = _bad_config(corpus_dir, teacher_dir, tmp_path, **{"ssl.layer": 99})
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 2
    assert "error:" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 2
    assert capsys.readouterr().err.count("error:") == 1


def test_under_accelerate_launch_the_error_is_said_once_and_first(corpus_dir, teacher_dir, tmp_path, subprocess_env):
    """Two real processes meet the same bad value: one `error:` line, no rank tracebacks, and it comes before
    anything the launcher prints about the failed processes."""
    cmd = [
        sys.executable,
        *accelerate_launch(),
        "-m",
        "siren",
        *_bad_config(corpus_dir, teacher_dir, tmp_path, **{"ssl.layer": 99}),
    ]
    r = subprocess.run(cmd, env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    out = r.stderr
    assert out.count("error: ") == 1, out[-3000:]
    assert "[rank0]" not in out and "[rank1]" not in out
    first = out.index("error: ssl: ssl.layer=99 is out of range")
    assert "Traceback" not in out[:first] and "ChildFailedError" not in out[:first]
