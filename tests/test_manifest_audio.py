"""Manifests (errors name file and line) and audio loading (every failure names the file)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from siren.data.audio import AudioError, audio_info, load_audio, save_audio
from siren.data.manifest import ManifestError, Utterance, read_manifest, write_manifest


def tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, data: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), data, sr, subtype=subtype)
    return path


# ------------------------------------------------------------------------------------------------------------ manifest
def test_manifest_round_trip_relative_paths(tmp_path):
    (tmp_path / "wavs").mkdir()
    utts = [
        Utterance("a", str(tmp_path / "wavs" / "a.wav"), 1.5, "s1", "hello there"),
        Utterance("b", "/elsewhere/b.wav", 2.0, "s2"),
    ]
    m = write_manifest(tmp_path / "m.jsonl", utts)
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    assert lines[0]["path"] == "wavs/a.wav"  # inside the manifest dir → relative
    assert lines[1]["path"] == "/elsewhere/b.wav"
    assert read_manifest(m) == utts
    # Relative paths resolve against the manifest's dir, not the cwd: moving the directory keeps it valid.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "m.jsonl").write_text(m.read_text())
    assert read_manifest(moved / "m.jsonl")[0].path == str((moved / "wavs" / "a.wav").resolve())
    assert not list(tmp_path.glob(".*.tmp"))


def test_manifest_id_defaults_to_stem(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"path": "x/utt_7.wav", "duration": 1, "speaker": "s"}\n\n')
    (u,) = read_manifest(p)
    assert u.id == "utt_7" and u.text == "" and u.duration == 1.0


@pytest.mark.parametrize(
    "second_line, needle",
    [
        ("{not json", "invalid JSON"),
        ('{"path": "b.wav", "speaker": "s"}', "duration"),
        ('{"path": "b.wav", "duration": "long", "speaker": "s"}', "duration"),
        ("[1, 2]", "JSON object"),
        ('{"id": "a", "path": "c.wav", "duration": 1, "speaker": "s"}', "duplicate id"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, second_line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "a", "path": "a.wav", "duration": 1, "speaker": "s"}\n' + second_line + "\n")
    with pytest.raises(ManifestError, match=needle) as ei:
        read_manifest(p)
    assert f"{p}:2" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_manifest_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------------------------------------------- audio
def test_load_good_file_mono_float32_16k(tmp_path):
    p = write_wav(tmp_path / "good.wav", tone(0.5, 16000))
    wav = load_audio(p)
    assert wav.dtype == torch.float32 and wav.shape == (8000,)
    assert torch.allclose(wav, torch.from_numpy(tone(0.5, 16000)), atol=1e-3)
    assert audio_info(p) == (16000, 8000, 1)


def test_load_stereo_is_mixed_down(tmp_path):
    left, right = tone(0.25, 16000, 300), tone(0.25, 16000, 700)
    p = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    wav = load_audio(p)
    assert wav.shape == (4000,)
    assert torch.allclose(wav, torch.from_numpy((left + right) / 2), atol=1e-6)
    assert audio_info(p)[2] == 2


def test_load_8k_is_resampled(tmp_path):
    p = write_wav(tmp_path / "low.wav", tone(0.5, 8000, 200), sr=8000)
    wav = load_audio(p, sample_rate=16000)
    assert wav.shape == (8000,) and wav.dtype == torch.float32
    # A 200 Hz tone stays a 200 Hz tone: its spectrum peaks at bin 200 * N / 16000.
    peak = int(torch.fft.rfft(wav).abs().argmax())
    assert abs(peak - 200 * 8000 // 16000) <= 1


def test_save_audio_atomic_clamped_pcm16(tmp_path):
    target = tmp_path / "deep" / "dir" / "out.wav"
    save_audio(target, torch.tensor([[0.0, 2.0, -3.0, 0.5]]), 16000)
    assert sf.info(str(target)).subtype == "PCM_16"
    back = load_audio(target)
    assert back.abs().max() <= 1.0 and back[1] > 0.99 and back[2] < -0.99
    assert [p.name for p in target.parent.iterdir()] == ["out.wav"]
    with pytest.raises(ValueError, match="shape"):
        save_audio(tmp_path / "x.wav", torch.zeros(2, 10), 16000)


def _empty(p: Path) -> Path:
    return write_wav(p, np.zeros(0, dtype=np.float32))


def _corrupt(p: Path) -> Path:
    p.write_bytes(b"RIFF\x00\x01garbage that is not a wav file" * 10)
    return p


def _nan(p: Path) -> Path:
    data = tone(0.5, 16000)
    data[100] = np.nan
    return write_wav(p, data, subtype="FLOAT")


def _short(p: Path) -> Path:
    return write_wav(p, tone(0.1, 16000))


@pytest.mark.parametrize(
    "make, reason",
    [
        (_empty, "empty"),
        (_corrupt, "unreadable"),
        (_nan, "non-finite"),
        (_short, "too short"),
        (lambda p: p, "not found"),
    ],
    ids=["empty", "corrupt", "nan", "short", "missing"],
)
def test_bad_audio_raises_naming_file(tmp_path, make, reason):
    p = make(tmp_path / "bad_file.wav")
    with pytest.raises(AudioError, match=reason) as ei:
        load_audio(p, min_seconds=0.3)
    assert "bad_file.wav" in str(ei.value) and ei.value.path == str(p) and reason in ei.value.reason


def test_audio_info_errors_and_pickling(tmp_path):
    import pickle

    with pytest.raises(AudioError, match="not found"):
        audio_info(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="unreadable"):
        audio_info(_corrupt(tmp_path / "c.wav"))
    err = pickle.loads(pickle.dumps(AudioError("/x.wav", "why")))
    assert (err.path, err.reason, str(err)) == ("/x.wav", "why", "/x.wav: why")
