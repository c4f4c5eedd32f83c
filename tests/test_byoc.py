"""Bring your own codec, the unit guarantees (docs/bring-your-own-codec.md): bad input gives one clear error naming the problem; foreign
weights load strictly; mel domains convert exactly or refuse; a rate-only entropy model cannot reach the range coder.

Each guarantee has a negative control (`CONTROLS`, tests/mechanisms.py): with its mechanism switched off the test fails.
"""

from __future__ import annotations

import inspect
import json
import logging
import re

import mechanisms
import pytest
import torch
from acme_codec import nets
from helpers import ROOT

from siren.config.loader import load_config
from siren.models import mel as mel_mod
from siren.models.builders import build_component
from siren.models.io import StrictLoadError
from siren.models.plugins import ComponentError
from siren.models.roles import RoleError

TINY = ROOT / "configs/model/tiny.yaml"


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def test_typo_in_args_names_the_argument_and_the_nearest():
    cfg = _cfg(
        "factorizer.target=acme_codec.nets:SpeechAnalyzer",
        "factorizer.args={feat_ch: 64, widht: 32, sem_ch: 32, pro_ch: 16, spk_ch: 32}",
    )
    with pytest.raises(
        ComponentError, match=r"unknown argument `widht`; did you mean `width`\?.*missing required argument `width`"
    ):
        build_component("factorizer", cfg)


def test_wrong_target_names_the_module_path_or_the_nearest_class():
    with pytest.raises(ComponentError, match=r"cannot import module 'acme_codex\.nets'"):
        build_component("factorizer", _cfg("factorizer.target=acme_codex.nets:SpeechAnalyzer"))
    with pytest.raises(ComponentError, match=r"has no 'SpeechAnalyser'; did you mean 'SpeechAnalyzer'"):
        build_component("factorizer", _cfg("factorizer.target=acme_codec.nets:SpeechAnalyser"))
    with pytest.raises(ComponentError, match=r"not an import path"):
        build_component("factorizer", _cfg("factorizer.target=acme_codec.nets.SpeechAnalyzer"))


def test_a_module_that_does_not_fit_its_role_is_refused_at_build():
    cfg = _cfg(
        "factorizer.target=acme_codec.nets:SpeechAnalyzer",
        "factorizer.args={feat_ch: 64, width: 32, sem_ch: 32, pro_ch: 16, spk_ch: 32}",
    )  # no adapter: channel-first tuple outputs and no downsample factors
    with pytest.raises(RoleError, match=r"does not satisfy the Factorizer role; missing input_dim, sem_downsample"):
        build_component("factorizer", cfg)


def _save_prefixed(path, module, extra=None, drop=()):
    sd = {f"module.{k}": v for k, v in module.state_dict().items() if k not in drop}
    sd.update(extra or {})
    torch.save({"model": sd, "epoch": 3}, path)


def test_foreign_weights_strict_one_error_lists_everything(tmp_path):
    src = nets.ScalarGrid(8, [3, 3])
    bad = nets.ScalarGrid(8, [3, 3, 3])  # mis-shaped down/up projections
    _save_prefixed(tmp_path / "q.pt", bad, extra={"module.stale": torch.zeros(2)}, drop=("up.bias",))
    cfg = _cfg(
        "sem_quantizer.target=acme_codec.nets:ScalarGrid",
        "sem_quantizer.args={ch: 8, grid: [3, 3]}",
        "sem_quantizer.adapter=acme_codec.siren_adapters:GridAsQuantizer",
        f"sem_quantizer.weights={tmp_path / 'q.pt'}",
        "sem_quantizer.weights_key=model",
        "sem_quantizer.rename={'^module\\.': ''}",
    )
    with pytest.raises(StrictLoadError) as info:
        build_component("sem_quantizer", cfg)
    msg = str(info.value)
    for needle in (
        "missing: up.bias",
        "unexpected: stale",
        "mis-shaped: down.weight",
        "mis-shaped: down.bias",
        "mis-shaped: up.weight",
    ):
        assert needle in msg, msg
    assert "5 problem(s)" in msg
    del src


def test_foreign_weights_load_exactly_with_renames_and_allowances_logged(tmp_path, caplog):
    src = nets.ScalarGrid(8, [3, 3])
    _save_prefixed(tmp_path / "q.pt", src, extra={"module.stale": torch.zeros(2)}, drop=("up.bias",))
    cfg = _cfg(
        "sem_quantizer.target=acme_codec.nets:ScalarGrid",
        "sem_quantizer.args={ch: 8, grid: [3, 3]}",
        "sem_quantizer.adapter=acme_codec.siren_adapters:GridAsQuantizer",
        f"sem_quantizer.weights={tmp_path / 'q.pt'}",
        "sem_quantizer.weights_key=model",
        "sem_quantizer.rename={'^module\\.': ''}",
        "sem_quantizer.allow_missing=[up.bias]",
        "sem_quantizer.allow_unexpected=[stale]",
    )
    with caplog.at_level(logging.INFO, logger="siren"):
        q = build_component("sem_quantizer", cfg)
    assert torch.equal(q.net.down.weight, src.down.weight) and torch.equal(q.net.up.weight, src.up.weight)
    text = caplog.text
    assert "module.down.weight -> down.weight" in text
    assert "missing tensor up.bias allowed by allow_missing" in text
    assert "unexpected tensor stale allowed by allow_unexpected" in text


