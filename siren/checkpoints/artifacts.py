"""Checkpoint URIs, the local artifact index and W&B checkpoint artifacts (docs/sharing.md).

A checkpoint URI is one of:
- a step directory `RUN/checkpoints/step_N/` (holds `meta.json`);
- a run directory `RUN/` or its `RUN/checkpoints/` directory: resolves to the step named in `checkpoints/latest`;
- `wandb:ENTITY/PROJECT/NAME:ALIAS`: looked up first in the local index (so teams on one machine or a shared filesystem
  need no server), otherwise downloaded from the W&B server into the cache (online only).

Local index layout, under `artifact_cache_dir()` (`$SIREN_ARTIFACT_CACHE`, default `~/.cache/siren/artifacts`; point
it at a shared filesystem to share one index between machines, or at a private dir to keep runs apart):
    index/<entity>/<project>/<name>.json  = {"owner": "/abs/run_dir", "aliases": {alias: "/abs/step_dir"},
                                             "versions": [{...}, ...]}
    downloads/<entity>/<project>/<name>/<version>/  artifacts fetched from the server
Entity `None` is stored as `local`. Index files are rewritten under an exclusive lock and replaced atomically, so
concurrent writers never lose each other's aliases and readers never see a half-written file.

A name belongs to one run directory (`owner`). Every write goes through one claim (`claim_artifact_name`, which
`index_checkpoint` also applies): a run directory other than the owner is refused with an error naming both, while
the owner still exists. Writers that choose a name themselves take `derive_run_name`'s, which gives a second run
directory of the same name (`runs/a/student`, `runs/b/student`) a name of its own. Server downloads are copies of the
named artifact and belong to no run directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import netrc
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from siren.checkpoints.layout import RunDir
from siren.errors import SirenError

logger = logging.getLogger(__name__)

WANDB_SCHEME = "wandb:"
LOCAL_ENTITY = "local"
# Aliases that W&B moves from version to version: never pinned in the index from a server download, or the index would
# keep answering with the version that happened to be downloaded first.
MOVING_ALIASES = frozenset({"latest", "best"})
_URI_RE = re.compile(r"^wandb:([^/:\s]+)/([^/:\s]+)/([^/:\s]+):([^/:\s]+)$")
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_NAME_LEN = 128


class CheckpointNotFound(SirenError, FileNotFoundError):
    """A checkpoint URI that is well formed but names nothing usable (missing, incomplete, deleted, not indexed)."""


class ArtifactNameTaken(SirenError):
    """An artifact name already indexed for another run directory that still exists."""


@dataclass(frozen=True)
class ArtifactRef:
    """A parsed `wandb:ENTITY/PROJECT/NAME:ALIAS` URI."""

    entity: str
    project: str
    name: str
    alias: str

    @property
    def qualified(self) -> str:
        """`ENTITY/PROJECT/NAME:ALIAS`, the form `wandb.Api().artifact` and `run.use_artifact` take."""
        return f"{self.entity}/{self.project}/{self.name}:{self.alias}"


def parse_wandb_uri(uri: str) -> ArtifactRef:
    """Parse `wandb:ENTITY/PROJECT/NAME:ALIAS`; anything else is a ValueError naming the URI."""
    match = _URI_RE.match(uri.strip())
    if match is None:
        raise ValueError(
            f"malformed checkpoint URI {uri!r}: expected 'wandb:ENTITY/PROJECT/NAME:ALIAS' "
            f"(e.g. 'wandb:local/siren/codec-baseline:latest'), a step directory or a run directory"
        )
    return ArtifactRef(*match.groups())


def artifact_name(stage: str, run_name: str) -> str:
    """W&B artifact name `<stage>-<run name>`, with characters W&B rejects replaced by `_`."""
    if not stage or not run_name:
        raise ValueError(f"artifact_name needs a stage and a run name, got stage={stage!r}, run_name={run_name!r}")
    return _NAME_BAD_CHARS.sub("_", f"{stage}-{run_name}")[:_MAX_NAME_LEN]


def artifact_cache_dir() -> Path:
    """Root of the local artifact index and downloads: `$SIREN_ARTIFACT_CACHE`, else `~/.cache/siren/artifacts`."""
    env = os.environ.get("SIREN_ARTIFACT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "siren" / "artifacts"


def index_path(entity: str | None, project: str, name: str) -> Path:
    """Path of the index file for one artifact (entity `None` → `local`)."""
    return artifact_cache_dir() / "index" / (entity or LOCAL_ENTITY) / project / f"{name}.json"


# ------------------------------------------------------------------------------------------------------------ resolution
def resolve_checkpoint(uri: str | os.PathLike[str]) -> Path:
    """Resolve a checkpoint URI to an existing step directory (one that holds `meta.json`)."""
    text = os.fspath(uri)
    if text.startswith(WANDB_SCHEME):
        return _resolve_wandb(parse_wandb_uri(text))
    if not text.strip():
        raise ValueError("malformed checkpoint URI '': empty")
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {text!r}: {path} does not exist")
    if not path.is_dir():
        raise CheckpointNotFound(
            f"checkpoint {text!r}: {path} is a file, expected a step, run or checkpoints directory"
        )
    if (path / "meta.json").is_file():
        return path
    if (path / "latest").is_file() or path.name == "checkpoints":
        return _latest_step(path, run_dir=path.parent)
    if RunDir(path).is_run():
        return _latest_step(path / "checkpoints", run_dir=path)
    raise CheckpointNotFound(
        f"checkpoint {text!r}: {path} is neither a step directory (no meta.json) nor a run directory "
        f"(no checkpoints/, config.yaml or metrics.jsonl)"
    )


def _latest_step(ckpt_dir: Path, run_dir: Path) -> Path:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        raise CheckpointNotFound(f"run {run_dir} has no complete checkpoint yet ({latest} does not exist)")
    step_name = latest.read_text().strip()
    if not step_name or "/" in step_name:
        raise CheckpointNotFound(
            f"{latest} is corrupt: expected a step directory name like 'step_40', got {step_name!r}"
        )
    step_dir = ckpt_dir / step_name
    if not (step_dir / "meta.json").is_file():
        raise CheckpointNotFound(f"{latest} names {step_name!r} but {step_dir / 'meta.json'} does not exist")
    return step_dir


def _resolve_wandb(ref: ArtifactRef) -> Path:
    index_file = index_path(ref.entity, ref.project, ref.name)
    if index_file.is_file():
        aliases = _read_index(index_file)["aliases"]
        if ref.alias in aliases:
            step_dir = Path(aliases[ref.alias])
            if not (step_dir / "meta.json").is_file():
                raise CheckpointNotFound(
                    f"wandb:{ref.qualified}: alias {ref.alias!r} in {index_file} points to {step_dir}, which no longer "
                    f"exists (deleted by checkpoint retention?); pick another alias or re-index the checkpoint"
                )
            return step_dir
    if not wandb_is_online():
        raise CheckpointNotFound(
            f"wandb:{ref.qualified} is not in the local artifact index at {index_file} and W&B is offline "
            f"(WANDB_MODE={os.environ.get('WANDB_MODE', '<unset>')}, or not logged in); log in with `wandb login`, "
            f"or point SIREN_ARTIFACT_CACHE at the cache of the machine that trained it"
        )
    return download_artifact(ref)


def download_artifact(ref: ArtifactRef) -> Path:
    """Download an artifact from the W&B server into the cache and index it; the only function that talks to the server.

    Indexed under its immutable version (`v3`) and, unless it is a moving alias (`latest`, `best`), the requested alias.
    """
    import wandb

    artifact = wandb.Api().artifact(ref.qualified, type="checkpoint")
    root = artifact_cache_dir() / "downloads" / ref.entity / ref.project / ref.name / artifact.version
    step_dir = Path(artifact.download(root=str(root))).resolve()
    if not (step_dir / "meta.json").is_file():
        raise CheckpointNotFound(
            f"wandb:{ref.qualified} downloaded to {step_dir} but holds no meta.json: not a checkpoint"
        )
    aliases = [artifact.version] + ([ref.alias] if ref.alias not in MOVING_ALIASES else [])
    index_checkpoint(step_dir, ref.entity, ref.project, ref.name, aliases)
    return step_dir


# ----------------------------------------------------------------------------------------------------------------- index
def index_checkpoint(
    step_dir: str | os.PathLike[str], entity: str | None, project: str, name: str, aliases: Sequence[str]
) -> Path:
    """Record `step_dir` under `aliases` in the local index (moving an alias that pointed elsewhere). Returns the file."""
    step_dir = Path(step_dir).expanduser().resolve()
    meta_file = step_dir / "meta.json"
    if not meta_file.is_file():
        raise CheckpointNotFound(f"cannot index {step_dir}: no meta.json, so it is not a complete checkpoint")
    if not aliases:
        raise ValueError(f"index_checkpoint({step_dir}) needs at least one alias")
    for alias in aliases:
        if not alias or _NAME_BAD_CHARS.search(alias):
            raise ValueError(f"invalid artifact alias {alias!r}: use letters, digits, '_', '-' and '.'")
    step = json.loads(meta_file.read_text()).get("step")
    target = index_path(entity, project, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        data = _read_index(target) if target.is_file() else {"aliases": {}, "versions": []}
        if not _is_download(step_dir):  # a run's checkpoint: the name must be this run's
            _claim(data, target, name, step_dir.parent.parent)
        for alias in aliases:
            data["aliases"][alias] = str(step_dir)
        # One version entry per step dir; its alias list is recomputed so moved aliases disappear from older entries.
        versions = {v["path"]: v for v in data["versions"]}
        versions.setdefault(str(step_dir), {"path": str(step_dir), "step": step, "indexed_at": time.time()})
        for version in versions.values():
            version["aliases"] = sorted(a for a, p in data["aliases"].items() if p == version["path"])
        data["versions"] = sorted(versions.values(), key=lambda v: (v["step"] is None, v["step"] or 0, v["path"]))
        _atomic_write_json(target, data)
    return target


def claim_artifact_name(entity: str | None, project: str, name: str, run_dir: str | os.PathLike[str]) -> Path:
    """Make artifact `name` the run directory `run_dir`'s, or raise ArtifactNameTaken naming the run that owns it.

    Idempotent for the owner; a name whose owner directory no longer exists passes to `run_dir`. Returns the index
    file."""
    target = index_path(entity, project, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        data = _read_index(target) if target.is_file() else {"aliases": {}, "versions": []}
        if _claim(data, target, name, Path(run_dir)):
            _atomic_write_json(target, data)
    return target


def name_owner(entity: str | None, project: str, name: str, run_dir: str | os.PathLike[str]) -> Path | None:
    """The other, still existing run directory that owns artifact `name`, or None (free, or `run_dir`'s own)."""
    target = index_path(entity, project, name)
    if not target.is_file():
        return None
    others = _other_owners(_read_index(target), Path(run_dir).expanduser().resolve())
    return others[0] if others else None


def derive_run_name(entity: str | None, project: str, stage: str, run_dir: str | os.PathLike[str]) -> str:
    """The run directory's name, unless another existing run directory owns `<stage>-<that name>`: then the name gets
    a short hash of this run directory's absolute path, so two run directories never share a name (nor `latest`)."""
    resolved = Path(run_dir).expanduser().resolve()
    base = resolved.name
    owner = name_owner(entity, project, artifact_name(stage, base), resolved)
    if owner is None:
        return base
    unique = f"{base}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    logger.warning(
        "artifact name %s belongs to the run at %s; this run (%s) logs its checkpoints as %s (set tracking.run_name "
        "to choose a name)",
        artifact_name(stage, base),
        owner,
        resolved,
        artifact_name(stage, unique),
    )
    return unique


