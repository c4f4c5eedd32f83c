"""Run-directory checkpoints (DESIGN §6): atomic step dirs, `latest`, retention, strict self-contained loading.

Layout::

    RUN/checkpoints/step_{N}/components/<name>.safetensors
                             meta.json
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
from pathlib import Path

from torch import nn

from siren.errors import SirenError
from siren.models.io import load_component, save_component

STEP_RE = re.compile(r"^step_(\d+)$")


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


def read_meta(step_path: str | Path) -> dict:
    path = Path(step_path) / "meta.json"
    if not path.is_file():
        raise SirenError(f"{step_path} is not a checkpoint: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SirenError(f"{path} is corrupt: {exc}") from exc


def begin_step(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for step `step`; call `commit_step` once everything is written in it."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Same name on every rank: accelerator.save_state writes per-rank RNG files into it.
    tmp = root / f".tmp-step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "components").mkdir(parents=True)
    return tmp


def save_components(tmp: Path, components: Mapping[str, nn.Module]) -> None:
    for name, module in components.items():
        save_component(module, tmp / "components" / f"{name}.safetensors")


def commit_step(run_dir: str | Path, tmp: Path, step: int, meta: dict) -> Path:
    """Write meta.json last, rename the temp dir into place, then point `latest` at it."""
    write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
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
