"""Optimizer, learning-rate schedule and the update of one step.

The schedule is a function of the global optimizer step only (docs/scale.md): the scheduler steps once per optimizer step
whatever the number of processes (Accelerate's default would step it once per process), and also on a skipped step,
so warmup and cosine end where `train.max_steps` says on 1 GPU or 64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def make_accelerator(mixed_precision: str | None):
    """The run's Accelerator. `step_scheduler_with_optimizer=False` is half of the schedule's guarantee above (the
    other half is `Updater.apply` stepping the scheduler once); mixed_precision None: the launcher's setting
    (accelerate config / ACCELERATE_MIXED_PRECISION) applies."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, launched CPU ranks do not join one gloo group
        mixed_precision=mixed_precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def make_scheduler(optimizer: torch.optim.Optimizer, scheduler: str, warmup_steps: int, max_steps: int):
    """The LR schedule as a LambdaLR over the global optimizer step (`lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, scheduler, warmup_steps, max_steps))


def lr_factor(step: int, scheduler: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the base LR for global optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    total = max(1, max_steps)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if scheduler == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if scheduler == "constant":
        return warm
    raise ValueError(f"unknown optim.scheduler {scheduler!r}; expected 'constant' or 'cosine'")


class Updater:
    """Unscale + clip, then step (or skip) the optimizer, then the scheduler; one call each per optimizer step.

    With a gradient scaler (fp16) every step goes through the scaler: it skips a step whose gradients overflowed and
    lowers its scale, which is the normal course of fp16 training and not a bad step. Without one, a non-finite step
    is skipped here.
    """

    def __init__(self, optimizer, scheduler, params: Sequence[torch.nn.Parameter], max_norm: float, scaler=None):
        self.optimizer, self.scheduler, self.params, self.max_norm, self.scaler = (
            optimizer,
            scheduler,
            list(params),
            max_norm,
            scaler,
        )

    def clip(self) -> torch.Tensor:
        """Total gradient norm before clipping (inf/nan when a gradient is not finite), as a 0-dim tensor."""
        if self.scaler is not None:
            self.scaler.unscale_(getattr(self.optimizer, "optimizer", self.optimizer))
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)

    def apply(self, finite: bool) -> bool:
        """Step when `finite` (or through the scaler); returns whether the weights were updated."""
        if self.scaler is not None:
            self.optimizer.step()  # the scaler steps or skips, and updates its scale either way
            stepped = not getattr(self.optimizer, "step_was_skipped", False)
        elif finite:
            self.optimizer.step()
            stepped = True
        else:
            stepped = False
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped
