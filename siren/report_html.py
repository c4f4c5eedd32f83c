"""`report.html`: the verify report as one self-contained page a person can open (docs/verify.md).

The page shows the verdict and every threshold, code agreement per stream and level, JS / entropy drift, bit rates and
mel distances, and per utterance the original / adapted / baseline audio players with their mel images side by side.
It is built from the report dict written to `report.json` and the media `run_verify` left in the same folder, named
`{id}_{original|adapted|baseline}.{wav,png}`. Media are embedded as base64 `data:` URIs and the style is inline, so the
file can be mailed, attached to W&B or copied anywhere and still play; it displays without JavaScript. A short inline
script only reports, in `#media-status` (JSON), whether each player loaded its audio and each image decoded: the
headless-browser test reads it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

VARIANTS = ("original", "adapted", "baseline")
MIME = {"wav": "audio/wav", "png": "image/png"}
MAX_MEDIA_UTTS = 8  # players + images for at most this many utterances: the page stays a few MB
MAX_TABLE_ROWS = 200  # per-utterance metric rows; the rest stay in report.json


def write_report_html(report: dict, out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` for `report` (the dict of report.json), embedding the media found in `out_dir`."""
    out_dir = Path(out_dir)
    path = out_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(render_report_html(report, out_dir), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    return path


def render_report_html(report: dict, media_dir: str | Path) -> str:
    """The page as a string; `media_dir` holds the per-utterance `{id}_{variant}.{wav,png}` files."""
    media_dir = Path(media_dir)
    m = report["metrics"]
    used: set[str] = set()  # metric names a section showed; the rest go to "other metrics"
    body = [
        _header(report),
        _checks(report["checks"]),
        _utterances(report, media_dir),
        _agreement(m, used),
        _drift(m, used),
        _bitrates(m, used),
        _mel(m, used),
        _other(m, used),
        _per_utterance_table(report["per_utterance"]),
        '<p class="note" id="media-summary">Media check: needs JavaScript (the page itself does not).</p>',
        '<pre id="media-status" hidden>{"settled": false}</pre>',
    ]
    title = f"SIREN verify — {report['run']} step {report['step']}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            *body,
            f"<script>{_MEDIA_CHECK_JS}</script>",
            "</body></html>",
            "",
        ]
    )


# ------------------------------------------------------------------------------------------------------- sections
def _header(r: dict) -> str:
    checks = r["checks"]
    passed = sum(bool(c["ok"]) for c in checks)
    verdict = "PASS" if r["passed"] else "FAIL"
    base = r.get("baseline") or {}
    facts = [
        ("baseline", base.get("uri") or base.get("path") or "not recorded"),
        ("eval set", r["eval_set"]),
        ("utterances", f"{r['num_utts']} ({r['seconds']:.1f} s of codes)"),
        ("pipeline", ", ".join(r["pipeline"]) or "decoder head only (no flow, no vocoder)"),
        ("written", f"{r['created']} in {r['out_dir']}"),
    ]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return (
        f"<h1>SIREN verify — {_esc(r['run'])} step {_esc(r['step'])}</h1>\n"
        f'<div class="verdict {verdict.lower()}" id="verdict">{verdict}'
        f'<span class="sub">{passed} of {len(checks)} thresholds met</span></div>\n'
        f'<table class="facts">{rows}</table>'
    )


def _checks(checks: list[dict]) -> str:
    rows = []
    for c in checks:
        value = "not computed" if c["value"] is None else _num(c["value"])
        ok = "✓" if c["ok"] else "✗"
        rows.append(
            f'<tr class="check {"ok" if c["ok"] else "bad"}"><td>{_esc(c["threshold"])}</td>'
            f"<td>{_esc(_num(c['limit']))}</td><td>{_esc(value)}</td><td>{ok}</td></tr>"
        )
    return _table("Thresholds", ["threshold", "limit", "value", "ok"], rows, table_id="checks")


def _agreement(m: dict, used: set[str]) -> str:
    """One row per stream: overall agreement, then each level (`l0, l1, …`; `g0, …` for speaker groups)."""
    streams = _streams(m, "agreement/")
    levels: dict[str, dict[str, float]] = {s: {} for s in streams}
    for k, v in m.items():
        parts = k.split("/")
        if parts[0] == "agreement" and len(parts) == 3:
            levels[parts[1]][parts[2]] = v
            used.add(k)
    width = max((len(v) for v in levels.values()), default=0)
    rows = []
    for s in streams:
        used.add(f"agreement/{s}")
        cells = [f"<td>{_esc(n)} {_esc(_num(v))}</td>" for n, v in sorted(levels[s].items(), key=_level_key)]
        cells += ["<td></td>"] * (width - len(cells))
        rows.append(f"<tr><td>{_esc(s)}</td><td>{_esc(_num(m.get(f'agreement/{s}')))}</td>{''.join(cells)}</tr>")
    head = ["stream", "all levels", *[f"level {i}" for i in range(width)]]
    note = "Share of frames (and levels) where the adapted checkpoint emits the baseline's code."
    return _table("Code agreement", head, rows, note=note, table_id="agreement")


