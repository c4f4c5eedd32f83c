"""`siren.ranks.Ranks`, the one rank helper of the trainer's StageContext, the caches and verify: shares that are
disjoint, cover everything and keep their order; gather in rank order; `agree` turning a failure on any rank into an
error on every rank; and a result that does not depend on the number of processes (two real gloo processes here).

These are the negative controls of the two `Ranks` mechanisms the launched tests rely on: the split (`verify_split`,
for verify's 2-process report in test_verify) and the failure vote (`frozen_check_all_ranks`, for a frozen weight moved
on one rank in test_scale). Switched off, the tests here fail; the launches then need no control launch of their own,
and their own positive checks (each rank judged its share; rank 0 logged the other rank's failure) fail without them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mechanisms
import numpy as np
import pytest
import torch
from helpers import fork_ranks

from siren.ranks import PeerFailed, Ranks
from siren.train.context import StageContext


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_are_disjoint_covering_and_ordered(world):
    items = [f"u{i}" for i in range(11)]
    shares = [Ranks(r, world).shard(items) for r in range(world)]
    assert sorted(x for s in shares for x in s) == sorted(items), f"the shares overlap or miss items: {shares}"
    assert sum(len(s) for s in shares) == len(items)
    for r, s in enumerate(shares):
        assert s == items[r::world] and s == sorted(s, key=items.index)  # every world-th, in order
    # the same type back: an array stays an array (the cache shards index arrays), a range a range
    arr = np.arange(11) * 3
    assert isinstance(Ranks(1, world).shard(arr), np.ndarray) and list(Ranks(1, world).shard(arr)) == list(
        arr[1::world]
    )
    assert Ranks(0, world).shard(range(11)) == range(0, 11, world)


def test_one_process_needs_no_group():
    ranks = Ranks()
    assert (ranks.rank, ranks.world, ranks.is_main) == (0, 1, True)
    ranks.barrier()
    assert ranks.gather({"n": 3}) == [{"n": 3}]
    assert ranks.agree(lambda: 7) == 7 and ranks.agree(lambda: 7, gather=True) == [7]
    with pytest.raises(ZeroDivisionError):  # its own error, unchanged
        ranks.agree(lambda: 1 / 0)
    assert ranks.which_failed(True) == [] and ranks.which_failed(False) == [0]


def test_the_stage_context_splits_and_gathers_through_ranks(monkeypatch, tmp_path):
    """StageContext.shard/gather and the cache's `ctx.ranks` are the one helper, not a copy of it."""
    seen = []
    real_shard, real_gather = Ranks.shard, Ranks.gather
    monkeypatch.setattr(Ranks, "shard", lambda self, items: seen.append("shard") or real_shard(self, items))
    monkeypatch.setattr(Ranks, "gather", lambda self, obj: seen.append("gather") or real_gather(self, obj))

    def barrier():
        seen.append("barrier")

    ctx = StageContext(torch.device("cpu"), 1, 3, tmp_path, [], [], barrier)
    assert ctx.shard(list(range(10))) == [1, 4, 7]
    assert seen == ["shard"]
    single = StageContext(torch.device("cpu"), 0, 1, tmp_path, [], [], barrier)
    assert single.gather(5) == [5] and seen[-1] == "gather"
    assert ctx.ranks == Ranks(1, 3, barrier, torch.device("cpu"))
    ctx.ranks.barrier()
    assert seen[-1] == "barrier"


# ------------------------------------------------------------------------------------------- two real processes
VALUES = [math.sin(i) * 10 ** (i % 7) for i in range(13)]  # floats whose sum depends on the order of adding


def _reduce(ranks: Ranks) -> float:
    """The pattern every user follows: each rank its share, gathered, combined in item order."""
    mine = ranks.shard(list(enumerate(VALUES)))
    pairs = sorted((p for share in ranks.gather(mine) for p in share), key=lambda p: p[0])
    return sum(v for _, v in pairs)


def _worker(rank: int, world: int, tmp: str) -> None:

    # Forked from the test process: in a negative control, the mechanism it switched off is off in this rank too.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/group", rank=rank, world_size=world)
    ranks = Ranks(rank, world, torch.distributed.barrier)
    out = {"sum": _reduce(ranks), "gathered": ranks.agree(lambda: rank * 10, gather=True)}
    out["which_failed"] = [ranks.which_failed(True), ranks.which_failed(rank != 1), ranks.which_failed(False)]

    def fails_on_rank_1():
        if rank == 1:
            raise RuntimeError("injected on rank 1")
        return "ok"

    try:
        ranks.agree(fails_on_rank_1, failed=lambda peers: PeerFailed(f"the job failed elsewhere ({peers})"))
        out["agree"] = "went on"
    except Exception as exc:
        out["agree"] = f"{type(exc).__name__}: {exc}"
    ranks.barrier()
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_two_processes_agree_and_reduce_as_one(tmp_path):
    fork_ranks(_worker, 2, 2, str(tmp_path))
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert out[0]["sum"] == out[1]["sum"] == _reduce(Ranks())  # bit-identical to the one-process result
    assert out[0]["gathered"] == out[1]["gathered"] == [0, 10]  # rank order, on every rank
    heard = [o["which_failed"] for o in out]
    assert heard == [[[], [1], [0, 1]]] * 2, f"a rank did not hear of the other's failure: {heard}"
    assert out[1]["agree"] == "RuntimeError: injected on rank 1"  # the failed rank raises its own error
    assert out[0]["agree"] == "PeerFailed: the job failed elsewhere (rank 1: RuntimeError: injected on rank 1)"


CONTROLS = [
    ("test_shares_are_disjoint_covering_and_ordered", "verify_split", r"the shares overlap or miss items"),
    ("test_two_processes_agree_and_reduce_as_one", "frozen_check_all_ranks", r"did not hear of the other's failure"),
]


@pytest.mark.parametrize("test_name, mechanism, failure", CONTROLS, ids=[m for _, m, _ in CONTROLS])
def test_fails_with_mechanism_disabled(test_name, mechanism, failure, request, monkeypatch):
    mechanisms.assert_fails_without(globals()[test_name], mechanism, failure, request, monkeypatch, {"world": 2})
