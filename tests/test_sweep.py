"""Sweep files, the offline sweep engine, trial commands and ranking (siren/sweep.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mechanisms
import pytest
import yaml

from siren.sweep import (
    SweepError,
    build_command,
    format_ranking,
    load_sweep,
    propose_trials,
    rank_trials,
    read_metric,
    run_sweep,
    trial_overrides,
)

REPO = Path(__file__).resolve().parents[1]
ADAPT_LR = REPO / "launch" / "sweeps" / "adapt_lr.yaml"
ADAPT_LOSS = REPO / "launch" / "sweeps" / "adapt_loss_weights.yaml"
ADAPT_LR_DDP = REPO / "launch" / "sweeps" / "adapt_lr_ddp.yaml"

# `sweeps` 0.2.0 declares its pydantic model the pydantic-1 way; the warnings are theirs, not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Valid config keys have changed in V2"),
    pytest.mark.filterwarnings("ignore:Support for class-based `config` is deprecated"),
]


def write_sweep(tmp_path: Path, **overrides) -> Path:
    config = yaml.safe_load(ADAPT_LR.read_text())
    config.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("path", [ADAPT_LR, ADAPT_LOSS, ADAPT_LR_DDP])
def test_shipped_sweeps_are_valid(path):
    load_sweep(path)


def test_sweep_metric_scaled_by_swept_weights_is_refused(tmp_path):
    """The loss-weight sweep ranks by held-out agreement (maximize); ranking it by the weighted total loss, or by a
    term whose own weight is swept, is refused at start, naming the metric and the weights."""
    config = yaml.safe_load(ADAPT_LOSS.read_text())
    assert config["metric"] == {"name": "eval/drift/sem/agreement", "goal": "maximize"}
    for metric, why in [("train/loss", "weighted sum"), ("eval/loss", "weighted sum"), ("eval/latent", "loss.latent")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**config, "metric": {"name": metric, "goal": "minimize"}}))
        with pytest.raises(SweepError, match=f"metric '{metric}'.*{why}"):
            load_sweep(path)
    # A weight held at one value is not swept, and a loss term whose weight is fixed may rank a sweep of another one.
    fixed = {**config, "parameters": {**config["parameters"], "loss.latent": {"value": 1.0}}}
    for metric, ok in [("train/loss", False), ("eval/latent", True), ("eval/agreement", False)]:
        path.write_text(yaml.safe_dump({**fixed, "metric": {"name": metric, "goal": "minimize"}}))
        if ok:
            load_sweep(path)
        else:
            with pytest.raises(SweepError, match=metric):
                load_sweep(path)


def test_invalid_sweep_reports_the_schemas_messages(tmp_path):
    from sweeps import schema_violations_from_proposed_config

    path = write_sweep(tmp_path, method="spiral")
    expected = schema_violations_from_proposed_config(yaml.safe_load(path.read_text()))
    assert expected, "the schema must reject method=spiral for this test to mean anything"
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    for message in expected:
        assert message in str(err.value)


def test_unknown_config_key_suggests_the_closest(tmp_path):
    path = write_sweep(
        tmp_path, parameters={"optim.lrr": {"values": [0.1]}, "optim.groups.factorizer.lr": {"value": 1}}
    )
    with pytest.raises(SweepError, match=r"did you mean 'optim.lr'") as err:
        load_sweep(path)
    assert "optim.groups" not in str(err.value)  # dict sections accept any group name


def test_values_a_config_field_refuses_are_named_when_the_sweep_is_read(tmp_path):
    """A parameter whose value, one of whose values, or whose lowest value is out of its config field's range is
    refused with the sweep file, before any trial (each would only fail at its own start)."""
    bad = {
        "optim.lr": {"distribution": "uniform", "min": -1.0e-3, "max": 1.0e-3},
        "train.batch_size": {"values": [4, 0]},
        "samples.max_seconds": {"value": 0.0},
        "optim.warmup_steps": {"min": -2, "max": 4},
    }
    with pytest.raises(SweepError) as err:
        load_sweep(write_sweep(tmp_path, parameters=bad))
    text = str(err.value)
    for key, why in [
        ("optim.lr", "must be >= 0, got -0.001"),
        ("train.batch_size", "must be >= 1, got 0"),
        ("samples.max_seconds", "must be > 0, got 0.0"),
        ("optim.warmup_steps", "must be >= 0, got -2"),
    ]:
        assert f"parameter {key!r}: `{key}` {why}" in text, text
    # in range from its lowest value up: loads; a field without a bound is not checked
    fine = {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "loss.mel": {"values": [-1.0]},
    }
    load_sweep(write_sweep(tmp_path, parameters=fine))


def test_command_without_args_macro_is_rejected(tmp_path):
    path = write_sweep(tmp_path, command=["${interpreter}", "-m", "siren", "train", "${args}"])
    with pytest.raises(SweepError, match=r"args_no_hyphens"):
        load_sweep(path)


# ------------------------------------------------------------------------------------------------------------- proposals
def test_random_proposals_for_adapt_lr():
    config = load_sweep(ADAPT_LR)
    trials = propose_trials(config, 6, seed=3)
    assert len(trials) == 6
    for params in trials:
        assert set(params) == {"optim.lr", "train.max_steps"}
        assert type(params["optim.lr"]) is float and 1e-4 <= params["optim.lr"] <= 3e-3
        assert type(params["train.max_steps"]) is int and params["train.max_steps"] == 10
    assert len({p["optim.lr"] for p in trials}) == 6
    assert propose_trials(config, 6, seed=3) == trials
    assert propose_trials(config, 6, seed=4) != trials


def test_grid_proposals_cover_the_grid_and_skip_done_points():
    config = load_sweep(ADAPT_LOSS)
    first = propose_trials(config, 20, seed=0)
    points = {(p["loss.latent"], p["loss.agreement"]) for p in first}
    assert points == {(a, b) for a in (0.5, 1.0, 2.0) for b in (0.0, 0.5, 1.0)}
    history = [{"params": p, "metric": 1.0, "returncode": 0} for p in first[:4]]
    rest = propose_trials(config, 20, seed=0, history=history)
    assert len(rest) == 5 and not any(p in first[:4] for p in rest)


def test_overrides_round_trip_through_yaml_and_end_with_trial_keys():
    params = {"optim.lr": 1e-5, "train.max_steps": 10, "loss.latent": 2.0, "tracking.tags": ["a", "b"]}
    overrides = trial_overrides(params, run_dir="runs/sweeps/s/trial_0", group="s", extra_overrides=["data.train=x"])
    parsed = dict(o.split("=", 1) for o in overrides)
    for key, value in params.items():
        back = yaml.safe_load(parsed[key])
        assert back == value and type(back) is type(value)
    assert overrides[-3:] == ["run_dir=runs/sweeps/s/trial_0", "tracking.group=s", "tracking.mode=offline"]
    assert "data.train=x" in overrides


def test_build_command_expands_macros_like_the_agent():
    config = load_sweep(ADAPT_LR)
    command = build_command(config, ["optim.lr=0.001", "run_dir=r"])
    assert command[0] == sys.executable
    assert command[1:] == ["-m", "siren", "train", "--config", "configs/demo/adapt.yaml", "optim.lr=0.001", "run_dir=r"]
    assert not any("${" in c for c in command)


# --------------------------------------------------------------------------------------------------------------- ranking
def _trial(index, metric, error=None):
    return {"index": index, "name": f"trial_{index}", "params": {}, "metric": metric, "error": error, "returncode": 0}


@pytest.mark.parametrize("goal, order", [("minimize", [1, 2, 0]), ("maximize", [0, 2, 1])])
def test_ranking_follows_goal_and_failures_go_last(goal, order):
    trials = [_trial(0, 3.0), _trial(1, 1.0), _trial(3, None, "exit code 1"), _trial(2, 2.0)]
    ranked = rank_trials(trials, goal)
    assert [t["index"] for t in ranked] == [*order, 3]
    assert [t["rank"] for t in ranked] == [1, 2, 3, 4]
    table = format_ranking(ranked, "train/loss")
    positions = [table.index(f"trial_{i} ") for i in [*order, 3]]
    assert positions == sorted(positions)
    assert "FAILED" in table


def test_read_metric_takes_last_logged_value(tmp_path):
    lines = [{"train/loss": 3.0, "step": 1}, {"train/grad_norm": 1.0}, {"train/loss": 2.5, "step": 2}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_metric(tmp_path, "train/loss") == 2.5
    assert read_metric(tmp_path, "eval/loss") is None
    assert read_metric(tmp_path / "missing", "train/loss") is None


# ---------------------------------------------------------------------------------------------------------- offline runs
# A stand-in for `siren train`: parses key=value overrides, logs train/loss = (x - 0.3)^2, fails for x > 0.8.
FAKE_TRAIN = """
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
x = float(args["x"])
assert args["tracking.mode"] == "offline" and args["tracking.group"] == "fake"
if x > 0.8:
    sys.exit("boom: x too large")
