"""Negative controls for the reliability suite: each reliability mechanism, and a way to switch it off.

`disable(name)` replaces the code of one mechanism with the naive version a framework without it would have. The
reliability tests are rerun with each mechanism off (`test_reliability.py::test_fails_with_mechanism_disabled`) and must
fail, so a test that would pass without its mechanism cannot hide in the suite. Subprocesses (`python -m siren train`)
get the same switch through `tests/controls/sitecustomize.py`, activated by `SIREN_TEST_DISABLE=<name>`.

`inject(fault)` does the same for test-only faults (`SIREN_TEST_FAULT=<name>:<arg>`), e.g. a checkpoint write held open so
that a test can kill the process in the middle of it. Production code carries no fault hooks.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import soundfile as sf
import torch

ENV = "SIREN_TEST_DISABLE"
FAULT_ENV = "SIREN_TEST_FAULT"
CONTROLS_DIR = Path(__file__).resolve().parent / "controls"


# ---------------------------------------------------------------------------------------------- naive replacements
def _inplace_begin_step(run_dir, step):
    """Write straight into step_N and point `latest` at it first (no temp dir, no rename, no meta-last)."""
    from siren.checkpoints import layout as ckpt

    final = ckpt.step_dir(run_dir, step)
    (final / "components").mkdir(parents=True, exist_ok=True)
    (ckpt.checkpoints_dir(run_dir) / "latest").write_text(final.name + "\n")
    return final


def _inplace_commit_step(run_dir, tmp, step, meta):
    (Path(tmp) / "meta.json").write_text(meta.to_json())
    return Path(tmp)


def _save_trainer_state_no_barrier(self, path):
    """accelerate's `save_state` alone: rank 0 goes on to commit the step while other ranks may still be writing."""
    self.accelerator.save_state(str(path))


def _no_trainer_state(self, path):
    """Resume restores the component weights only: optimizer moments, scheduler and RNG start afresh."""


def _trusting_read_audio(path, sample_rate, *, policy="convert", crop=None, min_samples=0):
    """Decode the whole file, check nothing, raise whatever libsndfile raises (no AudioError, so no replacement)."""
    from siren.data.audio import Decoded

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data).mean(dim=1)
    if sr != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, orig_freq=int(sr), new_freq=int(sample_rate))
    start, num = crop(wav.shape[0]) if crop else (0, wav.shape[0])
    return Decoded(
        wav=wav[start : start + num].contiguous(), offset=start, total=wav.shape[0], decoded_bytes=data.size * 4
    )


def _always_finite(metrics):
    return True


def _unguarded(self, why):
    """W&B errors are not caught: re-raise the exception being handled."""
    raise sys.exc_info()[1]


def _unguarded_log(self, metrics, step):
    """Log to W&B directly from the training loop, unprotected (no background thread, no error handling)."""
    import json

    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    if self.run is not None:
        self.run.log(metrics, step=step)


def _no_check(self, *a, **k):
    return None


def _no_preflight(run_dir, min_free_mb):
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # creates the run dir, checks nothing


def _scheduler_per_process(self, finite):
    """Accelerate's default for a prepared scheduler: step it once per process for every optimizer step."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if finite:
        self.optimizer.step()
    for _ in range(world):
        self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    return finite


def _same_stream_on_every_rank(seed, rank, step):
    """Every rank draws the same noise, timesteps and dropout masks (the seed ignores the rank)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"siren-stream:{seed}:0:{step}".encode()).digest()[:8], "little") >> 1


def _skip_nonfinite_without_scaler(self, finite):
    """A non-finite step skips optimizer.step() even under a gradient scaler, so the scaler never updates."""
    if finite:
        self.optimizer.step()
    self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    return finite


def _last_micro_batch_only(self, out):
    """Metrics of the last micro-batch only: the accumulated sums are dropped at every micro-batch."""
    self._vec = None
    self._keys = []
    _REAL_ADD(self, out)


def _never_large(layout):
    return False  # every codebook gets the dense window, whatever its size


