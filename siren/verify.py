"""`siren verify --run RUN --step N` (DESIGN §10): does the adapted checkpoint still speak the baseline's code language?

Loads `step_N` of an `adapt` run and the baseline named in its meta.json, runs both analysis paths on the eval set and
reports code agreement per stream/level, JS and entropy deltas, entropy-model and real-bitstream bit/s, and mel distances
of the full pipeline's output. Thresholds (`verify.thresholds`, `min/<metric>` or `max/<metric>`) decide pass/fail.
Exit code 0 = pass, 1 = fail, 2 = error (missing step, unresolvable baseline, layout mismatch, bad threshold).
`--wav FILE` judges one audio file instead of the eval set (the seed guide's "check this recording" workflow), with the
same thresholds; its outputs go to `RUN/verify/step_N/wav/<file stem>/`.
Beside report.json and report.md, `report.html` (siren/report_html.py) is the page a person opens: players, mels, tables.
Each verify keeps its own record, `RUN/verify/step_N/<UTC time>-<eval set name>/` (under `wav/<file stem>/` for
`--wav`); the files directly in `step_N/` (or `wav/<file stem>/`) are hard links to the newest record's, and `latest`
there names it, so `verify/step_N/report.json` is always the latest verify's report.
Under `accelerate launch` each process judges utterances `i % world == rank`; rank 0 reduces the code counts and the
per-utterance values in utterance order (the report does not depend on the number of processes), writes the report
and logs to W&B, and every process returns its verdict; an error on any process is exit 2 on all.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from siren.errors import LayoutMismatch, SirenError

log = logging.getLogger("siren")
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
COLLECTIVE_TIMEOUT_S = 1800  # a rank waits at most this long for its peers at one exchange
MAX_LISTED_SKIPS = 200  # skipped eval rows listed by id in the report (all are counted)
DISTANCES = ("adapted_vs_truth", "baseline_vs_truth", "adapted_vs_baseline", "silence_vs_truth", "noise_vs_truth")


class VerifyError(SirenError):
    pass


def _load(run: Path, step: int):
    from siren.artifacts import CheckpointNotFound
    from siren.lineage import check_ssl_matches, code_language_id, resolve_recorded, verified_code_language
    from siren.train.checkpoint import list_steps, read_meta, step_dir
    from siren.train.stages.adapt import baseline_fingerprint
    from siren.train.stages.common import load_checkpoint

    sd = step_dir(run, step)
    if not (sd / "meta.json").is_file():
        steps = list_steps(run)
        raise VerifyError(
            f"{sd} does not exist or is incomplete; saved steps in {run}: {', '.join(map(str, steps)) or 'none'}"
        )
    meta = read_meta(sd)
    if meta["stage"] != "adapt":
        raise VerifyError(
            f"{sd} is a {meta['stage']!r} checkpoint; verify checks an adapt checkpoint against its baseline"
        )
    base_rec = meta.get("baseline") or {}
    base_uri = base_rec.get("uri")
    if not base_uri and not base_rec.get("path"):
        raise VerifyError(f"{sd}/meta.json names no baseline")
    adapted = load_checkpoint(
        str(sd),
        ["student_ssl", "factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model", "decoder"],
    )
    # The step dir the adapt run actually used (recorded), not whatever the URI names today (DESIGN §19).
    base_path = resolve_recorded(base_rec, "baseline", f"{sd}/meta.json")
    try:
        base = load_checkpoint(
            str(base_path),
            ["ssl", "factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model", "decoder"],
            ssl_cfg_from=adapted.cfg,
        )
    except (CheckpointNotFound, FileNotFoundError) as exc:
        raise VerifyError(f"the baseline {base_path} recorded in {sd}/meta.json cannot be loaded: {exc}") from exc
    check_ssl_matches(adapted.cfg, base.meta, str(base.path))
    for ck in (adapted, base):
        verified_code_language(ck.modules, ck.meta, str(ck.path))
    if code_language_id(adapted.modules) != code_language_id(base.modules):
        raise VerifyError(
            f"{sd} speaks another code language than its baseline {base.path}: its quantizers or entropy model are "
            "not the baseline's (they must stay frozen in adapt)"
        )
    want = meta["baseline"].get("fingerprint")
    if want and baseline_fingerprint(base.meta) != want:
        raise VerifyError(
            f"the baseline at {base_uri} is not the one step {step} was trained against "
            f"(fingerprint {baseline_fingerprint(base.meta)[:12]} ≠ {want[:12]})"
        )
    for m in (*adapted.modules.values(), *base.modules.values()):
        m.eval().requires_grad_(False)
    adapted.modules["features"] = adapted.modules["student_ssl"]
    base.modules["features"] = base.modules["ssl"]
    return adapted, base


def _codecs(adapted, base) -> tuple[dict, list[str]]:
    """The adapted and baseline `Codec`s, sharing the pipeline checkpoints named in the adapted config."""
    from siren.lineage import resolve_recorded
    from siren.models.codec import Codec, _check_code_language
    from siren.train.stages.common import load_checkpoint

    cfg = adapted.cfg
    pipe = {}
    consumed = adapted.meta.get("consumed", {})
    for which, names in (("flow", ["fuser", "flow"]), ("vocoder", ["vocoder"])):
        rec = consumed.get(f"pipeline.{which}")
        uri = resolve_recorded(rec, f"pipeline.{which}", str(adapted.path)) if rec else getattr(cfg.pipeline, which)
        if uri:
            ck = load_checkpoint(str(uri), names)
            if which == "flow":
                _check_code_language(adapted.modules, ck, str(adapted.path))
            for m in ck.modules.values():
                m.eval().requires_grad_(False)
            pipe.update(ck.modules)
    codecs = {}
    for w, ck, feat in (("adapted", adapted, "student_ssl"), ("baseline", base, "ssl")):
        codecs[w] = Codec.from_config({**{n: m for n, m in ck.modules.items() if n != "features"}, **pipe}, cfg, feat)
    return codecs, sorted(pipe)


@dataclass(frozen=True)
class Ranks:
    """The processes of one verify: under `accelerate launch` each rank judges utterances `i % world == rank` and rank 0
    reduces (DESIGN §17); a plain `siren verify` is rank 0 of 1."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls) -> Ranks:
        from accelerate import PartialState

        # cpu=...: without it, launched CPU ranks would not join one gloo group (launch/accelerate/cpu_ddp.yaml);
        # the timeout bounds how long a rank waits for a stuck peer at a collective
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, fn: Callable[[], Any], gather: bool = False) -> Any:
        """Run `fn` on every rank, then exchange whether it failed: when any rank failed every rank raises (the failed
        one its own exception), so no rank waits for a crashed peer and all end with exit 2. → `fn`'s result, or with
        `gather` every rank's result in rank order (small picklable objects only)."""
        try:
            result, error = fn(), None
        except Exception as exc:  # re-raised below, once the peers have heard of it
            result, error = None, exc
        if self.world > 1:
            said = f"{type(error).__name__}: {error}" if error is not None else None
            out: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(out, (said, result if gather else None))
        if error is not None:
            raise error
        if self.world == 1:
            return [result] if gather else result
        failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(out) if e is not None]
        if failed:
            raise VerifyError(f"verify failed on another process ({'; '.join(failed)}); no verdict")
        return [res for _, res in out] if gather else result


