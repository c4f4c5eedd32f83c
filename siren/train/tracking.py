"""Tracking (docs/metrics.md): every logged step goes to `RUN/metrics.jsonl` and to W&B with the same keys.

W&B runs online when the user is logged in and `WANDB_MODE` does not say otherwise, offline otherwise, and not at all when
disabled. W&B failing (at init or mid-run) prints a warning and training goes on with metrics.jsonl. Non-main ranks get a
`NullTracker` (rank-aware by construction: only the main process writes).

metrics.jsonl is written synchronously (it is the record a resume truncates). W&B calls go through one background thread
in submission order, so `run.log` (about a millisecond per step, offline) overlaps the next step's compute instead of
adding to it. `flush()` waits for the queue; media (checkpoint samples) and artifacts are logged after a flush, from the
main thread, because they point at files of a step directory.

A resumed run rewinds its W&B run and logs again what the run directory holds up to the checkpoint it resumes from:
metrics.jsonl's rows and each kept checkpoint's `samples/`, so the synced run equals the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import warnings
from pathlib import Path
from typing import Any

from siren.checkpoints.layout import RunDir

log = logging.getLogger("siren")


def wandb_mode(requested: str) -> str:
    """Resolve `tracking.mode` (`auto` → online if logged in and WANDB_MODE allows it, else offline)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested == "disabled" or env == "disabled":
        return "disabled"
    if requested in ("online", "offline"):
        return requested
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "online":
        return "online"
    return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Drop lines logged after `last_step` (a killed run logs past its last checkpoint); returns how many were dropped."""
    path = Path(path)
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= last_step]
    if len(keep) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)
    return len(rows) - len(keep)


def replayable_samples(run_dir: str | Path, last_step: int) -> list[tuple[int, Path]]:
    """(step, samples dir) of the complete checkpoints up to `last_step` that hold rendered samples, in step order."""
    from siren.checkpoints import layout as ckpt

    out = []
    for step in ckpt.list_steps(run_dir):
        samples = ckpt.RunDir(run_dir).samples(step)
        if step <= last_step and (samples / "index.json").is_file():
            out.append((step, samples))
    return out


class NullTracker:
    """What non-main ranks get: every call is a no-op."""

    run = None
    run_id: str | None = None
    mode = "disabled"
    project: str | None = None
    entity: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_media(self, payload: dict[str, Any], step: int) -> None:
        pass

    @property
    def media_enabled(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class Tracker(NullTracker):
    """metrics.jsonl + W&B for the main process."""

    def __init__(
        self,
        run_dir: Path,
        *,
        project: str,
        entity: str | None,
        mode: str,
        run_name: str,
        group: str | None,
        tags: list[str],
        config: dict,
        job_type: str,
        resume_id: str | None = None,
        rewind_to: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.metrics_path = RunDir(self.run_dir).metrics
        self.project, self.entity = project, entity
        self.mode = wandb_mode(mode)
        self.run = None
        self.run_id = resume_id
        self._rewound = False  # set when a resumed run was rewound: its history is then replayed from metrics.jsonl
        self._jsonl = open(self.metrics_path, "a")
        if self.mode == "disabled":
            return
        try:
            import wandb

            (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            common = dict(
                project=project,
                entity=entity,
                name=run_name,
                group=group,
                tags=tags or None,
                config=config,
                job_type=job_type,
                dir=str(self.run_dir),
                mode=self.mode,
                reinit="create_new",  # never hand back another (e.g. abandoned) run of this process
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            self.run = self._init_run(wandb, common, resume_id, rewind_to)
            if self._rewound:
                self._replay(rewind_to)
            self.run_id = self.run.id
            self.entity = self.entity or (self.run.entity if self.mode == "online" else None)
        except Exception as exc:  # W&B must never stop training (docs/metrics.md)
            self._disable(f"wandb.init failed: {exc!r}")
            return
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._drain, name="siren-wandb", daemon=True)
        self._worker.start()

    def _init_run(self, wandb, common: dict, resume_id: str | None, rewind_to: int | None):
        """A new run, or the same run continued. A resumed run is *rewound* (`resume_from="<id>?_step=0"`) and the
        history metrics.jsonl keeps (up to the checkpoint it resumes from, `rewind_to`) is logged again: a killed
        process loses whatever W&B had not yet written to its offline file — in practice seconds of steps *before*
        its last checkpoint too — so rewinding to the checkpoint alone leaves holes. Offline, the rewind is
        recorded in the new offline-run dir (same run id) and applied when `wandb sync` uploads the dirs in start
        order. A server that refuses rewinds (online) gets a plain resume, and what W&B then shows is printed once."""
        if resume_id is None:
            return wandb.init(**common)
        if rewind_to is None:
            return wandb.init(id=resume_id, resume="allow", **common)
        try:
            run = wandb.init(resume_from=f"{resume_id}?_step=0", **common)
            self._rewound = True
            log.info(
                "W&B run %s rewound and its history replayed from %s up to step %d (the checkpoint resumed from); "
                "what the interrupted process logged after it is dropped",
                resume_id,
                self.metrics_path,
                rewind_to,
            )
            return run
        except Exception as exc:
            if self.mode != "online":
                raise
            log.warning(
                "W&B refused to rewind run %s to step %d (%r): resuming it instead. W&B keeps the values the "
                "interrupted run logged for steps after %d and ignores the re-logged ones (steps must increase); "
                "metrics.jsonl in %s holds the resumed run's values",
                resume_id,
                rewind_to,
                exc,
                rewind_to,
                self.run_dir,
            )
            return wandb.init(id=resume_id, resume="allow", **common)

    def _replay(self, last_step: int) -> None:
        """Log again, in step order, what the run wrote up to `last_step`: metrics.jsonl's rows (already cut at
        `last_step`) and the samples table of every checkpoint whose `samples/` is on disk, at its own step, after
        that step's scalars (the order a checkpoint logs them in). metrics.jsonl holds no media, so without the
        second part the rewind would drop every sample logged before the resume. Checkpoints that retention
        deleted are not on disk and are not replayed."""
        media = replayable_samples(self.run_dir, last_step)
        n_media, rows = len(media), 0
        for row in read_metrics(self.metrics_path):
            step = int(row.pop("step"))
            if step > last_step:
                break
            while media and media[0][0] < step:  # a checkpoint step with no metrics row of its own
                self._log_samples(*media.pop(0))
            self.run.log({k: float(v) if isinstance(v, str) else v for k, v in row.items()}, step=step)
            rows += 1
            if media and media[0][0] == step:
                self._log_samples(*media.pop(0))
        for item in media:
            self._log_samples(*item)
        log.info("W&B replay: %d metrics rows and the samples of %d checkpoints", rows, n_media)

    def _log_samples(self, step: int, samples_dir: Path) -> None:
        from siren.train.samples import samples_table

        self.run.log({"samples": samples_table(samples_dir)}, step=step)

    def _drain(self) -> None:
        """The W&B thread: log payloads in order; the first failure disables W&B (a warning, never an exception)."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            payload, step, what = item
            if self.run is None:
                continue
            try:
                self.run.log(payload, step=step)
            except Exception as exc:  # losing W&B mid-run never stops training
                self._disable(f"wandb {what} failed at step {step}: {exc!r}")

    def _disable(self, why: str) -> None:
        warnings.warn(f"W&B disabled, metrics continue in {self.metrics_path}: {why}", stacklevel=2)
        log.warning("W&B disabled: %s", why)
        if self.run is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception as exc:  # already broken: nothing more to do than to let go of it
                log.warning("wandb finish after failure also failed: %r", exc)
        self.run = None
        self.mode = "disabled"

    @property
    def media_enabled(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else repr(v)) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self._queue.put((dict(metrics), step, "log"))

    def log_media(self, payload: dict[str, Any], step: int) -> None:
        """Synchronous (checkpoints only): media objects may point at files of a step dir about to be renamed."""
        self.flush()
        if self.run is not None:
            try:
                self.run.log(payload, step=step)
            except Exception as exc:
                self._disable(f"wandb media log failed at step {step}: {exc!r}")

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until every submitted W&B call has run (so the main thread can use `run` directly)."""
        if self.run is None or not self._worker.is_alive():
            return
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            self._disable(f"wandb did not take the queued logs within {timeout:.0f} s")

    def finish(self, exit_code: int = 0) -> None:
        """Drain the W&B queue and close the run (exit_code 1 marks it failed). Safe to call twice."""
        self._jsonl.close()
        if self.run is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout=120)
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as exc:
                log.warning("wandb finish failed: %r", exc)
            self.run = None
