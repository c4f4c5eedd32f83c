"""`CheckpointMeta` is the schema of `meta.json`: what is written reads back equal, and a file that does not follow the
schema is refused with an error naming the file and the field (never half-read into a dict)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siren.checkpoints import layout as ckpt
from siren.checkpoints.meta import CheckpointMeta, MetaError

names = st.text("abcdefghij_", min_size=1, max_size=8)
json_leaf = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8)


@settings(max_examples=40, deadline=None)
@given(
    step=st.integers(0, 10**9),
    stage=st.sampled_from(["codec", "adapt", "distill", "flow", "vocoder"]),
    fingerprints=st.dictionaries(names, st.text("0123456789abcdef", min_size=64, max_size=64), max_size=5),
    frozen=st.lists(names, max_size=5),
    metrics=st.dictionaries(names, st.floats(allow_nan=False, allow_infinity=False), max_size=5),
    config=st.dictionaries(names, json_leaf, max_size=5),
    world=st.integers(1, 512),
)
def test_meta_round_trips_through_its_file(tmp_path_factory, step, stage, fingerprints, frozen, metrics, config, world):
    meta = CheckpointMeta(
        step=step,
        stage=stage,
        config=config,
        fingerprints=fingerprints,
        frozen=frozen,
        metrics=metrics,
        world_size=world,
    )
    run = tmp_path_factory.mktemp("run")
    tmp = ckpt.begin_step(run, step)
    final = ckpt.commit_step(run, tmp, step, meta)
    assert ckpt.read_meta(final) == meta
    assert ckpt.latest_step(run) == step


def _written(tmp_path, raw) -> object:
    step = tmp_path / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps(raw))
    return step


GOOD = {"step": 3, "stage": "codec", "config": {}, "fingerprints": {}}


def test_a_complete_meta_reads(tmp_path):
    assert ckpt.read_meta(_written(tmp_path, GOOD)).stage == "codec"


@pytest.mark.parametrize(
    "raw, match",
    [
        ({k: v for k, v in GOOD.items() if k != "fingerprints"}, r"missing field\(s\) fingerprints"),
        ({**GOOD, "fingerprint": {}}, r"unknown field\(s\) fingerprint"),
        ({**GOOD, "step": "3"}, r"field step is '3', not a int"),
        ({**GOOD, "step": True}, r"field step is True"),
        ({**GOOD, "config": []}, r"field config is \[\], not a dict"),
        ([1, 2], r"holds a list, not an object"),
    ],
)
def test_a_meta_off_the_schema_is_refused_naming_the_file_and_field(tmp_path, raw, match):
    step = _written(tmp_path, raw)
    with pytest.raises(MetaError, match=match) as err:
        ckpt.read_meta(step)
    assert str(step / "meta.json") in str(err.value)


def test_commit_refuses_a_meta_of_another_step(tmp_path):
    tmp = ckpt.begin_step(tmp_path, 5)
    with pytest.raises(Exception, match="step 4.*committed as step 5"):
        ckpt.commit_step(tmp_path, tmp, 5, CheckpointMeta(step=4, stage="codec", config={}, fingerprints={}))
    assert ckpt.latest_step(tmp_path) is None  # nothing was published
