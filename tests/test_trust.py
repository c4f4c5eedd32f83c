"""Trust (issue 13): the code language pins codes and grid constants, frozen/ok is checked every step, verify's exit
code is a verdict only when the thresholds gave one, and a killed + resumed run is one W&B run whose history equals
metrics.jsonl. Each test is rerun with its mechanism switched off (bottom of the file) and must then fail."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mechanisms
import pytest
import torch
from helpers import ROOT, finished_wandb_records, siren_main, stage_config, train_cmd, with_fault

from siren.checkpoints.lineage import code_language_id
from siren.errors import FrozenViolation
from siren.models.io import fingerprint
from siren.models.quantizers import FSQ, ProductQuantizer, ResidualFSQ
from siren.train.tracking import read_metrics
from siren.train.trainer import Trainer


# ------------------------------------------------------------------------------------------------- code language
def _fixed_input(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_golden_indices_of_a_fixed_input():
    """The codes of a fixed input through fixed-weight quantizers are pinned: a change of the FSQ grid, the residual
    scales or the index packing changes them (a golden index test: it must be updated deliberately, never silently)."""
    z = torch.linspace(-1.5, 1.5, 24).reshape(4, 6).T.contiguous()
    assert FSQ([3, 3, 3, 3])(z)[1].tolist() == [63, 63, 66, 66, 75, 75]
    assert FSQ([8, 5, 5, 5])(z)[1].tolist() == [688, 889, 929, 929, 937, 937]
    q = ResidualFSQ(4, [3, 3, 3, 3], 2)
    with torch.no_grad():
        for lin in (q.in_proj, q.out_proj):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    codes = q(_fixed_input((1, 5, 4)) * 0.7).codes
    assert codes[0].tolist() == [[36, 13], [64, 68], [49, 41], [26, 58], [53, 48]]


def _codec_parts(seed=0, scales_bump=0.0):
    from siren.models.entropy import EntropyModel

    torch.manual_seed(seed)
    parts = {
        "sem_quantizer": ResidualFSQ(8, [3, 3, 3, 3], 2),
        "pro_quantizer": ResidualFSQ(8, [3, 3, 3, 3], 1),
        "spk_quantizer": ProductQuantizer(16, 4, 16),
        "entropy_model": EntropyModel({"sem": (81, 2), "pro": (81, 1)}, 16, 1, 2, 64, 0.0),
    }
    if scales_bump:
        parts["sem_quantizer"].scales.mul_(1.0 + scales_bump)  # a non-persistent grid constant
    return parts


def test_code_language_covers_grid_constants():
    a, b = _codec_parts(), _codec_parts(scales_bump=0.5)
    # The weights and the state dicts are identical: only the residual scales (not in any state dict) differ ...
    assert fingerprint(a["sem_quantizer"]) == fingerprint(b["sem_quantizer"])
    # ... and they change the codes, so they must change the code language.
    x = _fixed_input((1, 12, 8), seed=3) * 2
    assert not torch.equal(a["sem_quantizer"](x).codes, b["sem_quantizer"](x).codes)
    assert code_language_id(a) != code_language_id(b), "grid constants are not part of the code language"
    assert code_language_id(a) == code_language_id(_codec_parts())  # and it is a pure function of the tensors


# ------------------------------------------------------------------------------------------------------ frozen/ok
def test_frozen_ok_is_checked_every_step_and_logged_before_the_stop(corpus_dir, teacher_dir, tmp_path):
    cfg = stage_config(
        "codec",
        corpus_dir,
        teacher_dir,
        tmp_path / "run",
        **{
            "trainable": "[factorizer,sem_quantizer,pro_quantizer,spk_quantizer,entropy_model]",
            "train.max_steps": 6,
            "train.checkpoint_every": 6,
            "samples.enabled": "false",
            "tracking.mode": "disabled",
        },
    )
    trainer = Trainer(cfg)
    step, calls = trainer.stage.step, {"n": 0}

    def tampering_step(modules, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(modules["decoder"].parameters()).view(-1)[0] += 1e-3
        return step(modules, batch)

    trainer.stage.step = tampering_step
    with pytest.raises(FrozenViolation, match="decoder") as info:
        trainer.fit()
    assert "step 2:" in str(info.value), f"not caught at the step it happened: {info.value}"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 2 and rows[-1]["frozen/ok"] == 0.0, rows[-1:]
    assert all(r["frozen/ok"] == 1.0 for r in rows[:-1])


def test_frozen_guard_names_the_tensor_and_catches_rebinding():
    from siren.train.frozen_guard import FrozenGuard

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).eval().requires_grad_(False)
    guard = FrozenGuard({"dec": m})
    assert guard.check()
    with torch.no_grad():
        m[0].bias[1] += 1.0
    with pytest.raises(FrozenViolation, match=r"dec\.0\.bias"):
        guard.check()
    guard = FrozenGuard({"dec": m})
    m[1].weight.data = m[1].weight.data.clone()  # same values, new storage: the views taken at start no longer see it
    with pytest.raises(FrozenViolation, match="re-bound"):
        guard.check()
    # A write through `.data` bypasses the version counter: the periodic checksum still finds it.
    guard = FrozenGuard({"dec": m}, checksum_every=3)
    m[1].weight.data[0, 0] += 1.0
    assert guard.check() and guard.check()
    with pytest.raises(FrozenViolation, match=r"dec\.1\.weight"):
        guard.check()


# ------------------------------------------------------------------------------------------------------- verify
@pytest.mark.parametrize(
    "exc",
    [RuntimeError("a bug"), torch.OutOfMemoryError("CUDA out of memory"), KeyboardInterrupt(), MemoryError()],
    ids=["bug", "oom", "interrupt", "host-oom"],
)
def test_verify_exits_2_on_every_error(exc, monkeypatch, capsys):
    import siren.verify as v

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr("siren.verify.run.run_verify", boom)
    args = SimpleNamespace(run="r", step=1, data=None, threshold=[], no_wandb=True)
    assert v.verify_cli(args) == v.EXIT_ERROR
    assert "error" in capsys.readouterr().out


def test_verify_without_thresholds_is_an_error(tmp_path, monkeypatch):
    import siren.verify as v

    cfg = stage_config("adapt", tmp_path, tmp_path, tmp_path / "run", **{"verify.thresholds": "{}"})
    fake = SimpleNamespace(cfg=cfg, modules={"ssl": None, "student_ssl": None}, meta={})
    monkeypatch.setattr("siren.verify.load.load_pair", lambda run, step: (fake, fake))
    monkeypatch.setattr("siren.models.analysis.code_layout", lambda modules: {"sem": (81, 1)})
    monkeypatch.setattr(
        "siren.models.frame_contract.check_frame_contract", lambda *a, **k: None
    )  # no real modules in the fake

    def went_on(*a, **k):
        raise AssertionError("verify went on without thresholds")

    monkeypatch.setattr("siren.data.manifest.read_manifest", went_on)
    args = SimpleNamespace(run=str(tmp_path / "run"), step=1, data=None, threshold=[], no_wandb=True)
    assert v.verify_cli(args) == v.EXIT_ERROR
    with pytest.raises(v.VerifyError, match="no thresholds"):
        v.run_verify(tmp_path / "run", 1, thresholds={})


# ----------------------------------------------------------------------------------------------------------- W&B
def _wandb_records(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(start time, records) of every offline-run dir of a run, read back with `wandb leet inspect` (no server)."""
    out = []
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))  # names begin with the start time
    for d in dirs:
        if not list(d.glob("run-*.wandb")):  # a process killed before W&B created its file: nothing to sync
            continue
        if d == dirs[-1]:  # the newest run finished (in this process): read it once W&B has written all of it
            finished_wandb_records(next(d.glob("run-*.wandb")))
        r = subprocess.run(
            [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(d)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            # A process SIGKILLed mid-write can leave a truncated file that cannot be read back. Only the killed run's
            # dir may be like that: the run that resumed it rewinds to step 0 and re-logs the whole history, so what
            # the truncated file held does not reach W&B's history either way.
            assert d != dirs[-1], f"the newest offline run cannot be read back: {r.stderr[-1000:]}"
            continue
        recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        runs = [x["run"] for x in recs if x.get("type") == "run"]
        if not runs:  # a process killed before W&B wrote anything to its file: nothing there to upload
            assert not any(x.get("type") == "history" for x in recs)
            continue
        out.append((runs[0]["start_time"], recs))
    return sorted(out, key=lambda t: t[0])


def synced_history(records: list[tuple[str, list[dict]]]) -> tuple[set[str], dict[int, dict]]:
    """What W&B holds after `wandb sync` of all of a run's offline dirs (`records`, from `_wandb_records`): they are
    uploaded in start order to one run id; a dir that starts with a rewind (`branch_point`) drops the history after
    that step; otherwise W&B ignores re-logged steps that do not increase."""
    ids, history = set(), {}
    for _, recs in records:
        run = next(x["run"] for x in recs if x.get("type") == "run")
        ids.add(run["run_id"])
        bp = run.get("branch_point")
        if bp is not None:
            history = {s: h for s, h in history.items() if s <= int(bp.get("value", 0))}  # 0 is left out of the JSON
        last = max(history, default=0)
        for x in recs:
            if x.get("type") != "history":
                continue
            step = int(x["history"]["step"]["num"])
            if bp is None and step <= last:
                continue  # W&B refuses steps that do not increase
            history[step] = {k: v for k, v in x["history"]["item"].items() if not k.startswith("_")}
    return ids, history


STAGE = "vocoder"


def test_killed_and_resumed_run_is_one_wandb_run_equal_to_metrics(
    corpus_dir, teacher_dir, tmp_path, subprocess_env, monkeypatch
):
    """Killed mid-checkpoint and resumed: one W&B run whose history equals metrics.jsonl. On the vocoder stage: W&B's
    resume is the trainer's, whatever the stage, and the vocoder builds no HuBERT (a faster process start)."""
    run = tmp_path / "run"
    ov = {
        "train.max_steps": 12,
        "train.checkpoint_every": 4,
        "samples.enabled": "false",
        "train.keep_last": 5,
        "tracking.mode": "offline",
    }
    cmd = train_cmd(STAGE, corpus_dir, teacher_dir, run, **ov)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=with_fault(subprocess_env, "slow_checkpoint_write:8"), stderr=subprocess.PIPE, text=True
    )
    t0 = time.time()
    while not list((run / "checkpoints").glob("*step_8*/components/*.safetensors")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 180, "timed out waiting for step 8"
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The resume in this process (only the kill needs a process of its own): its W&B run is finished, its offline
    # file complete, when fit() returns.
    Trainer(stage_config(STAGE, corpus_dir, teacher_dir, run, **ov)).fit()
    rows = {row["step"]: row for row in read_metrics(run / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, 13))
    records = _wandb_records(run)
    ids, history = synced_history(records)
    assert len(ids) == 1, f"the resumed run is not the same W&B run: {ids}"
    assert sorted(history) == sorted(rows), f"W&B steps {sorted(history)} ≠ metrics.jsonl steps {sorted(rows)}"
    for s, row in rows.items():
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                assert history[s].get(k) == pytest.approx(v, rel=0, abs=0), f"step {s} {k}: W&B has a stale value"
    # checkpoint artifacts: components + meta.json, no optimizer/trainer state by default
    entries = [
        e
        for _, recs in records
        for x in recs
        if x.get("type") == "artifact"
        for e in x["artifact"]["manifest"]["contents"]
    ]
    paths = {e["path"] for e in entries}
    assert "meta.json" in paths and any(p.startswith("components/") for p in paths), sorted(paths)[:10]
    assert not any(p.startswith("trainer/") for p in paths), "trainer state uploaded without upload_trainer_state"
    # --fresh starts another W&B run
    old_id = (run / "wandb_run_id").read_text().strip()
    fresh = train_cmd(STAGE, corpus_dir, teacher_dir, run, **{**ov, "train.max_steps": 2})
    assert siren_main(["train", "--fresh", *fresh[fresh.index("train") + 1 :]], monkeypatch) == 0
    assert (run / "wandb_run_id").read_text().strip() != old_id, "--fresh reused the old W&B run id"


def test_artifact_name_belongs_to_one_run_dir(corpus_dir, teacher_dir, tmp_path):
    ov = {"train.max_steps": 2, "samples.enabled": "false", "tracking.run_name": "adapt", "tracking.mode": "disabled"}
    Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "a" / "adapt", **ov)).fit()
    with pytest.raises(Exception, match="already belongs to the run"):
        Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "b" / "adapt", **ov))


