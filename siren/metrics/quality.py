"""Perceptual quality of rendered audio (the optional `eval` extra): PESQ, STOI, speaker similarity, WER, DNSMOS.

`score_utterance(uid, original, coded, scorers, text)` scores one utterance from in-memory 16 kHz mono waveforms;
`siren verify` calls it on every eval utterance and pools the rows with `pool_quality`. `quality_metrics(out_dir)` does
the same for the `<id>_original.wav` / `<id>_adapted.wav` / `<id>_baseline.wav` triples in a folder. Keys, for SYSTEM
in adapted/baseline, averages over utterances:

- `quality/pesq/SYSTEM`    wideband PESQ (MOS-LQO, ~1.0–4.64) of the coded audio against the original
- `quality/stoi/SYSTEM`    STOI (0–1) against the original
- `quality/spk_sim/SYSTEM` cosine similarity of resemblyzer speaker embeddings (coded vs original)
- `quality/wer/SYSTEM`     word error rate of the pocketsphinx transcript of the coded audio against the utterance's
                           manifest text when it has one (accuracy), else against the pocketsphinx transcript of the
                           original (consistency); both sides lower-cased, punctuation removed
- `quality/wer/reference_manifest`, `quality/wer/reference_asr`  how many utterances had each WER reference
- `quality/dnsmos/SYSTEM`  DNSMOS P.835 overall score (no reference) of the coded audio
- `quality/<metric>/failed` utterance×system pairs the library could not score (e.g. PESQ on silence); they are left
                           out of that metric's average, never replaced by a value. A metric whose every pair failed
                           for a system has no average key for it.
- `quality/num_utts`       utterances scored (those with audio from both systems; without a vocoder there is none)

Every scorer is a function of its audio alone: the same pair gives the same value on every call, in any order and
under any utterance id (reference-side caches are keyed by a digest of the samples, and pocketsphinx gets a fresh
decoder per utterance), and a pair (x, x) scores the ceiling (WER 0 against the original's own transcript).

Every model used here ships inside its wheel (resemblyzer `pretrained.pt`, pocketsphinx `en-us`, speechmos
`dnsmos_models/*.onnx`), so nothing is downloaded. Each library is imported only when its scorer is built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
METRICS = ("pesq", "stoi", "spk_sim", "wer", "dnsmos")
SYSTEMS = ("adapted", "baseline")

EVAL_LIBS = ("pesq", "pystoi", "resemblyzer", "pocketsphinx", "speechmos", "onnxruntime")

# scorer(utterance id, original (N,), coded (M,), manifest text or None) -> value; raises MetricFailed when the
# library cannot score the pair
Scorer = Callable[[str, np.ndarray, np.ndarray, "str | None"], float]


class MetricFailed(Exception):
    """A library could not score one utterance (silence, too short, ...); it is counted, not averaged."""


@dataclass(frozen=True)
class Utterance:
    id: str
    original: Path
    adapted: Path
    baseline: Path


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions + insertions + deletions, each cost 1) between two token sequences."""
    prev = list(range(len(hyp) + 1))  # distance from ref[:0] to hyp[:j]
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(ref: str, hyp: str) -> float:
    """Word edit distance / number of reference words (whitespace tokens). Can exceed 1 when hyp inserts words."""
    ref_words, hyp_words = ref.split(), hyp.split()
    if not ref_words:
        raise ValueError("word_error_rate: the reference transcript is empty, so WER is undefined")
    return edit_distance(ref_words, hyp_words) / len(ref_words)


def normalize_text(text: str) -> str:
    """Lower-cased words with punctuation removed ("Hello, world." → "hello world"): the form WER compares."""
    return " ".join(re.sub(r"[^\w']+", " ", text.lower()).split())


def wer_reference(text: str | None) -> str:
    """ "manifest" when the utterance's text holds a word (WER against it), else "asr" (against the original's ASR)."""
    return "manifest" if text and normalize_text(text) else "asr"


def missing_eval_libraries() -> list[str]:
    """The `eval` extra's packages that are not installed (none of them is imported here)."""
    return [m for m in EVAL_LIBS if importlib.util.find_spec(m) is None]


def find_utterances(out_dir: Path) -> list[Utterance]:
    """Utterances in `out_dir` with an original and both coded files, sorted by id; the others are logged and skipped."""
    out_dir = Path(out_dir)
    originals = sorted(out_dir.glob("*_original.wav"))
    if not originals:
        raise FileNotFoundError(f"quality_metrics: no *_original.wav in {out_dir}")
    utts, skipped = [], []
    for orig in originals:
        uid = orig.name[: -len("_original.wav")]
        adapted, baseline = out_dir / f"{uid}_adapted.wav", out_dir / f"{uid}_baseline.wav"
        # both systems are scored on the same utterances so their averages stay comparable
        if adapted.is_file() and baseline.is_file():
            utts.append(Utterance(uid, orig, adapted, baseline))
        else:
            skipped.append(uid)
    if skipped:
        log.info(
            "quality: %d utterance(s) without adapted+baseline audio skipped: %s", len(skipped), ", ".join(skipped)
        )
    return utts


