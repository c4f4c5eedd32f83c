"""Baseline profile (DESIGN §8): code histograms per stream and level, entropy, entropy-model bit/s on a reference set.

`siren profile --checkpoint URI --data MANIFEST --out FILE.json`; the `adapt` stage computes it at start and caches it
in `RUN/baseline_profile.json`, tagged with the baseline fingerprint and the code layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from siren.errors import LayoutMismatch
from siren.metrics.codebook import entropy_bits, histogram


def compute_profile(
    modules: dict[str, nn.Module], utterances, audio, device="cpu", max_utts: int | None = None
) -> dict:
    """modules: `features` (ssl or student), factorizer, quantizers, entropy_model; `audio`: the run's audio section.
    Full utterances, one at a time."""
    from siren.data.audio import load_audio
    from siren.models.roles import FrameGeometry
    from siren.train.stages.common import analyse, code_layout, entropy_rate, stream_masks

    geo = FrameGeometry.of(audio, modules["factorizer"])
    sample_rate = audio.sample_rate
    layout = code_layout(modules)
    hists = {s: torch.zeros(L, K, dtype=torch.float64) for s, (K, L) in layout.items()}
    bits_total, seconds_total, n = 0.0, 0.0, 0
    for u in utterances[: max_utts or len(utterances)]:
        wav = load_audio(u.path, sample_rate).to(device)
        with torch.no_grad():
            an = analyse(modules, modules["features"](wav[None]))
            lengths = torch.tensor([wav.shape[-1]], device=device)
            masks = stream_masks(lengths, an, geo)
            ent = modules["entropy_model"](
                {"sem": an.sem.codes, "pro": an.pro.codes}, {"sem": masks["sem"].sum(1), "pro": masks["pro"].sum(1)}
            )
            bits, seconds = entropy_rate(ent, masks, geo)
        for s in ("sem", "pro"):
            hists[s] += histogram(getattr(an, s).codes, masks[s], layout[s][0]).cpu()
        hists["spk"] += histogram(an.spk.codes, None, layout["spk"][0]).cpu()
        bits_total += float(bits)
        seconds_total += float(seconds)
        n += 1
    return {
        "layout": {s: list(v) for s, v in layout.items()},
        "histograms": {s: h.tolist() for s, h in hists.items()},
        "entropy_bits": {s: entropy_bits(h).tolist() for s, h in hists.items()},
        "bps_entropy": bits_total / max(seconds_total, 1e-9),
        "bits": bits_total,
        "num_utts": n,
        "seconds": seconds_total,
    }


def load_or_compute_profile(path: Path, ctx, modules, utterances, stage) -> dict:
    """Cached per run; recomputed never silently: a cached profile of another baseline or layout is an error.

    Every rank profiles its share of the reference set (`ctx.shard`); the sums are gathered and rank 0 writes."""
    layout = {s: list(v) for s, v in stage.code_layout(modules).items()}
    if not path.is_file():  # every rank sees the same answer: the file is only written after the gather below
        part = compute_profile(stage.profile_modules(modules), ctx.shard(list(utterances)), stage.cfg.audio, ctx.device)
        prof = merge_profiles(ctx.gather(part))
        if ctx.is_main:
            prof["baseline_fingerprint"] = stage.baseline_fingerprint
            prof["baseline_uri"] = stage.baseline_uri
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(prof))
            os.replace(tmp, path)
    ctx.barrier()
    prof = json.loads(path.read_text())
    if prof.get("baseline_fingerprint") != stage.baseline_fingerprint:
        raise LayoutMismatch(
            f"{path} was computed for another baseline (fingerprint "
            f"{str(prof.get('baseline_fingerprint'))[:12]} ≠ {stage.baseline_fingerprint[:12]}); "
            "use a new run dir or --fresh"
        )
    if prof["layout"] != layout:
        raise LayoutMismatch(f"{path} has code layout {prof['layout']}, this run has {layout}")
    return prof


def merge_profiles(parts: list[dict]) -> dict:
    """Profiles of disjoint utterance sets → the profile of their union (histograms, bits and seconds add up)."""
    layout = parts[0]["layout"]
    hists = {s: torch.zeros(L, K, dtype=torch.float64) for s, (K, L) in layout.items()}
    bits = seconds = 0.0
    n = 0
    for p in parts:
        if p["layout"] != layout:
            raise LayoutMismatch(f"profile parts with different layouts: {p['layout']} vs {layout}")
        for s in hists:
            hists[s] += torch.tensor(p["histograms"][s], dtype=torch.float64)
        bits += p["bits"]
        seconds += p["seconds"]
        n += p["num_utts"]
    return {
        "layout": layout,
        "histograms": {s: h.tolist() for s, h in hists.items()},
        "entropy_bits": {s: entropy_bits(h).tolist() for s, h in hists.items()},
        "bps_entropy": bits / max(seconds, 1e-9),
        "bits": bits,
        "num_utts": n,
        "seconds": seconds,
    }


def profile_checkpoint(uri: str, data: str, *, max_utts: int = 64, out: str | None = None) -> dict:
    from siren.artifacts import resolve_checkpoint
    from siren.data.manifest import read_manifest
    from siren.train.checkpoint import read_meta
    from siren.train.stages.common import load_checkpoint

    meta = read_meta(resolve_checkpoint(uri))
    feat = "student_ssl" if meta["stage"] == "adapt" else "ssl"
    names = [feat, "factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model"]
    ck = load_checkpoint(uri, names)
    mods = {**ck.modules, "features": ck.modules[feat]}
    for m in mods.values():
        m.eval()
    prof = compute_profile(mods, read_manifest(data), ck.cfg.audio, max_utts=max_utts)
    from siren.train.stages.adapt import baseline_fingerprint

    prof["baseline_fingerprint"] = baseline_fingerprint(meta)
    prof["baseline_uri"] = uri
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(prof, indent=1))
    return prof


def check_layout(a: dict, b: dict, what: str) -> None:
    if {k: list(v) for k, v in a.items()} != {k: list(v) for k, v in b.items()}:
        raise LayoutMismatch(f"{what}: code layouts differ: {a} vs {b}")