def _drift(m: dict, used: set[str]) -> str:
    rows = []
    for s in _streams(m, "js/", "entropy_delta_bits/"):
        keys = (f"js/{s}", f"entropy_delta_bits/{s}")
        used.update(keys)
        rows.append(f"<tr><td>{_esc(s)}</td>{''.join(f'<td>{_esc(_num(m.get(k)))}</td>' for k in keys)}</tr>")
    note = (
        "Code-usage drift from the baseline, mean over levels: Jensen-Shannon divergence and entropy change, in bits."
    )
    return _table("Drift", ["stream", "JS (bits)", "entropy Δ (bits)"], rows, note=note, table_id="drift")


def _bitrates(m: dict, used: set[str]) -> str:
    rows = []
    for w in ("adapted", "baseline"):
        keys = (f"bps_entropy/{w}", f"bps_real/{w}", f"bps_real_payload/{w}")
        used.update(keys)
        cells = "".join(f"<td>{_esc(_bps(m.get(k)))}</td>" for k in keys)
        rows.append(f"<tr><td>{w}</td>{cells}</tr>")
    used.add("bps_ratio")
    note = (
        f"Entropy-model estimate vs. the real range-coded bitstream (with and without its header); adapted / baseline "
        f"entropy-model ratio {_num(m.get('bps_ratio'))}. A rate-only entropy model has no real bitstream."
    )
    head = ["checkpoint", "entropy model (bit/s)", "real bitstream (bit/s)", "real payload (bit/s)"]
    return _table("Bit rates", head, rows, note=note, table_id="bitrates")


def _mel(m: dict, used: set[str]) -> str:
    rows = []
    for k in sorted(k for k in m if k.startswith("mel_l1/")):
        used.add(k)
        rows.append(f"<tr><td>{_esc(k.removeprefix('mel_l1/').replace('_', ' '))}</td><td>{_esc(_num(m[k]))}</td></tr>")
    note = "Mean absolute log-mel distance; silence and noise against the truth are the scale's floor and ceiling."
    return _table("Mel L1", ["pair", "L1"], rows, note=note, table_id="mel")


def _other(m: dict, used: set[str]) -> str:
    rows = [f"<tr><td>{_esc(k)}</td><td>{_esc(_num(v))}</td></tr>" for k, v in sorted(m.items()) if k not in used]
    return _table("Other metrics", ["metric", "value"], rows, table_id="other") if rows else ""


def _utterances(r: dict, media_dir: Path) -> str:
    """Per utterance with media: original / adapted / baseline, each an audio player over its mel image."""
    ids = [u["id"] for u in r["per_utterance"] if _has_media(media_dir, u["id"])]
    shown, rest = ids[:MAX_MEDIA_UTTS], ids[MAX_MEDIA_UTTS:]
    vocoder = "vocoder" in r["pipeline"]
    parts = ["<h2>Listen and look</h2>"]
    if not shown:
        parts.append('<p class="note">No utterance media in this folder.</p>')
    for uid in shown:
        cells = []
        for v in VARIANTS:
            wav, png = media_dir / f"{uid}_{v}.wav", media_dir / f"{uid}_{v}.png"
            if wav.is_file():
                player = (
                    f'<audio controls preload="metadata" data-media="{_esc(wav.name)}" '
                    f'src="{_esc(_data_uri(wav))}"></audio>'
                )
            elif v != "original" and not vocoder:
                player = '<p class="note">no audio: the pipeline has no vocoder (mel only)</p>'
            else:
                player = f'<p class="note">no audio: {_esc(wav.name)} is missing</p>'
            if png.is_file():
                image = (
                    f'<img data-media="{_esc(png.name)}" alt="{_esc(f"{uid} {v} mel")}" src="{_esc(_data_uri(png))}">'
                )
            else:
                image = f'<p class="note">no mel image: {_esc(png.name)} is missing</p>'
            cells.append(f'<figure class="variant"><figcaption>{v}</figcaption>{player}{image}</figure>')
        parts.append(f'<section class="utt"><h3>{_esc(uid)}</h3><div class="row">{"".join(cells)}</div></section>')
    if rest:
        parts.append(f'<p class="note">{len(rest)} more utterances have media in {_esc(str(media_dir))}.</p>')
    return "\n".join(parts)


