"""`siren manifest`: fake LibriSpeech / LibriTTS / VCTK / flat trees (audio made here) → every manifest field checked."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import siren_cmd

from siren.data.manifest import ManifestError, read_manifest, read_table
from siren.data.scan import build_manifest, speaker_order, split_by_speaker


def audio(path: Path, seconds: float, sr: int, channels: int = 1, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * sr)
    data = np.random.default_rng(len(str(path))).normal(0, 0.1, (n, channels)).astype(np.float32)
    sf.write(str(path), data, sr, format=fmt)
    return path


def librispeech_tree(root: Path) -> dict[str, tuple[str, float]]:
    """3 speakers × 2 utterances, 16 kHz flac, transcripts per chapter; returns id → (text, seconds)."""
    want = {}
    for spk in ("19", "26", "103"):
        chap = f"{spk}0"
        d = root / "train-clean-100" / spk / chap
        lines = []
        for k in range(2):
            uid = f"{spk}-{chap}-{k:04d}"
            seconds = 0.5 + 0.25 * k
            audio(d / f"{uid}.flac", seconds, 16000)
            lines.append(f"{uid} WORDS OF {spk} NUMBER {k}")
            want[uid] = (f"WORDS OF {spk} NUMBER {k}", seconds)
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return want


def test_librispeech_every_field(tmp_path):
    want = librispeech_tree(tmp_path / "LibriSpeech")
    (tmp_path / "LibriSpeech" / "train-clean-100" / "19" / "190" / "19-190-0009.flac").write_bytes(b"fLaC junk")
    summary = build_manifest([tmp_path / "LibriSpeech"], tmp_path / "m", val_speakers=1, jobs=3, progress=False)
    assert summary["layouts"] == {str((tmp_path / "LibriSpeech").resolve()): "librispeech"}
    rows = read_manifest(tmp_path / "m" / "train.jsonl") + read_manifest(tmp_path / "m" / "val.jsonl")
    assert sorted(u.id for u in rows) == sorted(want)
    for u in rows:
        text, seconds = want[u.id]
        assert u.text == text and u.speaker == u.id.split("-")[0]
        assert u.sample_rate == 16000 and u.channels == 1 and u.duration == pytest.approx(seconds, abs=1e-4)
        st = Path(u.path).stat()
        assert Path(u.path).name == f"{u.id}.flac" and u.size == st.st_size and u.mtime == st.st_mtime
    rejected = [json.loads(x) for x in (tmp_path / "m" / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["id"] == "19-190-0009" and "unreadable" in rejected[0]["reason"]
    val_spk = {u.speaker for u in read_manifest(tmp_path / "m" / "val.jsonl")}
    train_spk = {u.speaker for u in read_manifest(tmp_path / "m" / "train.jsonl")}
    assert len(val_spk) == 1 and not val_spk & train_spk and summary["rejected"] == 1


def test_libritts_vctk_flat_and_auto_detection(tmp_path):
    tts = tmp_path / "LibriTTS" / "train-clean-100" / "84" / "121123"
    audio(tts / "84_121123_000007_000001.wav", 0.6, 24000)
    (tts / "84_121123_000007_000001.normalized.txt").write_text("Hello, world.\n")
    vctk = tmp_path / "VCTK"
    audio(vctk / "wav48_silence_trimmed" / "p225" / "p225_001_mic1.flac", 0.4, 48000, channels=2)
    (vctk / "txt" / "p225").mkdir(parents=True)
    (vctk / "txt" / "p225" / "p225_001.txt").write_text("Please call Stella.\n")
    flat = tmp_path / "mine"
    audio(flat / "alice" / "take1.ogg", 0.5, 22050, fmt="OGG")
    audio(flat / "bob" / "take1.wav", 0.3, 8000)
    (flat / "bob" / "take1.txt").write_text("narrowband\n")
    summary = build_manifest([tmp_path / "LibriTTS", vctk, flat], tmp_path / "m", val=0.0, progress=False)
    assert sorted(summary["layouts"].values()) == ["flat", "libritts", "vctk"]
    by_id = {u.id: u for u in read_manifest(tmp_path / "m" / "train.jsonl")}
    assert set(by_id) == {"84_121123_000007_000001", "p225_001_mic1", "alice/take1", "bob/take1"}
    u = by_id["84_121123_000007_000001"]
    assert (u.speaker, u.text, u.sample_rate, u.channels) == ("84", "Hello, world.", 24000, 1)
    u = by_id["p225_001_mic1"]
    assert (u.speaker, u.text, u.sample_rate, u.channels) == ("p225", "Please call Stella.", 48000, 2)
    assert u.duration == pytest.approx(0.4, abs=1e-4)
    assert (by_id["alice/take1"].speaker, by_id["alice/take1"].sample_rate) == ("alice", 22050)
    assert (by_id["bob/take1"].speaker, by_id["bob/take1"].text) == ("bob", "narrowband")
    assert read_table(tmp_path / "m" / "val.jsonl").duration.shape == (0,)
    # A forced layout overrides detection.
    build_manifest([flat], tmp_path / "f", layout="flat", val=0.0, progress=False)
    assert {u.speaker for u in read_manifest(tmp_path / "f" / "train.jsonl")} == {"alice", "bob"}


def test_ids_stable_and_duplicates_named(tmp_path):
    librispeech_tree(tmp_path / "a")
    build_manifest([tmp_path / "a"], tmp_path / "m1", val=0.3, progress=False)
    build_manifest([tmp_path / "a"], tmp_path / "m2", val=0.3, jobs=1, progress=False)
    for split in ("train.jsonl", "val.jsonl"):
        one = [(u.id, u.speaker) for u in read_manifest(tmp_path / "m1" / split)]
        assert one == [(u.id, u.speaker) for u in read_manifest(tmp_path / "m2" / split)]
    librispeech_tree(tmp_path / "b")
    with pytest.raises(ManifestError, match=r"duplicate id '103-1030-0000'.*/a/.*/b/"):
        build_manifest([tmp_path / "a", tmp_path / "b"], tmp_path / "m3", progress=False)


def test_split_is_by_speaker_and_stable_when_speakers_are_added():
    from siren.data.manifest import Utterance

    utts = [Utterance(f"{s}-{k}", f"/{s}/{k}.wav", 1.0, s) for s in map(str, range(20)) for k in range(5)]
    train, val = split_by_speaker(utts, 0.2, None)
    assert len(val) == 20 and not {u.speaker for u in train} & {u.speaker for u in val}
    more = utts + [Utterance(f"new-{k}", f"/new/{k}.wav", 1.0, "new") for k in range(5)]
    old = speaker_order(sorted({u.speaker for u in utts}))
    assert [s for s in speaker_order(sorted({u.speaker for u in more})) if s != "new"] == old
    _, val2 = split_by_speaker(utts, None, 3)
    assert len({u.speaker for u in val2}) == 3
    with pytest.raises(ManifestError, match="at least one must stay in train"):
        split_by_speaker(utts, None, 20)
    one = [Utterance("x", "/x.wav", 1.0, "solo")]
    with pytest.raises(ManifestError, match="only 1 speaker"):
        split_by_speaker(one, 0.5, None)


def test_cli(tmp_path, subprocess_env):
    librispeech_tree(tmp_path / "ls")
    r = subprocess.run(
        siren_cmd("manifest", str(tmp_path / "ls"), "--out", str(tmp_path / "m"), "--val-speakers", "1"),
        env=subprocess_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["train"] == 4 and summary["val"] == 2 and summary["speakers"] == {"train": 2, "val": 1}
    assert "reading headers" in r.stderr  # the progress bar
    r = subprocess.run(
        siren_cmd("manifest", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")),
        env=subprocess_env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_manifest_then_train_on_librispeech_and_24k_libritts(tmp_path, teacher_dir):
    """A new user's path: `siren manifest` on the trees, then the codec demo config on them, no script in between."""
    from helpers import stage_config

    from siren.train.tracking import read_metrics
    from siren.train.trainer import Trainer

    for spk in ("19", "26", "103"):
        d = tmp_path / "ls" / "dev-clean" / spk / "1"
        for k in range(3):
            audio(d / f"{spk}-1-{k:04d}.flac", 1.2 + 0.1 * k, 16000)
    for spk in ("84", "85"):
        d = tmp_path / "tts" / "train-clean-100" / spk / "7"
        for k in range(3):
            audio(d / f"{spk}_7_{k:06d}.wav", 1.3, 24000)
            (d / f"{spk}_7_{k:06d}.normalized.txt").write_text("words\n")
    audio(tmp_path / "tts" / "train-clean-100" / "85" / "7" / "85_7_narrow.wav", 1.5, 8000)
    build_manifest([tmp_path / "ls", tmp_path / "tts"], tmp_path / "m", val_speakers=1, progress=False)
    overrides = {"data.train": str(tmp_path / "m" / "train.jsonl"), "data.val": str(tmp_path / "m" / "val.jsonl")}
    cfg = stage_config(
        "codec",
        tmp_path,
        teacher_dir,
        tmp_path / "run",
        **overrides,
        **{"train.max_steps": 3, "train.checkpoint_every": 3, "samples.enabled": "false"},
    )
    tr = Trainer(cfg)
    skipped = {**tr.dataset.skipped, **tr.val_dataset.skipped}
    assert [Path(p).name for p, why in skipped.items() if "narrowband" in why] == ["85_7_narrow.wav"]  # and counted
    rates = {int(tr.dataset.table.sample_rate[r]) for r in tr.dataset.rows}
    assert 24000 in rates  # LibriTTS rows train (resampled when read)
    tr.fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["train/loss"]) for r in rows)
