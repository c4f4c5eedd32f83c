"""Hyperparameter sweeps over SIREN config keys (docs/sharing.md#sweeps).

A sweep file is an ordinary W&B sweep YAML whose parameters are dotted SIREN config keys (`optim.lr`,
`optim.groups.factorizer.lr`) and whose `command` runs `siren train ... ${args_no_hyphens}`.
- Online (logged in, `WANDB_MODE` not offline/disabled): `wandb sweep` + `wandb agent --count N`.
- Offline: the same YAML is driven locally by W&B's open-source engine (`sweeps` package); each trial is a subprocess
  running the sweep's `command` with the W&B macros expanded, in its own run dir, as an offline W&B run in one group.
  The sweep metric is read back from each trial's `RUN/metrics.jsonl` and trials are ranked best-first.

Ranking reads the metric the way W&B's sweep controller does: the run summary, which for a key logged with `log()` and
no `define_metric` aggregation (SIREN defines none) is its last logged value. A sweep whose metric the swept keys scale
(the weighted total loss while loss weights vary, or a loss term while its own weight varies) is refused at start:
its ranking would measure the weights, not the runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

from siren.checkpoints.layout import RunDir
from siren.config.schema import SirenConfig
from siren.errors import SirenError

# Macros of a W&B sweep `command` that the offline runner expands; others are rejected rather than passed through.
_ARGS_MACRO = "${args_no_hyphens}"
_UNSUPPORTED_MACROS = {
    "${args}": "SIREN takes key=value overrides, use ${args_no_hyphens}",
    "${args_no_boolean_flags}": "SIREN takes key=value overrides, use ${args_no_hyphens}",
    "${args_json}": "SIREN takes key=value overrides, use ${args_no_hyphens}",
    "${args_json_file}": "SIREN takes key=value overrides, use ${args_no_hyphens}",
}
_STDERR_TAIL_LINES = 20


class SweepError(SirenError, ValueError):
    """An invalid sweep file, or a sweep that could not be started."""


class TrialProcess(Protocol):
    """What a trial runner returns: `subprocess.CompletedProcess` fits."""

    returncode: int
    stderr: str | None


Runner = Callable[[list[str], dict[str, str]], TrialProcess]


# ------------------------------------------------------------------------------------------------------------- loading
def load_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sweep YAML and validate it (W&B's schema + SIREN's needs); all problems are raised together."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise SweepError(f"sweep file {path} must hold a mapping, got {type(config).__name__}")
    from sweeps import schema_violations_from_proposed_config

    problems = list(schema_violations_from_proposed_config(config))
    metric = config.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        problems.append("'metric' with a 'name' (a logged key such as train/loss) is required to rank trials")
    command = config.get("command")
    if not isinstance(command, list) or _ARGS_MACRO not in command:
        problems.append(f"'command' must be a list that passes the overrides with {_ARGS_MACRO}")
    else:
        problems += [
            f"command macro {m} is not supported: {why}" for m, why in _UNSUPPORTED_MACROS.items() if m in command
        ]
        if "${program}" in command and "program" not in config:
            problems.append("command uses ${program} but the sweep has no 'program'")
    if isinstance(metric, dict) and metric.get("name") and (problem := metric_scaled_by_sweep(config)) is not None:
        problems.append(problem)
    for key, spec in (config.get("parameters") or {}).items():
        if isinstance(spec, dict) and "parameters" in spec:
            problems.append(f"parameter {key!r}: nested parameters are not supported, use dotted keys ({key}.<field>)")
        elif (problem := config_key_problem(key)) is not None:
            problems.append(f"parameter {key!r}: {problem}")
        elif isinstance(spec, dict):
            problems += [f"parameter {key!r}: {p}" for p in _out_of_range(key, spec)]
    if problems:
        raise SweepError(f"invalid sweep file {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


# Distributions whose `min` is the lowest value a trial can get (W&B infers int_uniform / uniform from a bare min/max).
_MIN_IS_LOWEST = {None, "int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values"}


def _out_of_range(key: str, spec: Mapping[str, Any]) -> list[str]:
    """The values a parameter can give that its config field refuses (`value`, each of `values`, the lowest of a
    distribution): found when the sweep is read, not in a failed trial each."""
    from siren.config.loader import bound_problem

    candidates = [spec["value"]] if "value" in spec else list(spec.get("values") or [])
    if "min" in spec and spec.get("distribution") in _MIN_IS_LOWEST:
        candidates.append(spec["min"])
    return [p for v in candidates if (p := bound_problem(key, v)) is not None]


def swept_keys(config: Mapping[str, Any]) -> list[str]:
    """Parameters that take more than one value (a fixed `value:` or a one-item `values:` list is not swept)."""
    out = []
    for key, spec in (config.get("parameters") or {}).items():
        if isinstance(spec, dict) and ("value" in spec or len(spec.get("values", [None, None])) == 1):
            continue
        out.append(key)
    return out


def metric_scaled_by_sweep(config: Mapping[str, Any]) -> str | None:
    """Why the sweep metric cannot rank these trials, or None: it must not be a loss the swept weights scale.

    `train/loss` and `eval/loss` are the weighted sum of the loss terms, so sweeping any `loss.<term>` weight scales
    them; `train/<term>` / `eval/<term>` is the term a larger `loss.<term>` weight pushes down directly.
    """
    name = str(config["metric"]["name"])
    weights = [k for k in swept_keys(config) if k.startswith("loss.")]
    if not weights:
        return None
    split, _, term = name.partition("/")
    if split not in ("train", "eval"):
        return None
    if term == "loss":
        return (
            f"metric {name!r} is the weighted sum of the loss terms and the sweep varies the weights "
            f"{', '.join(weights)}: it would rank the weights, not the runs; rank by a metric they do not scale "
            "(e.g. eval/drift/sem/agreement, goal: maximize)"
        )
    if f"loss.{term}" in weights:
        return (
            f"metric {name!r} is the loss term whose weight loss.{term} the sweep varies: a larger weight lowers it "
            "by construction; rank by a metric the weights do not drive (e.g. eval/drift/sem/agreement, goal: maximize)"
        )
    return None


def config_key_problem(key: str) -> str | None:
    """Why `key` is not a dotted leaf key of `SirenConfig` (with the closest valid name), or None when it is."""
    cls: Any = SirenConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config root"
        if cls is None:
            return f"{where} is a value, not a section"
        if isinstance(cls, _DictSection):  # a dict section (`optim.groups`): any name, then its value type
            cls = cls.value
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else ""
            return f"unknown key {part!r} in {where}{hint}"
        cls = _section_type(hints[part])
    if cls is not None:
        return f"{key!r} is a section, not a value; sweep one of its fields"
    return None


@dataclasses.dataclass(frozen=True)
class _DictSection:
    """A `dict[str, X]` schema field: any key, whose value is the dataclass `value` (None for plain values)."""

    value: Any


def _section_type(hint: Any) -> Any:
    """The dataclass (or dict-of-dataclass marker) behind a schema annotation, None for a leaf value."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) is dict:
        value = typing.get_args(hint)[1]
        return _DictSection(value if dataclasses.is_dataclass(value) else None)
    return None


