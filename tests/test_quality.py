"""Quality metrics: the edit distance always; PESQ/STOI/speaker/WER/DNSMOS only where the `eval` extra is installed."""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siren.metrics.quality import (
    EVAL_LIBS,
    METRICS,
    SYSTEMS,
    MetricFailed,
    _wer_scorer,
    edit_distance,
    find_utterances,
    normalize_text,
    pool_quality,
    quality_metrics,
    score_utterance,
    word_error_rate,
)

TEXT = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."


# ---- pure parts: always run -------------------------------------------------------------------------------------


def test_edit_distance_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("a b c".split(), "a b c".split()) == 0


def test_edit_distance_invariants_against_brute_force():
    rng = random.Random(0)

    def brute(a: str, b: str) -> int:
        # shortest edit script by breadth-first search over strings (tiny alphabet and lengths keep it cheap)
        frontier, seen, d = {a}, {a}, 0
        while b not in frontier:
            nxt = set()
            for s in frontier:
                for i in range(len(s) + 1):
                    for c in "ab":
                        nxt.add(s[:i] + c + s[i:])
                    if i < len(s):
                        nxt.add(s[:i] + s[i + 1 :])
                        for c in "ab":
                            nxt.add(s[:i] + c + s[i + 1 :])
            frontier = nxt - seen
            seen |= nxt
            d += 1
        return d

    for _ in range(40):
        a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 4)))
        b = "".join(rng.choice("ab") for _ in range(rng.randint(0, 4)))
        d = edit_distance(a, b)
        assert d == brute(a, b) == edit_distance(b, a)
        assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))
    words = ["x", "y", "z"]
    for a, b, c in itertools.product([("x",), ("x", "y"), ("z", "y", "x"), ()], repeat=3):
        assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
    assert edit_distance(words, words) == 0


def test_word_error_rate():
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert word_error_rate("a b c", "a x c d") == pytest.approx(2 / 3)  # one substitution, one insertion
    assert word_error_rate("a b", "") == 1.0
    assert word_error_rate("a", "b c d") == 3.0  # insertions can push WER above 1
    assert word_error_rate("  the   cat ", "the cat") == 0.0  # whitespace is only a separator
    with pytest.raises(ValueError, match="empty"):
        word_error_rate("", "anything")


def test_find_utterances_skips_incomplete(tmp_path):
    for name in ("u1_original", "u1_adapted", "u1_baseline", "u_2_original", "u_2_adapted", "u3_original"):
        (tmp_path / f"{name}.wav").touch()
    assert [u.id for u in find_utterances(tmp_path)] == ["u1"]
    u = find_utterances(tmp_path)[0]
    assert (u.original.name, u.adapted.name, u.baseline.name) == (
        "u1_original.wav",
        "u1_adapted.wav",
        "u1_baseline.wav",
    )


def test_no_coded_audio_is_empty_and_no_originals_raises(tmp_path):
    (tmp_path / "u1_original.wav").touch()
    assert quality_metrics(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="_original.wav"):
        quality_metrics(tmp_path / "nowhere")
    with pytest.raises(KeyError, match="unknown metric"):
        quality_metrics(tmp_path, metrics=("pesq", "mosnet"))


def test_normalize_text():
    assert normalize_text("Return all breakpoints for filename:lineno.") == "return all breakpoints for filename lineno"
    assert normalize_text("  It's   FINE, isn't it? ") == "it's fine isn't it"
    assert normalize_text("...") == ""


def test_wer_against_the_manifest_text_else_the_asr_of_the_original():
    """The reference is the text when the utterance has words in it; otherwise the transcript of the original."""
    heard = {1.0: "hello world", 0.5: "hello word"}  # a fake ASR keyed by the signal's level
    asr = _wer_scorer(transcribe=lambda wav: heard[float(wav[0])])
    orig, coded = np.full(4, 1.0), np.full(4, 0.5)
    assert asr("u", orig, coded, "Hello, there world!") == pytest.approx(2 / 3)  # vs "hello there world"
    assert asr("u", orig, orig, "Hello, there world!") == pytest.approx(1 / 3)
    assert asr("v", orig, coded, None) == pytest.approx(1 / 2)  # vs "hello world", the original's transcript
    assert asr("v", orig, orig, "") == 0.0
    assert asr("w", orig, orig, "?!") == 0.0  # text without a word is no reference
    deaf = _wer_scorer(transcribe=lambda wav: "")
    with pytest.raises(MetricFailed, match="no word"):
        deaf("x", orig, coded, None)
    assert deaf("x", orig, coded, "some text") == 1.0


