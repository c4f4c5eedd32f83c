"""Corpus builder: multi-speaker 16 kHz mono corpus, deterministic, idempotent, atomic, clear missing-program error."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf

from siren.data import corpus as corpus_mod
from siren.data.audio import load_audio
from siren.data.corpus import INSTALL_HINT, CorpusError, build_corpus, check_voices, mine_sentences
from siren.data.manifest import read_manifest

needs_voices = pytest.mark.skipif(bool(check_voices()), reason=f"TTS programs missing: {check_voices()}")


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    a = build_corpus(root / "a", n=6, seed=0, progress=False)
    b = build_corpus(root / "b", n=6, seed=0, progress=False)
    return root, a, b


def test_sentence_pool_is_clean_and_stable():
    pool = mine_sentences()
    assert len(pool) >= 500 and pool == sorted(set(pool)) and pool == mine_sentences()
    for s in pool:
        assert s.isascii() and 4 <= len(s.split()) <= 20 and s[0].isupper() and not any(c.isdigit() for c in s)


@needs_voices
def test_corpus_n6(two_builds):
    root, summary, _ = two_builds
    out = root / "a"
    train, val = read_manifest(summary["train"]), read_manifest(summary["val"])
    assert len(train) + len(val) == 6 and len(val) >= 1 and len(train) >= 1
    assert (summary["num_train"], summary["num_val"]) == (len(train), len(val))
    assert len({u.speaker for u in train + val}) >= 4 and len(summary["speakers"]) >= 4
    assert len({u.speaker for u in val}) >= 2  # the held-out split spans speakers
    assert not {u.id for u in train} & {u.id for u in val}
    assert json.loads((out / "corpus.json").read_text())["n"] == 6
    total = 0.0
    for u in train + val:
        info = sf.info(u.path)
        assert (info.samplerate, info.channels) == (16000, 1) and u.path.startswith(str(out / "wavs"))
        assert abs(info.frames / 16000 - u.duration) < 1e-3 and u.text
        wav = load_audio(u.path, min_seconds=0.5)
        assert 0.5 < wav.abs().max() <= 1.0  # normalised to -3 dBFS
        total += u.duration
    assert abs(summary["total_seconds"] - total) < 0.01
    # The manifests use relative paths, and no temporary build directory is left behind.
    assert json.loads((out / "train.jsonl").read_text().splitlines()[0])["path"].startswith("wavs/")
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]


@needs_voices
def test_corpus_deterministic(two_builds):
    root, a, b = two_builds
    ua = read_manifest(a["train"]) + read_manifest(a["val"])
    ub = read_manifest(b["train"]) + read_manifest(b["val"])
    assert [(u.id, u.text, u.speaker, u.duration) for u in ua] == [(u.id, u.text, u.speaker, u.duration) for u in ub]
    for x, y in zip(ua, ub, strict=True):
        assert open(x.path, "rb").read() == open(y.path, "rb").read()
    other = corpus_mod._plan(6, seed=1)
    assert [j.text for j in other] != [u.text for u in ua]


@needs_voices
def test_corpus_reused_and_conflicts_refused(two_builds, monkeypatch):
    root, a, _ = two_builds

    def no_synthesis(*args, **kwargs):
        raise AssertionError("an existing complete corpus must be reused, not resynthesised")

    monkeypatch.setattr(corpus_mod, "_synthesise", no_synthesis)
    assert build_corpus(root / "a", n=6, seed=0, progress=False) == a
    with pytest.raises(CorpusError, match="seed=0"):
        build_corpus(root / "a", n=6, seed=1, progress=False)
    (root / "a" / "wavs" / f"{read_manifest(a['val'])[0].id}.wav").rename(root / "stash.wav")
    try:
        with pytest.raises(CorpusError, match="incomplete"):
            build_corpus(root / "a", n=6, seed=0, progress=False)
    finally:
        (root / "stash.wav").rename(root / "a" / "wavs" / f"{read_manifest(a['val'])[0].id}.wav")


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "check_voices", lambda: [])
    calls = []

    def fail_third(job, wav_dir):
        calls.append(job.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        (wav_dir / f"{job.id}.wav").write_bytes(b"x")
        return 1.0

    monkeypatch.setattr(corpus_mod, "_synthesise", fail_third)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "parent" / "c", n=5, seed=0, jobs=1, progress=False)
    assert len(calls) >= 3 and list((tmp_path / "parent").iterdir()) == []


def test_missing_program_error(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "text2wave" else real_which(name))
    assert check_voices() == ["text2wave"]
    with pytest.raises(CorpusError) as ei:
        build_corpus(tmp_path / "c", n=5, progress=False)
    assert "text2wave" in str(ei.value) and INSTALL_HINT in str(ei.value)
    assert INSTALL_HINT == "sudo apt-get install -y flite festival festlex-cmu festlex-poslex festvox-kdlpc16k sox"
    assert not (tmp_path / "c").exists()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(shutil, "which", real_which)
    assert check_voices() == ["flite", "text2wave", "sox"]


def test_bad_arguments(tmp_path):
    with pytest.raises(CorpusError, match="at least 2"):
        build_corpus(tmp_path / "c", n=1, progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not a SIREN corpus"):
        build_corpus(tmp_path / "d", n=5, progress=False)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
