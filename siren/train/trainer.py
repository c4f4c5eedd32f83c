"""The one training loop, for every stage, on `accelerate.Accelerator` (docs/training.md#checkpoints-and-resume, docs/scale.md).

Set-up builds the stage's components, freezes them through the registry, and hands the stage a narrow context
(`StageContext`): stages never see the trainer. Per step, the loop reads top to bottom: seed this rank's stream →
micro-batches (forward + backward) → one all-reduce of the step's metrics → update → log → hooks (evaluation,
checkpoint with samples and sharing) → progress. The stage's loss runs inside the forward of a module holding only the
trainable components, so only they are wrapped by DDP (guarantee 3). Checkpoints are atomic; resume is automatic
and exact on CPU; SIGTERM/SIGUSR1 checkpoint and exit; a hung rank is reported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from siren import __version__
from siren.checkpoints import layout as ckpt
from siren.checkpoints.layout import RunDir
from siren.checkpoints.meta import CheckpointMeta
from siren.config.loader import dump_config, load_config, to_dict
from siren.config.schema import SirenConfig
from siren.config.stages import PIPELINE_PARTS
from siren.errors import FrozenViolation, SirenError
from siren.models.builders import component_targets
from siren.models.io import fingerprint
from siren.models.precision import reduced_precision_warning
from siren.ranks import Ranks
from siren.train.batches import BatchStream, ShardedBatches, per_process_batch
from siren.train.checkpoint_hook import CheckpointHook
from siren.train.context import StageContext
from siren.train.evaluation import Evaluator
from siren.train.frozen_guard import FrozenGuard
from siren.train.optim import Updater, make_accelerator, make_scheduler
from siren.train.progress import Progress
from siren.train.registry import Registry, assert_optimizer_excludes_frozen
from siren.train.samples import SamplesHook
from siren.train.sharing import ShareHook, default_run_name
from siren.train.stages import make_stage
from siren.train.stages.base import Stage, StepOutput
from siren.train.step_metrics import StepMetrics
from siren.train.supervision import PREEMPTED_EXIT_CODE, Preemption, Watchdog
from siren.train.tracking import NullTracker, Tracker, read_metrics, truncate_metrics

log = logging.getLogger("siren")

__all__ = ["Trainer", "train_from_cli", "read_metrics", "ShardedBatches", "PREEMPTED_EXIT_CODE"]


class TrainingAborted(SirenError):
    """Too many consecutive non-finite steps."""


class TrainableCore(nn.Module):
    """Holds only the trainable components; its forward runs the stage's step so DDP sees one forward per step."""

    def __init__(self, trainable: dict[str, nn.Module]):
        super().__init__()
        self.components = nn.ModuleDict(trainable)

    def forward(self, step_fn: Callable, frozen: dict[str, nn.Module], batch: dict) -> dict:
        out: StepOutput = step_fn({**frozen, **dict(self.components.items())}, batch)
        return {"out": out}


