"""AudioDataset: bad files excluded up front or replaced deterministically, deterministic aligned crops, collate."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from siren.data.datasets import AudioDataset, LoadFailures, collate, speaker_balanced_subset
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
    assert ds[0]["replaced_from"] is None and item["failed_rows"] == [1]
    # Deterministic: the same request gives the same replacement, and the bad file is not read again.
    again = ds[1]
    assert again["id"] == item["id"] and torch.equal(again["wav"], item["wav"]) and ds.load_failures == 1
    assert again["replaced_from"] == nan_utt.path and again["failed_rows"] == [1]


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


def test_more_workers_than_cpus_are_capped_and_give_the_same_batches(utts, monkeypatch, caplog):
    """A recipe's `data.num_workers: 8` on a 2-CPU machine starts 2 loader processes, says so, and the batches are
    those of loading in the training process."""
    import os

    from siren.train.batches import BatchStream

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    ds = AudioDataset(utts, SR, segment_samples=SR // 2, min_samples=100, seed=1)
    with caplog.at_level(logging.INFO, logger="siren"):
        many = BatchStream(ds, _Batches(), grad_accum=1, num_workers=8)
    assert many.loader.num_workers == 2
    assert "data.num_workers=8 capped at 2" in caplog.text
    assert BatchStream(ds, _Batches(), grad_accum=1, num_workers=1).loader.num_workers == 1  # within the CPUs: as asked
    inline = BatchStream(ds, _Batches(), grad_accum=1, num_workers=0)
    for step in range(3):
        a, b = many.next(step, 0), inline.next(step, 0)
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["index"], b["index"])


# ------------------------------------------------------------------------------ failures: distinct, remembered, shared
def _with_bad(tmp_path, utts) -> tuple[list[Utterance], set[str]]:
    """utts with bad rows between them (missing, corrupt, NaN), each claiming a usable duration."""
    (tmp_path / "corrupt.wav").write_bytes(b"not audio at all" * 50)
    nan = make_wav(tmp_path / "nan.wav", 1.2)
    data = sf.read(nan.path, dtype="float32")[0]
    data[::1000] = np.nan  # throughout: every crop meets one
    sf.write(nan.path, data, SR, subtype="FLOAT")
    bad = [
        Utterance("missing", str(tmp_path / "missing.wav"), 1.0, "s"),
        Utterance("corrupt", str(tmp_path / "corrupt.wav"), 1.0, "s"),
        nan,
    ]
    rows = [utts[0], bad[0], utts[1], bad[1], bad[2], utts[2], utts[3], utts[4]]
    return rows, {u.path for u in bad}


def _counting_reads(monkeypatch, bad: set[str], forbid: bool = False) -> list[str]:
    """Record (or, with `forbid`, refuse) every read of a bad file, in this process and in workers forked later."""
    import siren.data.datasets as datasets

    real, seen = datasets.read_audio, []

    def read(path, *a, **k):
        if str(path) in bad:
            if forbid:
                raise AssertionError(f"{path} was read again after it failed")
            seen.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(datasets, "read_audio", read)
    return seen


def test_a_failed_file_is_read_once_and_counted_once(tmp_path, utts, monkeypatch):
    rows, bad = _with_bad(tmp_path, utts)
    reads = _counting_reads(monkeypatch, bad)
    ds = AudioDataset(rows, SR, segment_samples=None, min_samples=100)
    reported = []
    for epoch in range(4):  # every epoch asks for every row again, bad ones included
        batch = collate([ds[(epoch, i)] for i in range(len(ds))])
        reported.append(ds.failures.note(batch["failed_rows"]))
        ds.failures.sync(lambda obj: [obj])
    assert sorted(reads) == sorted(bad)  # each bad file read exactly once
    assert reported == [len(bad), 0, 0, 0] and ds.failures.count == len(bad)
    assert [ds.table.path(int(r)) for r in ds.failures.rows()] == [u.path for u in rows if u.path in bad]


def test_workers_share_what_failed(tmp_path, utts, monkeypatch):
    """A file that failed in one DataLoader worker is known to the other workers and to the main process (shared
    memory), so a later epoch with new workers reads no bad file again."""
    rows, bad = _with_bad(tmp_path, utts)
    ds = AudioDataset(rows, SR, segment_samples=None, min_samples=100)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2)
    first = [r for b in loader for r in b["failed_rows"]]
    bad_rows = {i for i, u in enumerate(rows) if u.path in bad}
    assert set(first) == bad_rows
    assert {int(r) for r in torch.nonzero(ds.failures.seen).flatten()} == bad_rows  # marked by the workers, seen here
    _counting_reads(monkeypatch, bad, forbid=True)  # new workers fork with this: a read of a bad file fails the batch
    again = [
        r
        for b in torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2)
        for r in b["failed_rows"]
    ]
    assert set(again) == bad_rows


def test_load_failures_agree_across_ranks():
    """Two ranks meeting overlapping bad rows count each once, and both hold the same count and rows."""
    a, b = LoadFailures(20), LoadFailures(20)
    assert a.note([3, 5, 5]) == 2 and b.note([5, 7]) == 2
    gathered = [sorted(a.pending), sorted(b.pending)]  # what all_gather_object hands every rank
    assert a.sync(lambda _: gathered) == 3 and b.sync(lambda _: gathered) == 3
    assert a.count == b.count == 3 and a.rows().tolist() == b.rows().tolist() == [3, 5, 7]
    assert a.note([3, 7]) == 0 and not a.pending  # already counted on every rank: no new sync needed
    assert b.note([19]) == 1 and b.sync(lambda _: [[], [19]]) == 1 and b.count == 4
    assert a.counted.nbytes == 3 and a.seen.numel() == 20  # one bit / one byte per row, whatever fails
    with pytest.raises(IndexError, match="outside"):
        a.add([20])


def _two_rank_worker(rank: int, port: int, rows: list, bad_rows: list, out_dir: str) -> None:
    """One rank of a gloo group, run as the trainer runs: its share of each epoch through DataLoader workers, a sum
    of new failures, and a sync when any rank met one."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = AudioDataset(rows, SR, segment_samples=None, min_samples=100)

    def gather(obj):
        out = [None, None]
        dist.all_gather_object(out, obj)
        return out

    counts = []
    for epoch in range(3):
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).tolist()
        mine = perm[rank::2]
        loader = torch.utils.data.DataLoader(
            ds, sampler=[(epoch, i) for i in mine], batch_size=2, collate_fn=collate, num_workers=1
        )
        for batch in loader:
            new = torch.tensor([float(ds.failures.note(batch["failed_rows"]))])
            dist.all_reduce(new)
            if new.item() > 0:
                ds.failures.sync(gather)
            counts.append(ds.failures.count)
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"counts": counts, "rows": ds.failures.rows().tolist()}))
    dist.destroy_process_group()


