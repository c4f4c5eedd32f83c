"""Restarts keep every record: a killed and resumed run's W&B history holds the samples of every checkpoint on disk,
read back from the offline files (`wandb leet inspect`, no server) and compared with the files of the run directory."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, finished_wandb_records, stage_config, train_cmd, with_fault

from siren.data.manifest import read_manifest, write_manifest
from siren.train.trainer import Trainer
from siren.verify import EXIT_PASS, verify_cli


def _records(offline_dir: Path) -> list[dict] | None:
    """The records of one offline-run dir, or None when it cannot be read (a file cut short by SIGKILL)."""
    r = subprocess.run(
        [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(offline_dir)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def synced_samples(run_dir: Path) -> dict[int, set[tuple[str, str]]]:
    """step → {(file name, md5)} of the media in the `samples` table W&B shows at that step once every offline dir of
    the run is synced: dirs upload in start order; one that starts with a rewind (`branch_point`) drops the history
    after its branch step (0 here); within a step the last logged table wins."""
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))  # the names begin with the start time
    tables: dict[int, str] = {}  # step → client id of the table's artifact
    media: dict[str, set[tuple[str, str]]] = {}  # artifact client id → its media files
    for i, d in enumerate(dirs):
        if i == len(dirs) - 1:  # the resume's, in this process: read it once W&B has written all of it
            finished_wandb_records(next(d.glob("run-*.wandb")))
        recs = _records(d)
        if recs is None:
            assert i < len(dirs) - 1, f"the newest offline run {d} cannot be read back"
            continue
        runs = [x["run"] for x in recs if x.get("type") == "run"]
        if not runs:
            continue
        bp = runs[0].get("branch_point")
        if bp is not None:
            tables = {s: t for s, t in tables.items() if s <= int(bp.get("value", 0))}
        for x in recs:
            if x.get("type") == "artifact" and x["artifact"]["type"] == "run_table":
                art = x["artifact"]
                media[art["client_id"]] = {
                    (Path(e["path"]).name, e["digest"])
                    for e in art["manifest"]["contents"]
                    if e["path"].startswith("media/")
                }
            elif x.get("type") == "history":
                item = x["history"]["item"]
                if "samples.artifact_path" in item:
                    client_id = item["samples.artifact_path"].strip('"').split("://")[1].split("/")[0]
                    tables[int(x["history"]["step"]["num"])] = client_id
    return {s: media[c] for s, c in tables.items()}


def disk_samples(run_dir: Path) -> dict[int, set[tuple[str, str]]]:
    """step → {(file name, md5 as W&B writes it)} of the wavs and PNGs in each checkpoint's `samples/`."""
    out = {}
    for d in sorted((run_dir / "checkpoints").glob("step_*/samples")):
        step = int(d.parent.name.split("_")[1])
        out[step] = {
            (p.name, base64.b64encode(hashlib.md5(p.read_bytes()).digest()).decode())
            for p in d.iterdir()
            if p.suffix in (".wav", ".png")
        }
    return out