def shard(items: Sequence[Any], rank: int, world: int) -> list[tuple[int, Any]]:
    """This rank's (index, item) pairs: every world-th item from position `rank` (disjoint, covering, stable)."""
    return [(i, items[i]) for i in range(rank, len(items), world)]


def new_record_dir(latest_dir: Path, manifest: str) -> Path:
    """Create and return `latest_dir/<UTC time>-<eval set name>/`, this verify's own record (`-2`, `-3`… when one of
    that name exists). Outputs of a verify from before records existed are first moved into a record of their own."""
    latest_dir.mkdir(parents=True, exist_ok=True)
    if (latest_dir / "report.json").is_file() and not (latest_dir / LATEST).is_file():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime((latest_dir / "report.json").stat().st_mtime))
        old = latest_dir / f"{stamp}-earlier"
        old.mkdir()
        for f in _view_files(latest_dir):
            f.rename(old / f.name)
        _write_latest(latest_dir, old.name)
    base = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{Path(manifest).stem}"
    for n in range(1, 1000):
        record = latest_dir / (base if n == 1 else f"{base}-{n}")
        try:
            record.mkdir()  # exclusive: two verifies in the same second get two records
            return record
        except FileExistsError:
            continue
    raise VerifyError(f"cannot make a new verify record under {latest_dir}: {base} and 998 more exist")


