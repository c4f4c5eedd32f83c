"""The real bitstream (DESIGN §11): a small header + semantic/prosody codes range-coded with the entropy model.

File layout (version 3, little endian)::

    magic "SR" | version u8 | model id (4 bytes) | n_sem (LEB128 varint) | symbol hash (4 bytes)
    | spk codes (groups × ceil(log2 K) bits, byte-padded) | payload (range-coder bytes) | crc32 u32 over all before

Everything else is derived: levels and codebook sizes from the model, prosody frames = n_sem / 4 (the factorizer cuts
to whole 8-frame blocks), samples = n_sem × the semantic hop.

Determinism. Both sides get next-frame logits from the same incremental path (`EntropyModel.coder`, a key/value
cache: linear in length); the encoder, which knows every frame, runs it over the whole stream (`StreamCoder.run`: the
same per-frame operations, tested bit for bit against the decoder's `logits`/`push`) and quantises and range-codes the
stream in one call each. The logits become an integer frequency table by rounding their distance to the maximum onto
a grid of LOGIT_STEP nats and looking the grid index up in a fixed integer table, so a float difference far below the
grid step (another thread count, CPU or GPU) changes nothing unless a logit sits right on a rounding boundary. In that
rare case the decoded codes differ, and the symbol hash (blake2b over the frame count, speaker, semantic and prosody
codes) makes the decode raise instead of returning wrong audio. The CRC catches damaged files before any decoding.

The model id is sha256 over the fingerprints of the quantizers and the entropy model — the components that define the
"code language" — so a file made by another model is rejected, never decoded into garbage.

The payload is constriction's range-coder output (u32 words, most significant byte first) cut to the shortest byte
string that still decodes to the same codes when the reader pads it with zero bytes to whole words.

Versions: 1 stored whole little-endian words; 2 had byte-granular payloads but float probabilities, recomputed the
entropy model on the whole prefix for every frame and had no symbol hash. Both are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from siren.errors import SirenError
from siren.models.io import fingerprint

MAGIC = b"SR"
VERSION = 3
OLD_VERSIONS = {
    1: "version 1 (whole-word payloads, float probabilities)",
    2: "version 2 (float probabilities recomputed over the whole prefix, no symbol hash)",
}
_HEAD = struct.Struct("<2sB4s")
HASH_BYTES = 4
SEM_PER_PRO = 4  # semantic frames per prosody frame (25 Hz / 6.25 Hz)

# Probability quantisation: logits relative to their maximum, rounded to LOGIT_STEP nats, floored at −LOGIT_RANGE nats;
# the frequency of grid index j is round(2^FREQ_BITS · exp(−j · LOGIT_STEP)), at least 1.
LOGIT_STEP = 1.0 / 8
LOGIT_RANGE = 16.0
FREQ_BITS = 20
_FREQ_TABLE = np.maximum(
    1, np.rint(2.0**FREQ_BITS * np.exp(-np.arange(int(LOGIT_RANGE / LOGIT_STEP) + 1) * LOGIT_STEP))
).astype(np.int64)


class BitstreamError(SirenError):
    """A .siren file that is truncated, corrupted, was made by another model, or did not decode to its own hash."""


def model_id(modules: dict[str, nn.Module]) -> bytes:
    """4 bytes of sha256 over the code-defining components' fingerprints. Hashing the weights costs tens of ms, so
    the id is kept on the entropy model together with the weight versions it was computed for (any in-place update
    of a parameter bumps its version, so a changed model is never served a stale id)."""
    names = ("sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model")
    key = tuple((n, p.data_ptr(), p._version) for n in names for p in modules[n].parameters())
    cached = getattr(modules["entropy_model"], "_siren_model_id", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    fps = {n: fingerprint(modules[n]) for n in names}
    mid = hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).digest()[:4]
    modules["entropy_model"]._siren_model_id = (key, mid)
    return mid


def quantized_probs(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """logits (..., K) → (..., K) float64 probabilities that are exact ratios of integer frequencies (see module doc).

    Each row's result depends on that row alone and every step is exact or correctly rounded (float32 → float64,
    subtraction, division by a power of two, rounding, a table look-up, an integer sum, one division), so quantising a
    whole stream at once (the encoder) gives the same bits as quantising frame by frame (the decoder)."""
    lg = np.asarray(logits, dtype=np.float64)
    rel = (lg.max(-1, keepdims=True) - lg) / LOGIT_STEP
    idx = np.minimum(np.rint(rel), len(_FREQ_TABLE) - 1).astype(np.int64)
    freq = _FREQ_TABLE[idx]
    return freq / freq.sum(-1, keepdims=True)


def symbol_hash(n_sem: int, spk: torch.Tensor, sem: torch.Tensor, pro: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(struct.pack("<I", n_sem))
    for t in (spk, sem, pro):
        h.update(t.detach().to("cpu", torch.int32).contiguous().numpy().astype("<i4").tobytes())
    return h.digest()


def check_symbol_hash(want: bytes, got: bytes) -> None:
    if want != got:
        raise BitstreamError(
            "the decoded codes do not match the file's symbol hash: the file is damaged, or this machine computes the "
            "entropy model's probabilities differently from the encoding machine (no audio was produced)"
        )


@dataclass
class Encoded:
    data: bytes
    header_bits: int  # everything but the payload (header, speaker codes, length, hash, crc)
    payload_bits: int
    estimate_bits: float  # −log2 p of the coded symbols under the entropy model's float probabilities
    quantized_bits: float  # −log2 p under the integer frequency tables actually coded with
    seconds: float

    @property
    def bps(self) -> float:
        return 8 * len(self.data) / self.seconds

    @property
    def payload_bps(self) -> float:
        return self.payload_bits / self.seconds


def _stream_probs(entropy_model: nn.Module, stream: str, codes: torch.Tensor, t: int) -> np.ndarray:
    """Quantised probabilities (L, K) for frame t of `codes` (1, T, L), recomputed from scratch (a reference: O(t))."""
    c = entropy_model.coder(stream)
    for i in range(t):
        c.push(codes[:, i])
    return quantized_probs(c.logits()[0].cpu())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, off: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if off >= len(data) or shift > 35:
            raise BitstreamError("bitstream header is truncated or corrupted (frame count)")
        b = data[off]
        n |= (b & 0x7F) << shift
        off, shift = off + 1, shift + 7
        if not b & 0x80:
            return n, off


def encode_codes(
    modules: dict[str, nn.Module],
    sem: torch.Tensor,
    pro: torch.Tensor,
    spk: torch.Tensor,
    num_samples: int,
    sample_rate: int = 16000,
) -> Encoded:
    """sem (1, Ts, L), pro (1, Tp = Ts / 4, L), spk (1, G) → bytes. `num_samples` (the input's length) only sets the
    duration that bit/s figures are computed over; the decoder renders Ts × (semantic hop) samples."""
    import constriction

    if sem.shape[0] != 1 or pro.shape[0] != 1 or spk.shape[0] != 1:
        raise ValueError(
            f"encode_codes takes one utterance, got batches of {sem.shape[0]}/{pro.shape[0]}/{spk.shape[0]}"
        )
    if pro.shape[1] * SEM_PER_PRO != sem.shape[1]:
        raise BitstreamError(f"frame counts do not line up: {sem.shape[1]} sem vs {pro.shape[1]} pro frames")
    fam = constriction.stream.model.Categorical(perfect=False)
    enc = constriction.stream.queue.RangeEncoder()
    em = modules["entropy_model"]
    estimate = quantized = 0.0
    coded: list[tuple[np.ndarray, np.ndarray]] = []  # (probs (N, K), symbols (N,)) per stream, in coding order
    for stream, codes in (("sem", sem), ("pro", pro)):
        # The decoder's frame-by-frame path, run over the known frames (`StreamCoder.run`): the same logits.
        logits = em.coder(stream).run(codes.to(next(em.parameters()).device))[0].cpu()  # (T, L, K)
        k = logits.shape[-1]
        symbols = codes[0].cpu().numpy().astype(np.int32).reshape(-1)  # frame-major, level-minor: the coding order
        probs = quantized_probs(logits.reshape(-1, k))
        enc.encode(symbols, fam, probs)
        coded.append((probs, symbols))
        rows = np.arange(len(symbols))
        logp = torch.log_softmax(logits.reshape(-1, k).double(), -1).numpy()
        estimate -= float(logp[rows, symbols].sum()) / math.log(2)
        quantized -= float(np.log2(probs[rows, symbols]).sum())
    payload = _shortest_payload(enc.get_compressed().astype(">u4").tobytes(), coded)
    K_spk = modules["spk_quantizer"].codebook_size
    n_sem = sem.shape[1]
    head = _HEAD.pack(MAGIC, VERSION, model_id(modules)) + _varint(n_sem) + symbol_hash(n_sem, spk, sem, pro)
    body = head + _pack_bits(spk[0].tolist(), max(1, math.ceil(math.log2(K_spk)))) + payload
    data = body + struct.pack("<I", zlib.crc32(body))
    return Encoded(
        data=data,
        header_bits=8 * (len(data) - len(payload)),
        payload_bits=8 * len(payload),
        estimate_bits=estimate,
        quantized_bits=quantized,
        seconds=num_samples / sample_rate,
    )


def read_header(data: bytes) -> dict:
    """Magic, version, CRC and the fixed fields; raises BitstreamError naming the problem."""
    if len(data) < _HEAD.size + 1 + HASH_BYTES + 4:
        raise BitstreamError(f"file is truncated: {len(data)} bytes, shorter than the smallest header")
    magic, version, mid = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f"not a SIREN bitstream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        old = OLD_VERSIONS.get(version)
        what = f"an old SIREN bitstream, {old}" if old else f"bitstream version {version}"
        raise BitstreamError(f"this is {what}; this SIREN reads version {VERSION} only: re-encode the audio")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream is corrupted or truncated (CRC mismatch)")
    n_sem, off = _read_varint(body, _HEAD.size)
    h = body[off : off + HASH_BYTES]
    return {"model_id": mid, "n_sem": n_sem, "hash": h, "offset": off + HASH_BYTES, "body": body}


def decode_codes(
    modules: dict[str, nn.Module], data: bytes, sem_hop: int = 640
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """bytes → sem (1, Ts, L), pro (1, Tp, L), spk (1, G), samples the codes cover (Ts × sem_hop).
    Raises BitstreamError on any inconsistency, including codes that do not match the file's symbol hash."""
    import constriction

    hd = read_header(data)
    body, n_sem = hd["body"], hd["n_sem"]
    if hd["model_id"] != model_id(modules):
        raise BitstreamError(
            f"bitstream was made by another model (model id {hd['model_id'].hex()}, "
            f"this checkpoint is {model_id(modules).hex()})"
        )
    if n_sem % SEM_PER_PRO:
        raise BitstreamError(f"bitstream header is corrupted: {n_sem} semantic frames is not a multiple of 4")
    l_sem, l_pro = modules["sem_quantizer"].num_levels, modules["pro_quantizer"].num_levels
    groups = modules["spk_quantizer"].num_codebooks
    K_spk = modules["spk_quantizer"].codebook_size
    nbits = max(1, math.ceil(math.log2(K_spk)))
    off = hd["offset"]
    spk_bytes = math.ceil(groups * nbits / 8)
    spk = torch.tensor([_unpack_bits(body[off : off + spk_bytes], nbits, groups)], dtype=torch.long)
    off += spk_bytes
    fam = constriction.stream.model.Categorical(perfect=False)
    em = modules["entropy_model"]
    dev = next(em.parameters()).device
    out = {}
    try:
        dec = constriction.stream.queue.RangeDecoder(_words(body[off:]))
        for stream, n, L in (("sem", n_sem, l_sem), ("pro", n_sem // SEM_PER_PRO, l_pro)):
            codes = torch.zeros(1, n, L, dtype=torch.long)
            coder = em.coder(stream)
            for t in range(n):
                probs = quantized_probs(coder.logits()[0].cpu().numpy())
                codes[0, t] = torch.from_numpy(dec.decode(fam, probs).astype(np.int64))
                if t + 1 < n:
                    coder.push(codes[:, t].to(dev))
            out[stream] = codes
    except (ValueError, RuntimeError, AssertionError) as exc:  # constriction rejects a stream it cannot read
        raise BitstreamError(f"the payload cannot be decoded ({exc}); the file is damaged") from exc
    check_symbol_hash(hd["hash"], symbol_hash(n_sem, spk, out["sem"], out["pro"]))
    return out["sem"], out["pro"], spk, n_sem * sem_hop


def _words(payload: bytes) -> np.ndarray:
    """Payload bytes → the range decoder's u32 words (zero-padded to a whole word, most significant byte first)."""
    return np.frombuffer(payload + b"\0" * (-len(payload) % 4), dtype=">u4").astype(np.uint32)


def _decodes_to(payload: bytes, coded: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    import constriction

    fam = constriction.stream.model.Categorical(perfect=False)
    try:
        dec = constriction.stream.queue.RangeDecoder(_words(payload))
        return all(np.array_equal(dec.decode(fam, probs), symbols) for probs, symbols in coded)
    except (ValueError, RuntimeError, AssertionError):  # constriction rejects a stream it cannot read
        return False


def _shortest_payload(full: bytes, coded: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The shortest prefix of `full` (its last byte possibly incremented by one) that decodes to the same symbols.

    The values that decode correctly form one interval, so if no k-byte candidate works, no shorter one does: the search
    stops at the first length that fails. Each candidate is checked by decoding it (with the probabilities at hand)."""
    if not _decodes_to(full, coded):
        raise BitstreamError("range coder round trip failed before trimming; this is a bug, please report it")
    best = full
    for k in range(len(full) - 1, -1, -1):
        prefix = full[:k]
        found = prefix if _decodes_to(prefix, coded) else None
        if found is None and k > 0:
            up = int.from_bytes(prefix, "big") + 1
            if up < 256**k and _decodes_to(up.to_bytes(k, "big"), coded):
                found = up.to_bytes(k, "big")
        if found is None:
            break
        best = found
    return best


def _pack_bits(values: list[int], nbits: int) -> bytes:
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * nbits)
    return acc.to_bytes(math.ceil(len(values) * nbits / 8), "little")


def _unpack_bits(data: bytes, nbits: int, n: int) -> list[int]:
    acc = int.from_bytes(data, "little")
    return [(acc >> (i * nbits)) & ((1 << nbits) - 1) for i in range(n)]
