"""Sharing hook: every checkpoint goes into the local artifact index and, with W&B on, is logged as an artifact
(type `checkpoint`, name `<stage>-<run name>`, aliases `step_N`, `latest` and `best`; docs/sharing.md).

An artifact carries what a consumer needs — `components/`, `meta.json` and `samples/` — and the optimizer/trainer
state only with `tracking.upload_trainer_state: true`. A name belongs to one run directory: a second run that would
log under the same name (two runs called `adapt` in different folders) is refused at start, before it could move the
other run's `latest` alias.
"""

from __future__ import annotations

from pathlib import Path


class ShareHook:
    def __init__(
        self, tracker, stage_name: str, run_name: str, project: str | None, upload_trainer_state: bool = False
    ):
        self.tracker, self.stage_name, self.run_name, self.project = tracker, stage_name, run_name, project
        self.upload_trainer_state = upload_trainer_state

    @property
    def name(self) -> str:
        from siren.checkpoints.artifacts import artifact_name

        return artifact_name(self.stage_name, self.run_name)

    def claim_name(self, run_dir: Path) -> None:
        """Make the artifact name this run directory's, or refuse to start when another existing run owns it (the
        index writes of every checkpoint go through the same claim)."""
        from siren.checkpoints.artifacts import claim_artifact_name

        claim_artifact_name(self.tracker.entity, self.project or "siren", self.name, run_dir)

    def __call__(self, step_path: Path, step: int, is_best: bool) -> None:
        from siren.checkpoints.artifacts import index_checkpoint, log_checkpoint_artifact

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
    """The other, still existing run directory that owns artifact `name`, or None."""
    from siren.checkpoints.artifacts import name_owner as owner

    return owner(entity, project or "siren", name, run_dir)


def default_run_name(entity: str | None, project: str | None, stage: str, run_dir: Path) -> str:
    """The run directory's name, or with a hash of its path when another run directory owns that artifact name
    (`siren.checkpoints.artifacts.derive_run_name`). An explicit `tracking.run_name` that collides is refused (`claim_name`)."""
    from siren.checkpoints.artifacts import derive_run_name

    return derive_run_name(entity, project or "siren", stage, run_dir)
