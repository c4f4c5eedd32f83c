"""FeatureCache: round trip, atomic writes, corrupt entries named, crops, compute() only fills what is missing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from siren.data.features import FeatureCache, cache_key
from siren.data.manifest import Utterance

HOP, DIM = 320, 6


def frame_extractor(calls: list):
    """(B, N) → (B, N // HOP, DIM): frame means and simple functions of them, so values are checkable."""

    def extract(wav: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(wav.shape))
        frames = wav[:, : wav.shape[1] // HOP * HOP].reshape(wav.shape[0], -1, HOP).mean(-1, keepdim=True)
        return frames * torch.arange(1, DIM + 1, dtype=wav.dtype)

    return extract


@pytest.fixture
def utts(tmp_path) -> list[Utterance]:
    out = []
    for k, seconds in enumerate((0.5, 0.8, 0.3)):
        t = np.arange(int(seconds * 16000)) / 16000
        p = tmp_path / f"u{k}.wav"
        sf.write(
            str(p), (0.4 * np.sin(2 * math.pi * (150 + 40 * k) * t) + 0.1).astype(np.float32), 16000, subtype="FLOAT"
        )
        out.append(Utterance(f"u{k}", str(p), seconds, "s"))
    return out


def test_cache_key():
    assert cache_key("0123456789abcdef0123", 9) == "0123456789abcdef-L9"
    assert cache_key("ab", "last") == "ab-Llast"
    with pytest.raises(ValueError):
        cache_key("", 3)


def test_round_trip_and_atomic(tmp_path):
    cache = FeatureCache(tmp_path / "cache", cache_key("f" * 40, 3))
    x = torch.randn(7, DIM)
    assert not cache.has("a")
    p = cache.put("a", x)
    assert cache.has("a") and torch.equal(cache.get("a"), x)
    assert p.parent == tmp_path / "cache" / "ffffffffffffffff-L3"
    assert sorted(q.name for q in p.parent.iterdir()) == ["a.safetensors"]  # no temporaries left
    with pytest.raises(ValueError, match="T, D"):
        cache.put("b", torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="cache file name"):
        cache.path("../escape")
    with pytest.raises(FileNotFoundError, match="nope"):
        cache.get("nope")


def test_corrupt_entry_is_named(tmp_path):
    cache = FeatureCache(tmp_path, "k-L1")
    p = cache.put("bad", torch.ones(3, 2))
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(RuntimeError, match="bad.safetensors") as ei:
        cache.get("bad")
    assert "corrupt" in str(ei.value)


def test_crop_pads_only_past_the_end(tmp_path):
    cache = FeatureCache(tmp_path, "k-L1")
    x = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2) + 1
    cache.put("u", x)
    assert torch.equal(cache.crop("u", 2, 4), x[2:6])
    tail = cache.crop("u", 8, 5)
    assert tail.shape == (5, 2) and torch.equal(tail[:2], x[8:]) and tail[2:].abs().sum() == 0
    for start in (-1, 10, 12):
        with pytest.raises(ValueError, match="u.safetensors"):
            cache.crop("u", start, 3)


def test_compute_fills_missing_and_writes_meta(tmp_path, utts):
    calls: list = []
    cache = FeatureCache(tmp_path, cache_key("abcdef" * 4, 2), fingerprint="abcdef" * 4, layer=2)
    cache.put("u1", torch.zeros(1, DIM))  # already present: must not be recomputed
    assert cache.compute(frame_extractor(calls), utts, 16000, progress=False) == 2
    assert len(calls) == 2 and torch.equal(cache.get("u1"), torch.zeros(1, DIM))
    feats = cache.get("u0")
    assert feats.shape == (int(0.5 * 16000) // HOP, DIM) and feats.dtype == torch.float32
    assert torch.allclose(feats[:, 1], 2 * feats[:, 0])
    meta = json.loads((cache.dir / "meta.json").read_text())
    assert meta == {"key": cache.key, "fingerprint": "abcdef" * 4, "layer": 2, "dim": DIM, "count": 3}
    assert cache.compute(frame_extractor(calls), utts, 16000, progress=False) == 0 and len(calls) == 2


def test_compute_batched_matches_unbatched_for_a_local_extractor(tmp_path, utts):
    one = FeatureCache(tmp_path / "one", "k-L0")
    many = FeatureCache(tmp_path / "many", "k-L0")
    calls: list = []
    one.compute(frame_extractor([]), utts, 16000, progress=False)
    many.compute(frame_extractor(calls), utts, 16000, progress=False, batch_size=3)
    assert len(calls) == 1 and calls[0][0] == 3
    for u in utts:
        assert torch.allclose(one.get(u.id), many.get(u.id))


def test_compute_rejects_dimension_change(tmp_path, utts):
    cache = FeatureCache(tmp_path, "k-L0")
    cache.compute(frame_extractor([]), utts[:1], 16000, progress=False)
    with pytest.raises(ValueError, match="D=3"):
        cache.compute(lambda w: torch.zeros(1, 4, 3), utts[1:2], 16000, progress=False)
