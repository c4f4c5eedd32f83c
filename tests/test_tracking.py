"""Tracker: metrics.jsonl synchronously, W&B from one background thread, in order, failures turned into warnings."""

from __future__ import annotations

import threading
import warnings

from siren.train.tracking import Tracker, read_metrics


class BlockingRun:
    """A stand-in W&B run whose `log` waits until the test lets it go."""

    id, entity = "fake", None

    def __init__(self, fail_at: int | None = None):
        self.gate = threading.Event()
        self.logged: list[tuple[int, dict]] = []
        self.fail_at = fail_at
        self.finished_with = None

    def log(self, payload, step):
        self.gate.wait(30)
        if step == self.fail_at:
            raise ConnectionError("lost W&B")
        self.logged.append((step, dict(payload)))

    def finish(self, exit_code=0):
        self.finished_with = exit_code


def _tracker(tmp_path, run: BlockingRun, monkeypatch) -> Tracker:
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    return Tracker(
        tmp_path, project="p", entity=None, mode="offline", run_name="t", group=None, tags=[], config={}, job_type="x"
    )


def test_log_does_not_wait_for_wandb_and_keeps_order(tmp_path, monkeypatch):
    run = BlockingRun()
    tr = _tracker(tmp_path, run, monkeypatch)
    for step in range(1, 6):
        tr.log({"train/loss": float(step)}, step)  # returns although W&B is blocked
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert run.logged == []
    run.gate.set()
    tr.flush()
    assert [s for s, _ in run.logged] == [1, 2, 3, 4, 5]
    assert run.logged[2][1] == {"train/loss": 3.0}
    tr.finish()
    assert run.finished_with == 0


def test_wandb_failure_in_the_thread_warns_and_disables(tmp_path, monkeypatch):
    run = BlockingRun(fail_at=2)
    run.gate.set()
    tr = _tracker(tmp_path, run, monkeypatch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for step in range(1, 5):
            tr.log({"x": 1.0}, step)
        tr.flush()
        tr.finish()
    assert any("lost W&B" in str(x.message) for x in w)
    assert [s for s, _ in run.logged] == [1] and tr.run is None and run.finished_with == 1
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_rewound_run_replays_scalars_and_samples_in_step_order(tmp_path, monkeypatch):
    """Resumed from step 2: metrics.jsonl's rows up to 2 are logged again, and step 2's samples table (read from
    `checkpoints/step_2/samples/`) right after step 2's scalars; a checkpoint past the resume point is not."""
    import json

    import numpy as np
    import soundfile as sf
    import wandb

    for step in (2, 4):
        samples = tmp_path / "checkpoints" / f"step_{step}" / "samples"
        samples.mkdir(parents=True)
        (samples.parent / "meta.json").write_text("{}")
        sf.write(samples / "u1_original.wav", np.zeros(1600, dtype="float32"), 16000)
        index = {"step": step, "pipeline": {}, "samples": [{"id": "u1", "paths": {"original": "input"}}]}
        (samples / "index.json").write_text(json.dumps(index))
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in (1, 2))
    )
    run = BlockingRun()
    run.gate.set()
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    tr = Tracker(
        tmp_path,
        project="p",
        entity=None,
        mode="offline",
        run_name="t",
        group=None,
        tags=[],
        config={},
        job_type="x",
        resume_id="fake",
        rewind_to=2,
    )
    tr.finish()
    assert [(s, sorted(p)) for s, p in run.logged] == [(1, ["train/loss"]), (2, ["train/loss"]), (2, ["samples"])]
    table = run.logged[2][1]["samples"]
    assert table.columns == ["id", "audio/original", "mel/original"]
    assert table.data[0][0] == "u1" and isinstance(table.data[0][1], wandb.Audio) and table.data[0][2] is None
