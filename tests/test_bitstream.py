"""The range-coded payload on its own: byte-granular sealing keeps every stream decodable and costs a few bits."""

from __future__ import annotations

import copy
from pathlib import Path

import constriction
import numpy as np
import pytest
import torch

from siren.coding.bitstream import _decodes_to, _shortest_payload, _words


def _random_stream(rng: np.random.Generator):
    T, L, K = int(rng.integers(5, 60)), 2, 9
    coded = []
    for _ in range(T):
        probs = rng.dirichlet(np.full(K, 0.3), size=L)
        probs /= probs.sum(-1, keepdims=True)
        symbols = np.array([rng.choice(K, p=p) for p in probs], dtype=np.int32)
        coded.append((probs, symbols))
    fam = constriction.stream.model.Categorical(perfect=False)
    enc = constriction.stream.queue.RangeEncoder()
    for probs, symbols in coded:
        enc.encode(symbols, fam, probs)
    estimate = -sum(float(np.log2(p[np.arange(L), s]).sum()) for p, s in coded)
    return coded, enc.get_compressed().astype(">u4").tobytes(), estimate


def test_shortest_payload_decodes_and_saves_the_word_padding():
    rng = np.random.default_rng(0)
    word_over, byte_over = [], []
    for _ in range(60):
        coded, full, estimate = _random_stream(rng)
        short = _shortest_payload(full, coded)
        assert len(short) <= len(full) and _decodes_to(short, coded)
        # An independent decoder, fed the zero-padded words, reads back every symbol.
        fam = constriction.stream.model.Categorical(perfect=False)
        dec = constriction.stream.queue.RangeDecoder(_words(short))
        assert all(np.array_equal(dec.decode(fam, p), s) for p, s in coded)
        word_over.append(8 * len(full) - estimate)
        byte_over.append(8 * len(short) - estimate)
    assert np.mean(word_over) > 10  # whole 32-bit words cost ~16 bits per stream on average
    assert np.mean(byte_over) < 6, np.mean(byte_over)


def test_a_wrong_payload_does_not_decode():
    coded, full, _ = _random_stream(np.random.default_rng(1))
    short = _shortest_payload(full, coded)
    assert short and not _decodes_to(full[: len(short) - 1], coded)  # one byte shorter is not enough
    assert not _decodes_to(bytes(b ^ 0x55 for b in short), coded)


# ------------------------------------------------------------------------------------------ the codec's bitstream
@pytest.fixture(scope="module")
def tiny_codec(tmp_path_factory):
    from siren.config.loader import load_config
    from siren.models.builders import build_components
    from siren.models.codec import Codec
    from siren.models.ssl import save_tiny_teacher

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml")
    cfg.ssl.name = str(save_tiny_teacher(tmp_path_factory.mktemp("ssl") / "t", seed=0))
    torch.manual_seed(0)
    names = ["ssl", "factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model"]
    codec = Codec(build_components(names, cfg), sample_rate=16000, hop_length=320).eval()
    codes = codec.encode(torch.randn(3 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1)
    return codec, codes, codec.to_bytes(codes).data


def _perturbed_decode(codec, data, monkeypatch, scale: float, seed: int):
    """Decode with an entropy model whose head weights carry relative noise `scale`, as a machine whose arithmetic
    differs would compute them; the model id (a property of the weights file, equal on both machines) is kept."""
    from siren.coding import bitstream

    mods = codec._code_modules()
    mid = bitstream.model_id(mods)
    em = copy.deepcopy(mods["entropy_model"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lm in em.streams.values():
            w = lm.head.weight
            w.add_(w * scale * torch.randn(w.shape, generator=g))
    monkeypatch.setattr(bitstream, "model_id", lambda m: mid)
    return bitstream.decode_codes({**mods, "entropy_model": em}, data)


def test_perturbed_model_decodes_the_same_codes_or_raises(tiny_codec, monkeypatch):
    from siren.coding.bitstream import BitstreamError

    codec, codes, data = tiny_codec
    same = raised = 0
    for scale in (1e-7, 1e-6, 1e-4, 3e-2):  # last-bit noise up to a visibly different model
        for seed in range(3):
            try:
                sem, pro, spk, _ = _perturbed_decode(codec, data, monkeypatch, scale, seed)
            except BitstreamError as exc:
                assert "symbol hash" in str(exc) or "cannot be decoded" in str(exc)
                raised += 1
                continue
            assert torch.equal(sem, codes.sem) and torch.equal(pro, codes.pro), f"wrong codes at noise {scale}"
            same += 1
    assert same >= 3  # last-bit noise is absorbed by the quantised frequency tables
    assert raised >= 1  # a really different model is caught, not decoded into other codes


def test_without_the_symbol_hash_a_perturbed_model_returns_wrong_codes(tiny_codec, monkeypatch):
    """Negative control: the guarantee above rests on the hash, not on luck."""
    import mechanisms

    codec, codes, data = tiny_codec
    mechanisms.disable("symbol_hash", monkeypatch)
    sem, pro, _, _ = _perturbed_decode(codec, data, monkeypatch, 3e-2, 0)
    assert not (torch.equal(sem, codes.sem) and torch.equal(pro, codes.pro))


def test_every_payload_byte_is_protected(tiny_codec):
    from siren.coding.bitstream import BitstreamError

    codec, codes, data = tiny_codec
    back = codec.from_bytes(data)
    assert torch.equal(back.sem, codes.sem) and torch.equal(back.spk, codes.spk)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(BitstreamError):
            codec.from_bytes(bytes(bad))
    with pytest.raises(BitstreamError, match="truncated"):
        codec.from_bytes(data[:5])


def test_old_versions_are_refused_by_name(tiny_codec):
    from siren.coding.bitstream import BitstreamError

    codec, _, data = tiny_codec
    for v, word in ((1, "version 1"), (2, "version 2")):
        old = bytearray(data)
        old[2] = v
        with pytest.raises(BitstreamError, match=word):
            codec.from_bytes(bytes(old))


def test_quantised_tables_tolerate_tiny_differences():
    from siren.coding.bitstream import quantized_probs

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(1000, 81)).astype(np.float32)
    noisy = logits * (1 + rng.uniform(-1, 1, size=logits.shape).astype(np.float32) * 2e-7)
    p, q = quantized_probs(logits), quantized_probs(noisy)
    changed_rows = (p != q).any(-1).mean()
    assert changed_rows < 0.01  # a flip needs a logit within float noise of a rounding boundary
    assert np.allclose(p.sum(-1), 1) and (p > 0).all()
