"""Many processes, one result (a run on 1 or 2 processes, or stopped and resumed, gives the same numbers): the LR
schedule, random streams, precision, micro-batch metrics, evaluation split across ranks, progress, preemption and hang
reports — each rerun with its mechanism switched off."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mechanisms
import pytest
import torch
from helpers import (
    ROOT,
    fork_ranks,
    isolated_tracking,
    launch_cmd,
    reset_accelerate,
    rewind,
    stage_config,
    train_cmd,
    with_fault,
)
from safetensors.torch import load_file

from siren.train.progress import parse_status
from siren.train.supervision import HANG_EXIT_CODE, PREEMPTED_EXIT_CODE
from siren.train.tracking import read_metrics
from siren.train.trainer import Trainer

# The trainer's own mechanisms (the LR schedule, preemption, the hang watchdog) are tested on the vocoder stage: it
# builds no HuBERT, so a launched process starts ~2 s sooner. The codec stage is killed and resumed bitwise in
# tests/test_trainer.py, and the frozen check below needs the codec's frozen decoder. (Loaded 2-process runs on the
# vocoder once lost rank 1 with exit 1: rank 0 committed a checkpoint while rank 1 was still writing its trainer
# state into it. The checkpoint hook now waits for every rank; see the commit test below. A failed launch's message
# carries the first traceback of its output, `_why`, so a rank's own error is kept.)
TRAINER_STAGE = "vocoder"

LR = {
    "optim.scheduler": "cosine",
    "optim.warmup_steps": 4,
    "optim.lr": 1e-3,
    "train.max_steps": 24,  # a SIGTERM after step 3 lands mid-run however fast the steps are
    "train.checkpoint_every": 12,
    "samples.enabled": "false",
}
GLOBAL = {"train.global_batch_size": 8}  # 8 per process on one, 4 each on two: the same utterances per step
LAST, EVERY = LR["train.max_steps"], LR["train.checkpoint_every"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def _lrs(run: Path) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("train/lr/")}
        for r in read_metrics(run / "metrics.jsonl")
    }


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "checkpoints" / f"step_{step}" / "components").glob("*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    return out


def _run(cmd, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _why(text: str, n: int = 3000) -> str:
    """What a failed launch printed: its first traceback (a rank's own error, which the launcher's summary at the
    end pushes out of a plain tail) and its last `n` characters."""
    i = text.find("Traceback (most recent call last)")
    head = text[i : i + n] + "\n[...]\n" if 0 <= i < len(text) - n else ""
    return head + text[-n:]


def _latest(run: Path) -> int:
    f = run / "checkpoints" / "latest"
    return int(f.read_text().strip().removeprefix("step_")) if f.is_file() else 0


# ----------------------------------------------------------------------------------------------- 1. the LR schedule
@pytest.fixture(scope="module")
def lr_one_process(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    """The 1-process reference of the LR test (global batch 8), trained once for the module."""
    ref = tmp_path_factory.mktemp("lr") / "one"
    with isolated_tracking(ref.parent):
        reset_accelerate()
        Trainer(stage_config(TRAINER_STAGE, corpus_dir, teacher_dir, ref, **LR, **GLOBAL)).fit()
        reset_accelerate()
    return ref


@pytest.fixture(scope="module")
def two_process_run(corpus_dir, teacher_dir, tmp_path_factory) -> Callable[[dict], Path]:
    """The 2-process LR run (2 gloo ranks; global batch 8, so 4 each), launched once for the module: the LR test reads it, and the
    2-process SIGTERM test compares its resumed run with it (the uninterrupted reference). `get(env)` launches it
    with `env` on first use; under a negative control (a mechanism switched off in `env`) it launches a run of the
    control's own, never handing out the shared one. Readers that write (the LR test's resume) work on a copy. Rank 1
    writes its trainer state late at each checkpoint (`late_rank_state`), for the checkpoint-completeness test."""
    root = tmp_path_factory.mktemp("two_process")
    runs: dict[str, Path] = {}

    def get(env: dict) -> Path:
        key = env.get(mechanisms.ENV, "")
        if key not in runs:
            run = root / (f"without-{key}" if key else "run")
            cmd = launch_cmd(TRAINER_STAGE, corpus_dir, teacher_dir, run, **LR, **GLOBAL)
            r = _run(cmd, with_fault(env, "late_rank_state:1"))
            assert r.returncode == 0, _why(r.stdout + r.stderr)
            runs[key] = run
        return runs[key]

    return get


def test_lr_follows_the_global_step_on_two_processes_and_across_a_resume(
    lr_one_process, two_process_run, corpus_dir, teacher_dir, tmp_path, subprocess_env
):
    ref = lr_one_process
    ddp = tmp_path / "two"
    shutil.copytree(two_process_run(subprocess_env), ddp)
    assert json.loads((ddp / "checkpoints" / f"step_{LAST}" / "meta.json").read_text())["world_size"] == 2
    one, two = _lrs(ref), _lrs(ddp)
    assert sorted(one) == sorted(two) == list(range(1, LAST + 1))
    assert two == one, "the 2-process LR schedule differs from the 1-process one"
    peak = max(v for row in one.values() for v in row.values())
    assert one[4]["train/lr/default"] == pytest.approx(peak)  # warmup ends at step 4, not at 4 / world
    assert one[LAST]["train/lr/default"] > 0  # cosine reaches 0 only after the last step

    # Resume the 2-process run from its first checkpoint with ONE process: the schedule continues from the global step.
    rewind(ddp, EVERY)
    reset_accelerate()
    with isolated_tracking(tmp_path / "copy"):  # a copy of the shared run: its artifact index is not the original's
        Trainer(stage_config(TRAINER_STAGE, corpus_dir, teacher_dir, ddp, **LR, **GLOBAL)).fit()
    resumed = _lrs(ddp)
    later = range(EVERY + 1, LAST + 1)
    assert {s: resumed[s] for s in later} == {s: one[s] for s in later}, "resumed LR differs"


SCHEDULE_STEPS = 8


def _schedule_rank(rank: int, world: int, tmp: str) -> None:
    """One of two forked gloo ranks stepping a one-weight model through the trainer's own accelerator, scheduler and
    updater (siren.train.optim); writes the LR after each optimizer step."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # CPU ranks, as Accelerate's gloo launch makes them
    )
    # Forked from the test process: in a negative control, the mechanism it switched off is off in this rank too.
    from siren.train.optim import Updater, make_accelerator, make_scheduler

    reset_accelerate()  # forked from a test process that may have made a 1-process Accelerator: not this rank's state
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/group", rank=rank, world_size=world)
    acc = make_accelerator(None)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, scheduler = acc.prepare(model, optimizer, make_scheduler(optimizer, "cosine", 4, SCHEDULE_STEPS))
    updater = Updater(optimizer, scheduler, list(model.parameters()), max_norm=1.0)
    lrs = []
    for _ in range(SCHEDULE_STEPS):
        acc.backward(model(torch.ones(1, 1)).sum())
        updater.clip()
        updater.apply(True)
        lrs.append(optimizer.param_groups[0]["lr"])
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(lrs))
    torch.distributed.destroy_process_group()


