from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siren.config.loader import load_config
from siren.config.stages import COMPONENTS
from siren.models.builders import build_component, build_components, component_rates, nominal_bps

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


@pytest.fixture
def tiny():
    return load_config(CONFIGS / "tiny.yaml")


def test_ultra200bps_nominal_rate():
    cfg = load_config(CONFIGS / "ultra200bps.yaml")
    assert cfg.preset == "ultra200bps"
    bps = nominal_bps(cfg)
    assert 190 <= bps["total"] <= 205
    assert bps["sem"] == pytest.approx(25 * 6.3398, rel=1e-3)
    assert bps["pro"] == pytest.approx(6.25 * 6.3398, rel=1e-3)
    assert bps["spk_bits_per_utterance"] == 64
    assert bps["spk"] == pytest.approx(16.0)
    assert bps["total"] == pytest.approx(bps["sem"] + bps["pro"])


def test_tiny_has_same_code_layout(tiny):
    assert tiny.preset == "tiny"
    assert nominal_bps(tiny)["total"] == pytest.approx(nominal_bps(load_config(CONFIGS / "ultra200bps.yaml"))["total"])


def test_every_component_builds(tiny, tmp_path):
    from siren.models.ssl import save_tiny_teacher

    tiny.ssl.name = str(save_tiny_teacher(tmp_path / "teacher"))
    mods = build_components(COMPONENTS, tiny)
    assert set(mods) == set(COMPONENTS)
    assert mods["ssl"].dim == tiny.factorizer.input_dim
    assert mods["sem_quantizer"].dim == tiny.factorizer.sem_dim
    assert mods["entropy_model"].layout == {"sem": (81, 1), "pro": (81, 1)}
    assert set(component_rates(tiny)) == set(COMPONENTS)


def test_unknown_and_misconfigured(tiny):
    with pytest.raises(KeyError, match="factorizer"):
        build_component("factoriser", tiny)
    with pytest.raises(ValueError, match="ssl.name"):
        build_component("ssl", tiny)
    with pytest.raises(ValueError, match="input_dim=64.*768"):
        build_component("factorizer", tiny, ssl_dim=768)


def test_tiny_codec_train_step_shapes(tiny):
    # Speed is measured in benchmarks/ (make bench), not asserted here.
    names = ["factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model", "decoder"]
    m = build_components(names, tiny)
    params = [p for mod in m.values() for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    feats = torch.randn(8, 100, 64)  # 8 × 2 s at 50 Hz
    f = m["factorizer"](feats)
    s, p, k = m["sem_quantizer"](f.sem), m["pro_quantizer"](f.pro), m["spk_quantizer"](f.spk)
    mel = m["decoder"](s.quantized, p.quantized, k.quantized)
    ent = m["entropy_model"]({"sem": s.codes, "pro": p.codes})
    loss = mel.abs().mean() + s.commit_loss + p.commit_loss + k.commit_loss + ent.loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert mel.shape == (8, 80, 96)
    assert all(q.grad is not None for q in m["factorizer"].parameters() if q.requires_grad)