def publish_latest(record: Path, latest_dir: Path) -> None:
    """Make `latest_dir` show the newest verify: its files (report.json/.md/.html, wavs, PNGs) are replaced by hard
    links to `record`'s and `latest_dir/latest` names the record. Records are never touched."""
    for f in _view_files(latest_dir):
        f.unlink()
    for f in sorted(record.iterdir()):
        if f.is_file():
            try:
                os.link(f, latest_dir / f.name)
            except OSError:  # a filesystem without hard links: a copy shows the same thing
                shutil.copy2(f, latest_dir / f.name)
    _write_latest(latest_dir, record.name)


LATEST = "latest"  # the file in `verify/step_N/` (and `wav/<stem>/`) naming the newest record


def _view_files(latest_dir: Path) -> list[Path]:
    """The files of the latest view (records, `wav/` and the pointer are not among them)."""
    return [f for f in latest_dir.iterdir() if f.is_file() and f.name != LATEST]


def _write_latest(latest_dir: Path, name: str) -> None:
    tmp = latest_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, latest_dir / LATEST)


def run_verify(
    run: str | Path,
    step: int,
    data: str | None = None,
    thresholds: dict[str, float] | None = None,
    use_wandb: bool = True,
    wav: str | Path | None = None,
) -> dict:
    """Judge `step` of adapt run `run`; under `accelerate launch` every process judges its share of the eval set and
    every process returns the same report (rank 0 writes it)."""
    ranks = Ranks.start()
    job = ranks.agree(lambda: _prepare(run, step, data, thresholds, wav))
    # Every verify writes into its own record dir, named once by rank 0 (the others take its name).
    record = ranks.agree(lambda: new_record_dir(job.out_dir, job.manifest) if ranks.is_main else None, gather=True)[0]
    job = replace(job, out_dir=record, latest_dir=job.out_dir)
    parts = ranks.agree(lambda: _judge_share(job, ranks), gather=True)  # every rank's share, in rank order
    return ranks.agree(lambda: _report(job, parts, use_wandb) if ranks.is_main else None, gather=True)[0]


@dataclass
class _Job:
    """What every rank knows before judging: the checkpoints, the eval set and where the outputs go."""

    run: Path
    step: int
    adapted: Any
    layout: dict
    thresholds: dict
    manifest: str
    utts: list
    out_dir: Path
    wav: Path | None
    base: Any
    latest_dir: Path | None = None  # the view of the newest verify (out_dir is this verify's own record inside it)
    skipped: list = None  # [{"id", "reason"}] of eval rows not judged (their manifest row shows them unusable)
    num_skipped: int = 0


