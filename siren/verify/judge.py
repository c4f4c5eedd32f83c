"""Judging: every rank encodes, decodes and scores its share of the eval set (`judge_share`); rank 0 adds the shares
up in utterance order (`reduce`), computes the metrics (`compute_metrics`) and holds them against the thresholds
(`check`).

Every metric verify reports is declared once, in `declare`: its name and how its value comes from the reduced
`Totals`. The metrics a report holds and the names a threshold may use (`threshold_names`) are both read from that
declaration, so a new metric is one entry there (docs/verify.md, "What the report holds").
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from siren.verify.errors import VerifyError

log = logging.getLogger("siren")
SYSTEMS = ("adapted", "baseline")  # the two systems judged against each other
DISTANCES = ("adapted_vs_truth", "baseline_vs_truth", "adapted_vs_baseline", "silence_vs_truth", "noise_vs_truth")


@dataclass
class Totals:
    """Every rank's share, added up: code histograms and agreement counts per stream, and the per-utterance records
    in utterance order (so the float sums do not depend on the number of processes)."""

    layout: dict
    hist: dict  # system → stream → (L, K) code counts
    eq: dict  # stream → (L,) codes equal between the systems
    tot: dict  # stream → (L,) codes compared
    records: list  # one per judged utterance, in utterance order
    seconds: float  # audio judged
    rangeable: dict  # system → its entropy model can write a real bitstream
    quality: dict  # pooled quality metrics (siren.metrics.quality.pool_quality); {} when none was scored
    skipped: list = None  # [{"id", "reason"}] of the eval rows not judged: unusable rows, then clips found too short
    num_late: int = 0  # of those, found too short while judging

    def bits(self, key: str, w: str) -> float:
        return sum(r[key][w] for r in self.records)


Metric = Callable[[Totals], float | None]  # None: not computed this time (reported absent; a threshold on it fails)


def declare(layout: dict[str, tuple[int, int]]) -> dict[str, Metric]:
    """Every metric a verify report can hold, in report order: name → its value from the reduced `Totals`."""
    from siren.metrics.codebook import entropy_bits, level_names
    from siren.metrics.drift import js_divergence_bits
    from siren.metrics.quality import METRICS

    def js(t: Totals, s: str) -> float:
        return float(js_divergence_bits(t.hist["adapted"][s], t.hist["baseline"][s]).mean())

    def entropy_delta(t: Totals, s: str) -> float:
        return float((entropy_bits(t.hist["adapted"][s]) - entropy_bits(t.hist["baseline"][s])).mean())

    def real(t: Totals, w: str, payload: bool) -> float | None:
        if not t.rangeable[w]:  # a rate-only entropy model writes no bitstream
            return None
        bits = t.bits("real_bits", w) - (t.bits("header_bits", w) if payload else 0)
        return bits / t.seconds

    out: dict[str, Metric] = {}
    for s, (_, num_levels) in layout.items():
        for j, lv in enumerate(level_names(s, num_levels)):
            out[f"agreement/{s}/{lv}"] = lambda t, s=s, j=j: float(t.eq[s][j] / t.tot[s][j])
        out[f"agreement/{s}"] = lambda t, s=s: float(t.eq[s].sum() / t.tot[s].sum())
        out[f"js/{s}"] = lambda t, s=s: js(t, s)
        out[f"entropy_delta_bits/{s}"] = lambda t, s=s: entropy_delta(t, s)
    for w in SYSTEMS:
        out[f"bps_entropy/{w}"] = lambda t, w=w: t.bits("bits", w) / t.seconds
        out[f"bps_real/{w}"] = lambda t, w=w: real(t, w, payload=False)
        out[f"bps_real_payload/{w}"] = lambda t, w=w: real(t, w, payload=True)
    out["bps_ratio"] = lambda t: out["bps_entropy/adapted"](t) / max(out["bps_entropy/baseline"](t), 1e-9)
    # Each system's own codebooks, so a collapsed one (near-constant codes) shows, and fails a floor, even when the two
    # systems agree with each other: usage = fraction of the K codes seen, entropy = bits ÷ log2 K (mean over levels).
    for s, (K, _) in layout.items():
        for w in SYSTEMS:
            out[f"code_usage/{s}/{w}"] = lambda t, s=s, w=w: float((t.hist[w][s] > 0).float().mean(-1).mean())
            out[f"code_entropy/{s}/{w}"] = lambda t, s=s, w=w, K=K: float(
                (entropy_bits(t.hist[w][s].float()) / math.log2(max(K, 2))).mean()
            )
    for k in DISTANCES:
        out[f"mel_l1/{k}"] = lambda t, k=k: sum(r["row"][k] for r in t.records) / len(t.records)
    # With the eval extra and audio from both systems (siren.metrics.quality.pool_quality names them).
    quality = ["quality/num_utts"]
    for m in METRICS:
        quality += [f"quality/{m}/{w}" for w in SYSTEMS] + [f"quality/{m}/failed"]
    quality += ["quality/wer/reference_manifest", "quality/wer/reference_asr"]
    for name in quality:
        out[name] = lambda t, name=name: t.quality.get(name)
    return out


def threshold_names(layout: dict[str, tuple[int, int]]) -> set[str]:
    """The metric names a `min/<metric>` or `max/<metric>` threshold may use: the declared metrics."""
    return set(declare(layout))


def compute_metrics(totals: Totals) -> dict[str, float]:
    """The declared metrics that have a value this time (e.g. no `bps_real/*` for a rate-only entropy model)."""
    out = {}
    for name, value in declare(totals.layout).items():
        v = value(totals)
        if v is not None:
            out[name] = v
    return out


def reduce(job, parts: list[dict]) -> Totals:
    """Rank 0: add up every rank's share (`judge_share`'s results, in rank order); records in utterance order."""
    la = job.layout
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
    late = sorted((r for p in parts for r in p.get("skipped", [])), key=lambda r: r["index"])
    skipped = list(job.skipped or []) + [{"id": r["id"], "reason": r["reason"]} for r in late]
    if not records:
        wav = job.wav
        what = f"--wav {late[0]['reason']}" if wav is not None and late else f"no usable utterance in {job.manifest}"
        if wav is None and skipped:
            what += f"; skipped {len(skipped)} (e.g. {skipped[0]['id']}: {skipped[0]['reason']})"
        raise VerifyError(what)
    hist = {w: {s: sum(p["hist"][w][s] for p in parts) for s in la} for w in SYSTEMS}
    eq = {s: sum(p["eq"][s] for p in parts) for s in la}
    tot = {s: sum(p["tot"][s] for p in parts) for s in la}
    seconds = sum(r["samples"] / job.adapted.cfg.audio.sample_rate for r in records)
    pooled: dict = {}
    if parts[0]["quality"]:
        from siren.metrics.quality import pool_quality

        scored = [r for r in records if "quality" in r]
        for r in scored:
            r["row"]["quality"] = r["quality"]
        if not scored:
            log.info("verify: no utterance has audio from both systems (no vocoder?); quality metrics not computed")
        pooled = pool_quality([r["quality"] for r in scored], parts[0]["quality"])
    return Totals(la, hist, eq, tot, records, seconds, parts[0]["rangeable"], pooled, skipped, len(late))


def check(thresholds: dict[str, float], metrics: dict[str, float]) -> list[dict]:
    """One row per threshold, in name order: its value, its limit and whether it holds."""
    checks = []
    for key, limit in sorted(thresholds.items()):
        kind, _, name = key.partition("/")
        if name not in metrics:  # e.g. an eval-extra metric when the extra is not installed: a failed check
            checks.append({"threshold": key, "limit": limit, "value": None, "ok": False, "missing": True})
            continue
        ok = metrics[name] >= limit if kind == "min" else metrics[name] <= limit
        checks.append({"threshold": key, "limit": limit, "value": metrics[name], "ok": bool(ok)})
    return checks


# ------------------------------------------------------------------------------------------------------ thresholds
def resolve_thresholds(configured: dict, given: dict[str, float] | None, layout: dict, run: Path) -> dict[str, float]:
    """The run's `verify.thresholds` overridden by `given` (`--threshold`); refused when empty or naming an unknown
    metric (before the expensive part: a typo fails at once)."""
    th = dict(configured)
    th.update(given or {})
    require_thresholds(th, run)
    check_thresholds(th, threshold_names(layout))
    return th


def require_thresholds(th: dict[str, float], run: Path) -> None:
    """A verdict needs at least one threshold: an empty set would pass anything."""
    if not th:
        raise VerifyError(
            f"no thresholds: verify.thresholds in the config of {run} is empty and no --threshold was given; a "
            "verdict without a threshold would pass anything (set e.g. verify.thresholds.min/agreement/sem)"
        )


def check_thresholds(th: dict[str, float], known: set[str]) -> None:
    problems = []
    for key in sorted(th):
        kind, _, name = key.partition("/")
        if kind not in ("min", "max") or name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean `{kind}/{close[0]}`?" if close else f"; metrics: {', '.join(sorted(known))}"
            problems.append(f"threshold `{key}` is not min/<metric> or max/<metric> with a known metric{hint}")
    if problems:
        raise VerifyError("; ".join(problems))


# --------------------------------------------------------------------------------------------------- one rank's share
def judge_share(job, ranks, codecs: dict, pipe: list[str]) -> dict:
    """Encode, decode and score this rank's utterances (`ranks.shard` of the eval set) with the adapted and baseline
    `codecs` (`load.build_codecs`; `pipe`: the pipeline components they share). → sums that add across ranks exactly
    (code counts, histograms) and one record per utterance (floats, reduced in utterance order by rank 0)."""
    from siren.codec import ClipTooShort
    from siren.data.audio import load_audio, save_audio
    from siren.metrics.codebook import histogram
    from siren.models.mel import MelSpectrogram
    from siren.models.roles import can_range_code
    from siren.train.samples import save_mel_png

    la, cfg, out_dir = job.layout, job.adapted.cfg, job.out_dir
    device = ranks.device  # the accelerator when there is one (this rank's, under a launch)
    for c in codecs.values():
        c.to(device)
    a = cfg.audio
    mel_fn = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
    out_dir.mkdir(parents=True, exist_ok=True)
    rangeable = {w: can_range_code(c.components["entropy_model"]) for w, c in codecs.items()}
    scorers = _quality_scorers()

    hist = {w: {s: 0 for s in la} for w in SYSTEMS}
    eq = {s: torch.zeros(la[s][1], dtype=torch.float64) for s in la}
    tot = {s: torch.zeros(la[s][1], dtype=torch.float64) for s in la}
    records, skipped = [], []
    mine = ranks.shard(list(enumerate(job.utts)))
    for i, u in mine:
        wav = load_audio(u.path, a.sample_rate)
        try:
            codes = {w: c.encode(wav) for w, c in codecs.items()}
        except ClipTooShort as exc:  # the file is shorter than its row said (or --wav / the real clip is short)
            log.info("verify: %s skipped (%s)", u.id, exc)
            skipped.append({"index": i, "id": u.id, "reason": str(exc)})
            continue
        n = codes["adapted"].num_samples[0]
        wav = wav[None, :n]
        truth = mel_fn(wav)
        res, rec = {}, {"index": i, "samples": n, "bits": {}, "real_bits": {}, "header_bits": {}}
        with torch.no_grad():
            for w, codec in codecs.items():
                c = codes[w]
                ent = codec.components["entropy_model"]({"sem": c.sem.to(device), "pro": c.pro.to(device)})
                rec["bits"][w] = float(ent.total_bits["sem"].sum() + ent.total_bits["pro"].sum())
                if rangeable[w]:  # a rate-only model has no real bitstream
                    enc = codec.to_encoded(c)
                    rec["real_bits"][w] = 8 * len(enc.data)
                    rec["header_bits"][w] = enc.header_bits
                for s in la:
                    hist[w][s] = hist[w][s] + histogram(getattr(c, s), None, la[s][0]).cpu()
                mel = codec.decode_mel(c)
                audio = codec.vocode(mel).cpu() if codec.has("vocoder") else None
                res[w] = (c, mel.cpu(), audio)
        for s in la:
            ca, cb = getattr(res["adapted"][0], s), getattr(res["baseline"][0], s)
            ca = ca if ca.dim() == 3 else ca[:, None]
            cb = cb if cb.dim() == 3 else cb[:, None]
            eq[s] += (ca == cb).to(torch.float64).sum(dim=(0, 1)).cpu()
            tot[s] += ca.shape[0] * ca.shape[1]
        T = min(truth.shape[-1], res["adapted"][1].shape[-1])
        tr = truth[..., :T]
        ma, mb = res["adapted"][1][..., :T], res["baseline"][1][..., :T]
        silence = torch.full_like(tr, float(tr.min()))
        noise = mel_fn(torch.randn(1, n, generator=torch.Generator().manual_seed(i)) * wav.std())[..., :T]
        d = {
            "adapted_vs_truth": (ma - tr).abs().mean(),
            "baseline_vs_truth": (mb - tr).abs().mean(),
            "adapted_vs_baseline": (ma - mb).abs().mean(),
            "silence_vs_truth": (silence - tr).abs().mean(),
            "noise_vs_truth": (noise - tr).abs().mean(),
        }
        rec["row"] = {"id": u.id, **{k: float(v) for k, v in d.items()}}
        if scorers is not None and all(res[w][2] is not None for w in SYSTEMS):
            rec["quality"] = _score_quality(scorers, u, wav[0], {w: res[w][2][0] for w in res}, a.sample_rate)
        records.append(rec)
        if i < 4 or u.id == "real_human_codec2":  # written by the rank that judged it
            save_audio(out_dir / f"{u.id}_original.wav", wav[0], a.sample_rate)
            save_mel_png(out_dir / f"{u.id}_original.png", tr[0], f"{u.id} original")
            for w in SYSTEMS:
                if res[w][2] is not None:
                    save_audio(out_dir / f"{u.id}_{w}.wav", res[w][2][0], a.sample_rate)
                save_mel_png(out_dir / f"{u.id}_{w}.png", res[w][1][0, :, :T], f"{u.id} {w}")
    if ranks.world > 1:
        print(f"verify: rank {ranks.rank}/{ranks.world} judged {len(mine)} of {len(job.utts)} utterances", flush=True)
    return {
        "hist": hist,
        "eq": eq,
        "tot": tot,
        "records": records,
        "skipped": skipped,
        "pipeline": pipe,
        "rangeable": rangeable,
        "quality": None if scorers is None else list(scorers),  # the quality metrics scored
    }


def _quality_scorers() -> dict | None:
    """DNSMOS / WER / speaker similarity / PESQ / STOI scorers; None without the `eval` extra (reported absent)."""
    from siren.metrics.quality import build_scorers, missing_eval_libraries

    missing = missing_eval_libraries()
    if missing:
        log.info(
            "verify: eval extra not installed (%s missing): DNSMOS/WER/speaker/PESQ/STOI not computed",
            ", ".join(missing),
        )
        return None
    return build_scorers()


def _score_quality(scorers: dict, u, original: torch.Tensor, coded: dict, sample_rate: int) -> dict:
    """One utterance's quality row (siren.metrics.quality.score_utterance) from the in-memory audio, clamped to
    [-1, 1] as the written wav files are, at the metrics' 16 kHz; WER against the manifest text when it has one."""
    from siren.metrics.quality import SAMPLE_RATE, score_utterance

    def prep(x: torch.Tensor):
        x = x.detach().float().cpu().clamp(-1.0, 1.0)
        if sample_rate != SAMPLE_RATE:
            import torchaudio.functional as AF

            x = AF.resample(x, orig_freq=sample_rate, new_freq=SAMPLE_RATE)
        return x.numpy()

    return score_utterance(u.id, prep(original), {w: prep(x) for w, x in coded.items()}, scorers, u.text or None)
