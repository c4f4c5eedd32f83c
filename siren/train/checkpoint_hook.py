"""Checkpoint hook: frozen fingerprints checked, `step_N` written atomically, samples rendered, shared (docs/training.md#checkpoints-and-resume).

All ranks take part in `accelerator.save_state` (optimizer, scheduler, scaler and each rank's RNG); only rank 0 writes
components, `meta.json`, samples and the `latest` pointer, and applies retention. Rank 0 commits (renames the temporary
directory into place) only once every rank has written its state: accelerate's `save_state` ends without a barrier, so a
rank still writing its RNG file would otherwise write into a directory that has just been renamed away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from siren.checkpoints import layout as ckpt


class CheckpointHook:
    def __init__(
        self,
        run_dir: Path,
        accelerator,
        registry,
        saved_modules: dict[str, nn.Module],
        *,
        keep_last: int,
        keep_steps: list[int],
        best_metric: str,
        best_mode: str,
        best: dict | None,
        meta: Callable[[int, dict[str, float]], dict],
        window_state: Callable[[], dict | None],
        samples: Callable[[Path, int], None] | None,
        export: Callable[[Path], None] | None = None,
        share: Callable[[Path, int, bool], None] | None,
    ):
        self.run_dir, self.accelerator, self.registry, self.saved_modules = (
            run_dir,
            accelerator,
            registry,
            saved_modules,
        )
        self.keep_last, self.keep_steps, self.best_metric, self.best_mode = (
            keep_last,
            keep_steps,
            best_metric,
            best_mode,
        )
        self.best = best or {"step": None, "value": None}
        self.meta, self.window_state, self.samples, self.share = meta, window_state, samples, share
        self.export = export
        self.frozen_ok = 1.0

    def check_frozen(self) -> None:
        """Full sha256 of every frozen component; a change raises FrozenViolation naming it (frozen/ok → 0 first)."""
        self.frozen_ok = 0.0
        self.registry.check_frozen()
        self.frozen_ok = 1.0

    def __call__(
        self, step: int, metrics: dict[str, float], consider_best: bool = True, frozen_checked: bool = False
    ) -> Path | None:
        acc = self.accelerator
        if not frozen_checked:  # the trainer checks (and logs frozen/ok) before it calls the hook
            self.check_frozen()
        is_main = acc.is_main_process
        tmp = ckpt.tmp_step_dir(self.run_dir, step)
        if is_main:
            tmp = ckpt.begin_step(self.run_dir, step)
        acc.wait_for_everyone()
        self.save_trainer_state(tmp / "trainer")
        final = None
        if is_main:
            window = self.window_state()
            if window is not None:
                torch.save(window, tmp / "trainer" / "codebook_window.pt")
            ckpt.save_components(tmp, self.saved_modules)
            if self.export is not None:  # files for use outside SIREN (e.g. the distilled student)
                self.export(tmp)
            is_best = consider_best and self._update_best(step, metrics)
            meta = self.meta(step, metrics)
            if self.samples is not None:
                self.samples(tmp / "samples", step)
            final = ckpt.commit_step(self.run_dir, tmp, step, meta)
            if self.share is not None:
                self.share(final, step, is_best)
            ckpt.apply_retention(self.run_dir, self.keep_last, self.keep_steps, self.best["step"])
        acc.wait_for_everyone()
        return final

    def save_trainer_state(self, path: Path) -> None:
        """Every rank writes its part of the trainer state into `path`; returns when all ranks have."""
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()

    def _update_best(self, step: int, metrics: dict[str, float]) -> bool:
        key, mode = self.best_metric, self.best_mode
        if key not in metrics or not math.isfinite(metrics[key]):
            return False
        v, b = metrics[key], self.best["value"]
        if b is None or (v < b if mode == "min" else v > b):
            self.best = {"step": step, "value": v, "metric": key}
            return True
        return False
