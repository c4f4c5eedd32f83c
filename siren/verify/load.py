"""What verify judges, loaded and cross-checked before any judging: step N of an adapt run and the baseline step it was
trained against (through `siren.checkpoints`), the pipeline checkpoints that decode their codes, and the eval set (a
manifest, or one `--wav` file). `prepare` turns all of it into the `Job` every rank knows (docs/verify.md, "What it
does", step 1 and 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siren.checkpoints.layout import RunDir
from siren.config.stages import CODEC_PARTS
from siren.errors import LayoutMismatch
from siren.verify.errors import VerifyError
from siren.verify.judge import resolve_thresholds

MAX_LISTED_SKIPS = 200  # skipped eval rows listed by id in the report (all are counted)


def load_pair(run: Path, step: int):
    """→ (adapted, baseline) loaded checkpoints of `run`'s step `step` and the baseline recorded in its meta.json, in
    eval mode, each with its analysis features as `modules["features"]`. Refuses anything but the recorded baseline
    speaking the same code language with the same SSL model."""
    from siren.checkpoints.artifacts import CheckpointNotFound
    from siren.checkpoints.layout import list_steps, read_meta, step_dir
    from siren.checkpoints.lineage import (
        check_ssl_matches,
        checkpoint_fingerprint,
        code_language_id,
        resolve_recorded,
        verified_code_language,
    )
    from siren.checkpoints.load import load_checkpoint

    sd = step_dir(run, step)
    if not (sd / "meta.json").is_file():
        steps = list_steps(run)
        raise VerifyError(
            f"{sd} does not exist or is incomplete; saved steps in {run}: {', '.join(map(str, steps)) or 'none'}"
        )
    meta = read_meta(sd)
    if meta.stage != "adapt":
        raise VerifyError(
            f"{sd} is a {meta.stage!r} checkpoint; verify checks an adapt checkpoint against its baseline"
        )
    base_rec = meta.baseline or {}
    base_uri = base_rec.get("uri")
    if not base_uri and not base_rec.get("path"):
        raise VerifyError(f"{sd}/meta.json names no baseline")
    adapted = load_checkpoint(
        str(sd),
        ["student_ssl", *CODEC_PARTS],
    )
    # The step dir the adapt run actually used (recorded), not whatever the URI names today: a URI such as
    # `…:latest` may have moved on since, and verify judges against what the adaptation was trained from.
    base_path = resolve_recorded(base_rec, "baseline", f"{sd}/meta.json")
    try:
        base = load_checkpoint(
            str(base_path),
            ["ssl", *CODEC_PARTS],
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
    want = (meta.baseline or {}).get("fingerprint")
    if want and checkpoint_fingerprint(base.meta) != want:
        raise VerifyError(
            f"the baseline at {base_uri} is not the one step {step} was trained against "
            f"(fingerprint {checkpoint_fingerprint(base.meta)[:12]} ≠ {want[:12]})"
        )
    for m in (*adapted.modules.values(), *base.modules.values()):
        m.eval().requires_grad_(False)
    adapted.modules["features"] = adapted.modules["student_ssl"]
    base.modules["features"] = base.modules["ssl"]
    return adapted, base


def build_codecs(adapted, base) -> tuple[dict, list[str]]:
    """The adapted and baseline `Codec`s, sharing the pipeline checkpoints named in the adapted config."""
    from siren.checkpoints.lineage import resolve_recorded
    from siren.checkpoints.load import load_checkpoint
    from siren.codec import Codec, _check_code_language

    cfg = adapted.cfg
    pipe = {}
    consumed = adapted.meta.consumed
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


@dataclass
class Job:
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


def prepare(run, step, data, thresholds, wav) -> Job:
    """Load and check everything a verify of `run`'s step `step` needs, cheap refusals first (a wrong `--wav` path, a
    threshold naming no metric) so that they fail before any judging."""
    from siren.data.datasets import speaker_balanced_subset
    from siren.data.manifest import ManifestError, Utterance, log_excluded, read_manifest, usable_utterances
    from siren.models.analysis import code_layout
    from siren.models.frame_contract import check_frame_contract

    run = Path(run)
    if wav is not None:
        if data is not None:
            raise VerifyError("verify takes an eval manifest (--data) or one file (--wav), not both")
        check_wav(wav)  # before the checkpoints load: a wrong path fails at once
    adapted, base = load_pair(run, step)
    cfg = adapted.cfg
    a = cfg.audio  # a checkpoint from before the frame check at build is refused here, not mid-judging
    check_frame_contract(adapted.modules["student_ssl"], base.modules["ssl"], a.sample_rate, a.hop_length, "verify")
    la, lb = code_layout(adapted.modules), code_layout(base.modules)
    if la != lb:
        raise LayoutMismatch(f"code layouts differ: adapted {la} vs baseline {lb}")
    th = resolve_thresholds(cfg.verify.thresholds, thresholds, la, run)  # before the expensive part
    if wav is not None:
        manifest = str(wav)
        utts = [Utterance(id=Path(wav).stem, path=str(wav), duration=0.0, speaker="file")]
        out_dir = RunDir(run).verify(step) / "wav" / Path(wav).stem
    else:
        manifest = data or cfg.verify.data or cfg.data.val or cfg.data.train
        # Rows too short for either analysis path to encode (or otherwise unusable by their row) are not judged; the
        # report lists them. Speaker-balanced: round-robin over speakers, so a manifest sorted by speaker is not
        # judged on one voice.
        try:
            rows = read_manifest(manifest)
        except ManifestError as exc:
            if Path(manifest).is_file():
                raise
            # a missing manifest: say where its path came from and how to give another
            key = (
                next(k for k, v in (("verify.data", cfg.verify.data), ("data.val", cfg.data.val)) if v)
                if not data and (cfg.verify.data or cfg.data.val)
                else "data.train"
            )
            source = "--data" if data else f"{key} of the run's config"
            raise VerifyError(
                f"the eval manifest {manifest} ({source}) does not exist; pass --data MANIFEST, or --wav FILE to "
                "judge one file"
            ) from exc
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
        out_dir = RunDir(run).verify(step)
    skipped = [] if wav is not None else skipped
    job = Job(run, step, adapted, la, th, manifest, utts, out_dir, None if wav is None else Path(wav), base)
    job.skipped, job.num_skipped = skipped[:MAX_LISTED_SKIPS], len(skipped)
    return job


def eval_min_samples(adapted, base) -> int:
    """Fewest samples both analysis paths (student → adapted factorizer, teacher → baseline factorizer) can encode."""
    from siren.codec import min_encodable_samples
    from siren.models.roles import FrameGeometry

    out = 0
    for ck, fx in ((adapted, "student_ssl"), (base, "ssl")):
        geo = FrameGeometry.of(ck.cfg.audio, ck.modules["factorizer"])
        out = max(out, min_encodable_samples(ck.modules[fx].num_frames, geo.pro_hop, geo.pro_downsample))
    return out


def check_wav(path: str | Path) -> None:
    """The one file `--wav` names must exist and be readable audio (its header is read, not its samples)."""
    from siren.data.audio import AudioError, audio_info

    try:
        _, frames, _ = audio_info(path)
    except AudioError as exc:
        raise VerifyError(f"--wav {exc}") from exc
    if frames == 0:
        raise VerifyError(f"--wav {path}: empty audio (0 samples)")
