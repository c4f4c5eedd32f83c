"""Settings that used to do something other than what a user would think, silently: each now says so or is exact."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from helpers import reset_accelerate, stage_config
from hypothesis import given, settings
from hypothesis import strategies as st

from siren.errors import SirenError
from siren.models.precision import reduced_precision_warning
from siren.train.batches import ShardedBatches, per_process_batch


# ------------------------------------------------------------------------------------------------------ batch sizes
def _train(batch_size=8, grad_accum=1, global_batch_size=None):
    return SimpleNamespace(batch_size=batch_size, grad_accum=grad_accum, global_batch_size=global_batch_size)


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 16), accum=st.integers(1, 8), per=st.integers(1, 64), n_batches=st.integers(1, 5))
def test_a_global_batch_is_the_same_utterances_whatever_the_process_count(world, accum, per, n_batches):
    """With train.global_batch_size, the processes together take the same utterances per optimizer step as one
    process alone would: the union of the ranks' micro-batches of a step is the one-process step's batch."""
    g = world * accum * per
    assert per_process_batch(_train(global_batch_size=g, grad_accum=accum), world) == per
    n = g * n_batches
    one = ShardedBatches(n, per_process_batch(_train(global_batch_size=g, grad_accum=accum), 1), 1, 0, seed=3)
    ranks = [ShardedBatches(n, per, world, r, seed=3) for r in range(world)]
    single = one.epoch(0)
    for b in range(ranks[0].num_batches):
        union = sorted(i for r in ranks for i in r.epoch(0)[b])
        assert union == sorted(single[b])


@pytest.mark.parametrize("g, world, accum", [(10, 4, 1), (8, 2, 3), (0, 1, 1), (-4, 2, 1)])
def test_a_global_batch_that_does_not_split_evenly_is_refused(g, world, accum):
    with pytest.raises(SirenError, match=rf"global_batch_size={g} does not split evenly over {world} process"):
        per_process_batch(_train(global_batch_size=g, grad_accum=accum), world)


def test_without_a_global_batch_the_batch_is_per_process():
    assert per_process_batch(_train(batch_size=4), 1) == per_process_batch(_train(batch_size=4), 8) == 4


# ------------------------------------------------------------------------------------------ reduced precision on CPU
def test_reduced_precision_on_a_cpu_warns_with_its_cost():
    for mp in ("bf16", "fp16"):
        msg = reduced_precision_warning("cpu", mp)
        assert msg and mp in msg and "slower" in msg and "train.mixed_precision=no" in msg
    assert reduced_precision_warning("cpu", "no") is None
    assert reduced_precision_warning("cpu", None) is None
    assert reduced_precision_warning("cuda", "bf16") is None


@pytest.mark.parametrize("mixed_precision, warned", [("bf16", True), ("no", False)])
def test_a_cpu_run_in_bf16_says_what_it_costs(corpus_dir, teacher_dir, tmp_path, caplog, mixed_precision, warned):
    from siren.train.trainer import Trainer

    cfg = stage_config(
        "vocoder",
        corpus_dir,
        teacher_dir,
        tmp_path / "run",
        **{"train.mixed_precision": mixed_precision, "train.global_batch_size": 2, "tracking.mode": "disabled"},
    )
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="siren"):
        tr = Trainer(cfg)
    try:
        said = [r.getMessage() for r in caplog.records if "on a CPU" in r.getMessage()]
        assert bool(said) == warned, said
        assert tr.cfg.train.batch_size == 2 and tr.batches.batch_size == 2  # from the global batch (helpers say 4)
    finally:
        tr.finish()
        reset_accelerate()