def preflight_run_dir(run_dir: Path, min_free_mb: int) -> None:
    """Fail before training, not after an hour: the run dir must be creatable, writable and have free space."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise SirenError(f"run directory {run_dir} is not writable: {exc}") from exc
    free_mb = shutil.disk_usage(run_dir).free / 2**20
    if free_mb < min_free_mb:
        raise SirenError(
            f"only {free_mb:.0f} MiB free on the disk of {run_dir}; need at least train.min_free_mb={min_free_mb}"
        )


def write_pid_file(run_dir: Path, rank: int) -> Path:
    """`RUN/.pids/<host>-rank<R>.pid`: how `launch/slurm/train.sbatch` finds the training processes of each node to
    send them SIGUSR1 before the time limit (the launcher between them does not forward signals it does not handle)."""
    import socket

    d = RunDir(run_dir).pids
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{socket.gethostname()}-rank{rank}.pid"
    path.write_text(f"{os.getpid()}\n")
    return path


def seed_rank_stream(seed: int, device: torch.device) -> None:
    """Seed this process's generators for its device only (`torch.manual_seed` also walks every CUDA/XPU/MTIA backend:
    ~1 ms, a few % of a short step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def rank_stream_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank `rank`'s random stream at global step `step`: independent across ranks and steps, and a pure
    function of (seed, rank, step), so a resumed run draws exactly what the uninterrupted one drew."""
    digest = hashlib.sha256(f"siren-stream:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Trainer:
    def __init__(
        self,
        cfg: SirenConfig,
        *,
        fresh: bool = False,
        init_from: str | None = None,
        init_components: list[str] | None = None,
        stage: Stage | None = None,
    ):
        from accelerate.utils import set_seed

        self.cfg, self.init_from, self.run_dir, self.fresh = cfg, init_from, Path(cfg.run_dir), fresh
        self.layout = RunDir(self.run_dir)
        t = cfg.train
        # The scheduler steps once per optimizer step, not once per process (see siren.train.optim).
        self.accelerator = acc = make_accelerator(t.mixed_precision)
        self.is_main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.ranks = Ranks.of(acc)
        slow = reduced_precision_warning(acc.device.type, acc.mixed_precision)
        if slow and self.is_main:
            log.warning(slow)
        if self.is_main:
            preflight_run_dir(self.run_dir, t.min_free_mb)
            if fresh:
                self._archive_previous()
            ckpt.clean_partial(self.run_dir)
        acc.wait_for_everyone()
        self.pid_file = write_pid_file(self.run_dir, self.rank)

        # Components: identical initialisation on every rank, then weights from the resume point or --init-from.
        set_seed(t.seed)
        self.stage = stage or make_stage(cfg)
        self.modules = self.stage.build()
        # What runs from here on, and what config.yaml and meta.json record: the loaded config plus what building
        # resolved (the stage's own copy; the caller's config is left as it was).
        self.cfg = self.stage.cfg
        cfg, t = self.cfg, self.cfg.train
        t.batch_size = per_process_batch(t, self.world)  # what ran: recorded in config.yaml and meta.json
        self.consumed: dict[str, dict] = dict(self.stage.consumed)
        self.resume_step = 0 if fresh else (ckpt.latest_step(self.run_dir) or 0)
        self.resume_meta: CheckpointMeta | None = None
        if self.resume_step:
            self.resume_meta = ckpt.read_meta(ckpt.step_dir(self.run_dir, self.resume_step))
            ckpt.load_components(ckpt.step_dir(self.run_dir, self.resume_step), self._saved_modules())
        elif init_from:
            self._init_from(init_from, init_components)

        # Lineage (docs/sharing.md#lineage): pipeline checkpoints resolved, recorded and checked against this codec's code language,
        # and the eval files the samples read, all before step 1.
        self.pipeline_paths = self._preflight_pipeline()
        if cfg.samples.enabled and self.is_main:
            self._preflight_samples()

        # Freezing (docs/training.md#freezing): the registry decides what trains; everything else is pinned frozen.
        self.registry = Registry(self.modules)
        trainable = cfg.trainable or list(self.stage.default_trainable)
        self.plan = self.registry.apply(
            trainable, [*self.stage.required_frozen, *cfg.freeze], self.stage.required_frozen
        )
        for m in self.modules.values():
            m.to(acc.device)

        # Optimizer groups from the registry; only trainable components go to DDP; LR = f(global step).
        groups = {p: (g.lr, g.weight_decay) for p, g in cfg.optim.groups.items()}
        param_groups = self.registry.param_groups(groups, cfg.optim.lr, cfg.optim.weight_decay)
        self.group_names = [g.pop("name") for g in param_groups]
        core = TrainableCore({n: self.modules[n] for n in self.plan.trainable_components})
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "auto": {}}[cfg.optim.impl]
        optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas), **impl)
        o = cfg.optim
        scheduler = make_scheduler(optimizer, o.scheduler, o.warmup_steps, t.max_steps)
        self.core, self.optimizer, self.scheduler = acc.prepare(core, optimizer, scheduler)
        assert_optimizer_excludes_frozen(self.optimizer, self.registry)
        self.frozen = {n: m for n, m in self.modules.items() if n not in self.plan.trainable_components}
        self.frozen_guard = FrozenGuard({p: self.registry.module(p) for p in self.plan.frozen})
        self.frozen_ok = 1.0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.updater = Updater(self.optimizer, self.scheduler, params, t.max_grad_norm, scaler=acc.scaler)

        # Data: every rank its slice of one global order.
        self.dataset = self._build_dataset()
        self.val_dataset = self._build_dataset(val=True) if cfg.data.val else None  # before set-up: caches attach
        self.batches = ShardedBatches(len(self.dataset), t.batch_size, self.world, self.rank, t.seed)
        self.stream = BatchStream(self.dataset, self.batches, t.grad_accum, cfg.data.num_workers)
        self.excluded = sorted(self.dataset.skipped)  # found up front, the same on every rank: counted once
        # Distinct files that failed to load, by row, the same on every rank (siren.data.datasets.LoadFailures).
        from siren.data.datasets import restored_failures

        self.dataset.failures.add(restored_failures(self.dataset, self.resume_meta.data if self.resume_meta else {}))
        self.load_failures = self.dataset.failures.count
        self._failed_all = self._failed_paths()

        # The stage's set-up sees only the narrow context; it hands back its per-step metric sources.
        self.ctx = StageContext(
            device=acc.device,
            rank=self.rank,
            world=self.world,
            run_dir=self.run_dir,
            train_utterances=self.dataset.utterances,
            val_utterances=self.val_dataset.utterances if self.val_dataset is not None else [],
            barrier=acc.wait_for_everyone,
            mixed_precision=acc.mixed_precision,
            train_dataset=self.dataset,
            val_dataset=self.val_dataset,
        )
        self.stage.setup(self.ctx, self.modules)
        self.nominal_bps = self.stage.nominal_bps()
        self.step_metrics = StepMetrics(
            self.stage.metric_sources(self.modules), t.codebook_window, acc.device, self.world, t.grad_accum
        )
        if self.resume_step:
            self._restore_trainer_state(ckpt.step_dir(self.run_dir, self.resume_step) / "trainer")
        self.tracker = self._make_tracker()

        # Hooks the loop calls, each in its own module.
        self.evaluate = Evaluator(self.ctx, self.stage, lambda: self.val_dataset, t.batch_size)
        samples = SamplesHook(cfg, self.stage, self.modules, acc.device, self.tracker, self.core, self.pipeline_paths)
        share = ShareHook(
            self.tracker, self.stage.name, self.run_name, cfg.tracking.project, cfg.tracking.upload_trainer_state
        )
        if self.is_main:
            share.claim_name(self.run_dir)
        window = self.step_metrics.window
        self.checkpoint = CheckpointHook(
            self.run_dir,
            acc,
            self.registry,
            self._saved_modules(),
            keep_last=t.keep_last,
            keep_steps=t.keep_steps,
            best_metric=t.best_metric,
            best_mode=t.best_mode,
            best=self.resume_meta.best if self.resume_meta else None,
            meta=self._meta,
            window_state=(lambda: window.state()) if window is not None else (lambda: None),
            samples=samples if self.is_main else None,
            export=lambda tmp: self.stage.export(tmp, self.modules),
            share=share if self.is_main else None,
        )
        self.progress = Progress(t.max_steps, self.resume_step, t.status_every, self.is_main, acc.device)
        self.preempted = False

    # --------------------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to `train.max_steps` (or to a preemption signal); on any error the W&B run is closed as failed."""
        try:
            return self._fit()
        except BaseException:
            self.tracker.finish(exit_code=1)
            raise

    def _fit(self) -> dict:
        t = self.cfg.train
        step, bad_in_row, last = self.resume_step, 0, {}
        self.core.train()
        t_prev = time.perf_counter()
        with Preemption() as signals, Watchdog(t.hang_timeout_s, self.rank, self.run_dir) as watchdog:
            while step < t.max_steps:
                watchdog.arm(f"step {step + 1}")
                metrics, bad = self._train_step(step, preempt=signals.requested)
                step += 1
                now = time.perf_counter()
                metrics["train/step_time_s"], t_prev = now - t_prev, now
                bad_in_row = bad_in_row + 1 if bad else 0
                preempt = metrics.pop("signal/preempt") > 0
                is_ckpt = step % t.checkpoint_every == 0 or step == t.max_steps
                # frozen/ok (docs/metrics.md): the on-device check every N steps, the full sha256 where a checkpoint is written;
                # a violation is logged as 0 before the run stops.
                violation = self._check_frozen(step, full=is_ckpt or preempt)
                metrics["frozen/ok"] = self.frozen_ok
                if violation is not None:
                    self.tracker.log(metrics, step)
                    raise violation
                if is_ckpt:
                    watchdog.arm(f"evaluation at step {step}")
                    metrics.update(self.evaluate(self.modules, self.core))
                if step % t.log_every == 0 or step == t.max_steps or is_ckpt or preempt:
                    self.tracker.log(metrics, step)
                if bad_in_row >= t.max_bad_steps:
                    raise TrainingAborted(
                        f"aborting: {bad_in_row} consecutive steps with a non-finite loss or gradient "
                        f"(train.max_bad_steps={t.max_bad_steps}); last loss {metrics['train/loss']}; "
                        "check the learning rate and data"
                    )
                if is_ckpt or preempt:
                    watchdog.arm(f"checkpoint at step {step}")
                    self._failed_all = self._failed_paths()
                    self.checkpoint(step, metrics, consider_best=is_ckpt, frozen_checked=True)
                self.progress.update(step, metrics)
                last = metrics
                if preempt:
                    self.preempted = True
                    log.warning("preempted: checkpoint written at step %d; rerun the same command to resume", step)
                    break
            watchdog.arm("the final frozen check")
            if not self.preempted:
                self.registry.check_frozen()
            self.progress.close()
            self.finish()
        return last

    def _train_step(self, step: int, preempt: bool) -> tuple[dict[str, float], bool]:
        """One optimizer step over `train.grad_accum` micro-batches; returns the reduced metrics and whether it was bad."""
        t, acc = self.cfg.train, self.accelerator
        seed_rank_stream(rank_stream_seed(t.seed, self.rank, step), acc.device)  # dropout, noise, timesteps
        new_failures, audio_samples = 0, 0
        for k in range(t.grad_accum):
            batch = self.stream.next(step, k)
            new_failures += self.dataset.failures.note(batch.get("failed_rows", ()))
            audio_samples += int(batch["lengths"].sum())  # a host tensor: no device sync
            batch = {key: (v.to(acc.device) if key in ("wav", "lengths") else v) for key, v in batch.items()}
            last_micro = k == t.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or self.world == 1 else acc.no_sync(self.core)
            with sync:  # autocast, when mixed precision is on, is applied by the prepared module's forward
                out: StepOutput = self.core(self.stage.step, self.frozen, batch)["out"]
            acc.backward(out.loss / t.grad_accum)
            self.step_metrics.add(out)
        grad_norm = self.updater.clip()
        counters = {
            "data/load_failures": float(new_failures),
            "data/audio_seconds": audio_samples / self.cfg.audio.sample_rate,
            "signal/preempt": float(preempt),
        }
        metrics = self.step_metrics.reduce(acc, grad_norm, counters)
        lrs = [g["lr"] for g in self.optimizer.param_groups]  # the LRs this step's update uses
        finite = self._step_is_finite(metrics)
        stepped = self.updater.apply(finite)
        # With a gradient scaler an overflow is the scaler's business (it skips and lowers the scale), not a bad step.
        bad = not math.isfinite(metrics["train/loss"]) if acc.scaler is not None else not finite
        if bad:
            log.warning("step %d: non-finite loss/grad (%s), update skipped", step + 1, metrics["train/loss"])
        if metrics.pop("data/load_failures") > 0:  # a rank met a new bad file: every rank adds the same rows
            self.load_failures += self.dataset.failures.sync(self.ctx.gather)
        metrics["train/skipped_step"] = 0.0 if stepped else 1.0
        metrics["data/skipped"] = float(len(self.excluded) + self.load_failures)  # up front + failed at load, all ranks
        for name, lr in zip(self.group_names, lrs, strict=True):
            metrics[f"train/lr/{name}"] = lr
        if self.nominal_bps is not None:
            metrics["rate/bps_nominal"] = self.nominal_bps
        return metrics, bad

    def _check_frozen(self, step: int, full: bool) -> FrozenViolation | None:
        """Cheap check every `train.frozen_check_every` steps, sha256 when `full`; returns the violation (not raised, so
        the caller logs frozen/ok = 0 first). Every rank checks its own copy; one all-reduce makes every rank agree."""
        every = self.cfg.train.frozen_check_every
        checked = (every > 0 and step % every == 0) or full
        if not checked:
            return None
        local = None
        try:
            if every > 0 and step % every == 0:
                self.frozen_guard.check()
            if full:
                self.registry.check_frozen()
        except FrozenViolation as exc:
            local = exc
        failed = self.ranks.which_failed(local is None)
        if not failed:
            self.frozen_ok = 1.0
            return None
        self.frozen_ok = 0.0
        where = f" (on rank {', '.join(map(str, failed))} of {self.world})" if self.world > 1 else ""
        return FrozenViolation(f"step {step}{where}: {local if local is not None else 'a frozen component moved'}")

    @staticmethod
    def _step_is_finite(metrics: dict[str, float]) -> bool:
        """A step updates the weights only when its (all-rank) loss and gradient norm are finite."""
        return math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])

    # ------------------------------------------------------------------------------------------------------- set-up
    def _saved_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.modules.items() if n not in self.stage.not_saved}

    def _archive_previous(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in ckpt.RUN_STATE:
            p = self.run_dir / name
            if p.exists():
                p.rename(self.run_dir / f"{name}.before-fresh-{stamp}")

    def _init_from(self, uri: str, names: list[str] | None) -> None:
        from siren.checkpoints.artifacts import resolve_checkpoint

        path = resolve_checkpoint(uri)
        avail = set(ckpt.available_components(path))
        names = names or [n for n in self._saved_modules() if n in avail]
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise SirenError(f"--init-components names {unknown}, which stage {self.stage.name} does not have")
        ckpt.load_components(path, {n: self.modules[n] for n in names})
        from siren.checkpoints.lineage import checkpoint_record

        self.consumed["init_from"] = {**checkpoint_record(uri, path, ckpt.read_meta(path)), "components": names}
        log.info("initialised %s from %s", ", ".join(names), path)

    def _preflight_pipeline(self) -> dict[str, Path]:
        """Resolve the `pipeline.*` checkpoints this stage renders through (a missing one is an error now, not a
        skipped sample later), record them, and refuse a flow that reads another code language than these codes."""
        from siren.checkpoints.artifacts import resolve_checkpoint
        from siren.checkpoints.lineage import check_flow_reads, checkpoint_record
        from siren.models.io import fingerprint

        own = PIPELINE_PARTS
        paths: dict[str, Path] = {}
        for role in self.stage.pipeline_roles:
            uri = getattr(self.cfg.pipeline, role)
            if uri is None or all(n in self.modules for n in own[role]):
                continue
            path = resolve_checkpoint(uri)
            meta = ckpt.read_meta(path)
            missing = [n for n in own[role] if n not in ckpt.available_components(path)]
            if missing:
                raise SirenError(f"pipeline.{role}={uri} ({path}) has no {', '.join(missing)}")
            if role == "flow":
                language = self.stage.code_language(self.modules)
                where = self.consumed.get("baseline", {}).get("path") or f"the {self.stage.name} run {self.run_dir}"
                quantizers = {
                    n: fingerprint(self.modules[n]) for n in ("sem_quantizer", "pro_quantizer", "spk_quantizer")
                }
                check_flow_reads(language, where, meta, str(path), quantizers)
            self.consumed[f"pipeline.{role}"] = checkpoint_record(uri, path, meta)
            paths[role] = path
        return paths

    def _preflight_samples(self) -> None:
        """Sample utterance ids and the eval files they name must be usable before step 1."""
        from siren.data.audio import audio_info
        from siren.train.samples import clip_min_samples, eval_utterances

        for u in eval_utterances(self.cfg, clip_min_samples(self.stage, self.modules)):
            try:
                audio_info(u.path)
            except Exception as exc:
                raise SirenError(f"samples: eval utterance {u.id} ({u.path}) cannot be read: {exc}") from exc

    def _build_dataset(self, val: bool = False):
        from siren.data.datasets import build_dataset
        from siren.train.samples import clip_min_samples

        if not self.cfg.data.train:
            raise SirenError("data.train is not set: point it at a JSONL manifest (e.g. from `siren manifest`)")
        return build_dataset(self.cfg, val, clip_min_samples(self.stage, self.modules))

    def _restore_trainer_state(self, path: Path) -> None:
        """Optimizer, scheduler and scaler states (accelerate) and the codebook window: what exact resume needs."""
        self.accelerator.load_state(str(path))
        window = self.step_metrics.window
        if window is None:
            return
        wpath = path / "codebook_window.pt"
        if not wpath.is_file():
            raise SirenError(
                f"checkpoint is incomplete: {wpath} is missing (the codebook window cannot resume exactly)"
            )
        state = torch.load(wpath, map_location="cpu")  # a rank's device may print as "cpu:0", which torch.load refuses
        window.load_state(state)

    def _make_tracker(self):
        if not self.is_main:
            return NullTracker()
        # A killed run may have logged past its last checkpoint (or before any): keep the history consistent.
        if self.layout.metrics.is_file():
            dropped = truncate_metrics(self.layout.metrics, self.resume_step)
            if dropped:
                log.info("dropped %d metrics.jsonl lines logged after step %d", dropped, self.resume_step)
        self.layout.config.write_text(dump_config(self.cfg))
        tc = self.cfg.tracking
        # `--fresh` is a new W&B run; otherwise the run this directory has been logging to, rewound to the resume step.
        resume_id = None if self.fresh or not self.resume_meta else self.resume_meta.wandb.get("id")
        id_file = self.layout.wandb_run_id
        if resume_id is None and not self.fresh and id_file.is_file():
            resume_id = id_file.read_text().strip()
        tracker = Tracker(
            self.run_dir,
            project=tc.project,
            entity=tc.entity,
            mode=tc.mode,
            run_name=self.run_name,
            group=tc.group,
            tags=tc.tags,
            config=to_dict(self.cfg),
            job_type=self.stage.name,
            resume_id=resume_id,
            rewind_to=self.resume_step if resume_id else None,
        )
        if tracker.run_id:
            self.layout.wandb_run_id.write_text(tracker.run_id)
        # Lineage: online, every checkpoint this run consumes is declared with use_artifact (no-op offline).
        from siren.checkpoints.artifacts import use_checkpoint_artifact

        consumed = [
            self.cfg.baseline,
            self.cfg.pipeline.flow,
            self.cfg.pipeline.vocoder,
            self.cfg.student_ssl.path,
            self.init_from,
        ]
        for uri in filter(None, consumed):
            use_checkpoint_artifact(tracker.run, uri)
        return tracker

    @functools.cached_property
    def run_name(self) -> str:
        """`tracking.run_name`, else the name this run already used (a resume keeps it), else the run dir's name
        (made unique when another run directory already owns that artifact name)."""
        tr = self.cfg.tracking
        if tr.run_name:
            return tr.run_name
        if self.resume_meta and self.resume_meta.run_name:
            return self.resume_meta.run_name
        return default_run_name(tr.entity, tr.project, self.stage.name, self.run_dir)

    def _meta(self, step: int, metrics: dict[str, float]) -> CheckpointMeta:
        fps = {n: fingerprint(m) for n, m in self.modules.items()}
        return CheckpointMeta(
            step=step,
            stage=self.stage.name,
            run_name=self.run_name,
            config=to_dict(self.cfg),
            fingerprints=fps,
            targets=component_targets(self.modules, self.cfg),
            frozen=self.plan.frozen,
            frozen_fingerprints=self.registry.fingerprints(),
            trainable=self.plan.trainable_components,
            code_layout={k: list(v) for k, v in self.step_metrics.sources.layout.items()},
            baseline=self.stage.lineage()["baseline"],
            consumed=self.consumed,
            ssl=self._ssl_record(fps.get("ssl")),
            code_language=self.stage.code_language(self.modules),
            wandb={
                "id": self.tracker.run_id,
                "project": self.tracker.project,
                "entity": self.tracker.entity,
                "mode": self.tracker.mode,
            },
            metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
            best=self.checkpoint.best,
            version=__version__,
            world_size=self.world,
            mixed_precision=self.accelerator.mixed_precision,
            data={
                "excluded": self.excluded,
                "load_failures": self.load_failures,
                "load_failed": self._failed_all,
                "load_failed_rows": [int(r) for r in self.dataset.failures.rows()],
            },
        )

    def _ssl_record(self, ssl_fingerprint: str | None) -> dict | None:
        from siren.checkpoints.lineage import ssl_record

        if ssl_fingerprint is None:
            return None
        return {**ssl_record(self.cfg), "fingerprint": ssl_fingerprint}

    def _failed_paths(self) -> list[str]:
        """Paths that failed to load on any rank (the failure set is agreed on every rank at each step: no collective
        here)."""
        return [self.dataset.table.path(int(r)) for r in self.dataset.failures.rows()]

    def finish(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        self.pid_file.unlink(missing_ok=True)
        self.tracker.finish()
        acc.end_training()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train_from_cli(
    config: str,
    overrides: list[str],
    *,
    run_dir: str | None = None,
    fresh: bool = False,
    init_from: str | None = None,
    init_components: str | None = None,
) -> int:
    # Under a launcher every log line (warnings included) carries the rank that wrote it.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tag = f" rank {rank}" if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{tag} %(levelname)s %(message)s")
    logging.captureWarnings(True)
    overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    cfg = load_config(config, overrides)
    trainer = Trainer(
        cfg, fresh=fresh, init_from=init_from, init_components=init_components.split(",") if init_components else None
    )
    last = trainer.fit()
    if trainer.preempted:
        return PREEMPTED_EXIT_CODE
    if trainer.is_main:
        keys = [k for k in ("train/loss", "drift/sem/agreement", "rate/bps_entropy", "frozen/ok") if k in last]
        print(json.dumps({"run_dir": str(cfg.run_dir), "step": cfg.train.max_steps, **{k: last[k] for k in keys}}))
    return 0
