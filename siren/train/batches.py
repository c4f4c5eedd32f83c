"""The data order: one seeded permutation per epoch cut into global batches; rank r takes its slice (DESIGN §6, §17).

Every process computes the same permutation, so resuming at any step reproduces the data order exactly, and the
micro-batch index `step × grad_accum + k` alone says where in which epoch a batch comes from.
"""

from __future__ import annotations

import torch

from siren.errors import SirenError


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


class BatchStream:
    """`next(step, k)` → the collated micro-batch k of optimizer step `step` (0-based), host tensors.

    The DataLoader is re-created only at an epoch start or on a resume, so sequential reads stay one iterator.
    """

    def __init__(self, dataset, batches: ShardedBatches, grad_accum: int, num_workers: int):
        self.dataset, self.batches, self.grad_accum, self.num_workers = dataset, batches, grad_accum, num_workers
        self._it, self._epoch, self._next_micro = None, -1, -1

    def next(self, step: int, k: int) -> dict:
        micro = step * self.grad_accum + k
        epoch, pos = divmod(micro, self.batches.num_batches)
        if self._it is None or epoch != self._epoch or micro != self._next_micro:
            self._it, self._epoch = self._iterator(epoch, pos), epoch
        self._next_micro = micro + 1
        return next(self._it)

    def _iterator(self, epoch: int, start: int):
        from siren.data.datasets import collate

        self.dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.batches.epoch(epoch)[start:],
            collate_fn=collate,
            num_workers=self.num_workers,
        )
        return iter(loader)