def _per_utterance_table(per_utt: list[dict]) -> str:
    keys = sorted({k for u in per_utt for k in u if k != "id"})
    rows = []
    for u in per_utt[:MAX_TABLE_ROWS]:
        cells = "".join(f"<td>{_esc(_num(u.get(k)))}</td>" for k in keys)
        rows.append(f"<tr><td>{_esc(u['id'])}</td>{cells}</tr>")
    more = len(per_utt) - MAX_TABLE_ROWS
    note = f"First {MAX_TABLE_ROWS} of {len(per_utt)}; all are in report.json." if more > 0 else None
    head = ["utterance", *[k.replace("_", " ") for k in keys]]
    return _table("Per utterance", head, rows, note=note, table_id="per-utterance")


# -------------------------------------------------------------------------------------------------------- helpers
def _has_media(media_dir: Path, uid: str) -> bool:
    return any((media_dir / f"{uid}_{v}.{ext}").is_file() for v in VARIANTS for ext in MIME)


def _data_uri(path: Path) -> str:
    """The file itself, base64, as a `data:` URI: the page needs nothing beside it."""
    return f"data:{MIME[path.suffix[1:]]};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _streams(m: dict, *prefixes: str) -> list[str]:
    order = {"sem": 0, "pro": 1, "spk": 2}
    found = {k.split("/")[1] for k in m for p in prefixes if k.startswith(p)}
    return sorted(found, key=lambda s: (order.get(s, 9), s))


def _level_key(item: tuple[str, float]) -> tuple[str, int]:
    name = item[0]
    return (name[:1], int(name[1:]) if name[1:].isdigit() else -1)


def _num(v) -> str:
    if v is None:
        return "not computed"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _bps(v) -> str:
    return "not computed" if v is None else f"{v:.1f}"


def _table(title: str, head: list[str], rows: list[str], *, note: str | None = None, table_id: str) -> str:
    ths = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join(rows) or f'<tr><td colspan="{len(head)}">none</td></tr>'
    note_html = f'<p class="note">{_esc(note)}</p>' if note else ""
    return f'<h2>{_esc(title)}</h2>{note_html}<table id="{table_id}"><tr>{ths}</tr>{body}</table>'


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:24px 0 6px}h3{font-size:14px;margin:12px 0 4px}
.verdict{display:inline-block;font-size:28px;font-weight:700;padding:8px 20px;border-radius:6px;color:#fff}
.verdict.pass{background:#1b7f3b}.verdict.fail{background:#b3261e}
.verdict .sub{font-size:14px;font-weight:400;margin-left:14px}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}table.facts th{width:110px}
tr.check.ok td:last-child{color:#1b7f3b;font-weight:700}tr.check.bad{background:#fdecea}
tr.check.bad td:last-child{color:#b3261e;font-weight:700}
.note{color:#666;font-size:12px;margin:2px 0}
.row{display:flex;gap:12px;flex-wrap:wrap}
figure.variant{margin:0;padding:6px;border:1px solid #ddd;border-radius:4px;flex:1 1 0;min-width:280px;max-width:460px}
figure.variant figcaption{font-weight:600;margin-bottom:4px}
figure.variant audio{width:100%;display:block}figure.variant img{width:100%;display:block;margin-top:4px}
"""

# Reports, once every player and image has settled, what loaded: read by the headless-browser test and shown to a person.
_MEDIA_CHECK_JS = """
(function(){
  var audios=[].slice.call(document.querySelectorAll('audio')),imgs=[].slice.call(document.querySelectorAll('img'));
  function num(x){return isFinite(x)?x:null;}
  function tick(){
    var a=audios.map(function(e){return {media:e.dataset.media,readyState:e.readyState,duration:num(e.duration),
      error:e.error?e.error.code:null};});
    var i=imgs.map(function(e){return {media:e.dataset.media,complete:e.complete,naturalWidth:e.naturalWidth};});
    var settled=a.every(function(x){return x.readyState>=1||x.error!==null;})&&i.every(function(x){return x.complete;});
    document.getElementById('media-status').textContent=JSON.stringify({settled:settled,audio:a,img:i});
    var okA=a.filter(function(x){return x.error===null&&x.duration>0;}).length;
    var okI=i.filter(function(x){return x.naturalWidth>0;}).length;
    document.getElementById('media-summary').textContent='Media check: '+okA+' of '+a.length+
      ' audio players loaded, '+okI+' of '+i.length+' mel images decoded'+(settled?'.':' (still loading)');
    if(!settled){setTimeout(tick,50);}
  }
  tick();
})();
"""

__all__ = ["write_report_html", "render_report_html"]
