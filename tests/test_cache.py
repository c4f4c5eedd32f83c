"""The cache subsystem: values round-trip (fp16), crops, each rank its share, resume after a kill, corrupt shards
rebuilt, keys that change with the inputs, unusable files handed to the dataset's replacement."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from siren.data.cache import Field, ShardCache
from siren.data.datasets import AudioDataset, collate
from siren.data.manifest import Utterance
from siren.ranks import Ranks

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
    return make_ds(tmp_path)


def make_ds(tmp_path) -> AudioDataset:
    """7 utterances of 0.6 … 1.8 s, tones of known frame means, under tmp_path/wav."""
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
            reps[r] = cache.ensure(ds.load_full, comps[r], Ranks(r, 2, barrier.wait), progress=False)
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


# ----------------------------------------------------------------------------------------------------- the cache key
class KeyInputs:
    """Every input of the feature cache's key, held apart so that one can be changed; `digest()` builds the cache as
    `fill_features` does. A tiny random HuBERT stands in for the SSL model (only its identity matters here)."""

    def __init__(self, d: Path):
        from transformers import HubertModel

        from siren.models.ssl import SSLFeatureExtractor, tiny_hubert_config

        torch.manual_seed(0)
        cfg = tiny_hubert_config(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=16, conv_dim=8)
        self.layer = 1
        self.module = SSLFeatureExtractor(HubertModel(cfg), self.layer).eval()
        self.sample_rate, self.policy, self.min_samples, self.batch_seconds = SR, "resample_down", 100, 0.0
        self.segment_samples, self.seed, self.root = SR // 2, 0, d / "cache"
        self.utts = []
        for k in range(3):
            p = d / "wav" / f"u{k}.wav"
            p.parent.mkdir(exist_ok=True)
            self.write(p, 0.1 * (k + 1), SR // 2 + 800 * k)
            self.utts.append(Utterance(f"u{k}", str(p), (SR // 2 + 800 * k) / SR, "s0"))

    @staticmethod
    def write(path: Path, amplitude: float, n: int) -> None:
        sf.write(str(path), (amplitude * np.sin(np.arange(n) / 7.0)).astype(np.float32), SR, subtype="FLOAT")

    def digest(self) -> str:
        from siren.data.cache_fill import feature_cache

        ds = AudioDataset(
            self.utts,
            self.sample_rate,
            segment_samples=self.segment_samples,
            min_samples=self.min_samples,
            seed=self.seed,
            on_format_mismatch=self.policy,
        )
        return feature_cache(self.root, self.module, ds, layer=self.layer, batch_seconds=self.batch_seconds).digest


def _other(data, choices, current):
    return data.draw(st.sampled_from([c for c in choices if c != current]))


def _set_weight(x: KeyInputs, data) -> None:
    params = list(x.module.parameters())
    p = params[data.draw(st.integers(0, len(params) - 1))]
    e = data.draw(st.integers(0, p.numel() - 1))
    with torch.no_grad():
        p.view(-1)[e] += data.draw(st.sampled_from([-1.0, 1.0])) * data.draw(st.floats(1e-3, 1.0))


def _set_eps(x: KeyInputs, data) -> None:
    """A setting no weight shows: a norm layer's epsilon."""
    norms = [m for m in x.module.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm)]
    m = norms[data.draw(st.integers(0, len(norms) - 1))]
    m.eps = _other(data, [1e-6, 1e-5, 1e-4, 1e-3], m.eps)


def _set_layer(x: KeyInputs, data) -> None:
    x.layer = x.module.layer = _other(data, range(x.module.model.config.num_hidden_layers + 1), x.layer)


def _rewrite_same_size(x: KeyInputs, data) -> None:
    """Other samples, same length and format (same size); written later (a later mtime)."""
    p = Path(x.utts[data.draw(st.integers(0, len(x.utts) - 1))].path)
    st_ = p.stat()
    x.write(p, data.draw(st.floats(0.5, 0.9)), sf.info(str(p)).frames)
    assert p.stat().st_size == st_.st_size
    later = st_.st_mtime_ns + data.draw(st.integers(1, 10**6)) * 1_000_000
    os.utime(p, ns=(st_.st_atime_ns, later))


def _rewrite_other_size(x: KeyInputs, data) -> None:
    """Other samples of another length, with the old mtime put back (only the size tells)."""
    p = Path(x.utts[data.draw(st.integers(0, len(x.utts) - 1))].path)
    st_ = p.stat()
    x.write(p, 0.5, sf.info(str(p)).frames + data.draw(st.sampled_from([-1, 1])) * data.draw(st.integers(1, 400)))
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))