def test_the_scheduler_steps_once_per_optimizer_step_on_two_ranks(tmp_path):
    """The mechanism under the launched LR test above, on two forked gloo ranks: after optimizer step k the LR is the
    schedule's value at global step k on every rank (Accelerate's default steps a prepared scheduler once per process,
    which on 2 ranks reaches the end of warmup at step 2)."""
    from siren.train.optim import lr_factor

    fork_ranks(_schedule_rank, 2, 2, str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = [1e-3 * lr_factor(k, "cosine", 4, SCHEDULE_STEPS) for k in range(1, SCHEDULE_STEPS + 1)]
    assert got[0] == got[1], "the ranks disagree on the LR"
    assert got[0] == pytest.approx(want, rel=1e-12), (
        f"the scheduler stepped more than once per optimizer step on 2 ranks: {got[0]} (the schedule: {want})"
    )


def test_one_and_two_processes_log_the_same_losses_with_a_global_batch(lr_one_process, two_process_run, subprocess_env):
    """`train.global_batch_size` keeps results independent of the process count: the 2-process run took 4 utterances
    a process, and its steps saw the utterances of the 1-process run's (with `train.batch_size` alone the two would
    see 8 and 16). The split itself is property-tested in tests/test_traps.py."""
    two = two_process_run(subprocess_env)
    meta = json.loads((two / "checkpoints" / f"step_{LAST}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["train"]["batch_size"] == 4  # 8 over 2 processes
    a, b = ([r["train/loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (lr_one_process, two))
    assert len(a) == len(b) == LAST
    # Step 1 is before any update: the same utterances give the same loss, to float rounding. Later steps drift apart
    # only by rounding, which Adam's normalised first updates amplify.
    assert b[0] == pytest.approx(a[0], rel=1e-5), (a, b)
    assert b[:3] == pytest.approx(a[:3], rel=0.1), (a, b)


def test_a_step_is_committed_only_with_every_rank_state_in_it(two_process_run, subprocess_env):
    """accelerate's `save_state` returns on rank 0 while rank 1 may still be writing its part. In the shared 2-process
    run rank 1 writes late at each checkpoint (until rank 0 commits the step, or 1 s): each committed step holds both
    ranks' states, and no temporary directory is left. (Committed under rank 1, its write crashed the run.)"""
    run = two_process_run(subprocess_env)
    for step in (EVERY, LAST):
        names = sorted(p.name for p in (run / "checkpoints" / f"step_{step}" / "trainer").iterdir())
        missing = {f"random_states_{r}.pkl" for r in (0, 1)} - set(names)
        assert not missing, f"step_{step} was committed without rank 1's trainer state: it holds {names}"
    assert not list((run / "checkpoints").glob(".tmp-*")), "a rank wrote into a temporary directory after the commit"


def _hook_on_threads(run: Path, world: int = 2) -> None:
    """`CheckpointHook` writing step 1 on `world` threads, each holding a stand-in for its rank's accelerator:
    `save_state` writes the rank's RNG file into the directory and returns without a barrier, as accelerate's does.
    Rank 1 writes only once rank 0 has either committed the step or stopped at a barrier, so without the hook's own
    barrier after `save_state` its file lands after the commit. No launch: the control of the 2-process test above."""
    import threading

    from siren.checkpoints import layout as ckpt
    from siren.checkpoints.meta import CheckpointMeta
    from siren.train.checkpoint_hook import CheckpointHook

    barrier = threading.Barrier(world, timeout=30)
    committed = ckpt.step_dir(run, 1)

    class Accelerator:
        def __init__(self, rank: int):
            self.rank, self.is_main_process = rank, rank == 0

        def wait_for_everyone(self):
            barrier.wait()

        def save_state(self, path: str):
            if self.rank == 1:
                deadline = time.monotonic() + 20
                while not committed.exists() and barrier.n_waiting == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
            Path(path).mkdir(parents=True, exist_ok=True)
            torch.save({"rank": self.rank}, Path(path) / f"random_states_{self.rank}.pkl")

    def rank(r: int) -> None:
        hook = CheckpointHook(
            run, Accelerator(r), None, {"decoder": torch.nn.Linear(2, 2)}, keep_last=2, keep_steps=[],
            best_metric="train/loss", best_mode="min", best=None, window_state=lambda: None, samples=None,
            share=None, meta=lambda step, metrics: CheckpointMeta(step=step, stage="vocoder", config={}, fingerprints={}),
        )  # fmt: skip
        hook(1, {}, consider_best=False, frozen_checked=True)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def test_a_step_is_committed_after_every_rank_has_written_in_one_process(tmp_path):
    _hook_on_threads(tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_1" / "trainer").iterdir())
    assert names == ["random_states_0.pkl", "random_states_1.pkl"], f"step_1 was committed holding {names}"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*")), "rank 1 wrote after the commit"


# --------------------------------------------------------------------------------------------- 2. per-rank streams
def test_each_rank_draws_its_own_stream_and_a_step_redraws_the_same(corpus_dir, teacher_dir, tmp_path):
    tr = Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "run", **{"train.max_steps": 2}))
    draws = []
    real_step = tr.stage.step

    def recording_step(modules, batch):
        draws.append(torch.rand(8))  # what the stage's noise / dropout would draw first
        return real_step(modules, batch)

    tr.stage.step = recording_step
    for rank in (0, 1, 0):
        tr.rank = rank
        tr._train_step(0, preempt=False)
    rank0, rank1, rank0_again = draws
    assert torch.equal(rank0, rank0_again)  # a pure function of (seed, rank, step): resume redraws it exactly
    assert not torch.equal(rank0, rank1), "rank 1 drew the same random numbers as rank 0"


# -------------------------------------------------------------------------------------------- 3. mixed precision
def test_bf16_makes_the_same_codes_as_fp32():
    from siren.models.entropy import EntropyModel
    from siren.models.mel import MelSpectrogram
    from siren.models.quantizers import ProductQuantizer, ResidualFSQ

    torch.manual_seed(0)
    rfsq, pq = ResidualFSQ(64, [3, 3, 3, 3], 2), ProductQuantizer(64, 8, 256)
    ent = EntropyModel({"sem": (81, 2)}, dim=32, num_layers=1, num_heads=2, max_len=512, dropout=0.0).eval()
    mel = MelSpectrogram(16000, 80, 320, 1024, 1024, 0.0, 8000.0)
    x, spk, wav = torch.randn(8, 256, 64) * 2, torch.randn(64, 64), torch.randn(2, 32000) * 0.1
    with torch.no_grad():
        ref = rfsq(x), pq(spk), mel(wav)
        ref_bits = ent({"sem": ref[0].codes}).bits["sem"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = rfsq(x), pq(spk), mel(wav)
            low_bits = ent({"sem": ref[0].codes}).bits["sem"]
    assert torch.equal(ref[0].codes, low[0].codes), "FSQ codes differ under bf16"
    assert torch.equal(ref[1].codes, low[1].codes), "speaker PQ codes differ under bf16"
    assert torch.equal(ref[2], low[2]), "mel targets differ under bf16"
    assert torch.equal(ref_bits, low_bits), "entropy-model bits differ under bf16"


def _first_step(cfg) -> dict:
    tr = Trainer(cfg)
    tr.fit()
    return read_metrics(Path(cfg.run_dir) / "metrics.jsonl")[0], json.loads(
        (Path(cfg.run_dir) / "checkpoints" / "step_1" / "meta.json").read_text()
    )


def test_bf16_training_step_runs_and_stays_close_to_fp32(corpus_dir, teacher_dir, tmp_path, monkeypatch):
    ov = {"train.max_steps": 1, "train.checkpoint_every": 1, "samples.enabled": "false", "factorizer.dropout": 0.0}
    fp32, meta32 = _first_step(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "fp32", **ov))
    reset_accelerate()
    bf16, meta16 = _first_step(
        stage_config("codec", corpus_dir, teacher_dir, tmp_path / "bf16", **ov, **{"train.mixed_precision": "bf16"})
    )
    assert meta32["mixed_precision"] == "no" and meta16["mixed_precision"] == "bf16"
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=0.05)
    # Unset, the launcher's setting applies; set, the config wins.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    reset_accelerate()
    _, meta_launcher = _first_step(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "launcher", **ov))
    reset_accelerate()
    _, meta_cfg = _first_step(
        stage_config("codec", corpus_dir, teacher_dir, tmp_path / "cfg", **ov, **{"train.mixed_precision": "no"})
    )
    assert meta_launcher["mixed_precision"] == "bf16" and meta_cfg["mixed_precision"] == "no"


def test_fp16_overflow_is_skipped_by_the_scaler_and_training_continues():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from siren.train.optim import Updater

    Accelerator(cpu=True)  # Accelerate on CPU has no fp16 scaler of its own: the scaler unit is tested directly
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), scaler=scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: 1.0)
    up = Updater(opt, sched, list(model.parameters()), max_norm=1.0, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]

    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    norm = up.clip()
    assert not torch.isfinite(norm)
    assert up.apply(finite=False) is False  # skipped by the scaler
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**15  # and the scale lowered

    scaler.scale(model(torch.randn(3, 4)).sum()).backward()  # the next step trains normally
    assert torch.isfinite(up.clip())
    assert up.apply(finite=True) is True
    assert not torch.equal(before[0], model.weight.detach())


# ------------------------------------------------------------------------------------- 4. metrics over micro-batches
def test_grad_accum_metrics_cover_every_micro_batch(corpus_dir, teacher_dir, tmp_path):
    ov = {"train.max_steps": 1, "train.checkpoint_every": 1, "samples.enabled": "false", "factorizer.dropout": 0.0}
    whole, _ = _first_step(
        stage_config("codec", corpus_dir, teacher_dir, tmp_path / "b8", **ov, **{"train.batch_size": 8})
    )
    reset_accelerate()
    accum, _ = _first_step(
        stage_config(
            "codec", corpus_dir, teacher_dir, tmp_path / "b4x2", **ov, **{"train.batch_size": 4, "train.grad_accum": 2}
        )
    )
    counts = [k for k in whole if k.startswith("codebook/")]
    assert counts and {k: accum[k] for k in counts} == {k: whole[k] for k in counts}, "codebook counts differ"
    assert accum["rate/bps_entropy"] == pytest.approx(whole["rate/bps_entropy"], rel=1e-6)
    assert accum["data/audio_seconds"] == whole["data/audio_seconds"]
    for k in ("train/loss", "train/mel", "train/entropy"):
        assert accum[k] == pytest.approx(whole[k], rel=1e-4), k


# ------------------------------------------------------------------------------------- 5. evaluation across ranks
def test_evaluation_is_split_across_ranks_and_equals_one_process(corpus_dir, teacher_dir, tmp_path):
    from dataclasses import replace

    from siren.train.evaluation import Evaluator

    tr = Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "run", **{"train.batch_size": 2}))
    seen: list[list[str]] = []
    real_step = tr.stage.step

    def recording_step(modules, batch):
        seen[-1].extend(batch["ids"])
        return real_step(modules, batch)

    tr.stage.step = recording_step
    factory = lambda: tr.val_dataset  # noqa: E731
    parts, n = [], None
    for rank in (0, 1):
        seen.append([])
        ev = Evaluator(replace(tr.ctx, rank=rank, world=2), tr.stage, factory, 1)
        sums, n = ev.partial(tr.modules, tr.core)
        parts.append(sums)
    seen.append([])
    single = Evaluator(tr.ctx, tr.stage, factory, 1)(tr.modules, tr.core)
    rank0, rank1, one = seen
    assert rank0 and rank1 and not set(rank0) & set(rank1), "ranks repeated each other's eval batches"
    assert sorted(rank0 + rank1) == sorted(one)
    split = Evaluator.combine(parts, n)
    assert split.keys() == single.keys()
    for k in single:
        assert split[k] == pytest.approx(single[k], rel=1e-9), k