def test_killed_and_resumed_run_keeps_the_samples_logged_before_the_kill(
    corpus_dir, teacher_dir, tmp_path, subprocess_env
):
    """Checkpoint step 2 renders samples; the process is killed while writing step 4 and resumed from step 2. The
    resumed W&B run rewinds to step 0, so step 2's samples reach W&B only if the resume logs them again."""
    run = tmp_path / "run"
    ov = {"train.max_steps": 4, "train.checkpoint_every": 2, "samples.num": 1, "tracking.mode": "offline"}
    cmd = train_cmd("codec", corpus_dir, teacher_dir, run, **ov)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=with_fault(subprocess_env, "slow_checkpoint_write:4"), stderr=subprocess.PIPE, text=True
    )
    t0 = time.time()
    while not list((run / "checkpoints").glob(".tmp-step_4/components/*.safetensors")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 180, "timed out waiting for the step 4 checkpoint"
        time.sleep(0.05)
    time.sleep(1.0)  # let W&B write what it holds: the resume must not depend on what the killed process lost
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    # The resume in this process (only the kill needs a process of its own): its W&B run is finished, its offline
    # file complete, when fit() returns.
    Trainer(stage_config("codec", corpus_dir, teacher_dir, run, **ov)).fit()

    on_disk = disk_samples(run)
    assert sorted(on_disk) == [2, 4] and all(on_disk.values()), on_disk
    assert any(name.endswith(".wav") for name, _ in on_disk[2]), "no audio sample on disk to compare"
    synced = synced_samples(run)
    assert sorted(synced) == sorted(on_disk), (
        f"W&B has samples at steps {sorted(synced)}, the run dir at {sorted(on_disk)}"
    )
    for step, files in on_disk.items():
        assert synced[step] == files, f"step {step}: W&B media {sorted(synced[step])} ≠ files {sorted(files)}"


# ------------------------------------------------------------------------------------------- each verify its record
@pytest.fixture(scope="module")
def adapt_run(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    """A tiny adapt run on a 2-step codec of its own (the default verify thresholds, which also apply, pass against
    so young a baseline: not against the session's 6-step `codec_run`)."""
    root = tmp_path_factory.mktemp("verify_records")
    mp = pytest.MonkeyPatch()  # module scope: the per-test hermetic W&B and artifact cache are not set up yet
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("SIREN_ARTIFACT_CACHE", str(root / "artifacts"))
    common = {"train.max_steps": 2, "samples.enabled": "false", "tracking.mode": "disabled"}
    try:
        Trainer(stage_config("codec", corpus_dir, teacher_dir, root / "codec", **common)).fit()
        Trainer(stage_config("distill", corpus_dir, teacher_dir, root / "distill", **common)).fit()
        extra = {**common, "verify.real_clip": None, "student_ssl.path": str(root / "distill")}
        Trainer(
            stage_config("adapt", corpus_dir, teacher_dir, root / "adapt", baseline=str(root / "codec"), **extra)
        ).fit()
    finally:
        mp.undo()
    return root / "adapt"


def _media(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.suffix in (".wav", ".png")}


def test_each_verify_keeps_its_own_record(adapt_run, corpus_dir, tmp_path, capsys, monkeypatch):
    """`siren verify --data A` then `--data B`: two records, each with its own report and only its own utterances'
    media; `verify/step_2/` shows B's report and media (no file of A's left beside them) and `latest` names B's record."""
    import siren.verify

    monkeypatch.setattr(siren.verify.judge, "_quality_scorers", lambda: None)  # where outputs go, not what they score
    utts = read_manifest(corpus_dir / "val.jsonl")
    sets = {"set_a": utts[:2], "set_b": utts[2:4]}
    out = adapt_run / "verify" / "step_2"
    for name, rows in sets.items():
        manifest = write_manifest(tmp_path / f"{name}.jsonl", rows)
        args = SimpleNamespace(
            run=str(adapt_run), step=2, data=str(manifest), wav=None, threshold=["min/agreement/sem=0.0"], no_wandb=True
        )
        assert verify_cli(args) == EXIT_PASS, capsys.readouterr().out
    records = sorted(d for d in out.iterdir() if d.is_dir())
    assert [d.name.split("-", 1)[1] for d in records] == ["set_a", "set_b"], records
    for d, (name, rows) in zip(records, sets.items(), strict=True):
        report = json.loads((d / "report.json").read_text())
        assert report["eval_set"] == str(tmp_path / f"{name}.jsonl") and report["out_dir"] == str(d)
        assert {u["id"] for u in report["per_utterance"]} == {u.id for u in rows}
        assert _media(d) and {m.split("_")[0] for m in _media(d)} == {u.id.split("_")[0] for u in rows}
        assert (d / "report.md").is_file() and (d / "report.html").is_file()
    newest = records[-1]
    assert (out / "latest").read_text().strip() == newest.name
    assert (out / "report.json").read_text() == (newest / "report.json").read_text()
    assert _media(out) == _media(newest), "the latest view mixes another verify's media with the newest one's"


def test_outputs_of_a_verify_from_before_records_become_a_record(tmp_path):
    """A `verify/step_N/` written before records existed (report and media directly in it) is moved into a record of
    its own when the next verify starts, not overwritten."""
    from siren.verify import new_record_dir, publish_latest

    out = tmp_path / "verify" / "step_3"
    out.mkdir(parents=True)
    (out / "report.json").write_text('{"old": true}')
    (out / "u1_original.wav").write_bytes(b"old")
    record = new_record_dir(out, "/data/val.jsonl")
    (record / "report.json").write_text('{"new": true}')
    publish_latest(record, out)
    old = [d for d in out.iterdir() if d.is_dir() and d != record]
    assert len(old) == 1 and old[0].name.endswith("-earlier")
    assert (old[0] / "report.json").read_text() == '{"old": true}' and (old[0] / "u1_original.wav").is_file()
    assert (out / "report.json").read_text() == '{"new": true}' and not (out / "u1_original.wav").exists()
    assert record.name.endswith("-val") and (out / "latest").read_text().strip() == record.name
