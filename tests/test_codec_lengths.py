"""A codec returns what it was given: every utterance decodes to its input's length, through codes and through the
bitstream, alone or in a ragged batch; audio at another rate is resampled and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siren.codec import Codec
from siren.coding import bitstream
from siren.config.loader import load_config
from siren.config.stages import COMPONENTS
from siren.models.builders import build_components
from siren.models.ssl import save_tiny_teacher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> Codec:
    cfg = load_config(CONFIG)
    cfg.ssl.name = str(save_tiny_teacher(tmp_path_factory.mktemp("ssl") / "tiny_hubert"))
    torch.manual_seed(0)
    mods = build_components([c for c in COMPONENTS if c != "student_ssl"], cfg)
    return Codec(mods, sample_rate=16000, hop_length=320, flow_steps=1).eval()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(st.integers(0, 24000), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_every_utterance_decodes_to_its_input_length(codec, extra, seed):
    g = torch.Generator().manual_seed(seed)
    items = [torch.randn(codec.min_samples + n, generator=g) * 0.1 for n in extra]
    codes = codec.encode(items)
    assert codes.lengths == [w.shape[0] for w in items]
    decoded = codec.decode(codes)
    assert [w.shape[0] for w in decoded] == [w.shape[0] for w in items]
    for one, w in zip(codes.split(), items, strict=True):  # and through the file
        back = codec.from_bytes(codec.to_bytes(one))
        assert back.lengths == [w.shape[0]]
        assert codec.decode(back)[0].shape == w.shape


def test_the_file_carries_the_length_in_its_header(codec):
    w = torch.randn(codec.min_samples + 1234, generator=torch.Generator().manual_seed(1)) * 0.1
    one = codec.encode(w)
    hd = bitstream.read_header(codec.to_bytes(one))
    assert hd["n_sem"] * codec.sem_hop + hd["tail"] == w.shape[0]
    assert 0 <= hd["tail"] < codec.min_samples + 1234


def test_a_version_3_file_is_refused_by_name(codec):
    data = bytearray(codec.to_bytes(codec.encode(torch.randn(codec.min_samples) * 0.1)))
    data[2] = 3
    with pytest.raises(bitstream.BitstreamError, match="version 3 .no input length"):
        codec.from_bytes(bytes(data))


def test_audio_at_another_rate_is_resampled_and_says_so(codec, caplog):
    n8 = codec.min_samples // 2 + 4000
    w8 = torch.randn(n8, generator=torch.Generator().manual_seed(2)) * 0.1
    with caplog.at_level(logging.WARNING, logger="siren"):
        codes = codec.encode(w8, sample_rate=8000)
    assert codes.lengths == [2 * n8]  # the input's length at the codec's rate
    said = [r.getMessage() for r in caplog.records]
    assert any("8000 Hz resampled to the codec's 16000 Hz" in m and "upsampled" in m for m in said), said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siren"):
        codec.encode(torch.randn(codec.min_samples) * 0.1, sample_rate=16000)
    assert not [r for r in caplog.records if "resampled" in r.getMessage()]