def test_score_utterance_and_pool_count_failures_and_references():
    def level(uid, ref, deg, text=None):
        if not np.any(deg):
            raise MetricFailed("silent")
        return float(np.abs(deg).mean())

    scorers = {"stoi": level, "wer": _wer_scorer(transcribe=lambda wav: "a b")}
    orig = np.full(8, 0.5, dtype=np.float32)
    rows = [
        score_utterance("u1", orig, {"adapted": orig, "baseline": 0 * orig}, scorers, "a b c"),
        score_utterance("u2", orig, {"adapted": orig / 2, "baseline": np.full(8, np.nan)}, scorers, None),
    ]
    assert rows[0]["stoi/baseline"] is None and rows[1]["stoi/baseline"] is None  # silence; non-finite samples
    assert rows[1]["wer/baseline"] is None
    assert (rows[0]["wer_reference"], rows[1]["wer_reference"]) == ("manifest", "asr")
    pooled = pool_quality(rows, ("stoi", "wer"))
    assert pooled == {
        "quality/num_utts": 2.0,
        "quality/stoi/adapted": pytest.approx(0.375),
        "quality/stoi/failed": 2.0,  # never averaged in as a value
        "quality/wer/adapted": pytest.approx((1 / 3 + 0) / 2),
        "quality/wer/baseline": pytest.approx(1 / 3),
        "quality/wer/failed": 1.0,
        "quality/wer/reference_manifest": 1.0,
        "quality/wer/reference_asr": 1.0,
    }
    assert "quality/stoi/baseline" not in pooled  # every pair failed: no average for it
    assert pool_quality([], ("stoi",)) == {}


def test_audio_already_heard_is_not_decoded_again():
    """A clip's transcript is cached by its audio, whichever side it is on: the coded audio of eval's `original` row
    (the original itself) is not decoded a second time, and the score is the one a decode would give."""
    heard = []

    def transcribe(wav):
        heard.append(len(wav))
        return "a b c" if len(wav) == 100 else "a b d"

    score = _wer_scorer(transcribe)
    a, b = np.full(100, 0.1, np.float32), np.full(90, 0.1, np.float32)
    assert score("u", a, a) == 0.0 and heard == [100], heard  # one decode for the original row
    assert score("v", b, a) == pytest.approx(1 / 3) and heard == [100, 90], heard  # b is new, a was heard
    assert score("w", a, b) == pytest.approx(1 / 3) and heard == [100, 90], heard  # both heard
    assert score("x", b, a.copy()) == pytest.approx(1 / 3) and heard == [100, 90], heard  # the samples, not the array


def test_audio_already_embedded_is_not_embedded_again(monkeypatch):
    """The speaker embedding likewise: the original row's coded audio reuses the original's embedding."""
    resemblyzer = pytest.importorskip("resemblyzer")
    from siren.metrics.quality import _spk_sim_scorer

    embedded = []

    class Encoder:
        def __init__(self, *a, **k):
            pass

        def embed_utterance(self, x):
            embedded.append(len(x))
            v = np.ones(4) if len(x) > 8000 else np.array([1.0, 1.0, 1.0, -1.0])
            return v / np.linalg.norm(v)

    monkeypatch.setattr(resemblyzer, "VoiceEncoder", Encoder)
    monkeypatch.setattr(resemblyzer, "preprocess_wav", lambda wav, source_sr: wav)
    score = _spk_sim_scorer()
    tone = np.sin(np.arange(16000) / 5).astype(np.float32) * 0.3
    assert score("u", tone, tone) == pytest.approx(1.0) and embedded == [16000]
    assert score("v", tone[:4000], tone) == pytest.approx(0.5) and embedded == [16000, 4000]


