"""Property: every manifest row is judged the same by every path that reads or judges it.

Paths: the chunked reader (`read_table`, one json.loads per chunk), the line-by-line reader (the same with one line per
chunk, and `_parse_line` per line), `read_manifest` + `usable_utterances` (samples, verify), the dataset opening
(`AudioDataset` start-up exclusions), and `siren manifest` (scan: its duration rule, and the rows it writes read back).
They must agree on refusing the file (and on the line and reason), and on keep/skip and the reason of every row."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import siren.data.manifest as manifest
from siren.data.datasets import AudioDataset
from siren.data.manifest import (
    ManifestError,
    ManifestTable,
    duration_problem,
    read_manifest,
    read_table,
    row_problems,
    usable_utterances,
    write_manifest,
)

MISSING = object()
TARGET_SR = 16000
JUDGES = [(0, "convert"), (5120, "resample_down"), (8000, "skip")]  # (min_samples, on_format_mismatch)

durations = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0, 0.0, -0.0, -1.0, 0.1, 0.16, 0.32, 0.31999, 0.5, 35.0, 1e-7, float("nan"), float("inf")]),
    st.integers(-5, 40),
    st.sampled_from([None, "1.5", "long", True, False, [1.0]]),
)
rates = st.one_of(
    st.sampled_from([MISSING, None, 8000, 16000, 22050, 24000, 48000, 0, -16000, True, 16000.0, "16000"]),
    st.integers(-10, 200_000),
)
channels = st.sampled_from([MISSING, None, 1, 2, 6, 0, -1, False, 1.0])
sizes = st.sampled_from([MISSING, None, 0, 1024, -1, 2.5, True])
mtimes = st.sampled_from([MISSING, None, 0, 1.7e9, -3.0, "yesterday", float("nan")])
paths = st.one_of(
    st.sampled_from([MISSING, "", None, 3, ["a.wav"]]),
    st.text(min_size=0, max_size=12).map(lambda t: f"d/{t}.wav"),
    st.sampled_from(["../up.wav", "/abs/x.flac", "a b/ü ñ.wav", "x.wav/", "./y.wav", "z\\w.wav"]),
)
texts = st.one_of(st.sampled_from([MISSING, None, 5]), st.text(max_size=10))
speakers = st.one_of(st.sampled_from([MISSING, None, 7]), st.text(max_size=6))

row = st.fixed_dictionaries(
    {
        "path": paths,
        "duration": st.one_of(st.just(MISSING), durations),
        "speaker": speakers,
        "sample_rate": rates,
        "channels": channels,
        "size": sizes,
        "mtime": mtimes,
        "text": texts,
    }
)


def _line(i: int, fields: dict) -> str:
    rec = {"id": f"u{i}"}
    for k, v in fields.items():
        if v is not MISSING:
            rec[k] = f"r{i}/{v}" if k == "path" and isinstance(v, str) and v else v
    return json.dumps(rec, ensure_ascii=False)


def _read(path, chunk: int, monkeypatch) -> ManifestTable | str:
    monkeypatch.setattr(manifest, "_CHUNK", chunk)
    try:
        return read_table(path)
    except ManifestError as exc:
        return str(exc)


def _facts(t: ManifestTable) -> list[tuple]:
    return [
        (
            t.ids[i],
            t.path(i),
            repr(float(t.duration[i])),
            t.speaker(i),
            t.texts[i],
            int(t.sample_rate[i]),
            int(t.channels[i]),
            int(t.size[i]),
            repr(float(t.mtime[i])),
        )
        for i in range(len(t))
    ]


def _oracle(lines: list[str], path) -> str | None:
    """The first malformed line's error as the line-by-line reader gives it, or None."""
    for n, line in enumerate(lines, start=1):
        try:
            manifest._parse_line(line, f"{path}:{n}")
        except ManifestError as exc:
            return str(exc)
    return None


