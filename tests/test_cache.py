"""The cache subsystem: values round-trip (fp16), crops, each rank its share, resume after a kill, corrupt shards
rebuilt, keys that change with the inputs, unusable files handed to the dataset's replacement."""

from __future__ import annotations

import logging
import math
import os
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from siren.data.cache import Dist, Field, ShardCache
from siren.data.datasets import AudioDataset, collate
from siren.data.manifest import Utterance

SR, HOP, DIM = 16000, 320, 4


def frame_features(wav: torch.Tensor) -> torch.Tensor:
    """(N,) → (N // HOP, DIM): frame means times 1..DIM, so every value is checkable."""
    frames = wav[: wav.shape[0] // HOP * HOP].reshape(-1, HOP).mean(-1, keepdim=True)
    return frames * torch.arange(1, DIM + 1, dtype=wav.dtype)


class Counting:
    """compute() for the cache that records which waveforms it saw; `fail_after` simulates a kill."""

    def __init__(self, fail_after: int | None = None):
        self.seen = 0
        self.lengths: list[int] = []
        self.fail_after = fail_after

    def __call__(self, wavs):
        out = []
        for w in wavs:
            if self.fail_after is not None and self.seen >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.seen += 1
            self.lengths.append(w.shape[0])
            out.append({"features": frame_features(w)})
        return out


@pytest.fixture
def ds(tmp_path) -> AudioDataset:
    utts = []
    for k in range(7):
        seconds = 0.6 + 0.2 * k
        t = np.arange(int(seconds * SR)) / SR
        p = tmp_path / "wav" / f"u{k}.wav"
        p.parent.mkdir(exist_ok=True)
        sf.write(str(p), (0.3 * np.sin(2 * math.pi * (120 + 30 * k) * t) + 0.05).astype(np.float32), SR)
        utts.append(Utterance(f"u{k}", str(p), seconds, f"s{k % 2}"))
    return AudioDataset(utts, SR, segment_samples=SR // 2, min_samples=100, seed=0)


def make(ds, root, **kw) -> ShardCache:
    key = {"model": kw.pop("model", "fp-a"), "layer": 3}
    return ShardCache(root, "features", key, [Field("features", "t", "float16")], ds.table, ds.rows, **kw)


def test_values_crops_and_reuse(ds, tmp_path):
    cache = make(ds, tmp_path / "c", shard_bytes=2000)
    comp = Counting()
    rep = cache.ensure(ds.load_full, comp, progress=False)
    assert rep == {"computed": 7, "reused": 0, "total": 7} and comp.seen == 7
    assert comp.lengths == sorted(comp.lengths)  # length-sorted
    assert len(list(cache.dir.glob("*.bin"))) > 1  # several shards at this shard size
    view = cache.view({"t": (HOP, 10)})
    for j in range(len(ds)):
        full = frame_features(ds.load_full(j))
        got = view.entry(j)["features"]
        assert got.dtype == np.float16 and torch.allclose(torch.from_numpy(got.astype(np.float32)), full, atol=1e-3)
        item = view.item(j, 2 * HOP, 10)["features"].float()
        assert torch.allclose(item, full[2:12], atol=1e-3)
    n0 = frame_features(ds.load_full(0)).shape[0]
    tail = view.item(0, (n0 - 3) * HOP, 10)
    assert tail["features"][3:].abs().sum() == 0 and tail["features"][:3].abs().sum() > 0  # zero-padded past the end
    again = Counting()
    assert make(ds, tmp_path / "c").ensure(ds.load_full, again, progress=False)["computed"] == 0 and again.seen == 0


def test_dataset_items_carry_the_crop_of_the_cache(ds, tmp_path):
    cache = make(ds, tmp_path / "c")
    cache.ensure(ds.load_full, Counting(), progress=False)
    ds.attach("feats", cache.view({"t": (HOP, (SR // 2) // HOP)}))
    # Crops now start on the view's frame grid (no constant: the view's hops decide); off the grid, cached frames of
    # the whole utterance would not be the crop's frames and the comparison below fails.
    assert ds.align == HOP
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=1)
    for batch in loader:  # cut in the worker process, from memory-mapped shards
        for b in range(batch["wav"].shape[0]):
            live = frame_features(batch["wav"][b])
            n = batch["lengths"][b] // HOP
            assert torch.allclose(batch["feats"]["features"][b, :n].float(), live[:n], atol=1e-3)


def test_each_rank_computes_its_share(ds, tmp_path):
    barrier = threading.Barrier(2)
    comps, reps, errors = [Counting(), Counting()], [None, None], []

    def rank(r: int) -> None:
        try:
            cache = make(ds, tmp_path / "c", shard_bytes=1)
            reps[r] = cache.ensure(ds.load_full, comps[r], Dist(r, 2, barrier.wait), progress=False)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [c.seen for c in comps] == [4, 3] and [r["computed"] for r in reps] == [4, 3]
    assert sorted(comps[0].lengths + comps[1].lengths) == sorted(ds.load_full(j).shape[0] for j in range(7))
    shards = sorted(p.name for p in (tmp_path / "c").glob("*/*.idx.npz"))
    assert len({name.split("-")[1] for name in shards}) == 2  # each rank wrote its own shards


def test_kill_mid_fill_resumes_from_written_shards(ds, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        make(ds, tmp_path / "c", shard_bytes=1).ensure(ds.load_full, Counting(fail_after=4), progress=False)
    resumed = Counting()
    rep = make(ds, tmp_path / "c", shard_bytes=1).ensure(ds.load_full, resumed, progress=False)
    assert rep == {"computed": 3, "reused": 4, "total": 7} and resumed.seen == 3
    assert not list((tmp_path / "c").glob("*/*.tmp"))


def test_corrupt_shard_is_detected_and_rebuilt(ds, tmp_path, caplog):
    cache = make(ds, tmp_path / "c", shard_bytes=1)
    cache.ensure(ds.load_full, Counting(), progress=False)
    victim = sorted(cache.dir.glob("*.bin"))[2]
    data = bytearray(victim.read_bytes())
    data[5] ^= 0x40
    victim.write_bytes(bytes(data))
    comp = Counting()
    with caplog.at_level(logging.WARNING, logger="siren"):
        rep = make(ds, tmp_path / "c", shard_bytes=1).ensure(ds.load_full, comp, progress=False)
    assert rep["computed"] == 1 and comp.seen == 1
    assert any(victim.name in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    assert not victim.exists()  # set aside and removed; its entry lives in a new shard
    view = make(ds, tmp_path / "c").view({"t": (HOP, None)})
    for j in range(len(ds)):
        want = frame_features(ds.load_full(j))
        assert torch.allclose(torch.from_numpy(view.entry(j)["features"].astype(np.float32)), want, atol=1e-3)


def test_key_follows_model_and_files(ds, tmp_path):
    a = make(ds, tmp_path / "c")
    assert make(ds, tmp_path / "c").dir == a.dir
    assert make(ds, tmp_path / "c", model="fp-b").dir != a.dir
    p = ds.table.path(int(ds.rows[0]))
    os.utime(p, (1_000_000, 1_000_000))  # same bytes, another mtime: a changed file as far as the key knows
    assert make(ds, tmp_path / "c").dir != a.dir


def test_unusable_file_is_recorded_and_replaced_by_the_dataset(ds, tmp_path):
    os.remove(ds.table.path(int(ds.rows[3])))
    cache = make(ds, tmp_path / "c")
    rep = cache.ensure(ds.load_full, Counting(), progress=False)
    assert rep["computed"] == 7  # 6 computed + 1 recorded as unusable, not retried next time
    assert make(ds, tmp_path / "c").ensure(ds.load_full, Counting(), progress=False)["computed"] == 0
    ds.attach("feats", cache.view({"t": (HOP, (SR // 2) // HOP)}))
    item = ds[3]
    assert (
        item["replaced_from"].endswith("u3.wav")
        and item["index"] == 4
        and "not found" in next(iter(ds.skipped.values()))
    )


def test_the_teacher_cache_is_refused_when_adapt_runs_the_teacher_on_crops(corpus_dir, teacher_dir, tmp_path, capsys):
    """`loss.teacher_targets: crop` (the default) reads no teacher cache: `siren cache` says so instead of filling one."""
    from helpers import ROOT, stage_overrides

    from siren.cli import main

    args = stage_overrides("adapt", corpus_dir, teacher_dir, tmp_path / "run", baseline=str(tmp_path / "none"))
    rc = main(["cache", "--config", str(ROOT / "configs/demo/base.yaml"), *args])
    assert rc == 2
    assert "nothing to fill" in capsys.readouterr().err and not (tmp_path / "run" / "cache").exists()