# ------------------------------------------------------------------------------------------------------------ proposals
def propose_trials(
    sweep_config: Mapping[str, Any],
    n: int,
    seed: int = 0,
    history: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Next `n` parameter sets ({dotted key: Python value}) from the `sweeps` engine; fewer when a grid is exhausted.

    `history` holds finished trials (dicts with `params`, `metric`, `returncode`) so grid skips done points and bayes
    conditions on results. Deterministic for a given (config, seed, history); the global RNG state is restored.
    """
    # The engines are imported here, before seeding: `next_runs` imports them lazily and that consumes global random state.
    from sweeps import SweepRun, bayes_search, grid_search, next_runs, random_search  # noqa: F401

    metric_name = sweep_config.get("metric", {}).get("name")
    runs = []
    for trial in history:
        ok = trial.get("returncode") == 0 and _is_finite(trial.get("metric"))
        summary = {metric_name: trial["metric"]} if ok and metric_name else {}
        runs.append(
            SweepRun(
                name=trial.get("name"),
                config={k: {"value": v} for k, v in trial["params"].items()},
                summaryMetrics=summary,  # the alias: pydantic 2 ignores `summary_metrics=` here
                sampledHistory=[summary] if summary else [],
                state="finished" if ok else "failed",
            )
        )
    with _seeded(seed + len(runs)):
        proposed = next_runs(dict(sweep_config), runs, validate=True, n=n)
    return [{k: _to_python(v["value"]) for k, v in run.config.items()} for run in proposed if run is not None]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # `sweeps` samples from the global `random` (random/grid) and `numpy.random` (bayes) generators.
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _to_python(value: Any) -> Any:
    """numpy scalars/arrays → Python values, so YAML and the command line see plain numbers."""
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


def format_override_value(value: Any) -> str:
    """A value as YAML text, so the config loader reads back the same type (`1e-04` alone would be a YAML string)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(_to_python(value), default_flow_style=True).removesuffix("\n...\n").strip()


def trial_overrides(
    params: Mapping[str, Any], *, run_dir: str | os.PathLike[str], group: str, extra_overrides: Sequence[str] = ()
) -> list[str]:
    """`key=value` overrides for one offline trial: the proposal, then its own run dir, the sweep's group, offline W&B."""
    overrides = [f"{k}={format_override_value(v)}" for k, v in params.items()]
    overrides += list(extra_overrides)
    # Last so a sweep parameter cannot send two trials into one run dir (which would auto-resume the other trial).
    overrides += [f"run_dir={os.fspath(run_dir)}", f"tracking.group={group}", "tracking.mode=offline"]
    return overrides


def build_command(sweep_config: Mapping[str, Any], overrides: Sequence[str]) -> list[str]:
    """Expand the sweep's `command` macros the way `wandb agent` does, with this interpreter and `overrides`."""
    command = []
    for item in sweep_config["command"]:
        item = str(item)
        if item == "${env}":
            continue  # `/usr/bin/env` in the agent: a no-op prefix when the interpreter path is absolute
        elif item == "${interpreter}":
            command.append(sys.executable)
        elif item == "${program}":
            command.append(str(sweep_config["program"]))
        elif item == _ARGS_MACRO:
            command += list(overrides)
        elif item.startswith("${") and item.endswith("}"):
            raise SweepError(f"sweep command macro {item} is not supported by the offline runner")
        else:
            command.append(item)
    return command


# -------------------------------------------------------------------------------------------------------------- results
def read_metric(run_dir: str | os.PathLike[str], name: str) -> float | None:
    """W&B's summary value of `name`: its last value in `RUN/metrics.jsonl` (the same history W&B holds, a resumed run's
    re-logged steps included); None when the file is missing or never logged it."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return None
    value = None
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if name in record:
                value = record[name]
    return None if value is None else float(value)


def rank_trials(trials: Sequence[dict[str, Any]], goal: str) -> list[dict[str, Any]]:
    """Best-first: successful trials by metric (goal minimize/maximize), then failed ones in launch order."""
    if goal not in ("minimize", "maximize"):
        raise SweepError(f"sweep metric goal must be 'minimize' or 'maximize', got {goal!r}")
    ok = [t for t in trials if t["error"] is None]
    failed = [t for t in trials if t["error"] is not None]
    ok.sort(key=lambda t: t["metric"], reverse=goal == "maximize")
    failed.sort(key=lambda t: t["index"])
    ranked = ok + failed
    for rank, trial in enumerate(ranked, start=1):
        trial["rank"] = rank
    return ranked


def format_ranking(trials: Sequence[Mapping[str, Any]], metric_name: str = "metric") -> str:
    """A plain-text table of ranked trials: rank, name, metric, status, parameters."""
    rows = [("rank", "trial", metric_name, "status", "params")]
    for t in trials:
        metric = "-" if t.get("metric") is None else f"{t['metric']:.6g}"
        status = "ok" if t.get("error") is None else f"FAILED (rc={t.get('returncode')})"
        params = " ".join(f"{k}={format_override_value(v)}" for k, v in t.get("params", {}).items())
        rows.append((str(t.get("rank", "")), str(t.get("name", "")), metric, status, params))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    errors = [f"{t['name']}: {t['error']}" for t in trials if t.get("error") is not None]
    return "\n".join(lines + ([""] + errors if errors else []))


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -------------------------------------------------------------------------------------------------------------- running
def run_sweep(
    path: str | os.PathLike[str],
    count: int,
    *,
    online: bool | None = None,
    extra_overrides: Sequence[str] = (),
    runs_root: str | os.PathLike[str] = "runs/sweeps",
    seed: int = 0,
    runner: Runner | None = None,
    fresh: bool = False,
) -> list[dict[str, Any]]:
    """Run `count` trials of the sweep file at `path`; returns trials ranked best-first (and prints the table).

    Offline, a sweep run again finds its trial directories: it says so and resumes each (a finished trial trains no
    further and is ranked as it ended; a trial whose swept values differ from the new proposal is refused), or, with
    `fresh`, moves the earlier run aside and starts over.

    Each trial dict: index, name, params, run_dir, command, returncode, metric, error (None when it succeeded), rank.
    """
    from siren.checkpoints.artifacts import wandb_is_online

    if count < 1:
        raise SweepError(f"sweep count must be >= 1, got {count}")
    config = load_sweep(path)
    name = sweep_name(config, path)
    root = Path(runs_root) / name
    if wandb_is_online() if online is None else online:
        trials = _run_online(config, Path(path), count, name, root, extra_overrides)
    else:
        trials = _run_offline(config, count, name, root, extra_overrides, seed, runner or _subprocess_runner, fresh)
    ranked = rank_trials(trials, config["metric"].get("goal", "minimize"))
    print(
        f"sweep {name}: {len(ranked)} trial(s) ranked by {config['metric']['name']} ({config['metric'].get('goal', 'minimize')})"
    )
    print(format_ranking(ranked, config["metric"]["name"]))
    return ranked


def sweep_name(config: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """The sweep's `name`, else the file stem; made safe for a directory and a W&B group name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(config.get("name") or Path(path).stem))


def _subprocess_runner(command: list[str], env: dict[str, str]) -> TrialProcess:
    # stdout streams to the console (progress); stderr is captured so a failure can be reported.
    return subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True, check=False)


