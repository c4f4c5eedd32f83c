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