def _prepare(run, step, data, thresholds, wav) -> _Job:
    from siren.data.datasets import speaker_balanced_subset
    from siren.data.manifest import Utterance, log_excluded, read_manifest, usable_utterances
    from siren.models.ssl import check_frame_contract
    from siren.train.stages.common import code_layout

    run = Path(run)
    if wav is not None:
        if data is not None:
            raise VerifyError("verify takes an eval manifest (--data) or one file (--wav), not both")
        _check_wav(wav)  # before the checkpoints load: a wrong path fails at once
    adapted, base = _load(run, step)
    cfg = adapted.cfg
    a = cfg.audio  # a checkpoint from before the frame check at build is refused here, not mid-judging
    check_frame_contract(adapted.modules["student_ssl"], base.modules["ssl"], a.sample_rate, a.hop_length, "verify")
    la, lb = code_layout(adapted.modules), code_layout(base.modules)
    if la != lb:
        raise LayoutMismatch(f"code layouts differ: adapted {la} vs baseline {lb}")
    th = dict(cfg.verify.thresholds)
    th.update(thresholds or {})
    require_thresholds(th, run)
    check_thresholds(th, expected_metrics(la))  # before the expensive part: a typo fails at once
    if wav is not None:
        manifest = str(wav)
        utts = [Utterance(id=Path(wav).stem, path=str(wav), duration=0.0, speaker="file")]
        out_dir = run / "verify" / f"step_{step}" / "wav" / Path(wav).stem
    else:
        manifest = data or cfg.verify.data or cfg.data.val or cfg.data.train
        # Rows too short for either analysis path to encode (or otherwise unusable by their row) are not judged; the
        # report lists them. Speaker-balanced: round-robin over speakers, so a manifest sorted by speaker is not
        # judged on one voice.
        rows = read_manifest(manifest)
        usable, excluded = usable_utterances(rows, cfg.audio.sample_rate, eval_min_samples(adapted, base))
        skipped = [{"id": u.id, "reason": why} for u, why in excluded]
        log_excluded("verify", excluded, len(rows), manifest)
        utts = speaker_balanced_subset(usable, cfg.verify.max_utts, seed=0)
        if not utts:
            what = (
                f"; all {len(rows)} rows were skipped (e.g. {skipped[0]['id']}: {skipped[0]['reason']})" if rows else ""
            )
            raise VerifyError(f"the eval manifest {manifest} holds no usable utterance{what}")
        if cfg.verify.real_clip and Path(cfg.verify.real_clip).is_file():
            utts.append(Utterance(id="real_human_codec2", path=cfg.verify.real_clip, duration=0.0, speaker="human"))
        out_dir = run / "verify" / f"step_{step}"
    skipped = [] if wav is not None else skipped
    job = _Job(run, step, adapted, la, th, manifest, utts, out_dir, None if wav is None else Path(wav), base)
    job.skipped, job.num_skipped = skipped[:MAX_LISTED_SKIPS], len(skipped)
    return job


def eval_min_samples(adapted, base) -> int:
    """Fewest samples both analysis paths (student → adapted factorizer, teacher → baseline factorizer) can encode."""
    from siren.models.codec import min_encodable_samples
    from siren.models.roles import FrameGeometry

    out = 0
    for ck, fx in ((adapted, "student_ssl"), (base, "ssl")):
        geo = FrameGeometry.of(ck.cfg.audio, ck.modules["factorizer"])
        out = max(out, min_encodable_samples(ck.modules[fx].num_frames, geo.pro_hop, geo.pro_downsample))
    return out


def _judge_share(job: _Job, ranks: Ranks) -> dict:
    """Encode, decode and score this rank's utterances. → sums that add across ranks exactly (code counts,
    histograms) and one record per utterance (floats, reduced in utterance order by rank 0)."""
    from siren.data.audio import load_audio, save_audio
    from siren.metrics.codebook import histogram
    from siren.models.codec import ClipTooShort
    from siren.models.mel import MelSpectrogram
    from siren.models.roles import can_range_code
    from siren.train.samples import save_mel_png

    la, cfg, out_dir = job.layout, job.adapted.cfg, job.out_dir
    codecs, pipe = _codecs(job.adapted, job.base)
    device = ranks.device  # the accelerator when there is one (this rank's, under a launch)
    for c in codecs.values():
        c.to(device)
    a = cfg.audio
    mel_fn = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
    out_dir.mkdir(parents=True, exist_ok=True)
    rangeable = {w: can_range_code(c.components["entropy_model"]) for w, c in codecs.items()}
    scorers = _quality_scorers()

    hist = {w: {s: 0 for s in la} for w in ("adapted", "baseline")}
    eq = {s: torch.zeros(la[s][1], dtype=torch.float64) for s in la}
    tot = {s: torch.zeros(la[s][1], dtype=torch.float64) for s in la}
    records, skipped = [], []
    mine = shard(job.utts, ranks.rank, ranks.world)
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
        if scorers is not None and all(res[w][2] is not None for w in ("adapted", "baseline")):
            rec["quality"] = _score_quality(scorers, u, wav[0], {w: res[w][2][0] for w in res}, a.sample_rate)
        records.append(rec)
        if i < 4 or u.id == "real_human_codec2":  # written by the rank that judged it
            save_audio(out_dir / f"{u.id}_original.wav", wav[0], a.sample_rate)
            save_mel_png(out_dir / f"{u.id}_original.png", tr[0], f"{u.id} original")
            for w in ("adapted", "baseline"):
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