def _run_offline(
    config: dict[str, Any],
    count: int,
    name: str,
    root: Path,
    extra_overrides: Sequence[str],
    seed: int,
    runner: Runner,
    fresh: bool = False,
) -> list[dict[str, Any]]:
    metric_name = config["metric"]["name"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    trials: list[dict[str, Any]] = []
    earlier = sorted((p.name for p in root.glob("trial_*") if p.is_dir()), key=_trial_index) if root.is_dir() else []
    if earlier and fresh:
        aside = root.with_name(f"{root.name}.before-fresh-{time.strftime('%Y%m%d-%H%M%S')}")
        root.rename(aside)
        print(f"sweep {name}: --fresh: the earlier run ({len(earlier)} trial(s)) moved to {aside}", flush=True)
    elif earlier:
        print(
            f"sweep {name}: {root} holds {len(earlier)} trial(s) of an earlier run ({', '.join(earlier)}); resuming "
            "them: a finished trial trains no further and is ranked as it ended (--fresh starts the sweep over)",
            flush=True,
        )
    for k in range(count):
        # One proposal at a time, so bayes sees every finished trial and grid skips the points already run.
        proposal = propose_trials(config, 1, seed=seed, history=trials)
        if not proposal:
            print(f"sweep {name}: grid exhausted after {k} trial(s)")
            break
        params = proposal[0]
        run_dir = root / f"trial_{k}"
        if RunDir(run_dir).config.is_file():
            before = _params_from_resolved_config(run_dir, config["parameters"])
            differ = {
                key: (before.get(key), _to_python(v)) for key, v in params.items() if before.get(key) != _to_python(v)
            }
            if differ:
                raise SweepError(
                    f"sweep {name}: {run_dir} was run with other values of the swept keys than this sweep now proposes "
                    f"for it ({', '.join(f'{key}: {a!r} → {b!r}' for key, (a, b) in differ.items())}); pass --fresh "
                    "to start the sweep over"
                )
            print(f"sweep {name}: trial_{k} exists: resuming it", flush=True)
        command = build_command(
            config, trial_overrides(params, run_dir=run_dir, group=name, extra_overrides=extra_overrides)
        )
        print(f"sweep {name}: trial_{k}/{count}: {shlex.join(command)}", flush=True)
        proc = runner(command, env)
        trial = {
            "index": k,
            "name": f"trial_{k}",
            "params": params,
            "run_dir": str(run_dir),
            "command": command,
            "returncode": proc.returncode,
            "metric": None,
            "error": None,
        }
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-_STDERR_TAIL_LINES:])
            trial["error"] = f"exit code {proc.returncode}" + (f"; stderr tail:\n{tail}" if tail else "")
        else:
            trial["metric"] = read_metric(run_dir, metric_name)
            if not _is_finite(trial["metric"]):
                trial["error"] = (
                    f"{metric_name} is {trial['metric']} in {run_dir / 'metrics.jsonl'} (never logged or not finite)"
                )
        trials.append(trial)
    return trials


