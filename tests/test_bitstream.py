"""The range-coded payload on its own: byte-granular sealing keeps every stream decodable and costs a few bits."""

from __future__ import annotations

import constriction
import numpy as np

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