def _claim(data: dict[str, Any], target: Path, name: str, run_dir: Path) -> bool:
    """The claim, on an index file's data read under its lock: raise when another existing run directory owns `name`;
    else record `run_dir` as the owner. True when `data` changed."""
    mine = run_dir.expanduser().resolve()
    others = _other_owners(data, mine)
    if others:
        raise ArtifactNameTaken(
            f"checkpoint artifact name `{name}` already belongs to the run at {others[0]} (index {target}); "
            f"the run at {mine} may not share it: set tracking.run_name to a unique name for {mine}, or use another "
            f"artifact index (SIREN_ARTIFACT_CACHE)"
        )
    if data.get("owner") == str(mine):
        return False
    data["owner"] = str(mine)
    return True


def _other_owners(data: dict[str, Any], mine: Path) -> list[Path]:
    """Existing run directories other than `mine` that own the index entry: its recorded owner, and (for index files
    written before owners were recorded) the run directories of its versions that still exist."""
    found = []
    if data.get("owner"):
        found.append(Path(data["owner"]))
    for version in data.get("versions", []):
        step_dir = Path(version["path"])
        if not _is_download(step_dir) and step_dir.exists():
            found.append(step_dir.parent.parent)  # RUN/checkpoints/step_N → RUN
    out = []
    for owner in found:
        if owner.exists() and owner.resolve() != mine and owner.resolve() not in out:
            out.append(owner.resolve())
    return out