def test_import_loads_no_eval_library():
    code = (
        "import sys, siren.metrics.quality; "
        f"print(sorted(m for m in {EVAL_LIBS + ('torch', 'soundfile')!r} if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# ---- with the eval extra ----------------------------------------------------------------------------------------


def _speech(path) -> np.ndarray:
    import soundfile as sf

    if shutil.which("flite") is None or shutil.which("sox") is None:
        pytest.skip("flite and sox are needed to synthesise test speech")
    raw = path.parent / "flite_raw.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", TEXT, "-o", str(raw)], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True)
    wav, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000 and wav.ndim == 1 and len(wav) > 3 * sr
    return wav


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One out_dir scored once: `same` (adapted = original, baseline = white noise), `mute` (adapted = original,
    baseline = silence), `novoc` (original only). Returns the metrics dict."""
    for lib in EVAL_LIBS:
        pytest.importorskip(lib)
    import soundfile as sf

    d = tmp_path_factory.mktemp("quality")
    speech = _speech(d / "same_original.wav")
    noise = np.random.default_rng(0).standard_normal(len(speech)).astype(np.float32) * speech.std()
    sf.write(d / "same_adapted.wav", speech, 16000, subtype="PCM_16")
    sf.write(d / "same_baseline.wav", np.clip(noise, -1, 1), 16000, subtype="PCM_16")
    for name, wav in (("mute_original", speech), ("mute_adapted", speech[:-100]), ("mute_baseline", 0 * speech)):
        sf.write(d / f"{name}.wav", wav, 16000, subtype="PCM_16")  # mute_adapted: a vocoder a partial hop short
    sf.write(d / "novoc_original.wav", speech, 16000, subtype="PCM_16")
    return quality_metrics(d)


def test_keys(scored):
    expected = {f"quality/{m}/{s}" for m in METRICS for s in SYSTEMS} | {f"quality/{m}/failed" for m in METRICS}
    references = {"quality/wer/reference_manifest", "quality/wer/reference_asr"}
    assert set(scored) == expected | references | {"quality/num_utts"}
    assert scored["quality/wer/reference_asr"] == 2  # no text in a folder of files
    assert scored["quality/num_utts"] == 2  # novoc has no coded audio
    assert all(np.isfinite(v) for v in scored.values())


def test_identical_audio_scores_near_perfect(scored):
    assert scored["quality/pesq/adapted"] > 4.0
    assert scored["quality/stoi/adapted"] > 0.99
    assert scored["quality/spk_sim/adapted"] > 0.99
    assert scored["quality/wer/adapted"] == 0.0
    assert scored["quality/dnsmos/adapted"] > 2.5


def test_noise_and_silence_score_much_lower(scored):
    # the baseline averages are over the noise utterance (and silence where the library can score it)
    assert scored["quality/pesq/baseline"] < 1.5
    assert scored["quality/stoi/baseline"] < 0.6
    assert scored["quality/spk_sim/baseline"] < 0.8
    assert scored["quality/wer/baseline"] > 0.8
    assert scored["quality/dnsmos/baseline"] < scored["quality/dnsmos/adapted"] - 1.0


def test_failures_are_counted_not_averaged(scored):
    # silence: PESQ finds no utterance and resemblyzer has nothing to embed -> counted once each, not scored as 0
    assert scored["quality/pesq/failed"] == 1
    assert scored["quality/spk_sim/failed"] == 1
    # STOI, WER and DNSMOS give real (low) scores on silence
    assert scored["quality/stoi/failed"] == 0
    assert scored["quality/wer/failed"] == 0
    assert scored["quality/dnsmos/failed"] == 0


# ---- determinism on real speech (Debian's codec2-examples) ------------------------------------------------------

CODEC2_WAVS = "/usr/share/codec2/wav"
# morig then hts2a, or hts2a twice, made one reused pocketsphinx decoder hear hts2a differently; hts2a's first 1.5 s
# show it as well (measured), at half the decoding time of its 3 s
DET_CLIPS = ("hts2a", "morig", "forig")
DET_SECONDS = {"hts2a": 1.5}
DET_PAIRS = (("hts2a", "hts2a"), ("morig", "morig"), ("morig", "hts2a"))  # (original, coded)


def codec2_clip(name: str, seconds: float | None = None) -> np.ndarray:
    """A human-speech clip from Debian's codec2-examples (8 kHz), resampled to 16 kHz float32 (N,); its first
    `seconds` when given."""
    from pathlib import Path

    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    path = Path(CODEC2_WAVS) / f"{name}.wav"
    if not path.is_file():
        pytest.skip("Debian's codec2-examples (real speech clips) are not installed")
    wav, sr = sf.read(str(path), dtype="float32")
    if seconds is not None:
        wav = wav[: int(seconds * sr)]
    return AF.resample(torch.from_numpy(wav), sr, 16000).clamp(-1, 1).numpy()


def _shared_decoder_pocketsphinx():
    """The naive transcriber: one decoder reused for every utterance (the negative control)."""
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=16000, loglevel="FATAL")

    def transcribe(wav):
        decoder.start_utt()
        decoder.process_raw(np.round(np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return "" if hyp is None else hyp.hypstr

    return transcribe


def _order_effects(transcribe_factory, clips, alone: str) -> list[str]:
    """Orders in which hts2a's transcript through one transcriber differs from `alone`, its transcript by itself."""
    found = []
    for first, second in (("morig", "hts2a"), ("hts2a", "hts2a")):
        t = transcribe_factory()
        t(clips[first])
        if t(clips[second]) != alone:
            found.append(f"{first} -> {second}")
    return found