def _move_file(x: KeyInputs, data) -> None:
    k = data.draw(st.integers(0, len(x.utts) - 1))
    new = Path(x.utts[k].path).with_name(f"moved{k}.wav")
    os.replace(x.utts[k].path, new)
    x.utts[k] = dataclasses.replace(x.utts[k], path=str(new))


CHANGES_VALUES = {
    "ssl weights": _set_weight,
    "ssl architecture": _set_eps,
    "ssl layer": _set_layer,
    "sample rate": lambda x, data: setattr(x, "sample_rate", _other(data, [8000, 16000, 22050, 24000], x.sample_rate)),
    "format policy": lambda x, data: setattr(x, "policy", _other(data, ["resample_down", "skip", "convert"], x.policy)),
    "min_samples": lambda x, data: setattr(x, "min_samples", _other(data, [0, 1, 100, 4000], x.min_samples)),
    "batching": lambda x, data: setattr(x, "batch_seconds", data.draw(st.floats(0.5, 60.0))),
    "file content": _rewrite_same_size,
    "file size": _rewrite_other_size,
    "file path": _move_file,
}


def _rename_utterance(x: KeyInputs, data) -> None:
    k = data.draw(st.integers(0, len(x.utts) - 1))
    x.utts[k] = dataclasses.replace(x.utts[k], id=f"other{k}", speaker="s9", text="words")


def _read_file(x: KeyInputs, data) -> None:
    """Access time only (a read)."""
    p = Path(x.utts[data.draw(st.integers(0, len(x.utts) - 1))].path)
    os.utime(p, ns=(data.draw(st.integers(0, 2**40)), p.stat().st_mtime_ns))


def _load_from_elsewhere(x: KeyInputs, data) -> None:
    """The same SSL model, loaded from another directory."""
    where = data.draw(st.sampled_from(["/models/hubert", "facebook/hubert-base-ls960", "./elsewhere"]))
    x.module.model.config._name_or_path = where
    x.module.model.name_or_path = where


KEEPS_VALUES = {
    "cache root": lambda x, data: setattr(x, "root", x.root.parent / data.draw(st.sampled_from(["a", "b/c"]))),
    "crop length": lambda x, data: setattr(x, "segment_samples", data.draw(st.none() | st.integers(1, 3 * SR))),
    "seed": lambda x, data: setattr(x, "seed", data.draw(st.integers(1, 2**31))),
    "utterance id and speaker": _rename_utterance,
    "file read": _read_file,
    "ssl model location": _load_from_elsewhere,
}


@settings(max_examples=40, deadline=None)
@given(change=st.sampled_from(sorted(CHANGES_VALUES)), data=st.data())
def test_key_changes_with_every_input_that_changes_the_values(change, data):
    with tempfile.TemporaryDirectory() as d:
        x = KeyInputs(Path(d))
        before = x.digest()
        CHANGES_VALUES[change](x, data)
        assert x.digest() != before, f"changing the {change} left the cache key unchanged"


@settings(max_examples=25, deadline=None)
@given(change=st.sampled_from(sorted(KEEPS_VALUES)), data=st.data())
def test_key_ignores_inputs_that_do_not_change_the_values(change, data):
    with tempfile.TemporaryDirectory() as d:
        x = KeyInputs(Path(d))
        before = x.digest()
        KEEPS_VALUES[change](x, data)
        assert x.digest() == before, f"changing the {change} changed the cache key"


def test_the_same_ssl_model_saved_in_two_places_keys_the_same(teacher_dir, tmp_path):
    from siren.data.cache_fill import module_key
    from siren.models.ssl import SSLFeatureExtractor

    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    a, b = (SSLFeatureExtractor.from_pretrained(str(p), 2) for p in (teacher_dir, copy))
    assert module_key(a) == module_key(b)


def test_teacher_key_follows_the_teacher_path_and_nothing_else(ds):
    from siren.data.cache_fill import TEACHER_PATH, teacher_key

    torch.manual_seed(0)
    names = (*TEACHER_PATH, "factorizer", "student_ssl", "entropy_model", "decoder")
    modules = {n: torch.nn.Linear(3, 3) for n in names}
    before = teacher_key(modules, 9, ds)
    for n in names:
        saved = modules[n].weight.detach().clone()
        with torch.no_grad():
            modules[n].weight[0, 0] += 0.5
        changed = teacher_key(modules, 9, ds) != before
        assert changed == (n in TEACHER_PATH), f"{n}: key {'changed' if changed else 'unchanged'}"
        with torch.no_grad():
            modules[n].weight.copy_(saved)
    assert teacher_key(modules, 9, ds) == before and teacher_key(modules, 8, ds) != before
