"""The data order: one seeded permutation per epoch cut into global batches; rank r takes its slice (docs/training.md#checkpoints-and-resume, docs/scale.md).

Every process computes the same permutation, so resuming at any step reproduces the data order exactly, and the
micro-batch index `step × grad_accum + k` alone says where in which epoch a batch comes from.
"""

from __future__ import annotations

import logging
import os

import torch

from siren.errors import SirenError

log = logging.getLogger("siren")


def per_process_batch(train, world: int) -> int:
    """The micro-batch of each of `world` processes: `train.global_batch_size` ÷ (world × grad_accum) when that is
    set, else `train.batch_size` (per process, so the global batch then grows with the process count)."""
    g = train.global_batch_size
    if g is None:
        return train.batch_size
    per = world * train.grad_accum
    if g <= 0 or g % per:
        raise SirenError(
            f"train.global_batch_size={g} does not split evenly over {world} process(es) × train.grad_accum "
            f"{train.grad_accum}; use a multiple of {per}"
        )
    if g // per != train.batch_size:
        log.info(
            "train.global_batch_size=%d over %d process(es) × grad_accum %d: train.batch_size %d per process",
            g,
            world,
            train.grad_accum,
            g // per,
        )
    return g // per


class ShardedBatches:
    """Deterministic batches per (seed, epoch) for one rank of `world`."""

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


def usable_workers(asked: int) -> int:
    """`data.num_workers`, capped at the CPUs this process may run on: more loader processes than CPUs only compete
    with the training process for them (a recipe written for a GPU node, run on a laptop). Which batch a step gets never
    depends on the number of workers."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform
        cpus = os.cpu_count() or 1
    if asked > cpus:
        log.info("data.num_workers=%d capped at %d: this process may use %d CPU(s)", asked, cpus, cpus)
        return cpus
    return asked


class BatchStream:
    """`next(step, k)` → the collated micro-batch k of optimizer step `step` (0-based), host tensors.

    One DataLoader for the whole run (its workers persist); its sampler yields `(epoch, index)` keys from a start point
    through every later epoch, so an epoch change rebuilds nothing. Only a jump (a resume) restarts the iterator.
    """

    def __init__(self, dataset, batches: ShardedBatches, grad_accum: int, num_workers: int):
        from siren.data.datasets import EpochBatchSampler, collate

        self.batches, self.grad_accum = batches, grad_accum
        self.sampler = EpochBatchSampler(batches)
        num_workers = usable_workers(num_workers)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if num_workers > 0 else None,
        )
        self._it, self._next_micro = None, -1

    def next(self, step: int, k: int) -> dict:
        micro = step * self.grad_accum + k
        if self._it is None or micro != self._next_micro:
            self.sampler.start(*divmod(micro, self.batches.num_batches))
            self._it = iter(self.loader)
        self._next_micro = micro + 1
        return next(self._it)
