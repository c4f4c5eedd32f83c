"""`siren verify --run RUN --step N` (DESIGN §10): does the adapted checkpoint still speak the baseline's code language?

Loads `step_N` of an `adapt` run and the baseline named in its meta.json, runs both analysis paths on the eval set and
reports code agreement per stream/level, JS and entropy deltas, entropy-model and real-bitstream bit/s, and mel distances
of the full pipeline's output. Thresholds (`verify.thresholds`, `min/<metric>` or `max/<metric>`) decide pass/fail.
Exit code 0 = pass, 1 = fail, 2 = error (missing step, unresolvable baseline, layout mismatch, bad threshold).
`--wav FILE` judges one audio file instead of the eval set (the seed guide's "check this recording" workflow), with the
same thresholds; its outputs go to `RUN/verify/step_N/wav/<file stem>/`.
Beside report.json and report.md, `report.html` (siren/report_html.py) is the page a person opens: players, mels, tables.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from pathlib import Path

import torch

from siren.errors import LayoutMismatch, SirenError

log = logging.getLogger("siren")
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


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


def run_verify(
    run: str | Path,
    step: int,
    data: str | None = None,
    thresholds: dict[str, float] | None = None,
    use_wandb: bool = True,
    wav: str | Path | None = None,
) -> dict:
    from siren.data.audio import load_audio, save_audio
    from siren.data.datasets import speaker_balanced_subset
    from siren.data.manifest import Utterance, read_manifest
    from siren.metrics.codebook import entropy_bits, histogram, level_names
    from siren.metrics.drift import js_divergence_bits
    from siren.models.mel import MelSpectrogram
    from siren.models.roles import can_range_code
    from siren.train.samples import save_mel_png
    from siren.train.stages.common import code_layout

    run = Path(run)
    if wav is not None:
        if data is not None:
            raise VerifyError("verify takes an eval manifest (--data) or one file (--wav), not both")
        _check_wav(wav)  # before the checkpoints load: a wrong path fails at once
    adapted, base = _load(run, step)
    cfg = adapted.cfg
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
        # Speaker-balanced: round-robin over speakers, so a manifest sorted by speaker is not judged on one voice.
        utts = speaker_balanced_subset(read_manifest(manifest), cfg.verify.max_utts, seed=0)
        if not utts:
            raise VerifyError(f"the eval manifest {manifest} holds no utterance")
        if cfg.verify.real_clip and Path(cfg.verify.real_clip).is_file():
            utts.append(Utterance(id="real_human_codec2", path=cfg.verify.real_clip, duration=0.0, speaker="human"))
        out_dir = run / "verify" / f"step_{step}"
    codecs, pipe = _codecs(adapted, base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the accelerator when there is one
    for c in codecs.values():
        c.to(device)
    a = cfg.audio
    mel_fn = MelSpectrogram(a.sample_rate, a.n_mels, a.hop_length, a.n_fft, a.win_length, a.f_min, a.f_max)
    out_dir.mkdir(parents=True, exist_ok=True)

    hist = {w: {s: 0 for s in la} for w in ("adapted", "baseline")}
    eq = {s: torch.zeros(la[s][1], dtype=torch.float64) for s in la}
    tot = {s: torch.zeros(la[s][1], dtype=torch.float64) for s in la}
    bits = {"adapted": 0.0, "baseline": 0.0}
    real_bits = {"adapted": 0.0, "baseline": 0.0}
    header_bits = {"adapted": 0.0, "baseline": 0.0}
    seconds = 0.0
    dist = {
        "adapted_vs_truth": [],
        "baseline_vs_truth": [],
        "adapted_vs_baseline": [],
        "silence_vs_truth": [],
        "noise_vs_truth": [],
    }
    per_utt = []
    for i, u in enumerate(utts):
        wav = load_audio(u.path, a.sample_rate)
        try:
            codes = {w: c.encode(wav) for w, c in codecs.items()}
        except SirenError as exc:  # too short to hold one prosody frame
            log.info("verify: %s skipped (%s)", u.id, exc)
            continue
        n = codes["adapted"].num_samples[0]
        wav = wav[None, :n]
        truth = mel_fn(wav)
        res = {}
        with torch.no_grad():
            for w, codec in codecs.items():
                c = codes[w]
                ent = codec.components["entropy_model"]({"sem": c.sem.to(device), "pro": c.pro.to(device)})
                bits[w] += float(ent.total_bits["sem"].sum() + ent.total_bits["pro"].sum())
                if can_range_code(codec.components["entropy_model"]):  # a rate-only model has no real bitstream
                    enc = codec.to_bytes(c)
                    real_bits[w] += 8 * len(enc.data)
                    header_bits[w] += enc.header_bits
                else:
                    real_bits[w] = header_bits[w] = None
                for s in la:
                    hist[w][s] = hist[w][s] + histogram(getattr(c, s), None, la[s][0])
                mel = codec.decode_mel(c)
                audio = codec.vocode(mel).cpu() if codec.has("vocoder") else None
                res[w] = (c, mel.cpu(), audio)
            seconds += n / a.sample_rate
        for s in la:
            ca, cb = getattr(res["adapted"][0], s), getattr(res["baseline"][0], s)
            ca = ca if ca.dim() == 3 else ca[:, None]
            cb = cb if cb.dim() == 3 else cb[:, None]
            eq[s] += (ca == cb).to(torch.float64).sum(dim=(0, 1))
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
        for k, v in d.items():
            dist[k].append(float(v))
        per_utt.append({"id": u.id, **{k: float(v) for k, v in d.items()}})
        if i < 4 or u.id == "real_human_codec2":
            save_audio(out_dir / f"{u.id}_original.wav", wav[0], a.sample_rate)
            save_mel_png(out_dir / f"{u.id}_original.png", tr[0], f"{u.id} original")
            for w in ("adapted", "baseline"):
                if res[w][2] is not None:
                    save_audio(out_dir / f"{u.id}_{w}.wav", res[w][2][0], a.sample_rate)
                save_mel_png(out_dir / f"{u.id}_{w}.png", res[w][1][0, :, :T], f"{u.id} {w}")
    if seconds == 0:
        what = (
            f"{wav} is too short to hold one prosody frame" if wav is not None else f"no usable utterance in {manifest}"
        )
        raise VerifyError(what)

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
        metrics[f"bps_entropy/{w}"] = bits[w] / seconds
        if real_bits[w] is not None:  # absent for a rate-only entropy model: a threshold on it fails as missing
            metrics[f"bps_real/{w}"] = real_bits[w] / seconds
            metrics[f"bps_real_payload/{w}"] = (real_bits[w] - header_bits[w]) / seconds
    metrics["bps_ratio"] = metrics["bps_entropy/adapted"] / max(metrics["bps_entropy/baseline"], 1e-9)
    for k, v in dist.items():
        metrics[f"mel_l1/{k}"] = sum(v) / len(v)
    metrics.update(_optional_quality(out_dir))

    checks = []
    for key, limit in sorted(th.items()):
        kind, _, name = key.partition("/")
        if name not in metrics:  # e.g. an eval-extra metric when the extra is not installed: a failed check
            checks.append({"threshold": key, "limit": limit, "value": None, "ok": False, "missing": True})
            continue
        ok = metrics[name] >= limit if kind == "min" else metrics[name] <= limit
        checks.append({"threshold": key, "limit": limit, "value": metrics[name], "ok": bool(ok)})
    passed = all(c["ok"] for c in checks)
    report = {
        "run": str(run),
        "step": step,
        "baseline": adapted.meta["baseline"],
        "eval_set": manifest,
        "out_dir": str(out_dir),
        "num_utts": len(per_utt),
        "seconds": seconds,
        "metrics": metrics,
        "checks": checks,
        "passed": passed,
        "pipeline": pipe,
        "per_utterance": per_utt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(format_report(report))
    from siren.report_html import write_report_html

    write_report_html(report, out_dir)
    if use_wandb:
        _log_wandb(report, adapted, run, step)
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
    names |= {
        f"mel_l1/{k}"
        for k in ("adapted_vs_truth", "baseline_vs_truth", "adapted_vs_baseline", "silence_vs_truth", "noise_vs_truth")
    }
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


def _optional_quality(out_dir: Path) -> dict[str, float]:
    """DNSMOS / WER / speaker similarity / PESQ / STOI need the `eval` extra; without it they are reported absent."""
    import importlib.util

    missing = [
        m
        for m in ("pesq", "pystoi", "resemblyzer", "pocketsphinx", "speechmos", "onnxruntime")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        log.info(
            "verify: eval extra not installed (%s missing): DNSMOS/WER/speaker/PESQ/STOI not computed",
            ", ".join(missing),
        )
        return {}
    from siren.metrics.quality import quality_metrics

    return quality_metrics(out_dir)


def format_report(r: dict) -> str:
    m = r["metrics"]
    lines = [
        f"# SIREN verify — {r['run']} step {r['step']}",
        "",
        f"**{'PASS' if r['passed'] else 'FAIL'}** on {r['num_utts']} utterances ({r['seconds']:.1f} s of codes) "
        f"from `{r['eval_set']}`; baseline `{r['baseline'].get('uri')}`; pipeline: {', '.join(r['pipeline']) or 'decoder head only'}",
        "",
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
    return guarded_verdict(lambda: _verify_cli(args))


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
    print(format_report({**report, "metrics": {k: v for k, v in report["metrics"].items() if "/l" not in k}}))
    print(f"report: {Path(report['out_dir']) / 'report.md'} (the page to open: report.html beside it)")
    if not report["checks"]:  # run_verify refuses an empty threshold set; a report without checks is no pass
        raise VerifyError("the report holds no threshold check")
    return EXIT_PASS if report["passed"] else EXIT_FAIL


__all__ = ["run_verify", "verify_cli", "EXIT_PASS", "EXIT_FAIL", "EXIT_ERROR"]
