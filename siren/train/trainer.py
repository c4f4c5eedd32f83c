"""The one training loop, for every stage, on `accelerate.Accelerator` (DESIGN §6).

Per step: the stage's loss runs inside the forward of a module that holds only the trainable components (so only they
are wrapped by DDP, guarantee 3); losses, codebook counts and drift sums are concatenated into one vector, all-reduced
once and copied to the host once. Checkpoints are atomic; resume is automatic and exact on CPU.
"""

from __future__ import annotations

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
from siren.config.loader import dump_config, load_config, to_dict
from siren.config.schema import SirenConfig
from siren.errors import SirenError
from siren.metrics.codebook import CodebookWindow, stream_histograms
from siren.models.io import fingerprint
from siren.train import checkpoint as ckpt
from siren.train.registry import Registry, assert_optimizer_excludes_frozen
from siren.train.stages import make_stage
from siren.train.stages.base import Stage, StepOutput
from siren.train.tracking import NullTracker, Tracker, read_metrics, truncate_metrics

log = logging.getLogger("siren")


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


class ShardedBatches:
    """Deterministic batches per (seed, epoch): one seeded permutation cut into global batches; rank r takes its slice.

    Every process computes the same permutation, so resuming at any step reproduces the data order exactly.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.num_batches = n // (batch_size * world)
        if self.num_batches == 0:
            raise SirenError(
                f"the training set has {n} usable utterances, fewer than train.batch_size ({batch_size}) × "
                f"processes ({world}); lower train.batch_size or add data"
            )

    def epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world
        out = []
        for b in range(self.num_batches):
            chunk = perm[b * gb : (b + 1) * gb]
            out.append(chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
        return out


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
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg = cfg
        self.init_from = init_from
        self.run_dir = Path(cfg.run_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # without it, launched CPU ranks do not join one gloo group
            mixed_precision=cfg.train.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        acc = self.accelerator
        self.is_main = acc.is_main_process
        if self.is_main:
            preflight_run_dir(self.run_dir, cfg.train.min_free_mb)
            if fresh:
                self._archive_previous()
            ckpt.clean_partial(self.run_dir)
        acc.wait_for_everyone()

        set_seed(cfg.train.seed)
        self.stage = stage or make_stage(cfg)
        self.modules = self.stage.build()
        self.resume_step = 0 if fresh else (ckpt.latest_step(self.run_dir) or 0)
        self.resume_meta: dict = {}
        if self.resume_step:
            self.resume_meta = ckpt.read_meta(ckpt.step_dir(self.run_dir, self.resume_step))
            ckpt.load_components(ckpt.step_dir(self.run_dir, self.resume_step), self._saved_modules())
        elif init_from:
            self._init_from(init_from, init_components)

        # Freezing (DESIGN §5): the registry decides what trains; everything else is pinned frozen.
        self.registry = Registry(self.modules)
        trainable = cfg.trainable or list(self.stage.default_trainable)
        self.plan = self.registry.apply(
            trainable, [*self.stage.required_frozen, *cfg.freeze], self.stage.required_frozen
        )
        for m in self.modules.values():
            m.to(acc.device)
        self.frozen_ok = 1.0

        # Optimizer groups from the registry; only trainable components go to DDP.
        groups = {p: (g.lr, g.weight_decay) for p, g in cfg.optim.groups.items()}
        param_groups = self.registry.param_groups(groups, cfg.optim.lr, cfg.optim.weight_decay)
        self.group_names = [g.pop("name") for g in param_groups]
        core = TrainableCore({n: self.modules[n] for n in self.plan.trainable_components})
        optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda)
        self.core, self.optimizer, self.scheduler = acc.prepare(core, optimizer, scheduler)
        assert_optimizer_excludes_frozen(self.optimizer, self.registry)
        self.frozen = {n: m for n, m in self.modules.items() if n not in self.plan.trainable_components}

        self.dataset = self._build_dataset()
        self._val = self._build_dataset(val=True) if cfg.data.val else None  # built before setup: caches attach
        self.bad_files: set[str] = set(self.dataset.skipped)
        self.batches = ShardedBatches(
            len(self.dataset), cfg.train.batch_size, acc.num_processes, acc.process_index, cfg.train.seed
        )
        self.layout = self.stage.code_layout(self.modules)
        self.window = CodebookWindow(self.layout, cfg.train.codebook_window, acc.device) if self.layout else None

        self.stage.setup(self)  # caches and baseline profile; may use the tracker-free run dir
        if self.resume_step:
            self._restore_trainer_state(ckpt.step_dir(self.run_dir, self.resume_step) / "trainer")
        self.best = self.resume_meta.get("best", {"step": None, "value": None})
        self.tracker = self._make_tracker()

    # ------------------------------------------------------------------------------------------------------- set-up
    def _saved_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.modules.items() if n not in self.stage.not_saved}

    def _archive_previous(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in ("checkpoints", "metrics.jsonl", "baseline_profile.json"):
            p = self.run_dir / name
            if p.exists():
                p.rename(self.run_dir / f"{name}.before-fresh-{stamp}")

    def _init_from(self, uri: str, names: list[str] | None) -> None:
        from siren.artifacts import resolve_checkpoint

        path = resolve_checkpoint(uri)
        avail = set(ckpt.available_components(path))
        names = names or [n for n in self._saved_modules() if n in avail]
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise SirenError(f"--init-components names {unknown}, which stage {self.stage.name} does not have")
        ckpt.load_components(path, {n: self.modules[n] for n in names})
        log.info("initialised %s from %s", ", ".join(names), path)

    def _build_dataset(self, val: bool = False):
        from siren.data.datasets import build_dataset

        if not self.cfg.data.train:
            raise SirenError("data.train is not set: point it at a JSONL manifest (e.g. from `siren manifest`)")
        return build_dataset(self.cfg, val)

    def _make_tracker(self):
        if not self.is_main:
            return NullTracker()
        # A killed run may have logged past its last checkpoint (or before any): keep the history consistent.
        if (self.run_dir / "metrics.jsonl").is_file():
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", self.resume_step)
            if dropped:
                log.info("dropped %d metrics.jsonl lines logged after step %d", dropped, self.resume_step)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        t = self.cfg.tracking
        resume_id = self.resume_meta.get("wandb", {}).get("id")
        if resume_id is None and (self.run_dir / "wandb_run_id").is_file():
            resume_id = (self.run_dir / "wandb_run_id").read_text().strip()
        tracker = Tracker(
            self.run_dir,
            project=t.project,
            entity=t.entity,
            mode=t.mode,
            run_name=self.run_name,
            group=t.group,
            tags=t.tags,
            config=to_dict(self.cfg),
            job_type=self.stage.name,
            resume_id=resume_id,
        )
        if tracker.run_id:
            (self.run_dir / "wandb_run_id").write_text(tracker.run_id)
        # Lineage: online, every checkpoint this run consumes is declared with use_artifact (no-op offline).
        from siren.artifacts import use_checkpoint_artifact

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

    @property
    def run_name(self) -> str:
        return self.cfg.tracking.run_name or self.run_dir.resolve().name

    def _lr_lambda(self, step: int) -> float:
        o, total = self.cfg.optim, max(1, self.cfg.train.max_steps)
        warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        if o.scheduler == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return warm

    def window_state_restore(self) -> None:
        """Rebuild the codebook window from the checkpoint (saved by `_save`), so metrics continue exactly."""
        path = ckpt.step_dir(self.run_dir, self.resume_step) / "trainer" / "codebook_window.pt"
        if self.window is None:
            return
        if not path.is_file():
            raise SirenError(f"checkpoint is incomplete: {path} is missing (the codebook window cannot resume exactly)")
        state = torch.load(path, map_location=self.accelerator.device)
        self.window.load(state["buffers"], state["pos"])

    # --------------------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to `train.max_steps`; on any error the W&B run is closed as failed before the error propagates."""
        try:
            return self._fit()
        except BaseException:
            self.tracker.finish(exit_code=1)
            raise

    def _fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        step = self.resume_step
        bad_in_row = 0
        last: dict[str, float] = {}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.core.train()
        it = None
        t_prev = time.perf_counter()
        while step < cfg.train.max_steps:
            # Data: micro-batch index → (epoch, position); one iterator from the start (or resume) point on.
            for k in range(cfg.train.grad_accum):
                if it is None:
                    it = self._iterator(*divmod(step * cfg.train.grad_accum + k, self.batches.num_batches))
                # Audio goes to the device; bookkeeping (offsets, indices) stays on the host: reading it is no sync.
                batch = {key: (v.to(acc.device) if key in ("wav", "lengths") else v) for key, v in next(it).items()}
                self.bad_files.update(batch.get("replaced", ()))
                sync = k == cfg.train.grad_accum - 1
                ctx = acc.no_sync(self.core) if not sync and acc.num_processes > 1 else _nullcontext()
                with ctx:
                    out: StepOutput = self.core(self.stage.step, self.frozen, batch)["out"]
                    acc.backward(out.loss / cfg.train.grad_accum)
            grad_norm = acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
            values, names = self._reduce_metrics(out, grad_norm)
            host = values.tolist()  # the one host sync of the step
            metrics = dict(zip(names, host, strict=True))
            finite = self._step_is_finite(metrics)
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                log.warning(
                    "step %d: non-finite loss/grad (%s), update skipped (%d in a row)",
                    step + 1,
                    metrics["train/loss"],
                    bad_in_row,
                )
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            metrics["train/step_time_s"] = now - t_prev
            t_prev = now
            metrics["train/skipped_step"] = 0.0 if finite else 1.0
            metrics["frozen/ok"] = self.frozen_ok
            metrics["data/skipped"] = float(len(self.bad_files))  # excluded up front + failed at load (this rank)
            for name, g in zip(self.group_names, self.optimizer.param_groups, strict=True):
                metrics[f"train/lr/{name}"] = g["lr"]
            if self.stage.nominal_bps() is not None:
                metrics["rate/bps_nominal"] = self.stage.nominal_bps()
            is_ckpt = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
            if is_ckpt:
                metrics.update(self.evaluate())
            last = metrics
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or is_ckpt:
                self.tracker.log(metrics, step)
            if bad_in_row >= cfg.train.max_bad_steps:
                raise TrainingAborted(
                    f"aborting: {bad_in_row} consecutive steps with a non-finite loss or gradient (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}); last loss {metrics['train/loss']}; check the learning rate and data"
                )
            if is_ckpt:
                self.save(step, metrics)
        self.registry.check_frozen()
        self.finish()
        return last

    @staticmethod
    def _step_is_finite(metrics: dict[str, float]) -> bool:
        """A step updates the weights only when its (all-rank) loss and gradient norm are finite."""
        return math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["train/grad_norm"])

    def _restore_trainer_state(self, path: Path) -> None:
        """Optimizer, scheduler, scaler and RNG states (accelerate) and the codebook window: what exact resume needs."""
        self.accelerator.load_state(str(path))
        self.window_state_restore()

    @torch.no_grad()
    def evaluate(self, max_batches: int = 4) -> dict[str, float]:
        """`eval/loss` and `eval/<term>` on the first batches of the val set (uncropped start, fixed order).

        Runs with every module in eval mode and on a forked RNG, so it never changes the training trajectory."""
        from siren.data.datasets import collate

        if self._val is None:
            return {}
        bs = self.cfg.train.batch_size
        n = min(max_batches, max(1, len(self._val) // bs))
        was = [m.training for m in self.core.modules()]
        self.core.eval()
        sums: dict[str, float] = {}
        try:
            with torch.random.fork_rng(devices=[]):
                for b in range(n):
                    items = [self._val[i] for i in range(b * bs, min(len(self._val), (b + 1) * bs))]
                    batch = {
                        k: (v.to(self.accelerator.device) if k in ("wav", "lengths") else v)
                        for k, v in collate(items).items()
                    }
                    out = self.stage.step(self.modules, batch)
                    vals = {"eval/loss": out.loss, **{f"eval/{k}": v for k, v in out.terms.items()}}
                    for k, (num, den) in out.ratios.items():  # e.g. eval/drift/sem/agreement on held-out audio
                        vals[f"eval/{k}/num"], vals[f"eval/{k}/den"] = num, den
                    host = torch.stack([v.detach().to(torch.float64) for v in vals.values()]).tolist()
                    for k, v in zip(vals, host, strict=True):
                        sums[k] = sums.get(k, 0.0) + (v if k.endswith(("/num", "/den")) else v / n)
        finally:
            for m, t in zip(self.core.modules(), was, strict=True):
                m.training = t
        for k in [k[:-4] for k in sums if k.endswith("/num")]:
            sums[k] = sums.pop(k + "/num") / max(sums.pop(k + "/den"), 1e-12)
        return sums

    def _iterator(self, epoch: int, start: int):
        """Batches from (epoch, position) on, across epoch ends; the DataLoader and its workers are built once."""
        from siren.data.datasets import EpochBatchSampler, collate

        if getattr(self, "_loader", None) is None:
            self._sampler = EpochBatchSampler(self.batches)
            workers = self.cfg.data.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self._sampler,
                collate_fn=collate,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=4 if workers > 0 else None,
            )
        self._sampler.start(epoch, start)
        return iter(self._loader)

    def _reduce_metrics(self, out: StepOutput, grad_norm) -> tuple[torch.Tensor, list[str]]:
        """One vector: loss terms (mean over ranks), ratio sums, codebook counts (summed); one all-reduce."""
        acc = self.accelerator
        dev = out.loss.device
        scalars = {"train/loss": out.loss.detach(), **{f"train/{k}": v.detach() for k, v in out.terms.items()}}
        parts = [torch.stack([v.to(torch.float64) for v in scalars.values()]) / acc.num_processes]
        ratio_names = list(out.ratios)
        if ratio_names:
            parts.append(
                torch.stack(
                    [torch.stack([n.to(torch.float64), d.to(torch.float64)]) for n, d in out.ratios.values()]
                ).reshape(-1)
            )
        if self.window is not None:
            parts.append(stream_histograms(self.layout, out.codes))
        vec = torch.cat([p.to(dev) for p in parts])
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        # Everything below stays vectorised: a handful of tensor ops per step, one cat, no per-metric tensors.
        n_s, n_r = len(scalars), len(ratio_names)
        names = list(scalars) + ratio_names
        outs = [vec[:n_s]]
        if n_r:
            pairs = vec[n_s : n_s + 2 * n_r].view(n_r, 2)
            ratios = pairs[:, 0] / pairs[:, 1].clamp_min(1e-12)
            outs.append(ratios)
        i = n_s + 2 * n_r
        if self.window is not None:
            self.window.push_flat(vec[i:])  # the streams' histograms, concatenated in layout order
            names += self.window.names()
            outs.append(self.window.vector())
            ref = getattr(self.stage, "drift_ref", None)
            if ref is not None:  # drift against the baseline profile (adapt)
                bps = ratios[ratio_names.index("rate/bps_entropy")]
                names += ref.names()
                outs.append(ref.vector(self.window.running, bps, self.window.stats))
        names.append("train/grad_norm")
        outs.append(grad_norm.detach().to(torch.float64).reshape(1).to(dev))
        return torch.cat(outs), names

    # --------------------------------------------------------------------------------------------------- checkpoints
    def save(self, step: int, metrics: dict[str, float]) -> Path | None:
        """Check frozen fingerprints, write step_N atomically (all ranks take part in save_state), render samples."""
        acc = self.accelerator
        self.frozen_ok = 0.0
        self.registry.check_frozen()  # raises FrozenViolation naming the component
        self.frozen_ok = 1.0
        tmp = ckpt.checkpoints_dir(self.run_dir) / f".tmp-step_{step}"
        if self.is_main:
            tmp = ckpt.begin_step(self.run_dir, step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "trainer"))
        final = None
        if self.is_main:
            if self.window is not None:
                torch.save(self.window.state(), tmp / "trainer" / "codebook_window.pt")
            ckpt.save_components(tmp, self._saved_modules())
            self.stage.export(tmp, self.modules)
            is_best = self._update_best(step, metrics)
            meta = self._meta(step, metrics)
            self._render_samples(tmp / "samples", step)
            final = ckpt.commit_step(self.run_dir, tmp, step, meta)
            self._share(final, step, is_best)
            ckpt.apply_retention(self.run_dir, self.cfg.train.keep_last, self.cfg.train.keep_steps, self.best["step"])
        acc.wait_for_everyone()
        return final

    def _update_best(self, step: int, metrics: dict[str, float]) -> bool:
        key, mode = self.cfg.train.best_metric, self.cfg.train.best_mode
        if key not in metrics:
            return False
        v, b = metrics[key], self.best["value"]
        if b is None or (v < b if mode == "min" else v > b):
            self.best = {"step": step, "value": v, "metric": key}
            return True
        return False

    def _meta(self, step: int, metrics: dict[str, float]) -> dict:
        fps = {n: fingerprint(m) for n, m in self.modules.items()}
        return {
            "step": step,
            "stage": self.stage.name,
            "run_name": self.run_name,
            "config": to_dict(self.cfg),
            "fingerprints": fps,
            "frozen": self.plan.frozen,
            "frozen_fingerprints": self.registry.fingerprints(),
            "trainable": self.plan.trainable_components,
            "code_layout": {k: list(v) for k, v in self.layout.items()},
            "baseline": {"uri": self.stage.baseline_uri, "fingerprint": self.stage.baseline_fingerprint},
            "wandb": {
                "id": self.tracker.run_id,
                "project": self.tracker.project,
                "entity": self.tracker.entity,
                "mode": self.tracker.mode,
            },
            "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
            "best": self.best,
            "version": __version__,
            "world_size": self.accelerator.num_processes,
            "data": {"skipped": sorted(self.bad_files)},
        }

    def _render_samples(self, out_dir: Path, step: int) -> None:
        if not self.cfg.samples.enabled:
            return
        from siren.train.samples import render_samples

        was_training = [m.training for m in self.core.modules()]
        self.core.eval()
        try:
            render_samples(self, out_dir, step)
        finally:
            for m, t in zip(self.core.modules(), was_training, strict=True):
                m.training = t

    def _share(self, step_path: Path, step: int, is_best: bool) -> None:
        from siren.artifacts import artifact_name, index_checkpoint, log_checkpoint_artifact

        aliases = [f"step_{step}", "latest"] + (["best"] if is_best else [])
        name = artifact_name(self.stage.name, self.run_name)
        index_checkpoint(step_path, self.tracker.entity, self.cfg.tracking.project, name, aliases)
        self.tracker.flush()  # the W&B thread is idle while the main thread uses the run
        if self.tracker.run is not None:
            log_checkpoint_artifact(
                self.tracker.run, step_path, name, aliases, {"step": step, "stage": self.stage.name}
            )

    def finish(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        self.tracker.finish()
        acc.end_training()
        if acc.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train_from_cli(
    config: str,
    overrides: list[str],
    *,
    run_dir: str | None = None,
    fresh: bool = False,
    init_from: str | None = None,
    init_components: str | None = None,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = list(overrides) + ([f"run_dir={run_dir}"] if run_dir else [])
    cfg = load_config(config, overrides)
    trainer = Trainer(
        cfg, fresh=fresh, init_from=init_from, init_components=init_components.split(",") if init_components else None
    )
    last = trainer.fit()
    if trainer.is_main:
        keys = [k for k in ("train/loss", "drift/sem/agreement", "rate/bps_entropy", "frozen/ok") if k in last]
        print(json.dumps({"run_dir": str(cfg.run_dir), "step": cfg.train.max_steps, **{k: last[k] for k in keys}}))
    return 0


__all__ = ["Trainer", "train_from_cli", "read_metrics"]