def test_weights_key_and_pickled_code_are_explained(tmp_path):
    _save_prefixed(tmp_path / "q.pt", nets.ScalarGrid(8, [3, 3]))
    cfg = _cfg(
        "sem_quantizer.target=acme_codec.nets:ScalarGrid",
        "sem_quantizer.args={ch: 8, grid: [3, 3]}",
        f"sem_quantizer.weights={tmp_path / 'q.pt'}",
    )
    with pytest.raises(StrictLoadError, match=r"non-tensor entries \['epoch'\]; set weights_key"):
        build_component("sem_quantizer", cfg)
    with pytest.raises(StrictLoadError, match=r"weights_key 'ema': no entry 'ema'.*top-level keys: model, epoch"):
        build_component(
            "sem_quantizer", _cfg(*[f"{k}={v}" for k, v in _ov(cfg).items()], "sem_quantizer.weights_key=ema")
        )
    torch.save({"model": nets.ScalarGrid(8, [3, 3])}, tmp_path / "pickled.pt")  # a whole module: needs code to load
    with pytest.raises(StrictLoadError, match=r"weights_only=True"):
        build_component(
            "sem_quantizer",
            _cfg(
                *[f"{k}={v}" for k, v in _ov(cfg).items() if k != "sem_quantizer.weights"],
                f"sem_quantizer.weights={tmp_path / 'pickled.pt'}",
                "sem_quantizer.weights_key=model",
            ),
        )
    with pytest.raises(FileNotFoundError, match=r"weights file not found"):
        build_component(
            "sem_quantizer",
            _cfg(
                "sem_quantizer.target=acme_codec.nets:ScalarGrid",
                "sem_quantizer.args={ch: 8, grid: [3, 3]}",
                f"sem_quantizer.weights={tmp_path / 'nope.pt'}",
            ),
        )


def _ov(cfg) -> dict:
    s = cfg.sem_quantizer
    return {
        "sem_quantizer.target": s.target,
        "sem_quantizer.args": json.dumps(s.args),
        "sem_quantizer.weights": s.weights,
    }


def test_mel_domains_convert_exactly_and_refuse_other_filterbanks():
    from siren.config.schema import AudioConfig
    from siren.models.mel import MelDomain, MelDomainError, MelSpectrogram, convert_mel

    a = AudioConfig()
    front = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
    wav = 0.1 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    ln_mag = front(wav)
    # log10 of the power mel on the same filterbank, computed directly (clamped where the ln-magnitude is clamped).
    power = (ln_mag.exp()) ** 2
    log10_pow = torch.log10(power)
    ln_dom = MelDomain.of_audio(a)
    acme = MelDomain.of_audio(a, log="log10", power=2, shift=-2.0, scale=0.5)
    got = convert_mel(ln_mag, ln_dom, acme)
    assert torch.allclose(got, (log10_pow + 2.0) / 0.5, atol=1e-4)
    assert torch.allclose(convert_mel(got, acme, ln_dom), ln_mag, atol=1e-4)
    with pytest.raises(MelDomainError, match=r"hop 320 vs 256"):
        convert_mel(ln_mag, ln_dom, MelDomain.of_audio(a, hop=256, log="log10"))
    with pytest.raises(MelDomainError, match=r"n_mels 80 vs 100"):
        convert_mel(ln_mag, ln_dom, MelDomain.of_audio(a, n_mels=100))


def test_a_codec_refuses_a_vocoder_on_another_hop_at_construction():
    from acme_codec.siren_adapters import MelVocoderAsVocoder

    from siren.codec import Codec
    from siren.config.schema import AudioConfig
    from siren.models.mel import MelDomain, MelDomainError

    a = AudioConfig()
    voc = MelVocoderAsVocoder(nets.Log10PowerMelVocoder(80, 8, 256), 16000, 80, 256, 1024, 0.0, 8000.0)
    with pytest.raises(MelDomainError, match=r"vocoder: no exact conversion .*hop 256 vs 320"):
        Codec({"vocoder": voc}, sample_rate=16000, hop_length=320, mel_domain=MelDomain.of_audio(a), geometry=_geo())


def _geo():
    from siren.models.roles import FrameGeometry

    return FrameGeometry(16000, 320, 2, 8)


