"""Checkpoint URIs, the local artifact index and W&B checkpoint artifacts (siren/artifacts.py)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
from helpers import finished_wandb_records

from siren.checkpoints import artifacts
from siren.checkpoints.artifacts import (
    CheckpointNotFound,
    artifact_name,
    index_checkpoint,
    index_path,
    log_checkpoint_artifact,
    resolve_checkpoint,
    use_checkpoint_artifact,
)


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """Artifact cache and W&B state under tmp_path; W&B offline and not logged in."""
    monkeypatch.setenv("SIREN_ARTIFACT_CACHE", str(tmp_path / "cache"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_state"))
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")


def make_run(root: Path, steps=(10, 20), latest: str | None = "step_20") -> Path:
    """A run dir with complete step dirs (meta.json) and an optional `latest` file."""
    run = root / "run"
    for step in steps:
        step_dir = run / "checkpoints" / f"step_{step}"
        step_dir.mkdir(parents=True)
        meta = {"step": step, "stage": "codec", "run_name": "r", "fingerprints": {}, "wandb": {}}
        (step_dir / "meta.json").write_text(json.dumps(meta))
    (run / "config.yaml").write_text("stage: codec\n")
    if latest is not None:
        (run / "checkpoints" / "latest").write_text(latest + "\n")
    return run


# ------------------------------------------------------------------------------------------------------------ local paths
def test_resolve_step_run_and_checkpoints_dir(tmp_path):
    run = make_run(tmp_path)
    step10 = run / "checkpoints" / "step_10"
    assert resolve_checkpoint(str(step10)) == step10.resolve()
    assert resolve_checkpoint(str(run)) == (run / "checkpoints" / "step_20").resolve()
    assert resolve_checkpoint(str(run / "checkpoints")) == (run / "checkpoints" / "step_20").resolve()


def test_run_without_latest_has_no_complete_checkpoint(tmp_path):
    run = make_run(tmp_path, latest=None)
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint"):
        resolve_checkpoint(str(run))


def test_latest_naming_a_deleted_step_is_not_found(tmp_path):
    run = make_run(tmp_path, latest="step_30")
    with pytest.raises(CheckpointNotFound, match="step_30"):
        resolve_checkpoint(str(run))


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointNotFound, match="neither a step directory"):
        resolve_checkpoint(str(tmp_path / "random"))


@pytest.mark.parametrize(
    "uri", ["wandb:", "wandb:name", "wandb:proj/name:latest", "wandb:e/p/n", "wandb:e/p/n:", "wandb:e/p/x/n:latest"]
)
def test_malformed_wandb_uri_names_it(uri):
    with pytest.raises(ValueError, match="malformed checkpoint URI") as err:
        resolve_checkpoint(uri)
    assert not isinstance(err.value, CheckpointNotFound)
    assert repr(uri) in str(err.value)


# ----------------------------------------------------------------------------------------------------------------- index
def test_wandb_uri_resolves_through_local_index_and_aliases_move(tmp_path):
    run = make_run(tmp_path)
    step10, step20 = (run / "checkpoints" / f"step_{s}" for s in (10, 20))
    index_checkpoint(step10, None, "siren", "codec-r", ["step_10", "latest", "best"])
    index_checkpoint(step20, None, "siren", "codec-r", ["step_20", "latest"])

    assert resolve_checkpoint("wandb:local/siren/codec-r:latest") == step20.resolve()
    assert resolve_checkpoint("wandb:local/siren/codec-r:best") == step10.resolve()
    assert resolve_checkpoint("wandb:local/siren/codec-r:step_10") == step10.resolve()

    data = json.loads(index_path(None, "siren", "codec-r").read_text())
    assert data["aliases"]["latest"] == str(step20.resolve())
    by_path = {v["path"]: v for v in data["versions"]}
    # `latest` moved: it must be listed on the new version only.
    assert by_path[str(step10.resolve())]["aliases"] == ["best", "step_10"]
    assert by_path[str(step20.resolve())]["aliases"] == ["latest", "step_20"]
    assert [v["step"] for v in data["versions"]] == [10, 20]


def test_stale_alias_names_alias_and_path(tmp_path):
    run = make_run(tmp_path)
    step10 = run / "checkpoints" / "step_10"
    index_checkpoint(step10, "team", "siren", "codec-r", ["step_10"])
    shutil.rmtree(step10)  # retention deleted it
    with pytest.raises(CheckpointNotFound) as err:
        resolve_checkpoint("wandb:team/siren/codec-r:step_10")
    assert "'step_10'" in str(err.value) and str(step10.resolve()) in str(err.value)


def test_not_indexed_and_offline_explains(tmp_path, monkeypatch):
    def no_download(ref):
        raise AssertionError("must not contact the W&B server offline")

    monkeypatch.setattr(artifacts, "download_artifact", no_download)
    with pytest.raises(CheckpointNotFound) as err:
        resolve_checkpoint("wandb:team/siren/codec-r:latest")
    message = str(err.value)
    assert "offline" in message and str(index_path("team", "siren", "codec-r")) in message


def test_not_indexed_and_online_downloads(tmp_path, monkeypatch):
    target = make_run(tmp_path) / "checkpoints" / "step_20"
    calls = []
    monkeypatch.setattr(artifacts, "wandb_is_online", lambda: True)
    monkeypatch.setattr(artifacts, "download_artifact", lambda ref: calls.append(ref) or target)
    assert resolve_checkpoint("wandb:team/siren/codec-r:v3") == target
    assert [c.qualified for c in calls] == ["team/siren/codec-r:v3"]


def test_index_requires_complete_checkpoint(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointNotFound, match="meta.json"):
        index_checkpoint(tmp_path / "half", None, "siren", "codec-r", ["latest"])


def _index_many(args):
    cache, step_dir, worker, n = args
    import os

    os.environ["SIREN_ARTIFACT_CACHE"] = cache
    for i in range(n):
        index_checkpoint(step_dir, None, "siren", "codec-r", [f"w{worker}_{i}"])


def test_concurrent_writers_lose_no_alias(tmp_path):
    step_dir = make_run(tmp_path) / "checkpoints" / "step_10"
    cache = str(tmp_path / "cache")
    workers, n = 4, 15
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_index_many, [(cache, step_dir, w, n) for w in range(workers)])
    target = index_path(None, "siren", "codec-r")
    data = json.loads(target.read_text())  # parses: never half-written
    assert set(data["aliases"]) == {f"w{w}_{i}" for w in range(workers) for i in range(n)}
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_artifact_name_sanitised():
    name = artifact_name("adapt", "tiny hubert/run:1")
    assert name.startswith("adapt-tiny")
    assert all(c.isalnum() or c in "-_." for c in name)
    assert artifact_name("codec", "x" * 300).__len__() <= 128
    with pytest.raises(ValueError):
        artifact_name("codec", "")


# ------------------------------------------------------------------------------------------------------------------ W&B
def test_log_checkpoint_artifact_offline_is_recorded(tmp_path):
    import wandb

    step_dir = make_run(tmp_path) / "checkpoints" / "step_20"
    name = artifact_name("codec", "offline-test")
    run = wandb.init(project="siren", mode="offline", dir=str(tmp_path / "wb"), reinit="create_new")
    ok = log_checkpoint_artifact(run, step_dir, name, ["step_20", "latest"], {"step": 20})
    run.finish()
    assert ok is True
    files = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    finished_wandb_records(files[0])
    assert name.encode() in files[0].read_bytes()


class FakeRun:
    def __init__(self, offline: bool = False, fail: bool = False):
        self.offline, self.disabled, self.fail = offline, False, fail
        self.logged, self.used = [], []

    def log_artifact(self, artifact, aliases):
        if self.fail:
            raise ConnectionError("server unreachable")
        self.logged.append((artifact, aliases))

    def use_artifact(self, name):
        self.used.append(name)


def test_log_checkpoint_artifact_failure_returns_false(tmp_path, caplog):
    step_dir = make_run(tmp_path) / "checkpoints" / "step_20"
    with caplog.at_level(logging.WARNING, logger="siren.checkpoints.artifacts"):
        assert log_checkpoint_artifact(FakeRun(fail=True), step_dir, "codec-r", ["latest"], {}) is False
    assert "server unreachable" in caplog.text
    assert log_checkpoint_artifact(FakeRun(), step_dir, "codec-r", ["latest"], {}) is True


def test_use_checkpoint_artifact_only_online_and_wandb_uri():
    online, offline = FakeRun(), FakeRun(offline=True)
    use_checkpoint_artifact(online, "wandb:team/siren/codec-r:latest")
    use_checkpoint_artifact(online, "wandb:local/siren/codec-r:latest")  # index-only entity: nothing on the server
    use_checkpoint_artifact(online, "/some/step_dir")
    use_checkpoint_artifact(offline, "wandb:team/siren/codec-r:latest")
    assert online.used == ["team/siren/codec-r:latest"]
    assert offline.used == []


# --------------------------------------------------------------------------------------------- one name, one run dir
def test_a_name_belongs_to_one_run_dir_at_every_index_write(tmp_path):
    """A second run directory writing under a name that another existing run directory owns is refused, naming both,
    and the owner's `latest` stays where it was; once the owner is gone the name is free."""
    from siren.checkpoints.artifacts import ArtifactNameTaken

    first, second = make_run(tmp_path / "a"), make_run(tmp_path / "b")  # both dirs are called `run`
    index_checkpoint(first / "checkpoints" / "step_10", None, "siren", "codec-run", ["step_10", "latest"])
    with pytest.raises(ArtifactNameTaken) as err:
        index_checkpoint(second / "checkpoints" / "step_20", None, "siren", "codec-run", ["step_20", "latest"])
    assert str(first.resolve()) in str(err.value) and str(second.resolve()) in str(err.value)
    assert resolve_checkpoint("wandb:local/siren/codec-run:latest") == (first / "checkpoints" / "step_10").resolve()
    shutil.rmtree(first)
    index_checkpoint(second / "checkpoints" / "step_20", None, "siren", "codec-run", ["step_20", "latest"])
    assert resolve_checkpoint("wandb:local/siren/codec-run:latest") == (second / "checkpoints" / "step_20").resolve()


