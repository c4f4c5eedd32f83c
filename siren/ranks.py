"""The processes of one job, as every part of SIREN that splits work sees them: the trainer's `StageContext`, the
data caches (`siren.data.cache`), `siren cache` and `siren verify` all take one `Ranks`.

The rule they share (docs/scale.md): each rank takes its share `items[rank::world]`, works on it alone, and the
shares are combined afterwards in an order that does not depend on the number of processes; barriers only separate
phases, so no rank works while the others wait. A plain, unlaunched process is rank 0 of 1: every method works
without a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch

from siren.errors import SirenError

T = TypeVar("T")


class PeerFailed(SirenError):
    """`Ranks.agree`: the work failed on another rank (this rank's own part went through)."""


def _no_barrier() -> None:
    pass


def _peer_failed(peers: str) -> Exception:
    return PeerFailed(f"failed on another process ({peers})")


@dataclass(frozen=True)
class Ranks:
    """This process's place in its group: `rank` of `world`, the group's `barrier`, and the `device` it computes on."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = _no_barrier
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def of(cls, state) -> Ranks:
        """The ranks of an accelerate `PartialState` or `Accelerator` (both name these facts alike)."""
        return cls(state.process_index, state.num_processes, state.wait_for_everyone, state.device)

    @classmethod
    def launched(cls, timeout_s: float | None = None) -> Ranks:
        """Join the process group `accelerate launch` set up (or be rank 0 of 1 without one). On a CPU-only machine
        the ranks join one gloo group (launch/accelerate/cpu_ddp.yaml); `timeout_s` bounds how long a rank waits for
        a stuck peer at one collective."""
        from accelerate import PartialState

        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        return cls.of(PartialState(cpu=not torch.cuda.is_available(), **kwargs))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: T) -> T:
        """This rank's share of `items` (a sequence, range or array; the same type back): every world-th item from
        position `rank`. The shares are disjoint, together cover `items`, and keep its order."""
        return items[self.rank :: self.world]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects only: counts, dicts of floats)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def which_failed(self, ok: bool) -> list[int]:
        """The ranks whose `ok` is False, agreed on by all (a collective: every rank calls it at the same point).

        One small all-reduce of a `world`-long flag vector on the group's device; nothing when `world` is 1. Used where
        each rank checks its own copy of something (the trainer's frozen weights) and a failure on one rank must stop
        every rank at the same step, not leave rank 0 reporting success while the others die."""
        if self.world == 1:
            return [] if ok else [self.rank]
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = 0 if ok else 1
        torch.distributed.all_reduce(flags)
        return [r for r, bad in enumerate(flags.tolist()) if bad]

    def agree(
        self, fn: Callable[[], T], *, gather: bool = False, failed: Callable[[str], Exception] = _peer_failed
    ) -> Any:
        """Run `fn` on every rank, then exchange whether it failed: when any rank failed every rank raises (the failed
        one its own exception, the others `failed("rank R: <error>; ...")`), so no rank waits for a crashed peer.
        → `fn`'s result, or with `gather` every rank's result in rank order (small picklable objects only)."""
        try:
            result, error = fn(), None
        except Exception as exc:  # re-raised below, once the peers have heard of it
            result, error = None, exc
        said = f"{type(error).__name__}: {error}" if error is not None else None
        out = self.gather((said, result if gather else None)) if self.world > 1 else [(said, result)]
        if error is not None:
            raise error
        peers = [f"rank {r}: {e}" for r, (e, _) in enumerate(out) if e is not None]
        if peers:
            raise failed("; ".join(peers))
        return [res for _, res in out] if gather else result