def _report(job: _Job, parts: list[dict], use_wandb: bool) -> dict:
    """Rank 0: reduce every rank's share, compute the metrics and the verdict, write report.json/.md, log to W&B."""
    from siren.metrics.codebook import entropy_bits, level_names
    from siren.metrics.drift import js_divergence_bits

    la, out_dir = job.layout, job.out_dir
    # utterance order, whatever rank judged each: the float sums below do not depend on the number of processes
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
    late = sorted((r for p in parts for r in p.get("skipped", [])), key=lambda r: r["index"])
    skipped = list(job.skipped or []) + [{"id": r["id"], "reason": r["reason"]} for r in late]
    if not records:
        wav = job.wav
        what = f"--wav {late[0]['reason']}" if wav is not None and late else f"no usable utterance in {job.manifest}"
        if wav is None and skipped:
            what += f"; skipped {len(skipped)} (e.g. {skipped[0]['id']}: {skipped[0]['reason']})"
        raise VerifyError(what)
    hist = {w: {s: sum(p["hist"][w][s] for p in parts) for s in la} for w in ("adapted", "baseline")}
    eq = {s: sum(p["eq"][s] for p in parts) for s in la}
    tot = {s: sum(p["tot"][s] for p in parts) for s in la}
    sample_rate = job.adapted.cfg.audio.sample_rate
    seconds = sum(r["samples"] / sample_rate for r in records)

    metrics: dict[str, float] = {}
    for s in la:
        for j, name in enumerate(level_names(s, la[s][1])):
            metrics[f"agreement/{s}/{name}"] = float(eq[s][j] / tot[s][j])
        metrics[f"agreement/{s}"] = float(eq[s].sum() / tot[s].sum())
        metrics[f"js/{s}"] = float(js_divergence_bits(hist["adapted"][s], hist["baseline"][s]).mean())
        metrics[f"entropy_delta_bits/{s}"] = float(
            (entropy_bits(hist["adapted"][s]) - entropy_bits(hist["baseline"][s])).mean()
        )
    for w in ("adapted", "baseline"):
        metrics[f"bps_entropy/{w}"] = sum(r["bits"][w] for r in records) / seconds
        if parts[0]["rangeable"][w]:  # absent for a rate-only entropy model: a threshold on it fails as missing
            real = sum(r["real_bits"][w] for r in records)
            metrics[f"bps_real/{w}"] = real / seconds
            metrics[f"bps_real_payload/{w}"] = (real - sum(r["header_bits"][w] for r in records)) / seconds
    metrics["bps_ratio"] = metrics["bps_entropy/adapted"] / max(metrics["bps_entropy/baseline"], 1e-9)
    for k in DISTANCES:
        metrics[f"mel_l1/{k}"] = sum(r["row"][k] for r in records) / len(records)
    per_utt = [r["row"] for r in records]
    if parts[0]["quality"]:
        from siren.metrics.quality import pool_quality

        scored = [r for r in records if "quality" in r]
        for r in scored:
            r["row"]["quality"] = r["quality"]
        if not scored:
            log.info("verify: no utterance has audio from both systems (no vocoder?); quality metrics not computed")
        metrics.update(pool_quality([r["quality"] for r in scored], parts[0]["quality"]))

    checks = []
    for key, limit in sorted(job.thresholds.items()):
        kind, _, name = key.partition("/")
        if name not in metrics:  # e.g. an eval-extra metric when the extra is not installed: a failed check
            checks.append({"threshold": key, "limit": limit, "value": None, "ok": False, "missing": True})
            continue
        ok = metrics[name] >= limit if kind == "min" else metrics[name] <= limit
        checks.append({"threshold": key, "limit": limit, "value": metrics[name], "ok": bool(ok)})
    passed = all(c["ok"] for c in checks)
    report = {
        "run": str(job.run),
        "step": job.step,
        "baseline": job.adapted.meta["baseline"],
        "eval_set": job.manifest,
        "out_dir": str(out_dir),
        "num_utts": len(per_utt),
        "num_skipped": job.num_skipped + len(late),
        "skipped": skipped[:MAX_LISTED_SKIPS],
        "seconds": seconds,
        "metrics": metrics,
        "checks": checks,
        "passed": passed,
        "pipeline": parts[0]["pipeline"],
        "per_utterance": per_utt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(format_report(report))
    from siren.report_html import write_report_html

    write_report_html(report, out_dir)
    if job.latest_dir is not None:
        publish_latest(out_dir, job.latest_dir)
    if use_wandb:
        _log_wandb(report, job.adapted, job.run, job.step)
    return report


def _check_wav(path: str | Path) -> None:
    """The one file `--wav` names must exist and be readable audio (its header is read, not its samples)."""
    from siren.data.audio import AudioError, audio_info

    try:
        _, frames, _ = audio_info(path)
    except AudioError as exc:
        raise VerifyError(f"--wav {exc}") from exc
    if frames == 0:
        raise VerifyError(f"--wav {path}: empty audio (0 samples)")


def require_thresholds(th: dict[str, float], run: Path) -> None:
    """A verdict needs at least one threshold: an empty set would pass anything."""
    if not th:
        raise VerifyError(
            f"no thresholds: verify.thresholds in the config of {run} is empty and no --threshold was given; a "
            "verdict without a threshold would pass anything (set e.g. verify.thresholds.min/agreement/sem)"
        )


def expected_metrics(layout: dict[str, tuple[int, int]]) -> set[str]:
    """Names of the metrics a report holds (quality/* only with the eval extra)."""
    from siren.metrics.codebook import level_names

    names = {"bps_ratio"}
    for s, (_, L) in layout.items():
        names |= {f"agreement/{s}", f"js/{s}", f"entropy_delta_bits/{s}"}
        names |= {f"agreement/{s}/{lv}" for lv in level_names(s, L)}
    for w in ("adapted", "baseline"):
        names |= {f"bps_entropy/{w}", f"bps_real/{w}", f"bps_real_payload/{w}"}
    names |= {f"mel_l1/{k}" for k in DISTANCES}
    for m in ("pesq", "stoi", "spk_sim", "wer", "dnsmos"):
        names |= {f"quality/{m}/adapted", f"quality/{m}/baseline", f"quality/{m}/failed"}
    return names


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


def _skipped_lines(r: dict) -> list[str]:
    n = r.get("num_skipped", 0)
    if not n:
        return []
    shown = "; ".join(f"{x['id']}: {x['reason']}" for x in r.get("skipped", [])[:5])
    return [f"{n} eval utterance(s) skipped, not judged ({shown}{'; ...' if n > 5 else ''})", ""]


def format_report(r: dict) -> str:
    m = r["metrics"]
    lines = [
        f"# SIREN verify — {r['run']} step {r['step']}",
        "",
        f"**{'PASS' if r['passed'] else 'FAIL'}** on {r['num_utts']} utterances ({r['seconds']:.1f} s of codes) "
        f"from `{r['eval_set']}`; baseline `{r['baseline'].get('uri')}`; pipeline: {', '.join(r['pipeline']) or 'decoder head only'}",
        "",
        *_skipped_lines(r),
        "| check | value | limit | ok |",
        "|---|---:|---:|:-:|",
    ]
    for c in r["checks"]:
        value = "not computed" if c["value"] is None else f"{c['value']:.4f}"
        lines.append(f"| {c['threshold']} | {value} | {c['limit']:.4f} | {'✓' if c['ok'] else '✗'} |")
    lines += ["", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(m.items())]
    return "\n".join(lines) + "\n"


def _log_wandb(report: dict, adapted, run: Path, step: int) -> None:
    from siren.train.tracking import wandb_mode

    try:
        import wandb

        cfg = adapted.cfg
        mode = wandb_mode(cfg.tracking.mode)
        if mode == "disabled":
            return
        wb = wandb.init(
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            job_type="verify",
            name=f"verify-{run.name}-step_{step}",
            dir=str(run / "verify"),
            mode=mode,
            group=cfg.tracking.group,
            reinit="create_new",
            config={"run": str(run), "step": step},
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        from siren.artifacts import use_checkpoint_artifact

        uri = (adapted.meta.get("baseline") or {}).get("uri")
        if uri:
            use_checkpoint_artifact(wb, uri)
        wb.summary.update({f"verify/{k}": v for k, v in report["metrics"].items()})
        wb.summary["verify/passed"] = int(report["passed"])
        wb.log({"verify/report": wandb.Html(Path(report["out_dir"]) / "report.html", inject=False)})
        wb.finish()
    except Exception as exc:  # the report on disk is the result; W&B is a copy of it
        log.warning("verify: W&B logging failed: %r", exc)


def verify_cli(args) -> int:
    """Exit 0 = pass, 1 = a threshold failed, 2 = anything else went wrong (never a pass or a fail by accident)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    code = guarded_verdict(lambda: _verify_cli(args))
    _leave_process_group(code)
    return code


def _process_group() -> tuple[int, int]:
    """(rank, world) of the launched process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _leave_process_group(code: int) -> None:
    rank, world = _process_group()
    if world > 1:
        print(f"verify: rank {rank}/{world} exits {code}", flush=True)
        try:
            # Every rank reaches this point (an error on any rank was agreed on before): leave together, so no rank
            # tears its group down while a peer still talks to it (gloo aborts the process then, after the verdict).
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception as exc:  # the verdict stands: a group broken by a failed peer must not make it a crash
            log.warning("verify: leaving the process group failed: %r", exc)


def guarded_verdict(fn) -> int:
    """Run `fn` (returning 0 or 1) so that every other outcome is exit 2: SIREN errors, unexpected exceptions,
    out-of-memory, Ctrl-C and SIGTERM. A verdict is only ever what the thresholds said."""
    import signal
    import traceback

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _term) if _main_thread() else None
    try:
        code = fn()
        if code not in (EXIT_PASS, EXIT_FAIL, EXIT_ERROR):
            print(f"error: verify returned {code!r}, not a verdict", flush=True)
            return EXIT_ERROR
        return code
    except (SirenError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
    except KeyboardInterrupt as exc:
        print(f"error: verify was interrupted ({exc or 'Ctrl-C'}); no verdict", flush=True)
    except BaseException as exc:  # OOM, bugs, anything: an error verdict, with its traceback for the report
        traceback.print_exc()
        print(f"error: verify crashed: {type(exc).__name__}: {exc}; no verdict", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_ERROR


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _verify_cli(args) -> int:
    thresholds = {}
    for t in args.threshold:
        if "=" not in t:
            print(f"error: --threshold {t!r} is not NAME=VALUE", flush=True)
            return EXIT_ERROR
        k, v = t.split("=", 1)
        try:
            thresholds[k] = float(v)
        except ValueError:
            print(f"error: --threshold {k}: {v!r} is not a number")
            return EXIT_ERROR
    wav = getattr(args, "wav", None)
    report = run_verify(args.run, args.step, args.data, thresholds, use_wandb=not args.no_wandb, wav=wav)
    if _process_group()[0] == 0:  # every rank holds the report and returns its verdict; rank 0 prints it
        print(format_report({**report, "metrics": {k: v for k, v in report["metrics"].items() if "/l" not in k}}))
        print(f"report: {Path(report['out_dir']) / 'report.md'} (the page to open: report.html beside it)")
    if not report["checks"]:  # run_verify refuses an empty threshold set; a report without checks is no pass
        raise VerifyError("the report holds no threshold check")
    return EXIT_PASS if report["passed"] else EXIT_FAIL


__all__ = ["run_verify", "verify_cli", "EXIT_PASS", "EXIT_FAIL", "EXIT_ERROR"]
