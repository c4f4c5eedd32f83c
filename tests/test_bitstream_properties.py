"""Properties of the .siren bitstream through the public API (`Codec.to_bytes` / `Codec.from_bytes`): on any code
layout (FSQ codebooks of 2 to 2^16 codes, 1 to 3 residual levels), any length from one prosody frame, codes at the
ends of their codebooks and entropy models from uniform to sure of another code, the bytes decode to the same codes;
a flipped byte or a truncated file is a `BitstreamError`, never other codes and never another exception. With the CRC
recomputed after the flip (damage the CRC cannot see), the symbol hash still turns any change of codes into an error."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bitstream import code_modules

from siren.codec import Codec, Codes
from siren.coding.bitstream import BitstreamError, read_header
from siren.errors import LayoutMismatch
from siren.models.roles import FrameGeometry

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints the example to keep as a regression test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FSQ_LEVELS = [(2,), (3, 3), (5,), (4,) * 8]  # 2, 9, 5 and 2^16 codes per level
SHARPNESS = [0.0, 1.0, 30.0]  # the entropy model: uniform, untrained, sure of its next code
GEOMETRY = FrameGeometry(16000, 320, 2, 8)  # 25 Hz semantic, 6.25 Hz prosody frames


@cache
def codec(sem: tuple, pro: tuple, sharpness: float) -> Codec:
    """A codec holding only the code-defining modules (all `to_bytes` / `from_bytes` need), built once per layout."""
    mods = code_modules(sem, pro, sharpness)
    return Codec(mods, sample_rate=16000, hop_length=320, geometry=GEOMETRY).eval()


def _stream(draw, n: int, K: int, L: int) -> torch.Tensor:
    """(1, n, L) codes: each the first code, the last one, or any, so the codebook's ends are drawn often."""
    value = st.one_of(st.sampled_from([0, K - 1]), st.integers(0, K - 1))
    return torch.tensor(draw(st.lists(value, min_size=n * L, max_size=n * L)), dtype=torch.long).view(1, n, L)


@st.composite
def coded(draw):
    """(codec, Codes) for a drawn layout, model and length (1 to 8 prosody frames, 4 semantic frames each)."""
    sem = (draw(st.sampled_from(FSQ_LEVELS)), draw(st.integers(1, 3)))
    pro = (draw(st.sampled_from(FSQ_LEVELS)), draw(st.integers(1, 3)))
    c = codec(sem, pro, draw(st.sampled_from(SHARPNESS)))
    n_pro = draw(st.integers(1, 8))
    layout = c.components["entropy_model"].layout
    codes = Codes(
        sem=_stream(draw, 4 * n_pro, *layout["sem"]),
        pro=_stream(draw, n_pro, *layout["pro"]),
        spk=_stream(draw, 1, 16, 2)[0],
        sem_frames=torch.tensor([4 * n_pro]),
        sample_rate=16000,
        sem_hop=GEOMETRY.sem_hop,
        pro_hop=GEOMETRY.pro_hop,
    )
    return c, codes


def _same(a: Codes, b: Codes) -> bool:
    return torch.equal(a.sem, b.sem) and torch.equal(a.pro, b.pro) and torch.equal(a.spk, b.spk)


@SETTINGS
@given(coded())
def test_any_codes_come_back_from_their_bytes(case):
    c, codes = case
    data = c.to_bytes(codes)
    assert type(data) is bytes
    back = c.from_bytes(data)
    assert _same(back, codes) and back.num_samples == codes.num_samples


@SETTINGS
@given(coded(), st.data())
def test_a_flipped_byte_or_a_cut_is_an_error(case, data):
    c, codes = case
    good = c.to_bytes(codes)
    i = data.draw(st.integers(0, len(good) - 1), label="byte")
    bad = bytearray(good)
    bad[i] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(BitstreamError):
        c.from_bytes(bytes(bad))
    cut = data.draw(st.integers(0, len(good) - 1), label="cut")
    with pytest.raises(BitstreamError, match="truncated|corrupted"):
        c.from_bytes(good[:cut])


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@SETTINGS
@given(coded(), st.data())
def test_damage_the_crc_misses_gives_the_same_codes_or_an_error(case, data):
    """A flip with the CRC made to match: the symbol hash (or the header's own checks) still refuse other codes. The
    frame count is left alone: a forged count is decoded at its full length before the hash can refuse it."""
    c, codes = case
    good = c.to_bytes(codes)
    hd = read_header(good)
    varint = range(7, hd["offset"] - 4)  # magic (2) + version (1) + model id (4), then the frame count
    i = data.draw(st.integers(0, len(good) - 5).filter(lambda j: j not in varint), label="byte")
    body = bytearray(good[:-4])
    body[i] ^= data.draw(st.integers(1, 255), label="mask")
    try:
        back = c.from_bytes(_with_crc(bytes(body)))
    except BitstreamError as exc:
        assert str(exc)
    else:
        assert _same(back, codes), f"byte {i} changed the codes silently"


@SETTINGS
@given(coded(), st.sampled_from(["sem", "pro", "spk"]), st.booleans(), st.data())
def test_codes_outside_their_codebook_are_refused_when_encoding(case, stream, above, data):
    c, codes = case
    K = 16 if stream == "spk" else c.components["entropy_model"].layout[stream][0]
    bad = getattr(codes, stream).clone()
    bad.view(-1)[data.draw(st.integers(0, bad.numel() - 1), label="at")] = K if above else -1
    with pytest.raises(LayoutMismatch, match=rf"{stream} code {K if above else -1} is outside .* {K} codes"):
        c.to_bytes(replace(codes, **{stream: bad}))


def test_a_speaker_code_past_its_bits_is_refused_not_spilled():
    """Regression: a speaker code of 16 in a 16-code (4-bit) codebook was packed into its neighbour's bits; encoding
    succeeded and only the decode's symbol hash noticed. A sem code of K raised a bare IndexError from the model."""
    c = codec(((3, 3), 1), ((2,), 2), 1.0)
    sem, pro = torch.zeros(1, 4, 1, dtype=torch.long), torch.zeros(1, 1, 2, dtype=torch.long)
    codes = Codes(sem, pro, torch.tensor([[16, 0]]), torch.tensor([4]), 16000, GEOMETRY.sem_hop, GEOMETRY.pro_hop)
    with pytest.raises(LayoutMismatch, match="spk code 16 is outside"):
        c.to_bytes(codes)
    with pytest.raises(LayoutMismatch, match="sem code 9 is outside"):
        c.to_bytes(replace(codes, spk=torch.tensor([[15, 0]]), sem=torch.full((1, 4, 1), 9)))
    with pytest.raises(LayoutMismatch, match="pro codes have 1 levels, the model codes 2"):
        c.to_bytes(replace(codes, spk=torch.tensor([[15, 0]]), pro=torch.zeros(1, 1, 1, dtype=torch.long)))