def _no_signal_handlers(self):
    return self  # SIGTERM/SIGUSR1 keep their default action: the process dies at once


def _no_watchdog(self):
    return self  # no watchdog thread: a hung rank waits forever


def _unwrap_fp32_islands() -> list[tuple[str, Callable]]:
    return [
        ("siren.models.quantizers:ResidualFSQ.forward", "unwrap"),
        ("siren.models.quantizers:ProductQuantizer.forward", "unwrap"),
        ("siren.models.entropy:EntropyModel.forward", "unwrap"),
        ("siren.models.mel:MelSpectrogram.forward", "unwrap"),
    ]


def _no_hash_check(want, got):
    """Decoded codes are returned whatever the file's symbol hash says."""


# target: "module:attribute.path"
# Bring your own codec (tests/test_byoc.py).
def _no_check_args(fn, args, where, skip=0):
    """No signature check: a typo reaches the foreign constructor as a TypeError (or is swallowed by **kwargs)."""


def _no_role_check(name, module):
    return module


def _lenient_foreign_load(module, path, *, key=None, rename=None, allow_missing=(), allow_unexpected=(), where="", **_):
    """The common lenient loader: keep what fits, drop the rest silently (strict=False)."""
    from siren.models.weights import apply_renames, read_state

    state = apply_renames(read_state(path, key), rename or {}, where)
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    return {"missing": [], "unexpected": []}


def _identity_mel(mel, src, dst, what="mel"):
    return mel


def _everything_range_codes(entropy_model):
    return True


MECHANISMS: dict[str, list[tuple[str, Callable]]] = {
    "atomic_checkpoint": [
        ("siren.checkpoints.layout:begin_step", _inplace_begin_step),
        ("siren.checkpoints.layout:commit_step", _inplace_commit_step),
    ],
    "state_saved_before_commit": [
        ("siren.train.checkpoint_hook:CheckpointHook.save_trainer_state", _save_trainer_state_no_barrier)
    ],
    "resume_trainer_state": [("siren.train.trainer:Trainer._restore_trainer_state", _no_trainer_state)],
    "bad_audio_skip": [("siren.data.datasets:read_audio", _trusting_read_audio)],
    "nonfinite_step_skip": [("siren.train.trainer:Trainer._step_is_finite", staticmethod(_always_finite))],
    "wandb_guard": [
        ("siren.train.tracking:Tracker._disable", _unguarded),
        ("siren.train.tracking:Tracker.log", _unguarded_log),
    ],
    "frozen_check": [("siren.train.registry:Registry.check_frozen", _no_check)],
    "run_dir_preflight": [("siren.train.trainer:preflight_run_dir", _no_preflight)],
    "lr_per_global_step": [("siren.train.optim:Updater.apply", _scheduler_per_process)],
    "per_rank_streams": [("siren.train.trainer:rank_stream_seed", _same_stream_on_every_rank)],
    "fp16_overflow_through_scaler": [("siren.train.optim:Updater.apply", _skip_nonfinite_without_scaler)],
    "micro_batch_metrics": [("siren.train.step_metrics:StepMetrics.add", _last_micro_batch_only)],
    "sparse_codebook_window": [("siren.metrics.codebook:is_large", _never_large)],
    "preemption_signals": [("siren.train.supervision:Preemption.__enter__", _no_signal_handlers)],
    "hang_watchdog": [("siren.train.supervision:Watchdog.__enter__", _no_watchdog)],
    "fp32_islands": _unwrap_fp32_islands(),
    "symbol_hash": [("siren.coding.bitstream:check_symbol_hash", _no_hash_check)],
    "signature_check": [("siren.models.plugins:check_args", _no_check_args)],
    "role_check": [("siren.models.roles:check_role", _no_role_check)],
    "foreign_strict_load": [("siren.models.weights:load_foreign_weights", _lenient_foreign_load)],
    "mel_conversion": [("siren.models.mel:convert_mel", _identity_mel)],
    "rate_only_refusal": [("siren.codec:can_range_code", _everything_range_codes)],
}

