"""A sweep run again says what it does with the trials it finds: it resumes them (a trial whose swept values changed
is refused), or, with --fresh, moves the earlier run aside and starts over; a refused sweep file is one error line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from siren.cli import main
from siren.sweep import SweepError, run_sweep


def sweep_file(tmp_path: Path, values: list[float]) -> Path:
    config = {
        "name": "lr",
        "method": "grid",
        "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": values}},
        "command": ["${env}", "${interpreter}", "-m", "siren", "train", "${args_no_hyphens}"],
    }
    path = tmp_path / f"lr_{len(values)}_{values[0]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Runner:
    """A stand-in for `siren train`: a new trial writes its config and metrics; an existing one (a resumed finished
    run) trains nothing and leaves its files as they are."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, command, env):
        run = Path(next(c.split("=", 1)[1] for c in command if c.startswith("run_dir=")))
        lr = float(next(c.split("=", 1)[1] for c in command if c.startswith("optim.lr=")))
        existed = (run / "config.yaml").is_file()
        self.calls.append((run.name, existed))
        if not existed:
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}}))
            (run / "metrics.jsonl").write_text(json.dumps({"train/loss": lr}) + "\n")
        return subprocess.CompletedProcess(command, 0, stderr="")


def test_a_sweep_run_again_says_it_resumes_its_trials(tmp_path, capsys):
    path, runs = sweep_file(tmp_path, [3e-4, 1e-4]), tmp_path / "runs"
    first = Runner()
    run_sweep(path, 2, online=False, runs_root=runs, runner=first)
    assert first.calls == [("trial_0", False), ("trial_1", False)]
    capsys.readouterr()
    again = Runner()
    ranked = run_sweep(path, 2, online=False, runs_root=runs, runner=again)
    out = capsys.readouterr().out
    assert "holds 2 trial(s) of an earlier run (trial_0, trial_1); resuming them" in out
    assert "--fresh starts the sweep over" in out and "trial_0 exists: resuming it" in out
    assert again.calls == [("trial_0", True), ("trial_1", True)]
    assert [t["metric"] for t in ranked] == [1e-4, 3e-4]  # ranked as the trials ended


def test_a_trial_whose_swept_values_changed_is_refused(tmp_path):
    runs = tmp_path / "runs"
    run_sweep(sweep_file(tmp_path, [3e-4, 1e-4]), 2, online=False, runs_root=runs, runner=Runner())
    changed = Runner()
    with pytest.raises(SweepError, match=r"trial_0 was run with other values.*optim\.lr: 0\.0003 → 0\.002.*--fresh"):
        run_sweep(sweep_file(tmp_path, [2e-3, 1e-4]), 2, online=False, runs_root=runs, runner=changed)
    assert changed.calls == []  # refused before anything ran


def test_fresh_moves_the_earlier_run_aside_and_starts_over(tmp_path, capsys):
    path, runs = sweep_file(tmp_path, [3e-4, 1e-4]), tmp_path / "runs"
    run_sweep(path, 2, online=False, runs_root=runs, runner=Runner())
    capsys.readouterr()
    again = Runner()
    run_sweep(path, 2, online=False, runs_root=runs, runner=again, fresh=True)
    assert again.calls == [("trial_0", False), ("trial_1", False)]
    (aside,) = runs.glob("lr.before-fresh-*")
    assert sorted(p.name for p in aside.iterdir()) == ["trial_0", "trial_1"]
    assert "--fresh: the earlier run (2 trial(s)) moved to" in capsys.readouterr().out


def test_a_refused_sweep_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "grid", "parameters": {"optim.lr": {"values": [1e-4]}}}))
    assert main(["sweep", str(bad), "--count", "1", "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid sweep file") and "Traceback" not in err