def _is_download(step_dir: Path) -> bool:
    return (artifact_cache_dir() / "downloads").resolve() in step_dir.resolve().parents


def _read_index(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("aliases"), dict)
        or not isinstance(data.get("versions"), list)
    ):
        raise ValueError(f"artifact index {path} is malformed: expected {{'aliases': {{...}}, 'versions': [...]}}")
    return data


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    # A sidecar lock file serialises read-modify-write cycles across processes; the index itself is only ever replaced.
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _atomic_write_json(target: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------------------------ W&B
def wandb_is_online() -> bool:
    """True when W&B may talk to its server: `WANDB_MODE` is not offline/dryrun/disabled and credentials exist."""
    if os.environ.get("WANDB_MODE", "").strip().lower() in {"offline", "dryrun", "disabled"}:
        return False
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netrc_file = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    if not netrc_file.is_file():
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    return netrc.netrc(str(netrc_file)).authenticators(host) is not None


def log_checkpoint_artifact(
    run: Any,
    step_dir: str | os.PathLike[str],
    name: str,
    aliases: Sequence[str],
    metadata: Mapping[str, Any],
    include_trainer_state: bool = False,
) -> bool:
    """Log `step_dir` as a `checkpoint` artifact on `run` (offline: recorded for `wandb sync`). True on success.

    The artifact holds `components/`, `meta.json` and `samples/` (what a consumer loads and listens to); `trainer/`
    (optimizer, scheduler, RNG: several times the weights) only with `include_trainer_state`.

    W&B never stops training: any error is logged as a warning and reported by returning False.
    """
    import wandb

    try:
        artifact = wandb.Artifact(name, type="checkpoint", metadata=dict(metadata))
        root = Path(step_dir)
        artifact.add_file(os.fspath(root / "meta.json"), name="meta.json")
        for sub in ("components", "samples") + (("trainer",) if include_trainer_state else ()):
            if (root / sub).is_dir():
                artifact.add_dir(os.fspath(root / sub), name=sub)
        run.log_artifact(artifact, aliases=list(aliases))
    except Exception as exc:  # noqa: BLE001 - deliberately broad: W&B failures are reported, never fatal
        logger.warning(
            "could not log checkpoint artifact %r from %s to W&B: %s: %s", name, step_dir, type(exc).__name__, exc
        )
        return False
    return True


def use_checkpoint_artifact(run: Any, uri: str) -> None:
    """Declare a consumed `wandb:` checkpoint on `run` so W&B shows lineage. No-op offline, disabled or for local URIs.

    Offline `use_artifact` raises TypeError in wandb 0.31, and an index-only entity (`local`) does not exist on the server.
    """
    if run is None or not uri.startswith(WANDB_SCHEME):
        return
    if getattr(run, "offline", False) or getattr(run, "disabled", False):
        return
    ref = parse_wandb_uri(uri)
    if ref.entity == LOCAL_ENTITY:
        return
    try:
        run.use_artifact(ref.qualified)
    except Exception as exc:  # noqa: BLE001 - lineage is bookkeeping; losing the connection must not stop training
        logger.warning("could not declare %s as used by the W&B run: %s: %s", uri, type(exc).__name__, exc)