def test_a_second_clone_with_the_same_run_dir_name_gets_its_own_artifact_name(corpus_dir, teacher_dir, tmp_path):
    """Two clones each running `runs/demo/codec` must both train (the demo works in the second clone) without sharing
    `codec-codec:latest`: the second run's default name carries a hash of its directory, and a resume keeps it."""
    from siren.checkpoints.artifacts import resolve_checkpoint

    ov = {"train.max_steps": 2, "samples.enabled": "false", "tracking.mode": "disabled"}
    first, second = tmp_path / "clone1" / "codec", tmp_path / "clone2" / "codec"
    Trainer(stage_config("codec", corpus_dir, teacher_dir, first, **ov)).fit()
    t = Trainer(stage_config("codec", corpus_dir, teacher_dir, second, **ov))
    assert t.run_name != "codec" and t.run_name.startswith("codec-"), t.run_name
    t.fit()
    resumed = Trainer(stage_config("codec", corpus_dir, teacher_dir, second, **{**ov, "train.max_steps": 3}))
    assert resumed.run_name == t.run_name  # recorded in meta.json, not recomputed
    resumed.fit()
    project = "siren-demo"
    assert resolve_checkpoint(f"wandb:local/{project}/codec-codec:latest") == first / "checkpoints" / "step_2"
    mine = resolve_checkpoint(f"wandb:local/{project}/codec-{t.run_name}:latest")
    assert mine == second / "checkpoints" / "step_3"