def test_rate_only_entropy_model_cannot_reach_the_range_coder():
    from acme_codec.siren_adapters import ByteRateAsEntropyModel, GridAsQuantizer, TableAsSpeakerQuantizer

    from siren.codec import Codec, Codes
    from siren.errors import SirenError

    comps = {
        "sem_quantizer": GridAsQuantizer(nets.ScalarGrid(8, [3, 3])),
        "pro_quantizer": GridAsQuantizer(nets.ScalarGrid(8, [3, 3])),
        "spk_quantizer": TableAsSpeakerQuantizer(nets.VoiceTable(8, 2, 4)),
        "entropy_model": ByteRateAsEntropyModel(nets.StreamRates(1, 8)),
    }
    codec = Codec(comps, sample_rate=16000, hop_length=320, geometry=_geo())
    codes = Codes(
        sem=torch.zeros(1, 8, 1, dtype=torch.long),
        pro=torch.zeros(1, 2, 1, dtype=torch.long),
        spk=torch.zeros(1, 2, dtype=torch.long),
        sem_frames=torch.tensor([8]),
        sample_rate=16000,
        sem_hop=640,
        pro_hop=2560,
    )
    # Rate metrics still work: bits per code for every frame.
    ent = comps["entropy_model"]({"sem": codes.sem, "pro": codes.pro})
    assert ent.bits["sem"].shape == (1, 8) and bool((ent.bits["sem"] > 0).all())
    with pytest.raises(SirenError, match=r"rate-only.*cannot drive a range coder"):
        codec.to_bytes(codes)


def test_checkpoint_whose_class_cannot_be_imported_names_the_module(tmp_path, teacher_dir):
    """A run saved with a foreign factorizer, loaded where its package is missing: the error names the module."""
    from siren.checkpoints import layout as ckpt
    from siren.checkpoints.load import load_checkpoint

    cfg = _cfg(
        f"ssl.name={teacher_dir}",
        "factorizer.target=acme_codec.nets:SpeechAnalyzer",
        "factorizer.args={feat_ch: 64, width: 32, sem_ch: 32, pro_ch: 16, spk_ch: 32}",
        "factorizer.adapter=acme_codec.siren_adapters:AnalyzerAsFactorizer",
        "factorizer.adapter_args={input_dim: 64}",
    )
    fact = build_component("factorizer", cfg)
    from siren.checkpoints.meta import CheckpointMeta
    from siren.config.loader import to_dict

    tree = to_dict(cfg)
    tree["factorizer"]["target"] = "acme_codec_v2.nets:SpeechAnalyzer"  # the package the run was trained with
    tmp = ckpt.begin_step(tmp_path, 0)
    ckpt.save_components(tmp, {"factorizer": fact})
    ckpt.commit_step(tmp_path, tmp, 0, CheckpointMeta(step=0, stage="codec", config=tree, fingerprints={}))
    with pytest.raises(ComponentError, match=r"factorizer: cannot import module 'acme_codec_v2\.nets'"):
        load_checkpoint(str(tmp_path), ["factorizer"])


# ----------------------------------------------------------------------------------------------- negative controls
CONTROLS = [
    ("test_typo_in_args_names_the_argument_and_the_nearest", "signature_check", r"TypeError|DID NOT RAISE"),
    ("test_a_module_that_does_not_fit_its_role_is_refused_at_build", "role_check", r"DID NOT RAISE"),
    ("test_foreign_weights_strict_one_error_lists_everything", "foreign_strict_load", r"DID NOT RAISE|RuntimeError"),
    ("test_mel_domains_convert_exactly_and_refuse_other_filterbanks", "mel_conversion", r"assert|DID NOT RAISE"),
    ("test_a_codec_refuses_a_vocoder_on_another_hop_at_construction", "mel_conversion", r"DID NOT RAISE"),
    ("test_rate_only_entropy_model_cannot_reach_the_range_coder", "rate_only_refusal", r"AttributeError|coder"),
]


def test_every_byoc_guarantee_has_a_control():
    tests = {n for n, f in globals().items() if n.startswith("test_") and callable(f)}
    controlled = {t for t, _, _ in CONTROLS}
    # Error-message tests whose mechanism is the message itself are not controlled separately.
    uncontrolled = {
        "test_every_byoc_guarantee_has_a_control",
        "test_byoc_fails_with_mechanism_disabled",
        "test_wrong_target_names_the_module_path_or_the_nearest_class",
        "test_foreign_weights_load_exactly_with_renames_and_allowances_logged",
        "test_weights_key_and_pickled_code_are_explained",
        "test_checkpoint_whose_class_cannot_be_imported_names_the_module",
    }
    assert tests - uncontrolled == controlled


@pytest.mark.parametrize(
    "test_name, mechanism, failure", CONTROLS, ids=[f"{t[5:]}-without-{m}" for t, m, _ in CONTROLS]
)
def test_byoc_fails_with_mechanism_disabled(test_name, mechanism, failure, request, monkeypatch):
    mechanisms.disable(mechanism, monkeypatch)
    fn = globals()[test_name]
    kwargs = {n: request.getfixturevalue(n) for n in inspect.signature(fn).parameters}
    with pytest.raises((Exception, pytest.fail.Exception)) as info:
        fn(**kwargs)
    text = f"{info.type.__name__}: {info.value}"
    assert re.search(failure, text), f"{test_name} failed without {mechanism}, but not on its own check: {text[:2000]}"


del mel_mod
