"""Baseline profile (docs/metrics.md#baseline-profile): code histograms per stream and level, entropy, entropy-model bit/s on a reference set.

`siren profile --checkpoint URI --data MANIFEST --out FILE.json`; the `adapt` stage computes it at start on a fixed
speaker-balanced subset (`data.profile_utts`), every rank a share, and caches it in `RUN/baseline_profile.json` under a
key (baseline fingerprint, audio settings, the subset's rows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from siren.config.stages import ANALYSIS_PARTS
from siren.errors import LayoutMismatch
from siren.metrics.codebook import DENSE_MAX_CODES, entropy_bits, histogram


def profile_sums(modules: dict[str, nn.Module], utterances, audio, device="cpu") -> dict:
    """Sums a profile is made of, over `utterances` (full, one at a time): per-stream histograms, bits, seconds, count.
    `audio`: the run's audio section. Sums add across ranks, so each rank can take a share and the shares are reduced."""
    from siren.data.audio import load_audio
    from siren.models.analysis import analyse, code_layout, entropy_rate, stream_masks
    from siren.models.roles import FrameGeometry

    geo = FrameGeometry.of(audio, modules["factorizer"])
    sample_rate = audio.sample_rate
    layout = code_layout(modules)
    hists = {s: torch.zeros(L, K, dtype=torch.float64) for s, (K, L) in layout.items()}
    bits_total, seconds_total, n = 0.0, 0.0, 0
    for u in utterances:
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
    return {"layout": layout, "hists": hists, "bits": bits_total, "seconds": seconds_total, "n": n}


def stored_histogram(h: torch.Tensor) -> list | dict:
    """A stream's (L, K) counts as stored in the profile: dense nested lists up to `DENSE_MAX_CODES` codes per level,
    above it only the codes with a count (`{"codes": [[...] per level], "counts": [[...] per level]}`), which is what
    the sparse drift reference reads (`siren.metrics.drift.level_counts`)."""
    if h.shape[-1] <= DENSE_MAX_CODES:
        return h.tolist()
    nz = [torch.nonzero(row).flatten() for row in h]
    return {"codes": [i.tolist() for i in nz], "counts": [row[i].tolist() for row, i in zip(h, nz, strict=True)]}


def finish_profile(sums: dict) -> dict:
    hists = sums["hists"]
    return {
        "layout": {s: list(v) for s, v in sums["layout"].items()},
        "histograms": {s: stored_histogram(h) for s, h in hists.items()},
        "entropy_bits": {s: entropy_bits(h).tolist() for s, h in hists.items()},
        "bps_entropy": sums["bits"] / max(sums["seconds"], 1e-9),
        "num_utts": int(sums["n"]),
        "seconds": sums["seconds"],
    }


def compute_profile(
    modules: dict[str, nn.Module], utterances, audio, device="cpu", max_utts: int | None = None
) -> dict:
    """modules: `features` (ssl or student), factorizer, quantizers, entropy_model; `audio`: the audio section.
    Full utterances, one at a time."""
    return finish_profile(profile_sums(modules, utterances[: max_utts or len(utterances)], audio, device))


def _reduce(sums: dict, ctx) -> dict:
    """Sum the ranks' profile sums (a few small tensors: gathered, then added)."""
    parts = ctx.gather({"hists": sums["hists"], "bits": sums["bits"], "seconds": sums["seconds"], "n": sums["n"]})
    out = dict(sums)
    out["hists"] = {s: sum(p["hists"][s] for p in parts) for s in sums["hists"]}
    out["bits"] = sum(p["bits"] for p in parts)
    out["seconds"] = sum(p["seconds"] for p in parts)
    out["n"] = sum(p["n"] for p in parts)
    return out


def profile_key(stage, cfg, subset) -> dict:
    """Everything that changes a baseline profile: the baseline, the audio settings and the reference rows."""
    from siren.data.cache import row_digest
    from siren.data.manifest import ManifestTable

    table = ManifestTable.from_utterances(subset)
    return {
        "baseline": stage.baseline_fingerprint,
        "sample_rate": cfg.audio.sample_rate,
        "profile_utts": cfg.data.profile_utts,
        "rows": row_digest(table, range(len(table))),
    }


def load_or_compute_profile(path: Path, ctx, modules, utterances, stage) -> dict:
    """The baseline profile on a fixed speaker-balanced subset (`data.profile_utts`) of `utterances`, computed by every
    rank on its share and reduced; cached in `path` under its key (a changed key recomputes, never reuses). A cached
    profile of another baseline in the same run dir is an error."""
    from siren.data.datasets import speaker_balanced_subset

    cfg = stage.cfg
    layout = {s: list(v) for s, v in stage.code_layout(modules).items()}
    subset = speaker_balanced_subset(list(utterances), cfg.data.profile_utts, cfg.train.seed)
    key = profile_key(stage, cfg, subset)
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached is not None and cached.get("baseline_fingerprint") != stage.baseline_fingerprint:
        raise LayoutMismatch(
            f"{path} was computed for another baseline (fingerprint "
            f"{str(cached.get('baseline_fingerprint'))[:12]} ≠ {stage.baseline_fingerprint[:12]}); "
            "use a new run dir or --fresh"
        )
    if cached is None or cached.get("key") != key:
        sums = profile_sums(stage.profile_modules(modules), ctx.shard(subset), cfg.audio, ctx.device)
        if ctx.world > 1:
            sums = _reduce(sums, ctx)
        prof = finish_profile(sums)
        prof.update(key=key, baseline_fingerprint=stage.baseline_fingerprint, baseline_uri=stage.baseline_uri)
        ctx.barrier()  # every rank has read `path` before rank 0 replaces it
        if ctx.is_main:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(prof))
            os.replace(tmp, path)
        cached = prof
    if cached["layout"] != layout:
        raise LayoutMismatch(f"{path} has code layout {cached['layout']}, this run has {layout}")
    return cached


def profile_checkpoint(uri: str, data: str, *, max_utts: int = 64, out: str | None = None) -> dict:
    from siren.checkpoints.artifacts import resolve_checkpoint
    from siren.checkpoints.layout import read_meta
    from siren.checkpoints.load import load_checkpoint
    from siren.data.manifest import read_manifest

    meta = read_meta(resolve_checkpoint(uri))
    feat = "student_ssl" if meta.stage == "adapt" else "ssl"
    names = [feat, *ANALYSIS_PARTS, "entropy_model"]
    ck = load_checkpoint(uri, names)
    mods = {**ck.modules, "features": ck.modules[feat]}
    for m in mods.values():
        m.eval()
    prof = compute_profile(mods, read_manifest(data), ck.cfg.audio, max_utts=max_utts)
    from siren.checkpoints.lineage import checkpoint_fingerprint

    prof["baseline_fingerprint"] = checkpoint_fingerprint(meta)
    prof["baseline_uri"] = uri
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(prof, indent=1))
    return prof


def check_layout(a: dict, b: dict, what: str) -> None:
    if {k: list(v) for k, v in a.items()} != {k: list(v) for k, v in b.items()}:
        raise LayoutMismatch(f"{what}: code layouts differ: {a} vs {b}")
