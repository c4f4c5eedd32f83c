"""The range-coded payload on its own: byte-granular sealing keeps every stream decodable and costs a few bits."""

from __future__ import annotations

import copy
from pathlib import Path

import constriction
import numpy as np
import pytest
import torch

from siren.coding import bitstream
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
        short = _shortest_payload(full, lambda cands, coded=coded: [_decodes_to(p, coded) for p in cands])
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
    short = _shortest_payload(full, lambda cands: [_decodes_to(p, coded) for p in cands])
    assert short and not _decodes_to(full[: len(short) - 1], coded)  # one byte shorter is not enough
    assert not _decodes_to(bytes(b ^ 0x55 for b in short), coded)


# ------------------------------------------------------------------------------------------ the codec's bitstream
@pytest.fixture(scope="module")
def tiny_codec(tmp_path_factory):
    from siren.codec import Codec
    from siren.config.loader import load_config
    from siren.models.builders import build_components
    from siren.models.ssl import save_tiny_teacher

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml")
    cfg.ssl.name = str(save_tiny_teacher(tmp_path_factory.mktemp("ssl") / "t", seed=0))
    torch.manual_seed(0)
    names = ["ssl", "factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model"]
    codec = Codec(build_components(names, cfg), sample_rate=16000, hop_length=320).eval()
    codes = codec.encode(torch.randn(3 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1)
    return codec, codes, codec.to_bytes(codes)


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


# ----------------------------------------------------------------- windowed encoding: the bytes of whole-stream coding
def code_modules(sem=((3, 3), 1), pro=((2,), 2), sharpness: float = 1.0, seed: int = 0, max_len: int = 16) -> dict:
    """The code-defining modules of a small codec: FSQ quantizers of `levels` × residual levels per stream, a 2-group
    speaker codebook of 16 and a 1-layer entropy model whose logits are scaled by `sharpness` (0: uniform, large: a
    model sure of its next code, whose frames cost almost no bits)."""
    from siren.models.entropy import EntropyModel
    from siren.models.quantizers import ProductQuantizer, ResidualFSQ

    torch.manual_seed(seed)
    layout = {s: (int(np.prod(levels)), n) for s, (levels, n) in (("sem", sem), ("pro", pro))}
    em = EntropyModel(layout, 16, 1, 2, max_len, 0.0).eval()
    with torch.no_grad():
        for lm in em.streams.values():
            lm.head.weight.mul_(sharpness)
            lm.head.bias.normal_(0, 1).mul_(sharpness)
    return {
        "sem_quantizer": ResidualFSQ(8, list(sem[0]), sem[1]),
        "pro_quantizer": ResidualFSQ(8, list(pro[0]), pro[1]),
        "spk_quantizer": ProductQuantizer(8, 2, 16),
        "entropy_model": em,
    }


def random_codes(mods: dict, n_pro: int, seed: int = 0, mode: str = "random"):
    """sem (1, 4·n_pro, L), pro (1, n_pro, L), spk (1, 2): uniform codes, or every code 0, or every code K − 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, n in (("sem", 4 * n_pro), ("pro", n_pro)):
        K, L = mods["entropy_model"].layout[s]
        fill = {"random": None, "zero": 0, "max": K - 1}[mode]
        out.append(torch.randint(0, K, (1, n, L), generator=g) if fill is None else torch.full((1, n, L), fill))
    return out[0], out[1], torch.randint(0, 16, (1, 2), generator=g)


def whole_stream_payload(mods: dict, sem: torch.Tensor, pro: torch.Tensor) -> bytes:
    """The payload as the encoder made it before windows: each stream's logits in one `run`, one probability table for
    the whole stream, one `encode` call, and every trimming candidate decoded from the start."""
    fam = constriction.stream.model.Categorical(perfect=False)
    enc = constriction.stream.queue.RangeEncoder()
    coded = []
    for stream, codes in (("sem", sem), ("pro", pro)):
        logits = mods["entropy_model"].coder(stream).run(codes)[0]
        probs = bitstream.quantized_probs(logits.reshape(-1, logits.shape[-1]))
        symbols = codes[0].numpy().astype(np.int32).reshape(-1)
        enc.encode(symbols, fam, probs)
        coded.append((probs, symbols))
    full = enc.get_compressed().astype(">u4").tobytes()
    return _shortest_payload_one_by_one(full, lambda p: _decodes_to(p, coded))


def _shortest_payload_one_by_one(full: bytes, decodes) -> bytes:
    """The trimming loop as it was, one candidate at a time (`_shortest_payload` checks them in batches)."""
    assert decodes(full)
    best = full
    for k in range(len(full) - 1, -1, -1):
        prefix = full[:k]
        found = prefix if decodes(prefix) else None
        if found is None and k > 0:
            up = int.from_bytes(prefix, "big") + 1
            if up < 256**k and decodes(up.to_bytes(k, "big")):
                found = up.to_bytes(k, "big")
        if found is None:
            break
        best = found
    return best


def _payload(data: bytes, enc) -> bytes:
    return data[len(data) - 4 - enc.payload_bits // 8 : len(data) - 4]


@pytest.mark.parametrize(
    "sem, pro, sharpness, n_pro, mode",
    [
        (((3, 3), 1), ((2,), 2), 1.0, 20, "random"),
        (((4,) * 8, 1), ((3, 3, 3, 3), 1), 1.0, 12, "random"),  # 2^16 codes: 16 frames per window
        (((5,), 3), ((2, 2), 1), 30.0, 20, "zero"),  # a sure model: frames of almost no bits
        (((5,), 3), ((2, 2), 1), 30.0, 3, "max"),  # and codes it thinks improbable
        (((3, 3), 1), ((2,), 2), 0.0, 1, "max"),  # one prosody frame, uniform tables
    ],
)
@pytest.mark.parametrize("frames, tail_windows", [(256, 8), (3, 8), (1, 2)])
def test_windowed_encoding_writes_the_bytes_of_whole_stream_coding(
    sem, pro, sharpness, n_pro, mode, frames, tail_windows, monkeypatch
):
    """Windows of 256, 3 and 1 frames (the last with only 2 windows kept, so trimming candidates often reach past them
    and are checked from the start on recomputed tables) write the payload whole-stream coding wrote, and decode."""
    mods = code_modules(sem, pro, sharpness)
    s, p, k = random_codes(mods, n_pro, seed=n_pro, mode=mode)
    monkeypatch.setattr(bitstream, "WINDOW_FRAMES", frames)
    monkeypatch.setattr(bitstream, "_TAIL_WINDOWS", tail_windows)
    enc = bitstream.encode_codes(mods, s, p, k, s.shape[1] * 640)
    assert _payload(enc.data, enc) == whole_stream_payload(mods, s, p)
    sem2, pro2, spk2, _ = bitstream.decode_codes(mods, enc.data)
    assert torch.equal(sem2, s) and torch.equal(pro2, p) and torch.equal(spk2, k)


def _windowed_stream(rng: np.random.Generator, n_windows: int, sure: bool):
    """Random tables coded window by window as the encoder does: (full payload, tail kept, every window)."""
    fam = constriction.stream.model.Categorical(perfect=False)
    enc = constriction.stream.queue.RangeEncoder()
    tail, windows = bitstream._Tail(), []
    for _ in range(n_windows):
        n, K = int(rng.integers(1, 12)), int(rng.integers(2, 40))
        probs = rng.dirichlet(np.full(K, 0.05 if sure else 1.0), size=n)
        symbols = np.array([rng.choice(K, p=q / q.sum()) for q in probs], dtype=np.int32)
        tail.add(enc.pos(), probs, symbols)
        enc.encode(symbols, fam, probs)
        tail.trim(enc.pos()[0])
        windows.append((probs, symbols))
    return enc.get_compressed().astype(">u4").tobytes(), tail, windows


def test_the_tail_check_agrees_with_decoding_from_the_start():
    """Candidates that change the full payload's last bytes (every trimming candidate does): decoding the kept windows
    from their checkpoint says what decoding everything says; the fallback (too few windows kept) is exercised too."""
    rng = np.random.default_rng(3)
    seen = {"tail": 0, "recomputed": 0, True: 0, False: 0}
    for case in range(40):
        full, tail, windows = _windowed_stream(rng, int(rng.integers(1, 30)), sure=case % 2 == 0)

        def recompute(windows=windows):
            seen["recomputed"] += 1
            return [(None, p, s) for p, s in windows]

        check = bitstream._TailCheck(full, tail, recompute)
        for _ in range(12):
            cand = bytearray(full[: int(rng.integers(max(0, len(full) - 10), len(full) + 1))])
            if cand and rng.random() < 0.5:
                cand[-int(rng.integers(1, min(4, len(cand)) + 1))] ^= int(rng.integers(1, 256))
            before = seen["recomputed"]
            got = check([bytes(cand)])[0]
            seen["tail"] += seen["recomputed"] == before
            assert got == _decodes_to(bytes(cand), windows), (case, len(full), len(cand))
            seen[got] += 1
    assert seen[True] > 20 and seen[False] > 20 and seen["recomputed"] > 0 and seen["tail"] > 100, seen


def _table_sizes(mods, n_pro: int, monkeypatch) -> int:
    """The largest probability table the encoder made at once, in entries."""
    real, sizes = bitstream.quantized_probs, []

    def spy(logits):
        sizes.append(int(np.asarray(logits).size))
        return real(logits)

    monkeypatch.setattr(bitstream, "quantized_probs", spy)
    s, p, k = random_codes(mods, n_pro)
    bitstream.encode_codes(mods, s, p, k, s.shape[1] * 640)
    return max(sizes)


def test_the_encoders_tables_do_not_grow_with_duration(monkeypatch):
    mods = code_modules(((4,) * 8, 1), ((4,) * 8, 1))  # 2^16 codes per level: 16 frames per window
    one, four = _table_sizes(mods, 8, monkeypatch), _table_sizes(mods, 32, monkeypatch)
    assert one == four == bitstream.WINDOW_PROBS