@pytest.fixture(scope="module")
def det_clips():
    pytest.importorskip("pocketsphinx")
    return {n: codec2_clip(n, DET_SECONDS.get(n)) for n in DET_CLIPS}


def test_a_transcript_does_not_depend_on_the_clip_before(det_clips, monkeypatch):
    import siren.metrics.quality as q

    alone = q._pocketsphinx()(det_clips["hts2a"])
    assert _order_effects(q._pocketsphinx, det_clips, alone) == []
    # negative control: one reused decoder carries state from clip to clip, and this check sees it
    assert _order_effects(_shared_decoder_pocketsphinx, det_clips, alone) != []


@pytest.fixture(scope="module")
def det_scorers():
    for lib in EVAL_LIBS:
        pytest.importorskip(lib)
    from siren.metrics.quality import build_scorers

    return build_scorers(("pesq", "stoi", "spk_sim", "wer"))  # DNSMOS: its own test below (1 s a call)


@pytest.fixture(scope="module")
def det_alone(det_clips):
    """Each (ref, deg) pair scored by freshly built scorers, nothing scored before it."""
    from siren.metrics.quality import build_scorers

    out = {}
    for a, b in DET_PAIRS:
        fresh = build_scorers(("pesq", "stoi", "spk_sim", "wer"))
        out[a, b] = {n: _try(s, det_clips[a], det_clips[b]) for n, s in fresh.items()}
    return out


def _try(scorer, ref, deg):
    try:
        return scorer("u", ref, deg, None)  # one id for every clip: caches must key on the audio, not the id
    except MetricFailed as e:
        return f"failed: {e}"


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.sampled_from(range(len(DET_PAIRS))), min_size=2, max_size=3))
def test_scores_do_not_depend_on_call_order_or_id(order, det_clips, det_scorers, det_alone):
    """Same audio → same score, whatever was scored before it (under the same utterance id); (x, x) → the ceiling."""
    for i in order:
        a, b = DET_PAIRS[i]
        got = {n: _try(s, det_clips[a], det_clips[b]) for n, s in det_scorers.items()}
        assert got == det_alone[a, b], (a, b)
        if a == b:
            assert got["wer"] == 0.0 and got["stoi"] == pytest.approx(1.0, abs=1e-6)
            assert got["spk_sim"] == pytest.approx(1.0, abs=1e-5) and got["pesq"] > 4.6


def test_id_keyed_caches_would_break_the_order_property(det_clips):
    """Negative control for the audio-keyed caches: the same id with another original must not reuse its results."""
    pytest.importorskip("resemblyzer")
    from siren.metrics.quality import _spk_sim_scorer, _wer_scorer

    a, b = det_clips["morig"], det_clips["forig"]
    for scorer, ceiling in ((_spk_sim_scorer(), 1.0), (_wer_scorer(), 0.0)):
        scorer("u", a, b, None)
        assert scorer("u", b, b, None) == pytest.approx(ceiling, abs=1e-5)


def test_dnsmos_is_the_same_in_any_order(det_clips):
    pytest.importorskip("speechmos")
    from siren.metrics.quality import _dnsmos_scorer

    s = _dnsmos_scorer()
    a, b = det_clips["morig"], det_clips["forig"]
    first = s("u", a, a)
    s("u", b, b)
    assert s("u", a, a) == first
