"""Config → modules. The one place that reads the config for the model; modules take typed arguments.

Rates: the semantic stream runs at sample_rate / hop / 2 (25 Hz), prosody at sample_rate / hop / 8 (6.25 Hz); the
speaker codes are sent once per utterance. `nominal_bps(...)["total"]` is sem + pro (≈198 bit/s for ultra200bps),
the speaker bits are reported separately (`spk_bits_per_utterance`, and `spk` spread over `utterance_seconds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from siren.config.schema import SirenConfig
from siren.config.stages import COMPONENTS
from siren.errors import SirenError
from siren.models.plugins import ComponentError

SEM, PRO, SPK = "sem", "pro", "spk"


def _fsq_size(levels: list[int]) -> int:
    return math.prod(int(lv) for lv in levels)


def _streams(cfg: SirenConfig) -> dict[str, tuple[int, int]]:
    return {
        SEM: (_fsq_size(cfg.sem_quantizer.levels), cfg.sem_quantizer.num_residual),
        PRO: (_fsq_size(cfg.pro_quantizer.levels), cfg.pro_quantizer.num_residual),
    }


def build_component(name: str, cfg: SirenConfig, ssl_dim: int | None = None, *, load_weights: bool = True) -> nn.Module:
    """Build one registry component from `cfg`; `ssl_dim` (if given) must equal the factorizer's input_dim.

    The section's `target` (a foreign class) or SIREN's own class; then its foreign `weights` (unless
    `load_weights=False`: a SIREN checkpoint is about to provide them); then its `adapter`. The result is checked
    against the component's role (siren/models/roles.py).
    """
    from siren.models.plugins import build_target, wrap_adapter
    from siren.models.roles import check_role

    if name not in COMPONENTS:
        raise KeyError(f"unknown component {name!r}; valid names: {', '.join(COMPONENTS)}")
    section = getattr(cfg, name)
    if section.target:
        module = build_target(name, section.target, section.args)
    else:
        if section.args:
            raise ComponentError(f"{name}.args is set but {name}.target is not: args are for a foreign class")
        try:
            module = _build_own(name, cfg, ssl_dim)
        except SirenError:
            raise
        except ValueError as exc:  # a config value the model cannot take (sizes, layers, levels): the user's to fix
            raise ComponentError(f"{name}: {exc} (the `{name}:` section of the config)") from exc
    if load_weights and section.weights:
        from siren.models.weights import load_foreign_weights

        load_foreign_weights(
            module,
            section.weights,
            key=section.weights_key,
            rename=section.rename,
            allow_missing=section.allow_missing,
            allow_unexpected=section.allow_unexpected,
            where=name,
            args=section.args,
        )
    if section.adapter:
        module = wrap_adapter(name, module, section.adapter, section.adapter_args)
    check_role(name, module)
    if name == "factorizer" and ssl_dim is not None and getattr(module, "input_dim", ssl_dim) != ssl_dim:
        raise ValueError(
            f"the factorizer takes {module.input_dim}-d features but the SSL features are {ssl_dim}-d; "
            "set its input dimension to match"
        )
    return module


def _build_own(name: str, cfg: SirenConfig, ssl_dim: int | None) -> nn.Module:
    """SIREN's own implementation of component `name`, from its config section."""
    f, a = cfg.factorizer, cfg.audio
    if name == "ssl":
        from siren.models.ssl import SSLFeatureExtractor

        if not cfg.ssl.name:
            raise ValueError(
                "ssl.name is empty: set ssl.name to a HuBERT (e.g. facebook/hubert-base-ls960) or a "
                "local save_pretrained dir (`siren init-ssl --out DIR` makes a tiny one)"
            )
        return SSLFeatureExtractor.from_pretrained(cfg.ssl.name, cfg.ssl.layer)
    if name == "student_ssl":
        from siren.models.student_ssl import TinyHubert

        s = cfg.student_ssl
        if s.path:
            return TinyHubert.from_pretrained(s.path)
        return TinyHubert.from_config(
            s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size, s.conv_dim, teacher_dim=s.teacher_dim
        )
    if name == "factorizer":
        from siren.models.factorizer import Factorizer

        if ssl_dim is not None and ssl_dim != f.input_dim:
            raise ValueError(
                f"factorizer.input_dim={f.input_dim} but the SSL features are {ssl_dim}-d; "
                "set factorizer.input_dim to match"
            )
        return Factorizer(
            f.input_dim,
            f.hidden_dim,
            f.num_blocks,
            f.num_heads,
            f.kernel_size,
            f.sem_dim,
            f.pro_dim,
            f.spk_dim,
            f.dropout,
        )
    if name in ("sem_quantizer", "pro_quantizer"):
        from siren.models.quantizers import ResidualFSQ

        q = getattr(cfg, name)
        return ResidualFSQ(f.sem_dim if name == "sem_quantizer" else f.pro_dim, list(q.levels), q.num_residual)
    if name == "spk_quantizer":
        from siren.models.quantizers import ProductQuantizer

        return ProductQuantizer(f.spk_dim, cfg.spk_quantizer.groups, cfg.spk_quantizer.codebook_size)
    if name == "entropy_model":
        from siren.models.entropy import EntropyModel

        e = cfg.entropy_model
        return EntropyModel(_streams(cfg), e.dim, e.num_layers, e.num_heads, e.max_len, e.dropout)
    if name == "decoder":
        from siren.models.decoder import Decoder

        d = cfg.decoder
        return Decoder(f.sem_dim, f.pro_dim, f.spk_dim, d.hidden_dim, d.num_blocks, d.kernel_size, a.n_mels)
    if name == "fuser":
        from siren.models.fuser import Fuser

        u = cfg.fuser
        return Fuser(f.sem_dim, f.pro_dim, f.spk_dim, u.hidden_dim, u.cond_dim, u.num_blocks, u.kernel_size)
    if name == "flow":
        from siren.models.flow import FlowMatching

        fl = cfg.flow
        return FlowMatching(a.n_mels, cfg.fuser.cond_dim, fl.hidden_dim, fl.num_blocks, fl.kernel_size, fl.sigma_min)
    if name == "vocoder":
        from siren.models.vocoder import Vocoder

        v = cfg.vocoder
        return Vocoder(a.n_mels, v.dim, v.intermediate_dim, v.num_blocks, v.n_fft, a.hop_length)
    raise KeyError(f"component {name!r} is in the schema but has no builder; valid names: {', '.join(COMPONENTS)}")


