"""Sharing hook: every checkpoint goes into the local artifact index and, with W&B on, is logged as an artifact
(type `checkpoint`, name `<stage>-<run name>`, aliases `step_N`, `latest` and `best`; DESIGN §12).

An artifact carries what a consumer needs — `components/`, `meta.json` and `samples/` — and the optimizer/trainer
state only with `tracking.upload_trainer_state: true`. A name belongs to one run directory: a second run that would
log under the same name (two runs called `adapt` in different folders) is refused at start, before it could move the
other run's `latest` alias.
"""

from __future__ import annotations

from pathlib import Path

from siren.errors import SirenError


class ShareHook:
    def __init__(
        self, tracker, stage_name: str, run_name: str, project: str | None, upload_trainer_state: bool = False
    ):
        self.tracker, self.stage_name, self.run_name, self.project = tracker, stage_name, run_name, project
        self.upload_trainer_state = upload_trainer_state

    @property
    def name(self) -> str:
        from siren.artifacts import artifact_name

        return artifact_name(self.stage_name, self.run_name)

    def claim_name(self, run_dir: Path) -> None:
        """Refuse to start when the artifact name is already indexed for another run directory that still exists."""
        from siren.artifacts import index_path

        owner = name_owner(self.tracker.entity, self.project, self.name, run_dir)
        if owner is not None:
            index = index_path(self.tracker.entity, self.project or "siren", self.name)
            raise SirenError(
                f"checkpoint artifact name `{self.name}` already belongs to the run at {owner} (index {index}); "
                f"two runs may not share it: set tracking.run_name to a unique name for {Path(run_dir).resolve()}"
            )

    def __call__(self, step_path: Path, step: int, is_best: bool) -> None:
        from siren.artifacts import index_checkpoint, log_checkpoint_artifact

        aliases = [f"step_{step}", "latest"] + (["best"] if is_best else [])
        index_checkpoint(step_path, self.tracker.entity, self.project, self.name, aliases)
        self.tracker.flush()  # the W&B thread is idle while the main thread uses the run
        if self.tracker.run is not None:
            log_checkpoint_artifact(
                self.tracker.run,
                step_path,
                self.name,
                aliases,
                {"step": step, "stage": self.stage_name, "run_dir": str(Path(step_path).parent.parent.resolve())},
                include_trainer_state=self.upload_trainer_state,
            )


def name_owner(entity: str | None, project: str | None, name: str, run_dir: Path) -> Path | None:
    """The other, still existing run directory whose checkpoints are indexed under artifact `name`, or None."""
    from siren.artifacts import _read_index, index_path

    index = index_path(entity, project or "siren", name)
    if not index.is_file():
        return None
    mine = Path(run_dir).resolve()
    for version in _read_index(index).get("versions", []):
        step_dir = Path(version["path"])
        owner = step_dir.parent.parent  # RUN/checkpoints/step_N → RUN
        if owner.resolve() != mine and step_dir.exists():
            return owner
    return None


def default_run_name(entity: str | None, project: str | None, stage: str, run_dir: Path) -> str:
    """The run directory's name, unless another existing run already logs checkpoints under that artifact name (a
    second clone's `runs/demo/codec`, say): then the name gets a short hash of this run directory, so the two never
    share `latest`. An explicit `tracking.run_name` that collides is still refused (`ShareHook.claim_name`)."""
    import hashlib
    import logging

    from siren.artifacts import artifact_name

    resolved = Path(run_dir).resolve()
    base = resolved.name
    owner = name_owner(entity, project, artifact_name(stage, base), resolved)
    if owner is None:
        return base
    unique = f"{base}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    logging.getLogger("siren").warning(
        "artifact name %s belongs to the run at %s; this run (%s) logs its checkpoints as %s (set tracking.run_name "
        "to choose a name)",
        artifact_name(stage, base),
        owner,
        resolved,
        artifact_name(stage, unique),
    )
    return unique