def test_a_claim_holds_before_the_first_checkpoint_and_derived_names_differ(tmp_path):
    """A run claims its name at start (no checkpoint indexed yet): another run dir cannot write under it, and the name
    derived for a run dir of the same name is a different one, stable for that dir."""
    from siren.checkpoints.artifacts import ArtifactNameTaken, claim_artifact_name, derive_run_name

    first, second = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    assert derive_run_name(None, "siren", "codec", first) == "run"
    claim_artifact_name(None, "siren", "codec-run", first)
    claim_artifact_name(None, "siren", "codec-run", first)  # the owner's own claim again: fine
    with pytest.raises(ArtifactNameTaken, match="already belongs to the run"):
        index_checkpoint(second / "checkpoints" / "step_20", None, "siren", "codec-run", ["latest"])
    derived = derive_run_name(None, "siren", "codec", second)
    assert (
        derived != "run" and derived.startswith("run-") and derive_run_name(None, "siren", "codec", second) == derived
    )
    index_checkpoint(second / "checkpoints" / "step_20", None, "siren", artifact_name("codec", derived), ["latest"])


def test_server_downloads_belong_to_no_run_dir(tmp_path):
    """A version downloaded into the cache is a copy of the named artifact: indexing it under a name a local run owns
    is no collision."""
    from siren.checkpoints.artifacts import artifact_cache_dir

    run = make_run(tmp_path)
    index_checkpoint(run / "checkpoints" / "step_10", "team", "siren", "codec-r", ["latest"])
    download = artifact_cache_dir() / "downloads" / "team" / "siren" / "codec-r" / "v3"
    download.mkdir(parents=True)
    (download / "meta.json").write_text(json.dumps({"step": 30}))
    index_checkpoint(download, "team", "siren", "codec-r", ["v3"])
    assert resolve_checkpoint("wandb:team/siren/codec-r:v3") == download.resolve()


