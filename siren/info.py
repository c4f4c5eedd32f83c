"""`siren info`: what the config builds, per component: class, parameter count and output rate, and the nominal bit/s.

Every number comes from the built modules (SIREN's own or foreign `target:` classes), never from the preset's keys:
rates from the frame geometry (`audio` + the factorizer's downsampling), code layouts from the quantizers, latent
dimensions from one forward of the factorizer on silence, and the nominal bit/s from the same function the trainer
logs as `rate/bps_nominal`. Weights files are not read: none of these numbers depends on them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from siren.config.schema import SirenConfig
from siren.config.stages import COMPONENTS


def component_info(cfg: SirenConfig) -> dict:
    """{"preset", "components": {name: {params, class, rate[, note]}}, "layout", "bps", "bps_nominal"}.
    `ssl` is built only when it is a local dir or a `target:` class (`info` never goes to the network)."""
    from siren.models.builders import build_component
    from siren.models.plugins import class_path

    modules: dict[str, nn.Module] = {}
    notes: dict[str, str] = {}
    for name in COMPONENTS:
        if name == "ssl" and not cfg.ssl.target and not Path(cfg.ssl.name or "-").is_dir():
            notes[name] = f"not built: {cfg.ssl.name!r} is not a local dir" if cfg.ssl.name else "ssl.name not set"
            continue
        section_cfg = _without_student_path(cfg) if name == "student_ssl" and cfg.student_ssl.path else cfg
        try:
            modules[name] = build_component(name, section_cfg, load_weights=False)
        except (OSError, ValueError) as exc:  # e.g. hub id that cannot be reached: report, do not invent numbers
            notes[name] = f"not built: {exc}"
    rates, layout, bps = _rates(cfg, modules, notes)
    components = {}
    for name in COMPONENTS:
        m = modules.get(name)
        row: dict = {
            "params": sum(p.numel() for p in m.parameters()) if m is not None else None,
            "class": class_path(m) if m is not None else None,
            "rate": rates.get(name, ""),
        }
        if name in notes:
            row["note"] = notes[name]
        components[name] = row
    return {
        "preset": cfg.preset,
        "components": components,
        "layout": layout,
        "bps": bps,
        "bps_nominal": bps["total"] if bps else None,
    }


def _rates(cfg: SirenConfig, mods: dict[str, nn.Module], notes: dict[str, str]) -> tuple[dict, dict, dict | None]:
    """Human-readable output rate per built component, the code layout per stream, and the bit/s."""
    from siren.models.analysis import layout_bps
    from siren.models.roles import FrameGeometry, can_range_code

    a = cfg.audio
    fact = mods.get("factorizer")
    geo = FrameGeometry.of(a, fact) if fact is not None else None
    fr = a.sample_rate / a.hop_length
    rates: dict[str, str] = {}
    if "ssl" in mods:
        rates["ssl"] = f"{fr:g} Hz × {mods['ssl'].dim}"
    elif fact is not None:
        rates["ssl"] = f"{fr:g} Hz × {fact.input_dim} (the factorizer's input)"
    if "student_ssl" in mods:
        rates["student_ssl"] = f"{fr:g} Hz × {mods['student_ssl'].dim}"
    if geo is not None:
        dims = _probe_dims(fact, geo)
        if isinstance(dims, str):
            notes.setdefault("factorizer", f"latent dims unknown: {dims}")
            dims = {"sem": "?", "pro": "?", "spk": "?"}
        rates["factorizer"] = (
            f"sem {geo.sem_rate:g} Hz × {dims['sem']}, pro {geo.pro_rate:g} Hz × {dims['pro']}, "
            f"spk per utterance × {dims['spk']}"
        )
    layout: dict[str, dict] = {}
    for stream, hz in (("sem", geo.sem_rate if geo else None), ("pro", geo.pro_rate if geo else None)):
        q = mods.get(f"{stream}_quantizer")
        if q is None:
            continue
        layout[stream] = {"codebook_size": int(q.codebook_size), "levels": int(q.num_levels), "rate_hz": hz}
        where = f"{hz:g} Hz codes" if hz is not None else "codes (rate unknown: no factorizer)"
        rates[f"{stream}_quantizer"] = f"{where}, {q.num_levels} × {q.codebook_size}"
    spk = mods.get("spk_quantizer")
    if spk is not None:
        layout["spk"] = {"codebook_size": int(spk.codebook_size), "levels": int(spk.num_codebooks), "rate_hz": None}
        rates["spk_quantizer"] = f"per utterance, {spk.num_codebooks} × {spk.codebook_size}"
    if "entropy_model" in mods:
        coder = "range-codable" if can_range_code(mods["entropy_model"]) else "rate only: no range coder"
        rates["entropy_model"] = f"bits per sem/pro code ({coder})"
    for name in ("decoder", "flow"):
        if name in mods:
            rates[name] = f"{fr:g} Hz × {_n_mels(mods[name], a.n_mels)} mel"
    if "fuser" in mods:
        rates["fuser"] = f"{fr:g} Hz × {mods['fuser'].cond_dim}"
    if "vocoder" in mods:
        rates["vocoder"] = f"{a.sample_rate} Hz audio, {mods['vocoder'].hop_length} samples per mel frame"
    bps = None
    if geo is not None and "sem_quantizer" in mods and "pro_quantizer" in mods:
        # The trainer's own `rate/bps_nominal`: one definition of nominal bit/s, whatever the modules are.
        bps = {"total": layout_bps(geo, mods)}
        if spk is not None:
            bps["spk_bits_per_utterance"] = spk.num_codebooks * math.log2(spk.codebook_size)
    return rates, layout, bps


def _probe_dims(fact: nn.Module, geo) -> dict[str, int] | str:
    """sem/pro/spk latent dims from one forward on silence (a foreign factorizer declares none); or why it failed."""
    frames = 4 * math.lcm(geo.sem_downsample, geo.pro_downsample)
    was_training = fact.training
    fact.eval()
    try:
        with torch.no_grad():
            out = fact(torch.zeros(1, frames, int(fact.input_dim)))
        return {s: int(getattr(out, s).shape[-1]) for s in ("sem", "pro", "spk")}
    except Exception as exc:  # reported in the table, never replaced by the preset's numbers
        return f"{type(exc).__name__}: {exc}"
    finally:
        fact.train(was_training)


def _n_mels(module: nn.Module, default: int) -> int:
    domain = getattr(module, "mel_domain", None)
    return int(getattr(domain, "n_mels", default))


def _without_student_path(cfg: SirenConfig) -> SirenConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.student_ssl.path = None  # count the architecture the config describes
    return cfg
