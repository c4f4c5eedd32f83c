"""What a stage may see of the run: the narrow context the trainer hands to `Stage.setup` (and to the hooks).

Stages never touch the trainer: device, rank, world size, a barrier, the run dir and the utterance lists are all they
get. `shard` is the one way to split work across ranks (DESIGN §17: `items[rank::world]`, then a reduction — never one
rank working while the others wait at a barrier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class StageContext:
    device: torch.device
    rank: int
    world: int
    run_dir: Path
    train_utterances: Sequence[Any]
    val_utterances: Sequence[Any]
    barrier: Callable[[], None]
    mixed_precision: str = "no"
    # The datasets themselves, for caches that attach per-item views to them (train; val or None).
    train_dataset: Any = None
    val_dataset: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dist(self):
        """The same process-group facts in the form the cache subsystem takes."""
        from siren.data.cache import Dist

        return Dist(rank=self.rank, world=self.world, barrier=self.barrier)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world-th item from position `rank` (disjoint, covering, stable)."""
        return list(items[self.rank :: self.world])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects only: counts, dicts of floats)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out