def test_the_index_lives_under_siren_artifact_cache(tmp_path, monkeypatch):
    """SIREN_ARTIFACT_CACHE moves the whole index: a claim in one cache is unknown to another."""
    from siren.checkpoints.artifacts import claim_artifact_name

    first, second = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    claim_artifact_name(None, "siren", "codec-run", first)
    assert index_path(None, "siren", "codec-run") == tmp_path / "cache" / "index" / "local" / "siren" / "codec-run.json"
    monkeypatch.setenv("SIREN_ARTIFACT_CACHE", str(tmp_path / "other"))
    claim_artifact_name(None, "siren", "codec-run", second)
    assert json.loads(index_path(None, "siren", "codec-run").read_text())["owner"] == str(second.resolve())


def test_two_imports_into_dirs_of_the_same_name_do_not_share_an_entry(tmp_path):
    """`siren import` into `a/student` and `b/student`: the second gets a name of its own and leaves the first's
    `latest` alone; naming both the same explicitly is refused before the second writes anything."""
    import torch

    from siren.checkpoints.artifacts import ArtifactNameTaken
    from siren.config.loader import load_config
    from siren.importer import import_run
    from siren.models.builders import build_component

    base = Path(__file__).resolve().parents[1] / "configs" / "demo" / "base.yaml"
    torch.save(build_component("vocoder", load_config(base, [])).state_dict(), tmp_path / "voc.pt")

    def imp(out: Path, *overrides: str) -> Path:
        return import_run(load_config(base, [f"vocoder.weights={tmp_path / 'voc.pt'}", *overrides]), "vocoder", out)

    a, b = imp(tmp_path / "a" / "student"), imp(tmp_path / "b" / "student")
    project = load_config(base, []).tracking.project
    assert resolve_checkpoint(f"wandb:local/{project}/vocoder-student:latest") == a
    name_b = json.loads((b / "meta.json").read_text())["run_name"]
    assert name_b.startswith("student-")
    assert resolve_checkpoint(f"wandb:local/{project}/vocoder-{name_b}:latest") == b
    with pytest.raises(ArtifactNameTaken) as err:
        imp(tmp_path / "c" / "student", "tracking.run_name=student")
    assert str((tmp_path / "a" / "student").resolve()) in str(err.value)
    assert str((tmp_path / "c" / "student").resolve()) in str(err.value)
    assert not (tmp_path / "c" / "student").exists()
