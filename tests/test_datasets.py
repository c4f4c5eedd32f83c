"""AudioDataset: bad files excluded up front or replaced deterministically, deterministic aligned crops, collate."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from siren.data.datasets import AudioDataset, collate, speaker_balanced_subset
from siren.data.manifest import Utterance

SR = 16000
ALIGN = 2560


def make_wav(path: Path, seconds: float, sr: int = SR, freq: float = 220.0, nan: bool = False) -> Utterance:
    t = np.arange(int(seconds * sr)) / sr
    data = (0.3 * np.sin(2 * math.pi * freq * t) + 0.01 * t).astype(np.float32)
    if nan:
        data[len(data) // 2] = np.nan
    sf.write(str(path), data, sr, subtype="FLOAT")
    return Utterance(path.stem, str(path), seconds, speaker=f"spk{int(freq) % 3}")


@pytest.fixture
def utts(tmp_path) -> list[Utterance]:
    return [make_wav(tmp_path / f"u{k}.wav", 1.0 + 0.25 * k, freq=200.0 + 50 * k) for k in range(5)]


def test_start_trusts_the_manifest_and_opens_no_file(tmp_path, utts, monkeypatch):
    import soundfile

    def no_io(*a, **k):
        raise AssertionError("a file was opened at dataset start")

    monkeypatch.setattr(soundfile, "info", no_io)
    monkeypatch.setattr(soundfile, "SoundFile", no_io)
    rows = utts + [
        Utterance("gone", str(tmp_path / "gone.wav"), 1.0, "s"),  # found at load, not now
        Utterance("short", str(tmp_path / "short.wav"), 0.2, "s"),
        Utterance("nb", str(tmp_path / "nb.wav"), 1.0, "s", sample_rate=8000, channels=1),
        Utterance("hi", str(tmp_path / "hi.wav"), 1.0, "s", sample_rate=48000, channels=2),
    ]
    ds = AudioDataset(rows, SR, segment_samples=SR, min_samples=8000)
    assert [u.id for u in ds.utterances] == [u.id for u in utts] + ["gone", "hi"]
    assert (
        "too short" in ds.skipped[str(tmp_path / "short.wav")] and "narrowband" in ds.skipped[str(tmp_path / "nb.wav")]
    )
    skip = AudioDataset(rows, SR, segment_samples=SR, min_samples=8000, on_format_mismatch="skip")
    assert "expected 16000 Hz" in skip.skipped[str(tmp_path / "hi.wav")]
    conv = AudioDataset(rows, SR, segment_samples=SR, min_samples=8000, on_format_mismatch="convert")
    assert set(conv.skipped) == {str(tmp_path / "short.wav")}


def test_bad_files_found_at_load_are_replaced_and_counted(tmp_path, utts, caplog):
    bad = [
        Utterance("missing", str(tmp_path / "missing.wav"), 1.0, "s"),
        make_wav(tmp_path / "short.wav", 0.1),
        make_wav(tmp_path / "empty.wav", 0.0),
        Utterance("corrupt", str(tmp_path / "corrupt.wav"), 1.0, "s"),
        make_wav(tmp_path / "short8k.wav", 0.4, sr=8000),
    ]
    bad = [Utterance(u.id, u.path, 1.0, u.speaker) for u in bad]  # the manifest claims a usable duration
    (tmp_path / "corrupt.wav").write_bytes(b"not audio at all" * 50)
    with caplog.at_level(logging.WARNING, logger="siren"):
        ds = AudioDataset(utts[:2] + bad + utts[2:], SR, segment_samples=SR, min_samples=8000)
        assert len(ds) == len(utts) + len(bad) and not ds.skipped
        items = [ds[i] for i in range(len(ds))]
    assert set(ds.skipped) == {u.path for u in bad}
    assert "not found" in ds.skipped[bad[0].path] and "too short" in ds.skipped[bad[1].path]
    assert "narrowband" in ds.skipped[bad[4].path]
    assert {it["replaced_from"] for it in items[2:7]} == {u.path for u in bad}
    assert all(it["id"] == utts[2].id for it in items[2:7])  # each replaced by the next usable one
    assert sum("failed to load" in r.getMessage() for r in caplog.records) == len(bad)


def test_nothing_usable_raises(tmp_path):
    with pytest.raises(ValueError, match="no usable utterances"):
        AudioDataset([Utterance("m", str(tmp_path / "m.wav"), 0.001, "s")], SR, SR, 100)
    ds = AudioDataset([Utterance("m", str(tmp_path / "m.wav"), 1.0, "s")], SR, SR, 100)
    with pytest.raises(RuntimeError, match="all 1 utterances failed to load"):
        ds[0]


def test_crops_read_only_their_frames(tmp_path, monkeypatch):
    long = make_wav(tmp_path / "long.wav", 10.0)
    hi = make_wav(tmp_path / "hi.wav", 10.0, sr=48000)
    ds = AudioDataset([long, hi], SR, segment_samples=SR, min_samples=100, seed=1)
    whole = AudioDataset([long, hi], SR, segment_samples=None, min_samples=100)
    for i in range(2):
        before = ds.decoded_bytes
        it = ds[(3, i)]
        ref = whole[i]["wav"][it["offset"] : it["offset"] + SR]
        assert torch.allclose(it["wav"], ref, atol=1e-6)  # the same samples as cutting the decoded whole file
        file_rate = (SR, 48000)[i]
        # Bytes decoded: the 1-s crop (+ a resampling margin of a few ms at 48 kHz), not the 10-s file.
        assert SR * 4 * file_rate / SR <= ds.decoded_bytes - before < 1.05 * SR * 4 * file_rate / SR
    assert ds.used_bytes == SR * 4 + 3 * SR * 4  # the file bytes the two crops span (16 and 48 kHz)


def test_nan_file_replaced_at_getitem(tmp_path, utts):
    nan_utt = make_wav(tmp_path / "nan.wav", 1.5, nan=True)
    ds = AudioDataset([utts[0], nan_utt, utts[1]], SR, segment_samples=SR, min_samples=100)
    assert len(ds) == 3 and not ds.skipped  # the header is fine; only loading finds the NaN
    item = ds[1]
    assert item["replaced_from"] == nan_utt.path and item["id"] == utts[1].id and item["index"] == 2
    assert torch.isfinite(item["wav"]).all() and item["wav"].abs().sum() > 0  # real audio, not zeros
    assert ds.load_failures == 1 and "non-finite" in ds.skipped[nan_utt.path]
    assert ds[0]["replaced_from"] is None
    # Deterministic: the same request gives the same replacement.
    again = ds[1]
    assert again["id"] == item["id"] and torch.equal(again["wav"], item["wav"]) and ds.load_failures == 2


def test_crops_deterministic_and_aligned(utts):
    def make() -> AudioDataset:
        return AudioDataset(utts, SR, segment_samples=SR // 2, min_samples=100, seed=3, align=ALIGN)

    a, b = make(), make()
    offsets = {}
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        # A different access order (as with shuffled batches or workers) must not change any crop.
        from_b = {i: b[i] for i in range(len(b))}
        for i in reversed(range(len(a))):
            ia, ib = a[i], from_b[i]
            assert ia["offset"] == ib["offset"] and torch.equal(ia["wav"], ib["wav"])
            assert ia["offset"] % ALIGN == 0 and ia["length"] == SR // 2
            assert ia["offset"] + SR // 2 <= int(utts[i].duration * SR)
            offsets[(epoch, i)] = ia["offset"]
    # The crop really moves with the epoch for the longer utterances (not always 0).
    assert len({offsets[(e, 4)] for e in range(3)} | {offsets[(e, 3)] for e in range(3)}) > 1
    # Evaluation mode always starts at 0.
    ev = AudioDataset(utts, SR, segment_samples=SR // 2, min_samples=100, seed=3, train=False)
    assert all(ev[i]["offset"] == 0 for i in range(len(ev)))
    # The crop is the audio at that offset.
    full = AudioDataset(utts, SR, segment_samples=None, min_samples=100)
    a.set_epoch(1)
    it = a[4]
    assert torch.equal(it["wav"], full[4]["wav"][it["offset"] : it["offset"] + SR // 2])


def test_short_utterance_padded_and_whole_mode(utts):
    ds = AudioDataset(utts, SR, segment_samples=2 * SR, min_samples=100)
    item = ds[0]  # 1.0 s < 2.0 s segment
    assert item["wav"].shape == (2 * SR,) and item["length"] == SR and item["offset"] == 0
    assert item["wav"][SR:].abs().sum() == 0 and item["wav"][:SR].abs().sum() > 0
    whole = AudioDataset(utts, SR, segment_samples=None, min_samples=100)
    assert [whole[i]["length"] for i in range(len(whole))] == [int(u.duration * SR) for u in utts]


def test_collate_shapes(utts):
    ds = AudioDataset(utts, SR, segment_samples=None, min_samples=100)
    batch = collate([ds[i] for i in (0, 3, 1)])
    lengths = [int(utts[i].duration * SR) for i in (0, 3, 1)]
    assert batch["wav"].shape == (3, max(lengths)) and batch["wav"].dtype == torch.float32
    assert batch["lengths"].tolist() == lengths and batch["lengths"].dtype == torch.long
    assert batch["offsets"].shape == (3,) and batch["index"].tolist() == [0, 3, 1]
    assert batch["ids"] == [utts[i].id for i in (0, 3, 1)] and len(batch["speakers"]) == 3
    assert batch["replaced"] == []
    for b, n in enumerate(lengths):
        assert batch["wav"][b, n:].abs().sum() == 0


def test_dataloader_workers_match_main_process(utts):
    ds = AudioDataset(utts, SR, segment_samples=SR // 2, min_samples=100, seed=1)
    ds.set_epoch(2)
    main = collate([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), collate_fn=collate, num_workers=2)
    (batch,) = list(loader)
    assert torch.equal(batch["offsets"], main["offsets"]) and torch.equal(batch["wav"], main["wav"])


def test_speaker_balanced_subset():
    utts = [Utterance(f"{s}_{k}", f"/{s}_{k}.wav", 1.0, s) for s in ("c", "a", "b") for k in range(4)]
    sub = speaker_balanced_subset(utts, 5, seed=0)
    assert len(sub) == 5 and [u.speaker for u in sub] == ["a", "b", "c", "a", "b"]
    assert len({u.id for u in sub}) == 5
    assert sub == speaker_balanced_subset(list(reversed(utts)), 5, seed=0)
    assert len(speaker_balanced_subset(utts, 100, seed=0)) == len(utts)


class _Batches:
    """Two batches of two per epoch, in a seeded order per epoch (like the trainer's ShardedBatches)."""

    num_batches = 2

    def epoch(self, e: int) -> list[list[int]]:
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(e)).tolist()
        return [perm[:2], perm[2:]]


def test_persistent_workers_follow_the_epoch_without_a_new_loader(utts):
    from siren.data.datasets import EpochBatchSampler

    ds = AudioDataset(utts, SR, segment_samples=SR // 2, min_samples=100, seed=1)
    sampler = EpochBatchSampler(_Batches())
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate, num_workers=1, persistent_workers=True
    )
    sampler.start(1, 1)
    it = iter(loader)
    got = [next(it) for _ in range(5)]  # epoch 1 from its second batch, then epochs 2 and 3 in one iterator
    keys = [(1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    for batch, (e, pos) in zip(got, keys, strict=True):
        want = collate([ds[(e, i)] for i in _Batches().epoch(e)[pos]])
        assert torch.equal(batch["index"], want["index"]) and torch.equal(batch["offsets"], want["offsets"])
        assert torch.equal(batch["wav"], want["wav"])
    # The worker's copy of the dataset never saw set_epoch: the epoch travels with each key.
    assert ds.epoch == 0 and len({tuple(b["offsets"].tolist()) for b in got}) > 1