_REAL_ADD = None


def _owner(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, name


def disable(name: str, monkeypatch=None) -> None:
    """Switch mechanism `name` off in this process (through `monkeypatch` when given, so it is undone after a test)."""
    if name not in MECHANISMS:
        raise KeyError(f"unknown mechanism {name!r}; known: {', '.join(MECHANISMS)}")
    for target, replacement in MECHANISMS[name]:
        owner, attr = _owner(target)
        if not hasattr(owner, attr):
            raise AttributeError(f"{target} does not exist: the control for {name!r} is stale")
        if replacement == "unwrap":  # a decorated method: put back the undecorated function
            replacement = getattr(owner, attr).__wrapped__
        if replacement is _fsq_even_grid:
            global _REAL_FSQ_INIT
            _REAL_FSQ_INIT = _REAL_FSQ_INIT or getattr(owner, attr)
        if replacement is _last_micro_batch_only:
            global _REAL_ADD
            _REAL_ADD = _REAL_ADD or getattr(owner, attr)
        if monkeypatch is not None:
            monkeypatch.setattr(owner, attr, replacement)
        else:
            setattr(owner, attr, replacement)


# ----------------------------------------------------------------------------------------------------------- faults
def _slow_checkpoint_write(arg: str) -> None:
    """`slow_checkpoint_write:N`: after step N's component files are written, sleep 60 s before the commit."""
    import re
    import time

    from siren.checkpoints import layout as ckpt

    real = ckpt.save_components

    def slow(tmp, components):
        real(tmp, components)
        m = re.search(r"step_(\d+)$", Path(tmp).name)
        if m and int(m.group(1)) == int(arg):
            time.sleep(60)

    ckpt.save_components = slow


def _rank_sleep(arg: str) -> None:
    """`rank_sleep:R:S:SECONDS`: rank R (the launcher's RANK) sleeps SECONDS when it fetches step S's first batch."""
    import os
    import time

    from siren.train.batches import BatchStream

    rank, step, seconds = arg.split(":")
    real = BatchStream.next

    def next_or_hang(self, s, k):
        if int(os.environ.get("RANK", "0")) == int(rank) and s + 1 == int(step) and k == 0:
            time.sleep(float(seconds))  # the hang: the watchdog's stack dump must show this line
        return real(self, s, k)

    BatchStream.next = next_or_hang


def _late_rank_state(arg: str) -> None:
    """`late_rank_state:R`: rank R starts writing its trainer state only once rank 0 has committed the step, or after
    1 s (the step is committed only after every rank's state is written, so with that order kept it waits the 1 s)."""
    import os
    import time

    from accelerate import Accelerator

    real = Accelerator.save_state

    def late(self, output_dir=None, **kwargs):
        if int(os.environ.get("RANK", "0")) == int(arg):
            tmp = Path(output_dir).parent  # checkpoints/.tmp-step_N
            committed = tmp.with_name(tmp.name.removeprefix(".tmp-"))
            deadline = time.monotonic() + 1.0
            while not committed.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(self, output_dir, **kwargs)

    Accelerator.save_state = late


def _frozen_tamper(arg: str) -> None:
    """`frozen_tamper:R:S`: rank R nudges one weight of its frozen `decoder` copy during step S (the others do not)."""
    import os

    from siren.train.trainer import Trainer

    rank, step = (int(x) for x in arg.split(":"))
    real = Trainer._train_step

    def tampering(self, s, preempt):
        out = real(self, s, preempt)
        if int(os.environ.get("RANK", "0")) == rank and s + 1 == step:
            with torch.no_grad():
                next(self.frozen["decoder"].parameters()).view(-1)[0] += 1e-3
        return out

    Trainer._train_step = tampering


def stub_quality_scorers(calls: list | None = None) -> dict:
    """Quality scorers without the `eval` extra: deterministic functions of the audio (and, for WER, of the manifest
    text through the real WER scorer with a fake ASR that hears "one two three" in any audio). Each call is appended
    to `calls` as (metric, utterance id)."""
    import numpy as np

    from siren.metrics.quality import _wer_scorer

    def counted(name, fn):
        def score(uid, ref, deg, text=None):
            if calls is not None:
                calls.append((name, uid))
            return fn(uid, ref, deg, text)

        return score

    def level(uid, ref, deg, text=None):
        return float(np.abs(deg).mean() / max(np.abs(ref).mean(), 1e-9))

    wer = _wer_scorer(transcribe=lambda wav: "one two three")
    return {"stoi": counted("stoi", level), "wer": counted("wer", wer)}


def _verify_quality_stub(arg: str) -> None:
    """`verify_quality_stub`: verify scores quality with `stub_quality_scorers` (as if the eval extra were installed)."""
    import siren.verify.judge

    siren.verify.judge._quality_scorers = stub_quality_scorers


def _eval_quality_stub(arg: str) -> None:
    """`eval_quality_stub`: `siren eval` scores every metric it asks for with a deterministic function of the audio
    (a level ratio; WER through the real WER scorer with a fake ASR): the command's wiring without the scorers' cost.
    The real scorers are tested in tests/test_quality.py and tests/test_eval.py."""
    import siren.metrics.quality as quality

    quality.build_scorers = stub_eval_scorers


def stub_eval_scorers(metrics=None) -> dict:
    """`siren eval`'s scorers, stubbed: every metric a level ratio of the audio, WER through the real WER scorer with
    a fake ASR (`eval_quality_stub` in a subprocess; `monkeypatch.setattr(quality, "build_scorers", ...)` in-process)."""
    import numpy as np

    import siren.metrics.quality as quality

    def level(uid, ref, deg, text=None):
        return float(np.abs(deg).mean() / max(np.abs(ref).mean(), 1e-9))

    return {
        m: quality._wer_scorer(transcribe=lambda wav: "one two three") if m == "wer" else level
        for m in (quality.METRICS if metrics is None else metrics)
    }


def _verify_rank_crash(arg: str) -> None:
    """`verify_rank_crash:R`: rank R (the launcher's RANK) raises when verify loads its first utterance's audio."""
    import os

    import siren.data.audio

    real = siren.data.audio.load_audio

    def crash(path, *a, **kw):
        if int(os.environ.get("RANK", "0")) == int(arg):
            raise RuntimeError(f"injected crash on rank {arg}")
        return real(path, *a, **kw)

    siren.data.audio.load_audio = crash


FAULTS: dict[str, Callable[[str], None]] = {
    "slow_checkpoint_write": _slow_checkpoint_write,
    "rank_sleep": _rank_sleep,
    "late_rank_state": _late_rank_state,
    "frozen_tamper": _frozen_tamper,
    "verify_quality_stub": _verify_quality_stub,
    "eval_quality_stub": _eval_quality_stub,
    "verify_rank_crash": _verify_rank_crash,
}


def inject(specs: str) -> None:
    """Inject each fault of `specs`, comma-separated `NAME[:ARG]`s."""
    for spec in specs.split(","):
        name, _, arg = spec.partition(":")
        if name not in FAULTS:
            raise KeyError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
        FAULTS[name](arg)


# ------------------------------------------------------------------------------------------- issue 13: trust controls
def _state_dict_only(module):
    """The code language over the state dict alone: non-persistent grid constants (FSQ levels, scales) left out."""
    return {k: v.detach() for k, v in module.state_dict().items()}


def _guard_never_checks(self):
    return True  # frozen/ok stays 1 between checkpoints whatever happened


def _rank_keys_only(self, accelerator):
    """The sparse window fed this rank's codes only: rank 0 would log half the global batch."""
    keys = torch.cat(self._keys)
    self._keys = []
    return keys


def _own_rank_only(self, ok):
    return [] if ok else [self.rank]  # each rank judges its own copy; the others never hear of it


def _naive_verdict(fn):
    """Only SIREN's own errors map to exit 2; anything else escapes as a traceback (exit 1, read as a FAIL)."""
    from siren.errors import SirenError

    try:
        return fn()
    except SirenError:
        return 2


def _naive_init_run(self, wandb, common, resume_id, rewind_to):
    """Resume by id only: W&B keeps the killed process's steps after the checkpoint and drops the re-logged ones."""
    if resume_id is None:
        return wandb.init(**common)
    return wandb.init(id=resume_id, resume="allow", **common)


def _fsq_even_grid(self, levels):
    """FSQ with another grid: every level count rounded up to even (a changed grid constant)."""
    _REAL_FSQ_INIT(self, [lv + lv % 2 for lv in levels])


_REAL_FSQ_INIT = None


def _no_claim(self, run_dir):
    return None


def _no_migration(tree, source="saved config", *, default_version=0):
    """A loader without a schema version: an old saved config is read as if it were current, silently."""
    return tree


def _schema_version() -> int:
    from siren.config.migrations import SCHEMA_VERSION

    return SCHEMA_VERSION


def _bump_only(tree):
    """A version bump whose migration fills in nothing (the schema grew, the table did not)."""
    return []


MECHANISMS.update(
    {
        "code_language_grid_constants": [("siren.checkpoints.lineage:_all_tensors", _state_dict_only)],
        "frozen_step_check": [("siren.train.frozen_guard:FrozenGuard.check", _guard_never_checks)],
        "frozen_check_all_ranks": [("siren.ranks:Ranks.which_failed", _own_rank_only)],
        "verify_exit_guard": [("siren.verify.run:guarded_verdict", _naive_verdict)],
        "wandb_rewind": [("siren.train.tracking:Tracker._init_run", _naive_init_run)],
        "artifact_name_claim": [("siren.train.sharing:ShareHook.claim_name", _no_claim)],
        "sparse_window_gather": [("siren.train.step_metrics:StepMetrics._gather_keys", _rank_keys_only)],
        "unique_default_run_name": [
            ("siren.train.trainer:default_run_name", lambda entity, project, stage, run_dir: Path(run_dir).name)
        ],
        "fsq_grid": [("siren.models.quantizers:FSQ.__init__", _fsq_even_grid)],
        "verify_requires_thresholds": [("siren.verify.judge:require_thresholds", lambda th, run: None)],
        # every rank judges every utterance (no split): rank 0 reduces each utterance world times
        "verify_split": [("siren.ranks:Ranks.shard", lambda self, items: items)],
        "config_migration": [("siren.config.loader:migrate", _no_migration)],
        "empty_migration_table": [
            ("siren.config.migrations:MIGRATIONS", {v: _bump_only for v in range(_schema_version())})
        ],
        "sweep_metric_scale_check": [("siren.sweep:metric_scaled_by_sweep", lambda config: None)],
        # report.html links its media by file name (works only beside them) and pastes text in unescaped.
        "report_embeds_media": [("siren.report_html:_data_uri", lambda path: path.name)],
        "report_escapes_text": [("siren.report_html:_esc", str)],
    }
)


# --------------------------------------------------------------------------------------------- the control runner
def assert_fails_without(fn, mechanism: str, failure: str, request, monkeypatch, fixed: dict | None = None) -> None:
    """Run test function `fn` with `mechanism` switched off (in this process and in `python -m siren` subprocesses)
    and require it to fail on its own check: the failure text must match the regex `failure`. Parameters named in
    `fixed` get those values; every other parameter is a fixture."""
    import inspect
    import re

    import pytest

    monkeypatch.setenv(ENV, mechanism)  # reaches `python -m siren` subprocesses via tests/controls
    disable(mechanism, monkeypatch)
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (fixed or {}).items() if k in params}
    for name in params:
        if name not in kwargs:
            kwargs[name] = request.getfixturevalue(name)
    with pytest.raises((Exception, pytest.fail.Exception, KeyboardInterrupt)) as info:
        fn(**kwargs)
    text = f"{info.type.__name__}: {info.value}"
    assert re.search(failure, text), (
        f"{fn.__name__} failed without {mechanism}, but not on its own check: {text[:2000]}"
    )
