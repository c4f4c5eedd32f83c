"""The real bitstream (docs/bitstream.md): a small header + semantic/prosody codes range-coded with the entropy model.

File layout (version 4, little endian)::

    magic "SR" | version u8 | model id (4 bytes) | n_sem (LEB128 varint) | tail (LEB128 varint) | symbol hash (4 bytes)
    | spk codes (groups × ceil(log2 K) bits, byte-padded) | payload (range-coder bytes) | crc32 u32 over all before

Everything else is derived: levels and codebook sizes from the model, prosody frames = n_sem / 4 (the factorizer cuts
to whole 8-frame blocks). The codes cover n_sem × the semantic hop samples; `tail` is how many samples the input had
beyond them (the end that does not fill a whole block, under a second), so a decoder returns the input's length.

Determinism. Both sides get next-frame logits from the same incremental path (`EntropyModel.coder`, a key/value
cache: linear in length); the encoder, which knows every frame, runs it over windows of frames (`StreamCoder.run`: the
same per-frame operations, tested bit for bit against the decoder's `logits`/`push`) and quantises and range-codes one
window at a time, so its memory holds a few windows' tables whatever the duration; the bytes are those of coding the
whole stream at once (tested). The logits become an integer frequency table by rounding their distance to the maximum onto
a grid of LOGIT_STEP nats and looking the grid index up in a fixed integer table, so a float difference far below the
grid step (another thread count, CPU or GPU) changes nothing unless a logit sits right on a rounding boundary. In that
rare case the decoded codes differ, and the symbol hash (blake2b over the frame count, speaker, semantic and prosody
codes) makes the decode raise instead of returning wrong audio. The CRC catches damaged files before any decoding.

The model id is sha256 over the fingerprints of the quantizers and the entropy model — the components that define the
"code language" — so a file made by another model is rejected, never decoded into garbage.

The payload is constriction's range-coder output (u32 words, most significant byte first) cut to the shortest byte
string that still decodes to the same codes when the reader pads it with zero bytes to whole words. A cut only changes
the last bytes, so a candidate is checked by decoding the last windows from the encoder's checkpoint before them
(`_TailCheck`); one that differs too early for the windows kept is decoded from the start on recomputed tables.

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

from siren.errors import LayoutMismatch, SirenError
from siren.models.io import fingerprint

MAGIC = b"SR"
VERSION = 4
OLD_VERSIONS = {
    3: "version 3 (no input length: decodes to whole blocks only)",
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
    sem_hop: int = 640,
) -> Encoded:
    """sem (1, Ts, L), pro (1, Tp = Ts / 4, L), spk (1, G) → bytes. `num_samples` is the input's length: the file
    records how far it reaches past the Ts × `sem_hop` samples the codes cover, and bit/s figures are over it.

    The streams are coded in windows of frames (`_coding_windows`), so memory holds a few windows' probability tables
    however long the stream is; the bytes are those of coding the whole stream in one call."""
    import constriction

    _check_codes(modules, sem, pro, spk)
    tail_samples = int(num_samples) - sem.shape[1] * sem_hop
    if tail_samples < 0:
        raise BitstreamError(
            f"the input ({num_samples} samples) is shorter than its codes cover ({sem.shape[1]} frames × {sem_hop})"
        )
    fam = constriction.stream.model.Categorical(perfect=False)
    enc = constriction.stream.queue.RangeEncoder()
    tail = _Tail()
    estimate = quantized = 0.0
    for logits, probs, symbols in _coding_windows(modules, sem, pro):
        tail.add(enc.pos(), probs, symbols)
        enc.encode(symbols, fam, probs)
        tail.trim(enc.pos()[0])
        rows = np.arange(len(symbols))
        logp = torch.log_softmax(logits.double(), -1).numpy()
        estimate -= float(logp[rows, symbols].sum()) / math.log(2)
        quantized -= float(np.log2(probs[rows, symbols]).sum())
        del logits, logp  # the next window's tables take their place
    full = enc.get_compressed().astype(">u4").tobytes()
    payload = _shortest_payload(full, _TailCheck(full, tail, lambda: _coding_windows(modules, sem, pro)))
    K_spk = modules["spk_quantizer"].codebook_size
    n_sem = sem.shape[1]
    head = (
        _HEAD.pack(MAGIC, VERSION, model_id(modules))
        + _varint(n_sem)
        + _varint(tail_samples)
        + symbol_hash(n_sem, spk, sem, pro)
    )
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


def _check_codes(modules: dict[str, nn.Module], sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor) -> None:
    """The codes fit the model's layout: one utterance, whole prosody frames, levels, groups and codebook sizes (a code
    outside its codebook would be coded as another one, or spill into its neighbour's bits)."""
    if sem.dim() != 3 or pro.dim() != 3 or spk.dim() != 2:
        raise LayoutMismatch(
            f"encode_codes takes sem (1, Ts, L), pro (1, Tp, L), spk (1, G); got shapes {tuple(sem.shape)}, "
            f"{tuple(pro.shape)}, {tuple(spk.shape)}"
        )
    if sem.shape[0] != 1 or pro.shape[0] != 1 or spk.shape[0] != 1:
        raise ValueError(
            f"encode_codes takes one utterance, got batches of {sem.shape[0]}/{pro.shape[0]}/{spk.shape[0]}"
        )
    if pro.shape[1] * SEM_PER_PRO != sem.shape[1]:
        raise BitstreamError(f"frame counts do not line up: {sem.shape[1]} sem vs {pro.shape[1]} pro frames")
    sq, pq, kq = (modules[n] for n in ("sem_quantizer", "pro_quantizer", "spk_quantizer"))
    for name, codes, (K, L) in (
        ("sem", sem, (sq.codebook_size, sq.num_levels)),
        ("pro", pro, (pq.codebook_size, pq.num_levels)),
        ("spk", spk, (kq.codebook_size, kq.num_codebooks)),
    ):
        if codes.shape[-1] != L:
            what = "groups" if name == "spk" else "levels"
            raise LayoutMismatch(f"{name} codes have {codes.shape[-1]} {what}, the model codes {L}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
            raise LayoutMismatch(f"{name} code {bad} is outside the model's codebook of {K} codes (0 .. {K - 1})")


# Coding windows: at most this many probabilities (float64) in one window, and at most this many frames.
WINDOW_PROBS = 1 << 20
WINDOW_FRAMES = 256


def _coding_windows(modules: dict[str, nn.Module], sem: torch.Tensor, pro: torch.Tensor):
    """Yield (logits (N, K) float32, probs (N, K) float64, symbols (N,) int32) per window of frames, sem then pro,
    frame-major and level-minor: the coding order. The logits come from one `StreamCoder` per stream, run window after
    window, so they are the decoder's frame-by-frame logits; each window's tables are made and freed in turn."""
    em = modules["entropy_model"]
    dev = next(em.parameters()).device
    for stream, codes in (("sem", sem), ("pro", pro)):
        coder = em.coder(stream)
        T, L = codes.shape[1], codes.shape[2]
        K = modules[f"{stream}_quantizer"].codebook_size
        per = max(1, min(WINDOW_FRAMES, WINDOW_PROBS // (L * K)))
        for a in range(0, T, per):
            window = codes[:, a : a + per]
            logits = coder.run(window.to(dev))[0].cpu()
            logits = logits.reshape(-1, logits.shape[-1])  # (n · L, K)
            symbols = window[0].cpu().numpy().astype(np.int32).reshape(-1)
            yield logits, quantized_probs(logits), symbols


def read_header(data: bytes) -> dict:
    """Magic, version, CRC and the fixed fields; raises BitstreamError naming the problem."""
    if len(data) < _HEAD.size + 2 + HASH_BYTES + 4:
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
    tail, off = _read_varint(body, off)
    h = body[off : off + HASH_BYTES]
    return {"model_id": mid, "n_sem": n_sem, "tail": tail, "hash": h, "offset": off + HASH_BYTES, "body": body}


def decode_codes(
    modules: dict[str, nn.Module], data: bytes, sem_hop: int = 640
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """bytes → sem (1, Ts, L), pro (1, Tp, L), spk (1, G), the input's length in samples (Ts × sem_hop + tail).
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
    return out["sem"], out["pro"], spk, n_sem * sem_hop + hd["tail"]


def _words(payload: bytes) -> np.ndarray:
    """Payload bytes → the range decoder's u32 words (zero-padded to a whole word, most significant byte first)."""
    return np.frombuffer(payload + b"\0" * (-len(payload) % 4), dtype=">u4").astype(np.uint32)


def _decodes_to(payload: bytes, coded) -> bool:
    """Whether `payload` decodes to the symbols of `coded`, an iterable of (probs (N, K), symbols (N,)) in coding
    order, read from the start."""
    return _all_decode_to([payload], coded)[0]


def _all_decode_to(payloads: list[bytes], coded) -> list[bool]:
    """`_decodes_to` for several payloads at once: one pass over `coded` (which may be computed as it is read) feeds
    a decoder per payload, and stops once every payload has failed."""
    import constriction

    fam = constriction.stream.model.Categorical(perfect=False)
    ok = [True] * len(payloads)
    decoders = [constriction.stream.queue.RangeDecoder(_words(p)) for p in payloads]
    for probs, symbols in coded:
        for i, dec in enumerate(decoders):
            if ok[i]:
                ok[i] = _decodes_window(dec, fam, probs, symbols)
        if not any(ok):
            break
    return ok


def _decodes_window(dec, fam, probs: np.ndarray, symbols: np.ndarray) -> bool:
    try:
        return np.array_equal(dec.decode(fam, probs), symbols)
    except (ValueError, RuntimeError, AssertionError):  # constriction rejects a stream it cannot read
        return False


# A window's checkpoint serves candidates that agree with the full payload on its first `words + 2` words (what the
# decoder has read before the window's first symbol) plus a word of margin; the encoder keeps windows back to one
# that lies this many words before the end, enough for every candidate of a usual trim (the seal adds 1 or 2 words).
_SEEK_LOOKAHEAD = 3
_TAIL_WORDS = 8
_TAIL_WINDOWS = 8  # at most (frames of almost no bits would keep them all); earlier candidates are recomputed


@dataclass
class _Window:
    words: int  # the encoder's position before the window's first symbol (`RangeEncoder.pos`)
    state: tuple[int, int]
    probs: np.ndarray
    symbols: np.ndarray


class _Tail:
    """The last coded windows with the encoder's position before each: enough to check a trimmed payload by decoding
    the stream's end alone (`_TailCheck`), in memory that does not grow with the stream's length."""

    def __init__(self):
        self.windows: list[_Window] = []

    def add(self, pos: tuple[int, tuple[int, int]], probs: np.ndarray, symbols: np.ndarray) -> None:
        self.windows.append(_Window(pos[0], pos[1], probs, symbols))

    def trim(self, words_now: int) -> None:
        """Drop the oldest window once the next one is already `_TAIL_WORDS` behind the end (it only gets further)."""
        w = self.windows
        while len(w) > 1 and (w[1].words + _TAIL_WORDS <= words_now or len(w) > _TAIL_WINDOWS):
            w.pop(0)


class _TailCheck:
    """Which candidate payloads decode to the coded symbols, as `_decodes_to` over the whole stream would say.

    A range decoder has read exactly the first `words + 2` words when it reaches a window's first symbol (that is what
    `seek` restores), so a candidate that agrees with the full payload there decodes everything before the window as
    the full payload does, which is correctly; it decodes all symbols correctly iff it decodes the window and those
    after it correctly. Candidates that differ too early for the windows kept are decoded from the start, all in one
    pass over the probabilities computed again (`recompute()` yields the encoder's windows)."""

    def __init__(self, full: bytes, tail: _Tail, recompute):
        self.full_words = _words(full)
        self.windows = tail.windows
        self.recompute = recompute

    def __call__(self, candidates: list[bytes]) -> list[bool]:
        import constriction

        fam = constriction.stream.model.Categorical(perfect=False)
        ok: list[bool | None] = []
        for cand in candidates:
            words = _words(cand)
            n = min(len(words), len(self.full_words))
            differ = np.flatnonzero(words[:n] != self.full_words[:n])
            agree = int(differ[0]) if len(differ) else n  # words the candidate shares with the full payload
            kept = [i for i, w in enumerate(self.windows) if w.words + _SEEK_LOOKAHEAD <= agree]
            if not kept:
                ok.append(None)  # decoded from the start below
                continue
            dec = constriction.stream.queue.RangeDecoder(words)
            first = self.windows[kept[-1]]
            dec.seek(first.words, first.state)
            ok.append(all(_decodes_window(dec, fam, w.probs, w.symbols) for w in self.windows[kept[-1] :]))
        early = [c for c, o in zip(candidates, ok, strict=True) if o is None]
        if early:
            it = iter(_all_decode_to(early, ((p, s) for _, p, s in self.recompute())))
            ok = [next(it) if o is None else o for o in ok]
        return ok


def _shortest_payload(full: bytes, decode_check) -> bytes:
    """The shortest prefix of `full` (its last byte possibly incremented by one) that decodes to the same symbols;
    `decode_check(candidates) -> [bool]` says which candidates do.

    The values that decode correctly form one interval, so if no k-byte candidate works, no shorter one does: the search
    stops at the first length that fails. Lengths are checked in batches (4, 8, 16, ... at a time: a check from the
    start costs a pass over the stream) and the results are then read in order, one length after another."""
    if not decode_check([full])[0]:
        raise BitstreamError("range coder round trip failed before trimming; this is a bug, please report it")
    best, k, batch = full, len(full) - 1, 4
    while k >= 0:
        lengths = range(k, max(-1, k - batch), -1)
        cands = [c for n in lengths for c in _trimmed(full, n)]
        ok = dict(zip(cands, decode_check(cands), strict=True))
        for n in lengths:
            found = next((c for c in _trimmed(full, n) if ok[c]), None)
            if found is None:
                return best
            best = found
        k, batch = k - batch, 2 * batch
    return best


def _trimmed(full: bytes, k: int) -> list[bytes]:
    """The k-byte candidates, in order of preference: the prefix, then the prefix plus one in its last byte."""
    prefix = full[:k]
    up = int.from_bytes(prefix, "big") + 1
    return [prefix, up.to_bytes(k, "big")] if 0 < k and up < 256**k else [prefix]


def _pack_bits(values: list[int], nbits: int) -> bytes:
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * nbits)
    return acc.to_bytes(math.ceil(len(values) * nbits / 8), "little")


def _unpack_bits(data: bytes, nbits: int, n: int) -> list[int]:
    acc = int.from_bytes(data, "little")
    return [(acc >> (i * nbits)) & ((1 << nbits) - 1) for i in range(n)]
