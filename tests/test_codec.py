from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from siren.codec import Codec
from siren.config.loader import load_config
from siren.config.stages import COMPONENTS
from siren.errors import SirenError
from siren.models.builders import build_components, nominal_bps
from siren.models.mel import MelSpectrogram
from siren.models.ssl import save_tiny_teacher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
ALL = [c for c in COMPONENTS if c != "student_ssl"]  # the teacher-side codec


def _codec(mods, **kw) -> Codec:
    return Codec(mods, sample_rate=16000, hop_length=320, **kw).eval()


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    cfg = load_config(CONFIG)
    cfg.ssl.name = str(save_tiny_teacher(tmp_path_factory.mktemp("ssl") / "tiny_hubert"))
    torch.manual_seed(0)
    mods = build_components(ALL, cfg)
    return _codec(mods, flow_steps=2), cfg


def test_encode_decode_shapes(codec):
    c, cfg = codec
    wav = torch.randn(2, 32000) * 0.1  # 2 s
    with torch.no_grad():
        feats = c.features(wav[:, : 32000 // 2560 * 2560])  # encode cuts the audio to whole prosody frames first
        codes = c.encode(wav)
        t = feats.shape[1] // 8 * 8
        assert codes.sem.shape == (2, t // 2, 1) and codes.pro.shape == (2, t // 8, 1)
        assert codes.spk.shape == (2, cfg.spk_quantizer.groups)
        assert codes.sem_frames.tolist() == [t // 2] * 2 and codes.num_samples == [t // 2 * 640] * 2
        assert codes.sem.max() < 81 and codes.spk.max() < cfg.spk_quantizer.codebook_size
        mel = c.decode_mel(codes)
        assert mel.shape == (2, 80, t)
        wav_hat = c.decode(codes)  # one wav per utterance, as long as its input; the uncoded end is silence
        assert [w.shape for w in wav_hat] == [(32000,)] * 2
        assert all(torch.isfinite(w).all() and not w[t * 320 :].any() for w in wav_hat)
    # a batch gives each item the codes it gets alone
    alone = c.encode(wav[1])
    assert torch.equal(alone.sem, codes.sem[1:]) and torch.equal(alone.spk, codes.spk[1:])


def test_bytes_round_trip_and_ragged_batches(codec):
    c, _ = codec
    g = torch.Generator().manual_seed(5)
    items = [torch.randn(n, generator=g) * 0.1 for n in (16000, 24000)]
    codes = c.encode(items)  # different lengths: analysed one by one, padded, lengths kept
    assert codes.sem_frames.tolist() == [c.encode(w).sem.shape[1] for w in items]
    for one in codes.split():
        data = c.to_bytes(one)
        assert type(data) is bytes
        back = c.from_bytes(data)
        assert torch.equal(back.sem, one.sem) and torch.equal(back.pro, one.pro) and torch.equal(back.spk, one.spk)
        assert back.num_samples == one.num_samples and back.lengths == one.lengths
    assert [x.lengths[0] for x in codes.split()] == [16000, 24000]
    with pytest.raises(ValueError, match="one utterance"):
        c.to_bytes(codes)


def test_to_encoded_carries_the_bytes_and_their_sizes(codec):
    c, _ = codec
    one = c.encode(torch.randn(24000, generator=torch.Generator().manual_seed(6)) * 0.1)
    enc = c.to_encoded(one)
    assert enc.data == c.to_bytes(one) and len(enc.data) * 8 == enc.header_bits + enc.payload_bits
    assert enc.seconds == pytest.approx(24000 / 16000) and enc.estimate_bits > 0  # over the input's duration
    assert enc.quantized_bits == pytest.approx(enc.estimate_bits, rel=0.05)
    assert torch.equal(c.from_bytes(bytearray(enc.data)).sem, one.sem)  # any bytes-like object
    with pytest.raises(TypeError, match=r"got Encoded: pass its `\.data`"):
        c.from_bytes(enc)
    with pytest.raises(ValueError, match="one utterance"):
        c.to_encoded(c.encode(torch.randn(2, 16000) * 0.1))


def _readme_codec_example() -> tuple[str, list[str]]:
    """The README's Codec example: the python block after `<!-- codec-api -->` and the `codec.to_bytes(…)` /
    `codec.from_bytes(…)` calls of the paragraph right under it, verbatim."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- codec-api -->\s*```python\n(.*?)```\n(.*?)\n\n", text, re.S)
    assert m, "README.md has no python block after <!-- codec-api -->"
    calls = re.findall(r"`(codec\.(?:to|from)_bytes\([^`]*\))`", m.group(2))
    return m.group(1), calls


def test_readme_codec_example_round_trips_through_bytes(codec, tmp_path, monkeypatch):
    """The README's example, run on this tiny codec: its block, then the to_bytes / from_bytes calls it names (in
    the block itself or the paragraph under it), chained as written: `data` is the file, the codes come back."""
    import soundfile as sf

    import siren

    c, _ = codec
    block, calls = _readme_codec_example()
    assert any("to_bytes" in x for x in calls) or "to_bytes" in block, "the README example never shows to_bytes"
    monkeypatch.setattr(siren.Codec, "from_checkpoint", classmethod(lambda cls, uri, *a, **k: c))
    sf.write(
        tmp_path / "speech.wav", 0.1 * torch.randn(24000, generator=torch.Generator().manual_seed(7)).numpy(), 16000
    )
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    for call in calls:  # `codec.to_bytes(codes)` makes `data`, `codec.from_bytes(data)` reads it
        ns["data" if "to_bytes" in call else "back"] = eval(call, ns)
    assert type(ns["data"]) is bytes
    back = ns.get("back", ns["codes"])
    assert torch.equal(back.sem, ns["codes"].sem) and torch.equal(back.spk, ns["codes"].spk)
    assert (tmp_path / "decoded.wav").is_file()


def test_long_input_is_analysed_in_chunks(codec):
    c, _ = codec
    wav = torch.randn(5 * 16000, generator=torch.Generator().manual_seed(1)) * 0.1
    whole = c.encode(wav)
    c.max_chunk_seconds, c.context_seconds = 1.6, 0.64
    try:
        chunked = c.encode(wav)
    finally:
        c.max_chunk_seconds, c.context_seconds = 30.0, 1.28
    assert chunked.sem.shape[1] == whole.sem.shape[1] and chunked.pro.shape[1] == whole.pro.shape[1]
    # the cores are analysed with context, so most codes agree with the whole-utterance analysis
    assert (chunked.sem == whole.sem).float().mean() > 0.5


def test_dequantize_matches_quantize(codec):
    c, _ = codec
    wav = torch.randn(1, 15360) * 0.1  # whole prosody frames: encode analyses exactly this audio
    with torch.no_grad():
        an = c.analyse(c.features(wav))
        codes = c.encode(wav)
        sem, pro, spk = c.dequantize(codes)
    torch.testing.assert_close(sem, an.sem.quantized, atol=1e-5, rtol=0)
    torch.testing.assert_close(pro, an.pro.quantized, atol=1e-5, rtol=0)
    torch.testing.assert_close(spk, an.spk.quantized, atol=1e-5, rtol=0)


def test_flow_sampling_is_seeded(codec):
    c, _ = codec
    with torch.no_grad():
        codes = c.encode(torch.randn(1, 16000) * 0.1)
        a = c.decode_mel(codes, seed=3)
        b = c.decode_mel(codes, seed=3)
        d = c.decode_mel(codes, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_bps_and_missing_components(codec):
    c, cfg = codec
    assert c.bps_nominal() == pytest.approx(nominal_bps(cfg)["total"])
    partial = _codec({"ssl": c.components["ssl"], "factorizer": c.components["factorizer"]})
    with pytest.raises(SirenError, match="sem_quantizer"):
        partial.encode(torch.randn(16000))
    with pytest.raises(SirenError, match="student_ssl"):
        _codec({"factorizer": c.components["factorizer"]}, feature_extractor="student_ssl").features(
            torch.randn(1, 16000)
        )
    with pytest.raises(SirenError, match="too short"):
        c.encode(torch.randn(1000))


def test_mel_front_end_alignment():
    mel = MelSpectrogram(16000, 80, 320, 1024, 1024, 0.0, 8000.0)
    x = torch.randn(2, 32000)
    m = mel(x)
    assert m.shape == (2, 80, 100) and mel.num_frames(32000) == 100
    assert m.min() >= torch.log(torch.tensor(1e-5)) - 1e-6
    assert torch.allclose(mel(torch.zeros(1, 3200)), torch.log(torch.tensor(1e-5)))


def test_flow_loss_and_vocoder_train(codec):
    from siren.models.vocoder import multi_resolution_stft_loss

    c, _ = codec
    flow, voc = c.components["flow"], c.components["vocoder"]
    mel, cond = torch.randn(2, 80, 16) - 5, torch.randn(2, 16, flow.cond_dim)
    g = torch.Generator().manual_seed(0)
    l1 = flow.loss(mel, cond, generator=g)
    assert l1.dim() == 0 and l1 > 0
    assert flow.loss(mel, cond, generator=torch.Generator().manual_seed(0)) == l1
    wav = torch.randn(2, 16000)
    assert multi_resolution_stft_loss(wav, wav).item() == pytest.approx(0.0, abs=1e-6)
    assert multi_resolution_stft_loss(voc(torch.randn(2, 80, 50)), wav) > 0
