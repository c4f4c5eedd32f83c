from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siren.config.loader import load_config
from siren.config.schema import COMPONENTS
from siren.models.builders import build_components, nominal_bps
from siren.models.codec import Codec, Codes
from siren.models.mel import MelSpectrogram
from siren.models.ssl import save_tiny_teacher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
ALL = [c for c in COMPONENTS if c != "student_ssl"]  # the teacher-side codec


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    cfg = load_config(CONFIG)
    cfg.ssl.name = str(save_tiny_teacher(tmp_path_factory.mktemp("ssl") / "tiny_hubert"))
    torch.manual_seed(0)
    mods = build_components(ALL, cfg)
    return Codec(mods, flow_steps=2).eval(), cfg


def test_encode_decode_shapes(codec):
    c, cfg = codec
    wav = torch.randn(2, 32000) * 0.1  # 2 s
    with torch.no_grad():
        feats = c.features(wav)
        codes = c.encode(wav)
        t = feats.shape[1] // 8 * 8
        assert codes.sem.shape == (2, t // 2, 1) and codes.pro.shape == (2, t // 8, 1)
        assert codes.spk.shape == (2, cfg.spk_quantizer.groups)
        assert codes.sem.max() < 81 and codes.spk.max() < cfg.spk_quantizer.codebook_size
        mel = c.decode_mel(codes, generator=torch.Generator().manual_seed(0))
        assert mel.shape == (2, 80, t)
        wav_hat = c.decode(codes, generator=torch.Generator().manual_seed(0))
        assert wav_hat.shape == (2, t * 320)
        assert torch.isfinite(wav_hat).all()
        assert c.decoder_mel(codes).shape == (2, 80, t)


def test_dequantize_matches_quantize(codec):
    c, _ = codec
    wav = torch.randn(1, 16000) * 0.1
    with torch.no_grad():
        q = c.quantize(c.components["factorizer"](c.features(wav)))
        codes = Codes(sem=q["sem"].codes, pro=q["pro"].codes, spk=q["spk"].codes)
        sem, pro, spk = c.dequantize(codes)
    torch.testing.assert_close(sem, q["sem"].quantized, atol=1e-5, rtol=0)
    torch.testing.assert_close(pro, q["pro"].quantized, atol=1e-5, rtol=0)
    torch.testing.assert_close(spk, q["spk"].quantized, atol=1e-5, rtol=0)


def test_flow_sampling_is_seeded(codec):
    c, _ = codec
    with torch.no_grad():
        codes = c.encode(torch.randn(1, 16000) * 0.1)
        a = c.decode_mel(codes, generator=torch.Generator().manual_seed(3))
        b = c.decode_mel(codes, generator=torch.Generator().manual_seed(3))
        d = c.decode_mel(codes, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, d)


def test_bps_and_missing_components(codec):
    c, cfg = codec
    assert c.bps_nominal() == pytest.approx(nominal_bps(cfg)["total"])
    partial = Codec({"ssl": c.components["ssl"], "factorizer": c.components["factorizer"]})
    with pytest.raises(KeyError, match="sem_quantizer"):
        partial.encode(torch.randn(1, 16000))
    with pytest.raises(KeyError, match="student_ssl"):
        Codec({}, feature_extractor="student_ssl").features(torch.randn(1, 16000))


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
