"""`siren manifest --val F` keeps speakers whole; when that gives val far more than F of the utterances, it says so."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from siren.data.manifest import Utterance
from siren.data.scan import split_by_speaker, split_notes


def corpus(sizes: list[int]) -> list[Utterance]:
    return [
        Utterance(id=f"s{s}_{i}", path=f"/x/s{s}_{i}.wav", speaker=f"spk{s}", duration=1.0, sample_rate=16000)
        for s, n in enumerate(sizes)
        for i in range(n)
    ]


def test_a_whole_speaker_in_val_is_said():
    utts = corpus([8, 5, 5, 5])  # 23 utterances; --val 0.02 asks for half of one
    train, val = split_by_speaker(utts, 0.02, None)
    notes = split_notes(utts, val, 0.02, None)
    assert len(notes) == 1 and f"val holds {len(val)}" in notes[0] and "of 23" in notes[0]
    assert all(u.speaker in notes[0] for u in val) and "--val-speakers" in notes[0]


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=12), val=st.floats(0.01, 0.6))
def test_the_note_appears_exactly_when_val_overshoots(sizes, val):
    utts = corpus(sizes)
    train, val_set = split_by_speaker(utts, val, None)
    assert {u.speaker for u in train}.isdisjoint({u.speaker for u in val_set}) and train
    notes = split_notes(utts, val_set, val, None)
    want = val * len(utts)
    assert bool(notes) == (len(val_set) > max(1.5 * want, want + 1))
    if notes:
        assert f"val holds {len(val_set)}" in notes[0]


def test_a_split_by_speaker_count_needs_no_note():
    utts = corpus([8, 5, 5, 5])
    _, val = split_by_speaker(utts, None, 2)
    assert split_notes(utts, val, None, 2) == []
