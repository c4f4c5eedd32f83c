"""The real bitstream (DESIGN §11): a small header + semantic/prosody codes range-coded with the entropy model.

File layout (little endian), 13 bytes + speaker codes of overhead::

    magic "SR" | version u8 | model id (4 bytes) | n_sem u16 | spk codes (groups × ceil(log2 K) bits, byte-padded)
    | payload (range-coder bytes) | crc32 u32 over all previous bytes

The payload is constriction's range-coder output (u32 words, most significant byte first) cut to the shortest byte
string that still decodes to the same codes when the reader pads it with zero bytes to whole words. The encoder checks
this by decoding each candidate; it saves about 14 of the 16 bits that whole words cost per file.

Everything else is derived: levels and codebook sizes from the model, prosody frames = n_sem / 4 (the factorizer cuts
to whole 8-frame blocks), samples = n_sem × 640.

The model id is sha256 over the fingerprints of the quantizers and the entropy model — the components that define the
"code language" — so a file made by another model is rejected, never decoded into garbage. Probabilities come from the
entropy model one frame at a time (`next_probs` on the prefix), identically at encode and decode time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from siren.errors import SirenError
from siren.models.io import fingerprint

MAGIC = b"SR"
VERSION = 2  # 2: byte-granular payload (1 stored whole little-endian words)
_HEAD = struct.Struct("<2sB4sH")
SEM_HOP = 640


class BitstreamError(SirenError):
    """A .siren file that is truncated, corrupted, or was made by another model."""


def model_id(modules: dict[str, nn.Module]) -> bytes:
    fps = {n: fingerprint(modules[n]) for n in ("sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model")}
    return hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).digest()[:4]


@dataclass
class Encoded:
    data: bytes
    header_bits: int  # everything but the payload (header, speaker codes, length, crc)
    payload_bits: int
    estimate_bits: float  # −log2 p of the coded symbols under the same probabilities
    seconds: float

    @property
    def bps(self) -> float:
        return 8 * len(self.data) / self.seconds

    @property
    def payload_bps(self) -> float:
        return self.payload_bits / self.seconds


def _stream_probs(entropy_model: nn.Module, stream: str, codes: torch.Tensor, t: int) -> np.ndarray:
    """Probabilities (L, K) for frame t given frames < t of `codes` (1, T, L)."""
    with torch.no_grad():
        p = entropy_model.next_probs(stream, codes[:, :t])[0].double().cpu().numpy()
    return p / p.sum(-1, keepdims=True)


def encode_codes(
    modules: dict[str, nn.Module],
    sem: torch.Tensor,
    pro: torch.Tensor,
    spk: torch.Tensor,
    num_samples: int,
    sample_rate: int = 16000,
) -> Encoded:
    """sem (1, Ts, L), pro (1, Tp = Ts / 4, L), spk (1, G) → bytes. `num_samples` (the input's length) only sets the
    duration that bit/s figures are computed over; the decoder renders Ts × 640 samples."""
    import constriction

    fam = constriction.stream.model.Categorical(perfect=False)
    enc = constriction.stream.queue.RangeEncoder()
    em = modules["entropy_model"]
    estimate = 0.0
    coded: list[tuple[np.ndarray, np.ndarray]] = []  # (probs, symbols) per frame, in coding order
    for stream, codes in (("sem", sem), ("pro", pro)):
        for t in range(codes.shape[1]):
            probs = _stream_probs(em, stream, codes, t)
            symbols = codes[0, t].cpu().numpy().astype(np.int32)
            enc.encode(symbols, fam, probs)
            coded.append((probs, symbols))
            estimate -= float(np.log2(probs[np.arange(len(symbols)), symbols]).sum())
    payload = _shortest_payload(enc.get_compressed().astype(">u4").tobytes(), coded)
    if pro.shape[1] * 4 != sem.shape[1]:
        raise BitstreamError(f"frame counts do not line up: {sem.shape[1]} sem vs {pro.shape[1]} pro frames")
    K_spk = modules["spk_quantizer"].codebook_size
    head = _HEAD.pack(MAGIC, VERSION, model_id(modules), sem.shape[1])
    body = head + _pack_bits(spk[0].tolist(), max(1, math.ceil(math.log2(K_spk)))) + payload
    data = body + struct.pack("<I", zlib.crc32(body))
    return Encoded(
        data=data,
        header_bits=8 * (len(data) - len(payload)),
        payload_bits=8 * len(payload),
        estimate_bits=estimate,
        seconds=num_samples / sample_rate,
    )


def decode_codes(modules: dict[str, nn.Module], data: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """bytes → sem (1, Ts, L), pro (1, Tp, L), spk (1, G), samples the codes cover (Ts × 640).
    Raises BitstreamError on any inconsistency."""
    import constriction

    if len(data) < _HEAD.size + 4:
        raise BitstreamError(f"file is truncated: {len(data)} bytes, shorter than the {_HEAD.size + 4}-byte frame")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    magic, version, mid, n_sem = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise BitstreamError(f"not a SIREN bitstream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise BitstreamError(f"bitstream version {version} is not supported (this SIREN reads version {VERSION})")
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream is corrupted or truncated (CRC mismatch)")
    l_sem, l_pro = modules["sem_quantizer"].num_levels, modules["pro_quantizer"].num_levels
    groups = modules["spk_quantizer"].num_codebooks
    n_pro, num_samples = n_sem // 4, n_sem * SEM_HOP
    if mid != model_id(modules):
        raise BitstreamError(
            f"bitstream was made by another model (model id {mid.hex()}, this checkpoint is {model_id(modules).hex()})"
        )
    K_spk = modules["spk_quantizer"].codebook_size
    nbits = max(1, math.ceil(math.log2(K_spk)))
    off = _HEAD.size
    spk_bytes = math.ceil(groups * nbits / 8)
    spk = _unpack_bits(body[off : off + spk_bytes], nbits, groups)
    off += spk_bytes
    dec = constriction.stream.queue.RangeDecoder(_words(body[off:]))
    fam = constriction.stream.model.Categorical(perfect=False)
    em = modules["entropy_model"]
    out = {}
    for stream, n, L in (("sem", n_sem, l_sem), ("pro", n_pro, l_pro)):
        codes = torch.zeros(1, n, L, dtype=torch.long)
        for t in range(n):
            probs = _stream_probs(em, stream, codes, t)
            codes[0, t] = torch.from_numpy(np.asarray(dec.decode(fam, probs), dtype=np.int64))
        out[stream] = codes
    return out["sem"], out["pro"], torch.tensor([spk], dtype=torch.long), num_samples


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


# ------------------------------------------------------------------------------------------------------- checkpoints
ENCODER_PARTS = ["factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model"]


def load_codec(uri: str, *, with_decoder: bool = False):
    """Modules needed to encode (features + analysis + entropy model) from a codec or adapt checkpoint."""
    from siren.artifacts import resolve_checkpoint
    from siren.train.checkpoint import read_meta
    from siren.train.stages.common import load_checkpoint

    meta = read_meta(resolve_checkpoint(uri))
    feat = "student_ssl" if meta["stage"] == "adapt" else "ssl"
    if meta["stage"] not in ("adapt", "codec"):
        raise SirenError(f"{uri} is a {meta['stage']!r} checkpoint; encode/decode need a codec or adapt checkpoint")
    names = [feat, *ENCODER_PARTS] + (["decoder"] if with_decoder else [])
    ck = load_checkpoint(uri, names)
    for m in ck.modules.values():
        m.eval().requires_grad_(False)
    ck.modules["features"] = ck.modules[feat]
    return ck


def _model_registry() -> Path:
    from siren.artifacts import artifact_cache_dir

    return artifact_cache_dir() / "models"


def encode_file(wav_path: str, out_path: str, uri: str) -> Encoded:
    from siren.data.audio import load_audio
    from siren.train.stages.common import analyse

    ck = load_codec(uri)
    wav = load_audio(wav_path, ck.cfg.audio.sample_rate)
    n = wav.shape[-1] - wav.shape[-1] % 2560
    if n < 2560:
        raise SirenError(f"{wav_path} is too short to encode: {wav.shape[-1]} samples, need at least 2560 (0.16 s)")
    with torch.no_grad():
        an = analyse(ck.modules, ck.modules["features"](wav[None, :n]))
    # The model registry lets `siren decode` find the checkpoint from the file's model id alone.
    enc = encode_codes(ck.modules, an.sem.codes, an.pro.codes, an.spk.codes, n, ck.cfg.audio.sample_rate)
    reg = _model_registry()
    reg.mkdir(parents=True, exist_ok=True)
    (reg / f"{model_id(ck.modules).hex()}.json").write_text(json.dumps({"checkpoint": str(ck.path)}))
    tmp = Path(out_path).with_name(Path(out_path).name + ".tmp")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(enc.data)
    os.replace(tmp, out_path)
    return enc


def checkpoint_for(data: bytes) -> str:
    if len(data) < _HEAD.size or data[:2] != MAGIC:
        raise BitstreamError("not a SIREN bitstream")
    mid = _HEAD.unpack_from(data)[2].hex()
    p = _model_registry() / f"{mid}.json"
    if not p.is_file():
        raise BitstreamError(f"no local checkpoint is known for model id {mid}; pass --checkpoint URI")
    return json.loads(p.read_text())["checkpoint"]


def decode_file(
    in_path: str, out_path: str, uri: str | None = None, flow_uri: str | None = None, vocoder_uri: str | None = None
) -> dict:
    from siren.data.audio import save_audio
    from siren.train.stages.common import load_checkpoint

    data = Path(in_path).read_bytes()
    uri = uri or checkpoint_for(data)
    ck = load_codec(uri, with_decoder=True)
    sem, pro, spk, num_samples = decode_codes(ck.modules, data)
    q = ck.modules
    lat = (
        q["sem_quantizer"].decode_codes(sem),
        q["pro_quantizer"].decode_codes(pro),
        q["spk_quantizer"].decode_codes(spk),
    )
    flow_uri = flow_uri or ck.cfg.pipeline.flow
    vocoder_uri = vocoder_uri or ck.cfg.pipeline.vocoder
    if not vocoder_uri:
        raise SirenError("decoding to audio needs a vocoder: pass --pipeline-vocoder URI or set pipeline.vocoder")
    vocoder = load_checkpoint(vocoder_uri, ["vocoder"]).modules["vocoder"].eval()
    with torch.no_grad():
        if flow_uri:
            fl = load_checkpoint(flow_uri, ["fuser", "flow"]).modules
            g = torch.Generator().manual_seed(0)
            mel = fl["flow"].sample(
                fl["fuser"].eval()(*lat), steps=ck.cfg.flow.steps, solver=ck.cfg.flow.solver, generator=g
            )
            path = "fuser+flow"
        else:
            mel = q["decoder"](*lat)
            path = "decoder head (no pipeline.flow)"
        wav = vocoder(mel)[0, :num_samples]
    save_audio(out_path, wav, ck.cfg.audio.sample_rate)
    return {"samples": num_samples, "mel_path": path, "checkpoint": str(ck.path)}


def encode_cli(args) -> int:
    enc = encode_file(args.input, args.output, args.checkpoint)
    print(
        f"{args.output}: {len(enc.data)} bytes for {enc.seconds:.2f} s = {enc.bps:.1f} bit/s "
        f"(payload {enc.payload_bps:.1f} bit/s, entropy-model estimate {enc.estimate_bits / enc.seconds:.1f} bit/s, "
        f"header {enc.header_bits} bits)"
    )
    return 0


def decode_cli(args) -> int:
    info = decode_file(args.input, args.output, args.checkpoint, args.pipeline_flow, args.pipeline_vocoder)
    print(f"{args.output}: {info['samples']} samples via {info['mel_path']} ({info['checkpoint']})")
    return 0
