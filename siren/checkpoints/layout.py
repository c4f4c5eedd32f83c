"""The run directory and its checkpoints: atomic step dirs, `latest`, retention, strict self-contained loading.

Layout (`RunDir` names every path; nothing else spells them)::

    RUN/config.yaml            the config the run was started with (as loaded, after overrides)
    RUN/metrics.jsonl          one JSON line per logged step
    RUN/baseline_profile.json  adapt: the baseline's codebook profile (drift reference)
    RUN/wandb_run_id           the W&B run id, so a resume continues the same W&B run
    RUN/.pids/                 one pid file per process (for schedulers that signal before a time limit)
    RUN/cache/                 adapt's teacher cache when data.feature_cache is not set
    RUN/verify/step_{N}/       `siren verify` records of step N
    RUN/checkpoints/step_{N}/components/<name>.safetensors
                             meta.json       (`CheckpointMeta`)
                             trainer/        (accelerator.save_state: optimizer, scheduler, scaler, RNG)
                             samples/
    RUN/checkpoints/latest   (text file: the newest complete step dir name)

A step is written into `RUN/checkpoints/.tmp-step_{N}-<pid>/` and renamed into place; `latest` is replaced (write to a
temporary file, `os.replace`) only after that, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from siren.checkpoints.meta import CheckpointMeta
from siren.errors import SirenError
from siren.models.io import load_component, save_component

STEP_RE = re.compile(r"^step_(\d+)$")
# What a `--fresh` start moves aside (renamed `<name>.before-fresh-<stamp>`): everything a previous run left that a new
# one would otherwise read as its own.
RUN_STATE = ("checkpoints", "metrics.jsonl", "baseline_profile.json", "wandb_run_id")


@dataclass(frozen=True)
class RunDir:
    """The paths inside one run directory."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def baseline_profile(self) -> Path:
        return self.root / "baseline_profile.json"

    @property
    def wandb_run_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def train_log(self) -> Path:
        """The trainer's console output where `siren demo` keeps it."""
        return self.root / "train.log"

    @property
    def pids(self) -> Path:
        return self.root / ".pids"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def checkpoints(self) -> Path:
        return checkpoints_dir(self.root)

    def step(self, step: int) -> Path:
        return step_dir(self.root, step)

    def samples(self, step: int) -> Path:
        return step_dir(self.root, step) / "samples"

    def verify(self, step: int) -> Path:
        return self.root / "verify" / f"step_{step}"

    def is_run(self) -> bool:
        """Whether this looks like a run directory (a started run writes its config and metrics first)."""
        return self.checkpoints.is_dir() or self.config.is_file() or self.metrics.is_file()


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_step(run_dir: str | Path) -> int | None:
    """Step named by `latest`, or None when the run has no complete checkpoint."""
    latest = checkpoints_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    m = STEP_RE.match(name)
    if not m or not (checkpoints_dir(run_dir) / name / "meta.json").is_file():
        raise SirenError(f"{latest} names `{name}`, which is not a complete checkpoint directory")
    return int(m.group(1))


def list_steps(run_dir: str | Path) -> list[int]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_meta(step_path: str | Path) -> CheckpointMeta:
    """The step's `meta.json`, checked against the schema (`CheckpointMeta.from_dict`)."""
    path = Path(step_path) / "meta.json"
    if not path.is_file():
        raise SirenError(f"{step_path} is not a checkpoint: {path} is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SirenError(f"{path} is corrupt: {exc}") from exc
    return CheckpointMeta.from_dict(raw, path)


def tmp_step_dir(run_dir: str | Path, step: int) -> Path:
    """Where step `step` is written before `commit_step` renames it: the same name on every rank, since
    `accelerator.save_state` writes per-rank RNG files into it."""
    return checkpoints_dir(run_dir) / f".tmp-step_{step}"


def begin_step(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for step `step`; call `commit_step` once everything is written in it."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_step_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "components").mkdir(parents=True)
    return tmp


def save_components(tmp: Path, components: Mapping[str, nn.Module]) -> None:
    for name, module in components.items():
        save_component(module, tmp / "components" / f"{name}.safetensors")


def commit_step(run_dir: str | Path, tmp: Path, step: int, meta: CheckpointMeta) -> Path:
    """Write meta.json last, rename the temp dir into place, then point `latest` at it."""
    if meta.step != step:
        raise SirenError(f"checkpoint meta says step {meta.step}, but it is being committed as step {step}")
    write_text_atomic(tmp / "meta.json", meta.to_json())
    final = step_dir(run_dir, step)
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    write_text_atomic(checkpoints_dir(run_dir) / "latest", final.name + "\n")
    return final


def clean_partial(run_dir: str | Path) -> list[str]:
    """Remove temporary dirs left by a killed checkpoint write; returns their names."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step_", ".old-step_")):
                shutil.rmtree(p, ignore_errors=False)
                removed.append(p.name)
    return removed


def apply_retention(run_dir: str | Path, keep_last: int, keep_steps: Iterable[int], best_step: int | None) -> list[int]:
    """Delete step dirs outside the last `keep_last`, `keep_steps` and the best; returns deleted steps."""
    steps = list_steps(run_dir)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    keep |= set(keep_steps)
    if best_step is not None:
        keep.add(best_step)
    latest = latest_step(run_dir)
    if latest is not None:
        keep.add(latest)
    deleted = [s for s in steps if s not in keep]
    for s in deleted:
        shutil.rmtree(step_dir(run_dir, s))
    return deleted


def load_components(
    step_path: str | Path, components: Mapping[str, nn.Module], allow: Iterable[str] = ()
) -> dict[str, list[str]]:
    """Strictly load every named component from a step dir; a missing file is an error naming it."""
    step_path = Path(step_path)
    allow = list(allow)
    patched = {}
    missing = [n for n in components if not (step_path / "components" / f"{n}.safetensors").is_file()]
    if missing:
        raise SirenError(f"checkpoint {step_path} has no weights for component(s): {', '.join(missing)}")
    for name, module in components.items():
        patched[name] = load_component(module, step_path / "components" / f"{name}.safetensors", allow=allow)
    return patched


def available_components(step_path: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(step_path) / "components").glob("*.safetensors"))