# --------------------------------------------------------------------------------------- old checkpoints keep loading
V0_CONFIG = Path(__file__).resolve().parent / "fixtures" / "config_v0.json"
# Keys whose default changed after the migration that added them: (section, key) → the value the migration writes.
MOVED_DEFAULTS = {
    ("optim", "impl"): "auto",
    ("loss", "teacher_targets"): "full",
}  # schema 0 (commit 76f6ab9), its defaults


def _keys(tree: dict, shape: dict, prefix: str = "") -> set[str]:
    """Dotted keys of `tree`, descending where `shape` (a schema's defaults) has a section, not into free mappings."""
    out = set()
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(shape.get(k), dict) and shape[k]:
            out |= _keys(v, shape[k], f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def _as_v0(tree: dict, v0: dict) -> dict:
    """`tree` cut down to the keys schema version 0 had (what the trainer of that commit wrote into meta.json)."""
    return {k: _as_v0(v, v0[k]) if isinstance(v0.get(k), dict) and v0[k] else v for k, v in tree.items() if k in v0}


def test_old_checkpoint_loads_through_the_logged_migration(corpus_dir, teacher_dir, tmp_path, caplog):
    """A checkpoint whose meta.json config is in the version-0 form (no `schema_version`, none of the keys issues 12-13
    added) loads through the migration table: every added key is logged once, the migrated config equals the one the
    current code wrote, and the components load strictly. A version from the future is an error naming it."""
    from siren.checkpoints.load import load_checkpoint
    from siren.config.loader import config_from_dict
    from siren.config.migrations import SCHEMA_VERSION

    v0 = json.loads(V0_CONFIG.read_text())
    ov = {"train.max_steps": 1, "samples.enabled": "false", "tracking.mode": "disabled"}
    run = tmp_path / "codec"
    Trainer(stage_config("codec", corpus_dir, teacher_dir, run, **ov)).fit()
    step = run / "checkpoints" / "step_1"
    meta = json.loads((step / "meta.json").read_text())
    current = meta["config"]
    assert current["schema_version"] == SCHEMA_VERSION, "the dumped config does not carry its schema version"

    old = _as_v0(current, v0)
    assert _keys(old, v0) == _keys(v0, v0), "the test's version-0 form differs from the frozen fixture"
    (step / "meta.json").write_text(json.dumps({**meta, "config": old}))
    caplog.set_level("WARNING", logger="siren")
    loaded = load_checkpoint(str(step), ["factorizer", "sem_quantizer", "decoder"])
    assert set(loaded.modules) == {"factorizer", "sem_quantizer", "decoder"}
    log = "\n".join(r.getMessage() for r in caplog.records if "schema_version 0 -> 1" in r.getMessage())
    assert log, "no migration was logged for a version-0 config"
    for key in ("train.frozen_check_every", "tracking.upload_trainer_state", "flow.target", "ssl.weights"):
        assert f"`{key}:" in log, f"the migration log does not name {key}: {log}"
    # The migrated config is the one the current code wrote, except where a default moved after the key was added:
    # a migration writes the value of its own time (what the old checkpoint ran with), not today's default.
    then = copy.deepcopy(current)
    for (section, key), value in MOVED_DEFAULTS.items():
        then[section][key] = value
    assert loaded.cfg == config_from_dict(then), "the migrated config differs from the one the current code wrote"

    caplog.clear()  # the same source migrates again silently: each change is logged once
    load_checkpoint(str(step), ["decoder"])
    assert not [r for r in caplog.records if "schema_version 0 -> 1" in r.getMessage()]

    (step / "meta.json").write_text(json.dumps({**meta, "config": {**current, "schema_version": SCHEMA_VERSION + 1}}))
    with pytest.raises(Exception, match=f"schema_version {SCHEMA_VERSION + 1}.*newer SIREN"):
        load_checkpoint(str(step), ["decoder"])


def test_every_schema_key_is_reached_by_the_migrations():
    """Migrating the version-0 defaults gives every key of the current schema: a field added without a migration (and
    a version bump) fails here."""
    import dataclasses

    from siren.config.migrations import migrate
    from siren.config.schema import SirenConfig

    migrated = migrate(json.loads(V0_CONFIG.read_text()), "fixture")
    current = dataclasses.asdict(SirenConfig())
    assert _keys(migrated, current) == _keys(current, current)


# ------------------------------------------------------------------------------------------------ negative controls
CONTROLS = [
    ("test_frozen_guard_names_the_tensor_and_catches_rebinding", "frozen_step_check", r"DID NOT RAISE"),
    ("test_golden_indices_of_a_fixed_input", "fsq_grid", r"AssertionError"),
    ("test_code_language_covers_grid_constants", "code_language_grid_constants", r"grid constants are not part"),
    ("test_frozen_ok_is_checked_every_step_and_logged_before_the_stop", "frozen_step_check", r"not caught at the step"),
    ("test_verify_exits_2_on_every_error", "verify_exit_guard", r"a bug|out of memory|KeyboardInterrupt|MemoryError"),
    ("test_verify_without_thresholds_is_an_error", "verify_requires_thresholds", r"went on without thresholds"),
    ("test_killed_and_resumed_run_is_one_wandb_run_equal_to_metrics", "wandb_rewind", r"stale value|W&B steps"),
    ("test_artifact_name_belongs_to_one_run_dir", "artifact_name_claim", r"DID NOT RAISE"),
    (
        "test_a_second_clone_with_the_same_run_dir_name_gets_its_own_artifact_name",
        "unique_default_run_name",
        r"already belongs to the run",
    ),
    ("test_old_checkpoint_loads_through_the_logged_migration", "config_migration", r"no migration was logged"),
    ("test_every_schema_key_is_reached_by_the_migrations", "empty_migration_table", r"AssertionError"),
]
_NOT_CONTROLLED = {"test_every_trust_test_has_a_control", "test_fails_with_mechanism_disabled"}


def test_every_trust_test_has_a_control():
    tests = {n for n, f in globals().items() if n.startswith("test_") and callable(f) and n not in _NOT_CONTROLLED}
    assert tests == {t for t, _, _ in CONTROLS}


@pytest.mark.parametrize(
    "test_name, mechanism, failure", CONTROLS, ids=[f"{t[5:]}-without-{m}" for t, m, _ in CONTROLS]
)
def test_fails_with_mechanism_disabled(test_name, mechanism, failure, request, monkeypatch):
    mechanisms.assert_fails_without(
        globals()[test_name], mechanism, failure, request, monkeypatch, {"exc": RuntimeError("a bug")}
    )