# ---------------------------------------------------------------------------------------------------- 6. progress
def test_status_lines_off_a_terminal(corpus_dir, teacher_dir, tmp_path, capsys):
    """In this process, stderr captured (not a terminal): what a process's stderr off a terminal receives."""
    capsys.readouterr()
    cfg = stage_config(
        "codec", corpus_dir, teacher_dir, tmp_path / "run", **{"train.status_every": 2, "train.max_steps": 5}
    )
    Trainer(cfg).fit()
    err = capsys.readouterr().err
    status = [parse_status(line) for line in err.splitlines()]
    steps = [s[0] for s in status if s is not None]
    assert steps == [2, 4, 5], err[-2000:]
    assert all(s[1] == 5 for s in status if s is not None)
    line = next(x for x in err.splitlines() if x.startswith("siren: step 2/5"))
    assert "steps/s" in line and "s audio/s" in line and "ETA" in line


# ------------------------------------------------------------------------------------------------- 7. preemption
def _child_pids(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            out += [child, *_child_pids(child)]
    return out


def _is_siren_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"siren" in cmd and b"train" in cmd and not any(b"wandb" in c for c in cmd)


def _train_until(proc: subprocess.Popen, run: Path, min_step: int) -> int:
    t0 = time.time()
    while True:
        rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= min_step:
            return rows[-1]["step"]
        assert proc.poll() is None, "the run ended before the signal"
        assert time.time() - t0 < 300, "timed out waiting for training to start"
        time.sleep(0.02)


PRE = {"train.max_steps": 24, "train.checkpoint_every": 12, "samples.enabled": "false"}


@pytest.mark.parametrize("procs", [1, 2])
def test_sigterm_checkpoints_the_current_step_and_resumes_bitwise(
    procs, two_process_run, corpus_dir, teacher_dir, tmp_path, subprocess_env
):
    """SIGTERM to every process of a run at step 3 or later: it checkpoints the step it is on (not a scheduled one)
    and exits; resumed, it ends on the weights and losses of the uninterrupted run. The runs are the LR test's (24
    steps, checkpoints every 12), so on 2 processes the uninterrupted one is `two_process_run`, launched once."""
    make = train_cmd if procs == 1 else launch_cmd
    ov = {**LR, "train.batch_size": 4} if procs == 1 else {**LR, **GLOBAL}  # on 2: `two_process_run`'s config
    run = tmp_path / "run"
    proc = subprocess.Popen(
        make(TRAINER_STAGE, corpus_dir, teacher_dir, run, **ov),
        cwd=ROOT,
        env=subprocess_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    _train_until(proc, run, 3)
    targets = [proc.pid] if procs == 1 else [p for p in _child_pids(proc.pid) if _is_siren_worker(p)]
    assert len(targets) == procs
    for pid in targets:  # SLURM signals every task of the step
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if procs == 1:
        assert proc.returncode == PREEMPTED_EXIT_CODE, _why(err)
    assert "preempted: checkpoint written at step" in err, _why(err)
    stopped = _latest(run)
    assert 3 <= stopped < LAST and stopped % EVERY != 0, stopped  # the step it was on, not a scheduled checkpoint
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] == stopped

    # The resume and the uninterrupted reference come last: the control (no signal handlers) fails above without
    # paying for them. On one process both run in this process (only the signalled run needs its own process).
    if procs == 1:
        ref = tmp_path / "ref"
        for d in (run, ref):
            reset_accelerate()
            Trainer(stage_config(TRAINER_STAGE, corpus_dir, teacher_dir, d, **ov)).fit()
    else:
        r = _run(make(TRAINER_STAGE, corpus_dir, teacher_dir, run, **ov), subprocess_env)
        assert r.returncode == 0, _why(r.stderr)
        ref = two_process_run(subprocess_env)
    a, b = _weights(ref, LAST), _weights(run, LAST)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert [x["train/loss"] for x in read_metrics(run / "metrics.jsonl")] == [
        x["train/loss"] for x in read_metrics(ref / "metrics.jsonl")
    ]


FAKE_SLURM = {
    # srun: drop its options and run the command on this machine (one node).
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then hostname; else echo "$@" >> "$SCONTROL_LOG"; fi\n',
    # accelerate launch ... -m siren train ...: one process of the same command.
    "accelerate": '#!/bin/bash\nwhile [ "$1" != -m ]; do shift; done\nshift\nexec "$PYTHON" -m "$@"\n',
}


def test_slurm_script_forwards_usr1_to_every_rank_and_requeues(corpus_dir, teacher_dir, tmp_path, subprocess_env):
    """launch/slurm/train.sbatch on one node, with srun/scontrol/accelerate stood in by one-line scripts."""
    import sys

    from helpers import stage_overrides

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run = tmp_path / "run"
    env = {
        **subprocess_env,
        "PATH": f"{bin_dir}{os.pathsep}{subprocess_env['PATH']}",
        "PYTHON": sys.executable,
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NAME": "siren-test",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "1",
        "RUN_DIR": str(run),
    }
    overrides = [
        x for x in stage_overrides(TRAINER_STAGE, corpus_dir, teacher_dir, run, **PRE) if not x.startswith("run_dir=")
    ]
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch/slurm/train.sbatch"), str(ROOT / "configs/demo/base.yaml"), *overrides],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    _train_until(proc, run, 3)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell before the time limit
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, _why(err)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    stopped = _latest(run)
    assert 3 <= stopped < 24 and stopped % 12 != 0, f"no checkpoint at the step it was on: latest is {stopped}"
    assert not list((run / ".pids").glob("*.pid"))  # the ranks exited cleanly and removed their pid files


# ---------------------------------------------------------------------------------------------------- 8. hangs
def test_a_hung_rank_is_reported_with_its_stacks(corpus_dir, teacher_dir, tmp_path, subprocess_env):
    """Rank 1 sleeps 20 seconds in step 3 (train.hang_timeout_s=6): its watchdog reports the hang with its
    stacks long before the sleep ends."""
    env = with_fault(subprocess_env, "rank_sleep:1:3:20")
    run = tmp_path / "run"
    ov = {"train.max_steps": 6, "train.hang_timeout_s": 6, "samples.enabled": "false"}
    t0 = time.time()
    r = _run(launch_cmd(TRAINER_STAGE, corpus_dir, teacher_dir, run, **ov), env, timeout=300)
    assert r.returncode != 0, "the run finished although rank 1 hung"
    out = r.stdout + r.stderr
    assert re.search(r"rank 1: step 3 did not finish within train.hang_timeout_s=6 s", out), _why(out)
    assert "next_or_hang" in out  # rank 1's own stack, dumped by its watchdog
    report = run / "logs" / "hang-rank1-step3.txt"
    assert report.is_file() and "next_or_hang" in report.read_text()
    assert time.time() - t0 < 40 + 60, "the hang was waited out, not reported"
    assert str(HANG_EXIT_CODE) in out


WATCHED = """
import sys, time
from siren.train.supervision import Watchdog

def stuck_in_a_collective():
    time.sleep(3)

with Watchdog(0.5, rank=1, run_dir=sys.argv[1], poll_s=0.05) as dog:
    dog.arm("step 3")
    stuck_in_a_collective()
"""


def test_the_watchdog_ends_a_stuck_process_with_its_stacks(tmp_path, subprocess_env):
    """The watchdog on its own, in a small process that imports no torch: an armed phase that overruns its timeout ends
    the process with HANG_EXIT_CODE, its stacks on stderr and in the run's logs, before the phase ends (the phase
    ending first leaves the watchdog nothing to report: exit 0). It is the negative control of the watchdog (`hang_watchdog`) the launched test above relies on."""
    r = subprocess.run(
        [sys.executable, "-c", WATCHED, str(tmp_path)], env=subprocess_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == HANG_EXIT_CODE, f"exit {r.returncode}: the stuck process was not ended\n{r.stderr[-2000:]}"
    assert "rank 1: step 3 did not finish within train.hang_timeout_s=0.5 s" in r.stderr
    assert "stuck_in_a_collective" in r.stderr
    assert "stuck_in_a_collective" in (tmp_path / "logs" / "hang-rank1-step3.txt").read_text()


PREEMPTED = """
import os, signal, time
from siren.train.supervision import Preemption

with Preemption() as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.time() + 5
    while signals.signum is None and time.time() < deadline:
        time.sleep(0.01)
    print("requested", signals.requested, signals.signum)
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)
"""


def test_a_signal_is_a_request_while_the_preemption_handlers_are_on(subprocess_env):
    """`Preemption` on its own, in a small process that imports no torch: SIGTERM and SIGUSR1 only set the flag (the
    first signal is kept), and leaving the context restores the default actions. It is the negative control of the
    preemption handlers (`preemption_signals`) the launched SIGTERM and SLURM tests rely on."""
    r = subprocess.run(
        [sys.executable, "-c", PREEMPTED], env=subprocess_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, f"exit {r.returncode}: the process died of the signal\n{r.stderr[-2000:]}"
    assert r.stdout.split("\n")[:2] == [f"requested True {int(signal.SIGTERM)}", "restored True True"], r.stdout


# -------------------------------------------------------------------------------- frozen/ok agreed by every rank
def test_a_frozen_weight_moved_on_one_rank_stops_every_rank(corpus_dir, teacher_dir, tmp_path, subprocess_env):
    """Rank 1 alone nudges its copy of the frozen decoder at step 3: every rank stops at step 3, and rank 0 (the one
    that logs) records frozen/ok = 0 for that step, although its own copy never moved."""
    env = with_fault(subprocess_env, "frozen_tamper:1:3")
    run = tmp_path / "run"
    ov = {
        "trainable": "[factorizer,sem_quantizer,pro_quantizer,spk_quantizer,entropy_model]",
        "train.max_steps": 6,
        "train.checkpoint_every": 6,
        "train.hang_timeout_s": 60,
        "samples.enabled": "false",
    }
    r = _run(launch_cmd("codec", corpus_dir, teacher_dir, run, **ov), env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, "the run finished although rank 1's frozen decoder moved"
    rows = read_metrics(run / "metrics.jsonl")
    assert rows and rows[-1]["step"] == 3 and rows[-1]["frozen/ok"] == 0.0, (
        f"rank 0 did not log frozen/ok = 0 at step 3: {[(x['step'], x['frozen/ok']) for x in rows]}\n{out[-2000:]}"
    )
    assert all(x["frozen/ok"] == 1.0 for x in rows[:-1])
    assert "step 3 (on rank 1 of 2)" in out, _why(out)


# --------------------------------------------------------------------------------------------- negative controls
CONTROLS = [
    (
        "test_the_scheduler_steps_once_per_optimizer_step_on_two_ranks",
        "lr_per_global_step",
        r"stepped more than once per optimizer step",
    ),
    (
        "test_a_step_is_committed_after_every_rank_has_written_in_one_process",
        "state_saved_before_commit",
        r"step_1 was committed holding \['random_states_0.pkl'\]",
    ),
    ("test_each_rank_draws_its_own_stream_and_a_step_redraws_the_same", "per_rank_streams", r"rank 1 drew the same"),
    ("test_bf16_makes_the_same_codes_as_fp32", "fp32_islands", r"differ under bf16"),
    (
        "test_fp16_overflow_is_skipped_by_the_scaler_and_training_continues",
        "fp16_overflow_through_scaler",
        r"get_scale|unscale_",
    ),
    ("test_grad_accum_metrics_cover_every_micro_batch", "micro_batch_metrics", r"codebook counts differ"),
    ("test_a_signal_is_a_request_while_the_preemption_handlers_are_on", "preemption_signals", r"died of the signal"),
    ("test_the_watchdog_ends_a_stuck_process_with_its_stacks", "hang_watchdog", r"the stuck process was not ended"),
]
_NOT_CONTROLLED = {
    "test_every_scale_test_has_a_control",
    "test_fails_with_mechanism_disabled",
    "test_bf16_training_step_runs_and_stays_close_to_fp32",  # runs the stage; the codes test above holds the guarantee
    "test_evaluation_is_split_across_ranks_and_equals_one_process",  # checks the split itself (disjoint, covering)
    "test_status_lines_off_a_terminal",  # an output format, not a mechanism that can be switched off
    # Launched tests whose mechanism is switched off in a cheaper test of its own, which then fails: the LR schedule
    # (`lr_per_global_step`) on two forked ranks, the preemption handlers (`preemption_signals`) in a small process.
    # Without them these fail too (measured: the 2-process LR schedule differs; the signalled process dies at once,
    # exit -15; the SLURM run leaves no checkpoint at the step it was on), but each such launch costs 4-12 s of CPU.
    "test_lr_follows_the_global_step_on_two_processes_and_across_a_resume",
    "test_sigterm_checkpoints_the_current_step_and_resumes_bitwise",
    "test_slurm_script_forwards_usr1_to_every_rank_and_requeues",
    # Reads the LR test's two runs; the split it relies on (`per_process_batch`) is property-tested in test_traps.py.
    "test_one_and_two_processes_log_the_same_losses_with_a_global_batch",
    # Its mechanism, the failure vote across ranks (`frozen_check_all_ranks`), is switched off in tests/test_ranks.py's
    # two gloo processes, which then fail. Without it, rank 0 never logs the other rank's failure, which this test
    # asserts, so a control launch would add nothing but its ~12 s of CPU.
    "test_a_frozen_weight_moved_on_one_rank_stops_every_rank",
    # Its mechanism (`state_saved_before_commit`) is switched off in the same hook on two threads, which then fails
    # (`test_a_step_is_committed_after_every_rank_has_written_in_one_process`); the launch checks rank 1's state is in.
    "test_a_step_is_committed_only_with_every_rank_state_in_it",
    # Its mechanism (`hang_watchdog`) is switched off in the watchdog's own small process, which then fails; without
    # it no launch prints rank 1's stacks or writes the hang report this test reads.
    "test_a_hung_rank_is_reported_with_its_stacks",
}


def test_every_scale_test_has_a_control():
    tests = {n for n, f in globals().items() if n.startswith("test_") and callable(f) and n not in _NOT_CONTROLLED}
    assert tests == {t for t, _, _ in CONTROLS}


@pytest.mark.parametrize("test_name, mechanism, failure", CONTROLS, ids=[f"{m}" for _, m, _ in CONTROLS])
def test_fails_with_mechanism_disabled(test_name, mechanism, failure, request, monkeypatch):
    mechanisms.assert_fails_without(globals()[test_name], mechanism, failure, request, monkeypatch)