os.makedirs(args["run_dir"], exist_ok=True)
with open(os.path.join(args["run_dir"], "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"train/loss": 99.0}) + "\\n")
    f.write(json.dumps({"train/loss": (x - 0.3) ** 2}) + "\\n")
"""


def fake_sweep(tmp_path: Path) -> Path:
    config = {
        "name": "fake",
        "method": "grid",
        "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": {"x": {"values": [0.1, 0.9, 0.5, 0.3]}},
        "command": ["${env}", "${interpreter}", "-c", FAKE_TRAIN, "${args_no_hyphens}"],
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_offline_sweep_runs_trials_and_ranks_them(tmp_path, monkeypatch, capsys):
    import siren.sweep as sweep_mod

    # `x` is not a SIREN config key; this test exercises the runner, not key validation.
    monkeypatch.setattr(sweep_mod, "config_key_problem", lambda key: None)
    ranked = run_sweep(fake_sweep(tmp_path), 4, online=False, runs_root=tmp_path / "runs")
    assert [t["params"]["x"] for t in ranked] == [0.3, 0.1, 0.5, 0.9]
    assert ranked[0]["metric"] == pytest.approx(0.0) and ranked[1]["metric"] == pytest.approx(0.04)
    failed = ranked[-1]
    assert failed["returncode"] == 1 and "boom: x too large" in failed["error"]
    assert {Path(t["run_dir"]).name for t in ranked} == {f"trial_{k}" for k in range(4)}
    assert all(Path(t["run_dir"]).parent == tmp_path / "runs" / "fake" for t in ranked)
    assert "trial_3" in capsys.readouterr().out


def test_injected_runner_failure_is_ranked_last(tmp_path):
    commands = []

    def runner(command, env):
        commands.append(command)
        run_dir = next(c.split("=", 1)[1] for c in command if c.startswith("run_dir="))
        lr = float(next(c.split("=", 1)[1] for c in command if c.startswith("optim.lr=")))
        if len(commands) == 2:
            return subprocess.CompletedProcess(command, 7, stderr="line 1\nCUDA out of memory\n")
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "metrics.jsonl").write_text(json.dumps({"train/loss": lr}) + "\n")
        return subprocess.CompletedProcess(command, 0, stderr="")

    ranked = run_sweep(ADAPT_LR, 3, online=False, runs_root=tmp_path / "runs", runner=runner)
    assert len(commands) == 3
    assert all(c[1:6] == ["-m", "siren", "train", "--config", "configs/demo/adapt.yaml"] for c in commands)
    ok = ranked[:2]
    assert ok[0]["metric"] <= ok[1]["metric"] and all(t["error"] is None for t in ok)
    assert ranked[2]["index"] == 1 and ranked[2]["returncode"] == 7 and "CUDA out of memory" in ranked[2]["error"]


def test_trial_that_never_logs_the_metric_is_a_failure(tmp_path):
    def runner(command, env):
        return subprocess.CompletedProcess(command, 0, stderr="")

    ranked = run_sweep(ADAPT_LR, 1, online=False, runs_root=tmp_path / "runs", runner=runner)
    assert ranked[0]["metric"] is None and "train/loss" in ranked[0]["error"]


# ------------------------------------------------------------------------------------------------- data-parallel trials
def _wandb_summary(run_dir: Path) -> dict:
    """The summary W&B holds for a trial, read back from its offline run file (no server)."""
    (d,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    exe = str(Path(sys.executable).with_name("wandb"))
    out = subprocess.run([exe, "leet", "inspect", "--json", str(d)], capture_output=True, text=True, check=True)
    summary: dict = {}
    for rec in (json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")):
        if rec.get("type") == "summary":
            summary.update(rec["summary"].get("update", {}))  # later updates win, as in W&B's summary
    return summary


def test_ddp_sweep_runs_trials_of_two_processes(corpus_dir, teacher_dir, tmp_path):
    """The shipped data-parallel sweep's command (accelerate launch, 2 CPU processes) runs an offline trial on the tiny
    vocoder stage (the one stage without HuBERT: ~3 s less start-up per rank): it ran with world size 2, and its
    ranked value is the summary W&B holds for it. One trial: ranking several is
    `test_offline_sweep_runs_trials_and_ranks_them`'s; what is tested here is the launch."""
    from helpers import free_port, stage_overrides

    shipped = yaml.safe_load(ADAPT_LR_DDP.read_text())
    command = list(shipped["command"])
    at = command.index("--config_file")
    assert command[at - 1] == "accelerate.commands.launch" and command[at + 1] == "launch/accelerate/cpu_ddp.yaml"
    # The demo's adapt needs a trained baseline: the same launch on the tiny vocoder stage, paths made absolute.
    command = [str(REPO / c) if c.startswith(("launch/", "configs/")) else c for c in command]
    command[command.index(str(REPO / "configs/demo/adapt.yaml"))] = str(REPO / "configs/demo/base.yaml")
    command[at + 2 : at + 2] = ["--main_process_port", str(free_port())]
    sweep = {
        **shipped,
        "name": "ddp",
        "method": "grid",
        "metric": {"name": "eval/loss", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [1.0e-3, 3.0e-3]}},
        "command": command,
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(sweep))
    ov = {"train.max_steps": 2, "train.checkpoint_every": 2, "samples.enabled": "false", "train.batch_size": 2}
    extra = stage_overrides("vocoder", corpus_dir, teacher_dir, tmp_path / "unused", **ov)
    ranked = run_sweep(path, 1, online=False, runs_root=tmp_path / "runs", extra_overrides=extra)
    assert [t["error"] for t in ranked] == [None], ranked
    assert [t["params"] for t in ranked] == [{"optim.lr": 1.0e-3}], ranked  # the grid's first point
    for t in ranked:
        run_dir = Path(t["run_dir"])
        meta = json.loads((run_dir / "checkpoints" / "step_2" / "meta.json").read_text())
        assert meta["world_size"] == 2, f"{t['name']} ran with world size {meta['world_size']}"
        assert _wandb_summary(run_dir)["eval/loss"] == pytest.approx(t["metric"]), "ranked value != W&B summary"


# ------------------------------------------------------------------------------------------------ negative controls
@pytest.mark.parametrize(
    "test_name, mechanism", [("test_sweep_metric_scaled_by_swept_weights_is_refused", "sweep_metric_scale_check")]
)
def test_fails_with_mechanism_disabled(test_name, mechanism, tmp_path, monkeypatch):
    mechanisms.disable(mechanism, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        globals()[test_name](tmp_path)