def _run_online(
    config: dict[str, Any], path: Path, count: int, name: str, root: Path, extra_overrides: Sequence[str]
) -> list[dict[str, Any]]:
    # The agent runs the same command for every trial, so a shell wrapper appends a per-trial run dir from the run id the
    # agent exports (WANDB_RUN_ID); without it every trial would share (and auto-resume) one run dir.
    fixed = [*extra_overrides, f"tracking.group={name}"]
    wrapper = f'exec "$@" run_dir={shlex.quote(str(root))}/"$WANDB_RUN_ID" ' + " ".join(shlex.quote(o) for o in fixed)
    command = [sys.executable if c == "${interpreter}" else c for c in config["command"] if c != "${env}"]
    derived = {**config, "command": ["/bin/sh", "-c", wrapper, "siren-trial", *command]}
    root.mkdir(parents=True, exist_ok=True)
    derived_path = root / f"{path.stem}.wandb.yaml"
    derived_path.write_text(yaml.safe_dump(derived, sort_keys=False))

    wandb_exe = Path(sys.executable).parent / "wandb"
    wandb_cmd = [str(wandb_exe) if wandb_exe.is_file() else "wandb"]
    create = [*wandb_cmd, "sweep", "--project", str(config.get("project") or "siren")]
    if config.get("entity"):
        create += ["--entity", str(config["entity"])]
    proc = subprocess.run([*create, str(derived_path)], capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    match = re.search(r"wandb agent (\S+)", output)
    if proc.returncode != 0 or match is None:
        raise SweepError(f"`{shlex.join([*create, str(derived_path)])}` failed (exit {proc.returncode}):\n{output}")
    sweep_path = match.group(1)
    print(f"sweep {name}: created {sweep_path}; running {count} trial(s) with wandb agent", flush=True)
    subprocess.run([*wandb_cmd, "agent", "--count", str(count), sweep_path], check=True)

    trials = []
    for k, run_dir in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        metric = read_metric(run_dir, config["metric"]["name"])
        error = None if _is_finite(metric) else f"{config['metric']['name']} never logged in {run_dir}"
        params = _params_from_resolved_config(run_dir, config["parameters"])
        trials.append(
            {"index": k, "name": run_dir.name, "params": params, "run_dir": str(run_dir), "command": []}
            | {"returncode": None, "metric": metric, "error": error}
        )
    return trials


def _trial_index(name: str) -> int:
    tail = name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else 1 << 30


def _params_from_resolved_config(run_dir: Path, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The swept values as the trial resolved them (`RUN/config.yaml`); empty when the trial never wrote it."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return {}
    resolved = yaml.safe_load(path.read_text())
    params = {}
    for key in parameters:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        params[key] = node
    return params
