"""Sharing hook: every checkpoint goes into the local artifact index and, with W&B on, is logged as an artifact
(type `checkpoint`, name `<stage>-<run name>`, aliases `step_N`, `latest` and `best`; DESIGN §12)."""

from __future__ import annotations

from pathlib import Path


class ShareHook:
    def __init__(self, tracker, stage_name: str, run_name: str, project: str | None):
        self.tracker, self.stage_name, self.run_name, self.project = tracker, stage_name, run_name, project

    def __call__(self, step_path: Path, step: int, is_best: bool) -> None:
        from siren.artifacts import artifact_name, index_checkpoint, log_checkpoint_artifact

        aliases = [f"step_{step}", "latest"] + (["best"] if is_best else [])
        name = artifact_name(self.stage_name, self.run_name)
        index_checkpoint(step_path, self.tracker.entity, self.project, name, aliases)
        self.tracker.flush()  # the W&B thread is idle while the main thread uses the run
        if self.tracker.run is not None:
            log_checkpoint_artifact(
                self.tracker.run, step_path, name, aliases, {"step": step, "stage": self.stage_name}
            )
