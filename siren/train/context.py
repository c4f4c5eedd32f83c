"""What a stage may see of the run: the narrow context the trainer hands to `Stage.setup` (and to the hooks).

Stages never touch the trainer: device, rank, world size, a barrier, the run dir and the utterance lists are all they
get. `shard` is the one way to split work across ranks (`items[rank::world]`, then a reduction — never one rank
working while the others wait at a barrier; docs/scale.md). The rank facts are `siren.ranks.Ranks`, the one helper the
trainer, the caches and verify share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from siren.ranks import Ranks

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
    def ranks(self) -> Ranks:
        """This process's place in the run's process group (rank, world, barrier, device)."""
        return Ranks(rank=self.rank, world=self.world, barrier=self.barrier, device=self.device)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world-th item from position `rank` (disjoint, covering, stable)."""
        return list(self.ranks.shard(items))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects only: counts, dicts of floats)."""
        return self.ranks.gather(obj)