def component_targets(modules: dict[str, nn.Module], cfg: SirenConfig) -> dict[str, dict]:
    """For meta.json: every component's class (and the target/adapter/args it was built from)."""
    from siren.models.plugins import describe

    return {n: describe(getattr(cfg, n, None), m) for n, m in modules.items()}


def build_components(names: Iterable[str], cfg: SirenConfig) -> dict[str, nn.Module]:
    """Build several components; the factorizer is checked against the ssl's dim when both are built."""
    names = list(names)
    out: dict[str, nn.Module] = {}
    if "ssl" in names:
        out["ssl"] = build_component("ssl", cfg)
    ssl_dim = out["ssl"].dim if "ssl" in out else None
    for name in names:
        if name not in out:
            out[name] = build_component(name, cfg, ssl_dim=ssl_dim)
    return out


def frame_rate(cfg: SirenConfig) -> float:
    """SSL/mel frame rate in Hz (50 for 16 kHz, hop 320)."""
    return cfg.audio.sample_rate / cfg.audio.hop_length


def nominal_bps(cfg: SirenConfig, utterance_seconds: float = 4.0) -> dict[str, float]:
    """Bits per second before entropy coding: {sem, pro, spk, total, spk_bits_per_utterance}; total = sem + pro."""
    if utterance_seconds <= 0:
        raise ValueError(f"utterance_seconds must be > 0, got {utterance_seconds}")
    from siren.models.factorizer import Factorizer

    fr = frame_rate(cfg)  # SIREN's own factorizer's rates: a config alone names no foreign module
    sem = (
        fr / Factorizer.sem_downsample * cfg.sem_quantizer.num_residual * math.log2(_fsq_size(cfg.sem_quantizer.levels))
    )
    pro = (
        fr / Factorizer.pro_downsample * cfg.pro_quantizer.num_residual * math.log2(_fsq_size(cfg.pro_quantizer.levels))
    )
    spk_bits = cfg.spk_quantizer.groups * math.log2(cfg.spk_quantizer.codebook_size)
    return {
        SEM: sem,
        PRO: pro,
        SPK: spk_bits / utterance_seconds,
        "total": sem + pro,
        "spk_bits_per_utterance": spk_bits,
    }


def component_rates(cfg: SirenConfig) -> dict[str, str]:
    """Human-readable output rate of each component."""
    fr = frame_rate(cfg)
    f, a = cfg.factorizer, cfg.audio
    sem_k, pro_k = _fsq_size(cfg.sem_quantizer.levels), _fsq_size(cfg.pro_quantizer.levels)
    return {
        "ssl": f"{fr:g} Hz × {f.input_dim}",
        "student_ssl": f"{fr:g} Hz × {cfg.student_ssl.teacher_dim}",
        "factorizer": f"sem {fr / 2:g} Hz × {f.sem_dim}, pro {fr / 8:g} Hz × {f.pro_dim}, spk per utterance × {f.spk_dim}",
        "sem_quantizer": f"{fr / 2:g} Hz codes, {cfg.sem_quantizer.num_residual} × {sem_k}",
        "pro_quantizer": f"{fr / 8:g} Hz codes, {cfg.pro_quantizer.num_residual} × {pro_k}",
        "spk_quantizer": f"per utterance, {cfg.spk_quantizer.groups} × {cfg.spk_quantizer.codebook_size}",
        "entropy_model": "bits per sem/pro code",
        "decoder": f"{fr:g} Hz × {a.n_mels} mel",
        "fuser": f"{fr:g} Hz × {cfg.fuser.cond_dim}",
        "flow": f"{fr:g} Hz × {a.n_mels} mel",
        "vocoder": f"{a.sample_rate} Hz audio",
    }