def check_all_paths_agree(rows: list[dict], tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.jsonl"
    lines = [_line(i, r) for i, r in enumerate(rows)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    chunked, by_line = _read(path, 20_000, monkeypatch), _read(path, 1, monkeypatch)
    expected_error = _oracle(lines, path)
    if expected_error is not None:  # refused by every reader, naming the same line and reason
        assert chunked == by_line == expected_error
        with pytest.raises(ManifestError) as err:
            read_manifest(path)
        assert str(err.value) == expected_error
        return
    assert isinstance(chunked, ManifestTable) and isinstance(by_line, ManifestTable)
    assert _facts(chunked) == _facts(by_line)
    utts = read_manifest(path)
    for min_samples, policy in JUDGES:
        judged = row_problems(chunked, TARGET_SR, min_samples, policy)
        assert row_problems(by_line, TARGET_SR, min_samples, policy) == judged
        keep, skipped = usable_utterances(utts, TARGET_SR, min_samples, policy)
        assert {u.id: why for u, why in skipped} == {chunked.ids[r]: why for r, why in judged.items()}
        assert [u.id for u in keep] == [chunked.ids[r] for r in range(len(chunked)) if r not in judged]
        # One row at a time (verify's --wav, a samples id) gives the same verdict as the whole table.
        for r, u in enumerate(utts):
            alone = row_problems(ManifestTable.from_utterances([u]), TARGET_SR, min_samples, policy)
            assert alone.get(0) == judged.get(r)
        # The dataset opening.
        if len(judged) == len(chunked):
            with pytest.raises(ManifestError, match="no usable utterances"):
                AudioDataset(chunked, TARGET_SR, None, min_samples, on_format_mismatch=policy)
        else:
            ds = AudioDataset(chunked, TARGET_SR, None, min_samples, on_format_mismatch=policy)
            assert ds.skipped == {chunked.path(r): why for r, why in judged.items()}
            assert ds.excluded_count == len(judged) and sorted(ds.rows.tolist()) == sorted(
                set(range(len(chunked))) - set(judged)
            )
    for r, u in enumerate(utts):
        # `siren manifest`: a file of this duration is rejected for the same reason the readers skip its row ...
        invalid = row_problems(chunked, TARGET_SR, 0, "convert").get(r)
        assert duration_problem(u.duration) == invalid
    # ... and the rows it writes (write_manifest) read back as the same rows with the same verdicts.
    back = tmp_path / "back" / "m.jsonl"
    write_manifest(back, utts)
    again = read_table(back)
    assert [(u.id, repr(u.duration), u.sample_rate, u.channels) for u in again] == [
        (u.id, repr(u.duration), u.sample_rate, u.channels) for u in utts
    ]
    for min_samples, policy in JUDGES:
        assert row_problems(again, TARGET_SR, min_samples, policy) == row_problems(
            chunked, TARGET_SR, min_samples, policy
        )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=1, max_size=6))
def test_every_path_judges_every_row_alike(rows, tmp_path, monkeypatch):
    check_all_paths_agree(rows, tmp_path, monkeypatch)


def _r(**kw) -> dict:
    base = {
        "path": "a.wav",
        "duration": 1.0,
        "speaker": "s",
        "sample_rate": MISSING,
        "channels": MISSING,
        "size": MISSING,
        "mtime": MISSING,
        "text": MISSING,
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "rows",
    [
        # A null duration: the chunked reader used to read it as NaN (a kept row) while the line reader refused it.
        [_r(duration=None)],
        [_r(), _r(duration=None), _r(duration="long")],
        # A string duration the chunked reader converted ("1.5" → 1.5) and a bool sample rate (True == 1 Hz).
        [_r(duration="1.5")],
        [_r(sample_rate=True)],
        # NaN / 0 / negative durations: kept as rows, skipped by every judge with one reason.
        [_r(duration=float("nan")), _r(duration=0), _r(duration=-2.0), _r(duration=0.2)],
        # A 1-frame-at-48-kHz clip: scan accepts it; a duration rounded on writing read back as 0 s.
        [_r(duration=1 / 48000)],
        # mtime that is not a number: a raw numpy ValueError from the chunked reader before.
        [_r(mtime="yesterday")],
        [_r(path="")],
    ],
)
def test_regressions(rows, tmp_path, monkeypatch):
    check_all_paths_agree(rows, tmp_path, monkeypatch)