def load_wav(path: Path) -> np.ndarray:
    """Read a 16 kHz mono wav as float32 (N,) in [-1, 1]; any other rate or layout is an error naming the file."""
    import soundfile as sf

    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise ValueError(f"quality: {path} is {sr} Hz; the quality metrics need {SAMPLE_RATE} Hz audio")
    if wav.shape[1] != 1:
        raise ValueError(f"quality: {path} has {wav.shape[1]} channels; expected mono")
    wav = wav[:, 0]
    if not np.isfinite(wav).all() or np.abs(wav).max(initial=0.0) > 1.0:
        raise ValueError(f"quality: {path} has non-finite samples or samples outside [-1, 1]")
    return wav


def _is_silent(wav: np.ndarray) -> bool:
    return wav.size == 0 or not np.any(wav)


def _aligned(ref: np.ndarray, deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # vocoder output can differ from the original by a partial hop; intrusive metrics need equal lengths
    n = min(len(ref), len(deg))
    return ref[:n], deg[:n]


def _pesq_scorer() -> Scorer:
    from pesq import PesqError, pesq

    def score(uid: str, ref: np.ndarray, deg: np.ndarray, text: str | None = None) -> float:
        ref, deg = _aligned(ref, deg)
        if _is_silent(ref) or _is_silent(deg):
            raise MetricFailed("silent audio")
        try:
            return float(pesq(SAMPLE_RATE, ref, deg, "wb"))
        # PesqError: no utterances detected / buffer too short; ValueError: NaN from its level alignment on near-silence
        except (PesqError, ValueError) as e:
            raise MetricFailed(f"{type(e).__name__}: {e}") from e

    return score


def _stoi_scorer() -> Scorer:
    from pystoi import stoi

    def score(uid: str, ref: np.ndarray, deg: np.ndarray, text: str | None = None) -> float:
        ref, deg = _aligned(ref, deg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = float(stoi(ref, deg, SAMPLE_RATE, extended=False))
        # pystoi returns a placeholder 1e-5 with a RuntimeWarning when too few non-silent frames remain
        for w in caught:
            if "Not enough STFT frames" in str(w.message):
                raise MetricFailed(str(w.message))
        return value

    return score


def _spk_sim_scorer() -> Scorer:
    import torch
    from resemblyzer import VoiceEncoder, preprocess_wav

    # CPU: a tiny LSTM, and verify must not take GPU memory from a training job
    encoder = VoiceEncoder(device=torch.device("cpu"), verbose=False)
    cache: dict[str, np.ndarray] = {}

    def embed(wav: np.ndarray) -> np.ndarray:
        if _is_silent(wav):
            raise MetricFailed("silent audio")  # resemblyzer normalises by the RMS, which would give NaN
        x = preprocess_wav(wav, source_sr=SAMPLE_RATE)  # level normalisation + VAD trimming of long pauses
        if x.size == 0 or not np.isfinite(x).all():
            raise MetricFailed("no voiced audio after resemblyzer's VAD")
        e = encoder.embed_utterance(x)
        if not np.isfinite(e).all():
            raise MetricFailed("non-finite speaker embedding")
        return e

    def score(uid: str, ref: np.ndarray, deg: np.ndarray, text: str | None = None) -> float:
        key = audio_key(ref)
        if key not in cache:
            cache[key] = embed(ref)
        # Coded audio that is an original already embedded (eval's `original` row) is not embedded twice.
        e_ref, e_deg = cache[key], cache.get(audio_key(deg))
        if e_deg is None:
            e_deg = embed(deg)
        # embed_utterance returns unit-norm vectors; divide anyway so the value is a cosine by construction
        return float(np.dot(e_ref, e_deg) / (np.linalg.norm(e_ref) * np.linalg.norm(e_deg)))

    return score


def _pocketsphinx() -> Callable[[np.ndarray], str]:
    from pocketsphinx import Decoder

    def transcribe(wav: np.ndarray) -> str:
        # A fresh decoder per utterance: one reused decoder carries its cepstral-mean and search state from the
        # previous utterance into the next, so the same clip was heard differently depending on what came before.
        decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")  # default en-us acoustic model + LM from the wheel
        pcm = np.round(np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return "" if hyp is None else hyp.hypstr  # None: the decoder recognised no word at all

    return transcribe


def audio_key(wav: np.ndarray) -> str:
    """A digest of the samples: caches of reference-side results are keyed by the audio itself, never by an id, so
    two different clips under one id never share a cached embedding or transcript."""
    a = np.ascontiguousarray(wav)
    return hashlib.blake2b(a.tobytes() + str((a.dtype.str, a.shape)).encode(), digest_size=16).hexdigest()


def _wer_scorer(transcribe: Callable[[np.ndarray], str] | None = None) -> Scorer:
    """WER of `transcribe(coded)` (pocketsphinx by default) against the manifest text, else against
    `transcribe(original)`."""
    transcribe = transcribe or _pocketsphinx()
    cache: dict[str, str] = {}

    def score(uid: str, ref: np.ndarray, deg: np.ndarray, text: str | None = None) -> float:
        if wer_reference(text) == "manifest":
            reference = normalize_text(text)
        else:
            key = audio_key(ref)
            if key not in cache:
                cache[key] = normalize_text(transcribe(ref))
            reference = cache[key]
            if not reference:
                raise MetricFailed("pocketsphinx recognised no word in the original (and no text), so WER is undefined")
        # Coded audio that is an original already heard (eval's `original` row) is not decoded twice: a transcript
        # depends on the audio alone (a fresh decoder each time).
        hypothesis = cache.get(audio_key(deg))
        if hypothesis is None:
            hypothesis = normalize_text(transcribe(deg))
        return word_error_rate(reference, hypothesis)

    return score


def _dnsmos_scorer() -> Scorer:
    from speechmos import dnsmos

    def score(uid: str, ref: np.ndarray, deg: np.ndarray, text: str | None = None) -> float:
        if deg.size == 0:
            raise MetricFailed("empty audio")  # speechmos tiles short clips by doubling, which never ends on 0 samples
        return float(dnsmos.run(deg, sr=SAMPLE_RATE)["ovrl_mos"])

    return score


SCORERS: dict[str, Callable[[], Scorer]] = {
    "pesq": _pesq_scorer,
    "stoi": _stoi_scorer,
    "spk_sim": _spk_sim_scorer,
    "wer": _wer_scorer,
    "dnsmos": _dnsmos_scorer,
}


def build_scorers(metrics: Sequence[str] = METRICS) -> dict[str, Scorer]:
    """One scorer per metric name (each imports its library here); an unknown name is a KeyError naming the known."""
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown:
        raise KeyError(f"quality metrics: unknown metric(s) {unknown}; known: {', '.join(SCORERS)}")
    return {name: SCORERS[name]() for name in metrics}


def score_utterance(
    uid: str,
    original: np.ndarray,
    coded: Mapping[str, np.ndarray],
    scorers: Mapping[str, Scorer],
    text: str | None = None,
) -> dict:
    """Score one utterance: original (N,) and coded {system: (M,)} 16 kHz mono float waveforms, `text` its manifest
    transcript or None. → {"<metric>/<system>": value, or None where the library could not score it,
    "wer_reference": "manifest" | "asr" when WER is scored}."""
    row: dict = {}
    for name, scorer in scorers.items():
        for system in SYSTEMS:
            deg = coded[system]
            try:
                if not (np.isfinite(original).all() and np.isfinite(deg).all()):
                    raise MetricFailed("non-finite samples")
                row[f"{name}/{system}"] = float(scorer(uid, original, deg, text))
            except MetricFailed as e:
                row[f"{name}/{system}"] = None
                log.warning("quality: %s failed on %s (%s): %s", name, uid, system, e)
    if "wer" in scorers:
        row["wer_reference"] = wer_reference(text)
    return row


def pool_quality(rows: Sequence[Mapping], metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Means over the utterance rows of `score_utterance` (failed pairs counted, not averaged); {} for no row."""
    if not rows:
        return {}
    out: dict[str, float] = {"quality/num_utts": float(len(rows))}
    for name in metrics:
        failed = 0
        for system in SYSTEMS:
            values = [r[f"{name}/{system}"] for r in rows]
            ok = [v for v in values if v is not None]
            failed += len(values) - len(ok)
            if ok:
                out[f"quality/{name}/{system}"] = float(np.mean(ok))
        out[f"quality/{name}/failed"] = float(failed)
    if "wer" in metrics:
        for ref in ("manifest", "asr"):
            out[f"quality/wer/reference_{ref}"] = float(sum(r["wer_reference"] == ref for r in rows))
    return out


def quality_metrics(out_dir: Path, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Average quality metrics of the adapted and baseline audio in `out_dir` (see the module docstring for keys;
    no text is known here, so WER is against the original's transcript).

    Returns {} when no utterance has coded audio (no vocoder configured). Raises on unknown metric names, missing
    originals, or audio that is not 16 kHz mono.
    """
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown:
        raise KeyError(f"quality_metrics: unknown metric(s) {unknown}; known: {', '.join(SCORERS)}")
    utts = find_utterances(Path(out_dir))
    if not utts:
        log.info("quality: no utterance in %s has adapted+baseline audio (no vocoder?); nothing to score", out_dir)
        return {}
    scorers = build_scorers(metrics)
    rows = [
        score_utterance(u.id, load_wav(u.original), {s: load_wav(getattr(u, s)) for s in SYSTEMS}, scorers)
        for u in utts
    ]
    return pool_quality(rows, metrics)
