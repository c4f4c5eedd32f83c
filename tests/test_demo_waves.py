"""`siren demo` runs independent stages side by side (siren/demo.py `run_wave`): the CPU threads are split between
them, and a stage that fails stops the others at once and is the one named in the error."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from siren import demo
from siren.checkpoints.layout import RunDir


class FakeStage:
    """A `demo._Stage` whose subprocess is a shell command chosen per stage name (no training)."""

    commands: dict[str, list[str]] = {}
    envs: dict[str, dict] = {}

    def __init__(self, stage, env, root, data, position):
        self.stage, self.done, self.t0 = stage, False, time.perf_counter()
        self.run_dir = Path(root) / stage
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "train.log").write_text(f"{stage} log line\n")
        FakeStage.envs[stage] = env
        self.proc = subprocess.Popen(FakeStage.commands[stage])

    def wait(self):
        return self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()

    def result(self):
        return {"stage": self.stage, "code": self.proc.returncode}


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(demo, "_Stage", FakeStage)
    FakeStage.envs.clear()
    return FakeStage


def test_a_wave_splits_the_threads_and_waits_for_every_stage(fake, tmp_path):
    fake.commands = {"vocoder": ["sleep", "0.3"], "distill": ["true"]}
    out = demo.run_wave(("vocoder", "distill"), {"OMP_NUM_THREADS": "4"}, str(tmp_path), "data")
    assert [r["code"] for r in out] == [0, 0]
    assert fake.envs["vocoder"]["OMP_NUM_THREADS"] == fake.envs["distill"]["OMP_NUM_THREADS"] == "2"
    fake.commands = {"codec": ["true"]}
    demo.run_wave(("codec",), {"OMP_NUM_THREADS": "4"}, str(tmp_path), "data")
    assert fake.envs["codec"]["OMP_NUM_THREADS"] == "4"  # alone: all of them


def test_a_failing_stage_stops_the_others_and_is_named(fake, tmp_path):
    fake.commands = {"vocoder": ["sleep", "60"], "distill": ["sh", "-c", "sleep 0.3; exit 3"]}
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"stage distill failed \(exit 3\)") as info:
        demo.run_wave(("vocoder", "distill"), {}, str(tmp_path), "data")
    assert time.perf_counter() - t0 < 20, "the other stage was waited out, not stopped"
    assert "distill log line" in str(info.value)  # the failing stage's log tail, not the stopped one's


def test_stages_get_the_free_cores_only(monkeypatch):
    """On 2 cores with one kept busy by another process, a lone stage gets 1 thread (2 would collapse); with none
    busy it gets PyTorch's default; side by side, one each."""
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo, "busy_cores", lambda seconds=0.5: 1.0)
    assert demo.wave_threads(1, {}) == 1
    monkeypatch.setattr(demo, "busy_cores", lambda seconds=0.5: 0.1)
    assert demo.wave_threads(1, {}) is None and demo.wave_threads(2, {}) == 1
    assert demo.wave_threads(1, {"OMP_NUM_THREADS": "3"}) == 3  # the user's budget wins


def test_busy_cores_sees_a_busy_process():
    proc = subprocess.Popen(["python3", "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert demo.busy_cores(0.5) > 0.5
    finally:
        proc.kill()


def test_the_waves_come_from_what_each_stage_reads():
    """The demo's order is derived from the registry: every stage runs in a wave after each stage whose checkpoint it
    reads (`StageSpec.needs`), and its overrides point each of those config keys at that stage's run."""
    from siren.config.stages import CHECKPOINT_INPUTS, STAGE_SPECS, stage_waves

    assert demo.WAVES == stage_waves() and sorted(demo.STAGES) == sorted(STAGE_SPECS)
    wave_of = {s: i for i, wave in enumerate(demo.WAVES) for s in wave}
    for name, spec in STAGE_SPECS.items():
        assert all(wave_of[need] < wave_of[name] for need in spec.needs), (name, spec.needs, demo.WAVES)
        overrides = dict(o.split("=", 1) for o in demo.stage_overrides(name, "R", "D"))
        for key in spec.inputs:
            assert overrides[key] == f"R/{CHECKPOINT_INPUTS[key]}", (name, key)
    assert demo.WAVES == (("vocoder", "distill"), ("codec",), ("flow",), ("adapt",))  # what the demo has always run
    assert "baseline" not in dict(o.split("=", 1) for o in demo.stage_overrides("codec", "R", "D"))


def test_waves_refuse_a_circle(monkeypatch):
    """A stage that needs itself through another (a registry mistake) is named, not looped on."""
    import dataclasses

    from siren.config import stages

    specs = dict(stages.STAGE_SPECS)
    specs["codec"] = dataclasses.replace(specs["codec"], reads=("baseline",))  # codec reading codec
    monkeypatch.setattr(stages, "STAGE_SPECS", specs)
    with pytest.raises(ValueError, match=r"need one another in a circle"):
        stages.stage_waves()
    # A control: without the circle the same call orders every stage.
    specs["codec"] = dataclasses.replace(specs["codec"], reads=())
    assert sum(len(w) for w in stages.stage_waves()) == len(stages.STAGES)


def _fake_verify(tmp_path, monkeypatch, script: str) -> Path:
    """`verify_command` replaced by a shell script; the run's verify dir where a real verify writes its report."""
    run = tmp_path / "adapt"
    monkeypatch.setattr(demo, "verify_command", lambda r, step: ["bash", "-c", script])
    monkeypatch.setattr(demo, "wave_threads", lambda n, env: 1)
    return run


def test_verify_runs_beside_the_eval(tmp_path, monkeypatch):
    """The demo's verify is started before the eval and is still running while it scores; its report is returned."""
    report = RunDir(tmp_path / "adapt").verify(600) / "report.json"
    run = _fake_verify(tmp_path, monkeypatch, f"sleep 1; mkdir -p {report.parent}; echo '{{}}' > {report}")
    seen = {}

    def eval_while_verifying(root, data, env):
        seen["threads"] = env["OMP_NUM_THREADS"]
        seen["report_during_eval"] = report.exists()  # the verify sleeps 1 s before it writes: not yet
        return {"table": "t"}

    monkeypatch.setattr(demo, "run_eval", eval_while_verifying)
    t0 = time.perf_counter()
    path, evaluated = demo.verify_beside_eval(run, 600, str(tmp_path), "data", {})
    assert path == report and evaluated == {"table": "t"}
    assert seen == {"threads": "1", "report_during_eval": False}, "the eval waited for the verify"
    assert time.perf_counter() - t0 >= 1.0  # and the verify was waited for, not left behind


def test_a_failed_eval_stops_the_verify_and_a_failed_verify_is_named(tmp_path, monkeypatch):
    run = _fake_verify(tmp_path, monkeypatch, "sleep 60")

    def failing_eval(root, data, env):
        raise RuntimeError("siren eval failed (exit 2)")

    monkeypatch.setattr(demo, "run_eval", failing_eval)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"siren eval failed"):
        demo.verify_beside_eval(run, 600, str(tmp_path), "data", {})
    assert time.perf_counter() - t0 < 20, "the verify was waited out, not stopped"

    monkeypatch.setattr(demo, "verify_command", lambda r, step: ["bash", "-c", "echo no such run; exit 2"])
    monkeypatch.setattr(demo, "run_eval", lambda root, data, env: {})
    with pytest.raises(RuntimeError, match=r"verify failed with an error \(exit 2\):\nno such run"):
        demo.verify_beside_eval(run, 600, str(tmp_path), "data", {})
