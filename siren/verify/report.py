"""What a verify leaves behind: `report.json`, `report.md` and `report.html` (siren/report_html.py, the page a person
opens: players, mels, tables) in this verify's own record `RUN/verify/step_N/<UTC time>-<eval set name>/` (under
`wav/<file stem>/` for `--wav`), the latest view beside the records, and a copy of the report on W&B.

The files directly in `step_N/` (or `wav/<file stem>/`) are hard links to the newest record's and `latest` there
names it, so `verify/step_N/report.json` is always the latest verify's report (docs/verify.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from siren.checkpoints.layout import RunDir
from siren.verify.errors import VerifyError
from siren.verify.load import MAX_LISTED_SKIPS

log = logging.getLogger("siren")
LATEST = "latest"  # the file in `verify/step_N/` (and `wav/<stem>/`) naming the newest record


def build_report(job, totals, metrics: dict[str, float], checks: list[dict], pipeline: list[str]) -> dict:
    """The report of one verify (what report.json holds): the metrics, the threshold checks and the verdict."""
    per_utt = [r["row"] for r in totals.records]
    return {
        "run": str(job.run),
        "step": job.step,
        "baseline": job.adapted.meta.baseline,
        "eval_set": job.manifest,
        "out_dir": str(job.out_dir),
        "num_utts": len(per_utt),
        "num_skipped": job.num_skipped + totals.num_late,
        "skipped": totals.skipped[:MAX_LISTED_SKIPS],
        "seconds": totals.seconds,
        "metrics": metrics,
        "checks": checks,
        "passed": all(c["ok"] for c in checks),
        "pipeline": pipeline,
        "per_utterance": per_utt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_report(report: dict, out_dir: Path, latest_dir: Path | None) -> None:
    """report.json, report.md and report.html into the record `out_dir`; then the latest view shows it."""
    from siren.report_html import write_report_html

    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(format_report(report))
    write_report_html(report, out_dir)
    if latest_dir is not None:
        publish_latest(out_dir, latest_dir)


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


# --------------------------------------------------------------------------------------------- records and the view
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


def _view_files(latest_dir: Path) -> list[Path]:
    """The files of the latest view (records, `wav/` and the pointer are not among them)."""
    return [f for f in latest_dir.iterdir() if f.is_file() and f.name != LATEST]


def _write_latest(latest_dir: Path, name: str) -> None:
    tmp = latest_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, latest_dir / LATEST)


# ---------------------------------------------------------------------------------------------------------- W&B
def log_wandb(report: dict, adapted, run: Path, step: int) -> None:
    """A W&B run (`job_type="verify"`) holding the metrics, the verdict and the page; never fails the verify."""
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
            dir=str(RunDir(run).verify(step).parent),
            mode=mode,
            group=cfg.tracking.group,
            reinit="create_new",
            config={"run": str(run), "step": step},
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        from siren.checkpoints.artifacts import use_checkpoint_artifact

        uri = (adapted.meta.baseline or {}).get("uri")
        if uri:
            use_checkpoint_artifact(wb, uri)
        wb.summary.update({f"verify/{k}": v for k, v in report["metrics"].items()})
        wb.summary["verify/passed"] = int(report["passed"])
        wb.log({"verify/report": wandb.Html(Path(report["out_dir"]) / "report.html", inject=False)})
        wb.finish()
    except Exception as exc:  # the report on disk is the result; W&B is a copy of it
        log.warning("verify: W&B logging failed: %r", exc)