def test_two_ranks_with_workers_count_distinct_files(tmp_path, utts):
    import json

    from helpers import fork_ranks, free_port

    rows, bad = _with_bad(tmp_path, utts)
    bad_rows = [i for i, u in enumerate(rows) if u.path in bad]
    args = (free_port(), rows, bad_rows, str(tmp_path))
    fork_ranks(_two_rank_worker, 2, *args)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1  # the same count at every step and the same rows on both ranks
    assert r0["rows"] == bad_rows and r0["counts"][-1] == len(bad_rows)  # distinct files, not attempts or ranks
    assert r0["counts"] == sorted(r0["counts"])


def test_trainer_counts_distinct_bad_files_over_epochs(corpus_dir, teacher_dir, tmp_path, monkeypatch):
    """data/skipped counts each bad file once, however many epochs ask for it, and no bad file is read twice."""
    import json

    from helpers import stage_config

    from siren.data.manifest import write_manifest
    from siren.train.tracking import read_metrics
    from siren.train.trainer import Trainer

    rows, bad = _with_bad(tmp_path, [make_wav(tmp_path / f"g{k}.wav", 1.0 + 0.1 * k) for k in range(5)])
    manifest = write_manifest(tmp_path / "train.jsonl", rows)
    reads = _counting_reads(monkeypatch, bad)
    cfg = stage_config(
        "codec",
        corpus_dir,
        teacher_dir,
        tmp_path / "run",
        **{
            "data.train": str(manifest),
            "data.segment_seconds": 0.5,
            "train.batch_size": 4,
            "train.max_steps": 6,
            "train.checkpoint_every": 6,
            "samples.enabled": "false",
        },
    )
    tr = Trainer(cfg)
    epochs = 6 / tr.batches.num_batches
    assert epochs >= 3  # every bad row is asked for again and again
    tr.fit()
    skipped = [r["data/skipped"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert skipped == sorted(skipped) and skipped[-1] == len(bad)
    assert sorted(reads) == sorted(bad)  # read once each, then known
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_6" / "meta.json").read_text())
    assert sorted(meta["data"]["load_failed"]) == sorted(bad) and meta["data"]["load_failures"] == len(bad)
    assert [tr.dataset.table.path(r) for r in meta["data"]["load_failed_rows"]] == meta["data"]["load_failed"]
    tr.tracker.finish()


def test_resume_restores_failed_rows(tmp_path, utts, monkeypatch):
    """A checkpoint's failed rows come back on resume (counted, and not read again); an older meta with paths only,
    or a reordered manifest, is matched by path."""
    from siren.data.datasets import restored_failures

    rows, bad = _with_bad(tmp_path, utts)
    ds = AudioDataset(rows, SR, segment_samples=None, min_samples=100)
    bad_rows = [i for i, u in enumerate(rows) if u.path in bad]
    paths = [rows[r].path for r in bad_rows]
    assert restored_failures(ds, {"load_failed_rows": bad_rows, "load_failed": paths}) == bad_rows
    assert restored_failures(ds, {"load_failed": paths}) == bad_rows  # written before rows were recorded
    moved = AudioDataset(list(reversed(rows)), SR, segment_samples=None, min_samples=100)
    assert restored_failures(moved, {"load_failed_rows": bad_rows, "load_failed": paths}) == sorted(
        len(rows) - 1 - r for r in bad_rows
    )
    assert restored_failures(ds, {}) == []
    ds.failures.add(restored_failures(ds, {"load_failed_rows": bad_rows, "load_failed": paths}))
    assert ds.failures.count == len(bad)
    _counting_reads(monkeypatch, bad, forbid=True)
    items = [ds[i] for i in range(len(ds))]
    assert sorted({r for it in items for r in it["failed_rows"]}) == bad_rows
