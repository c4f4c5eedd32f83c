"""`siren eval`: score codecs from their real bitstreams on real speech, beside Codec 2 and the original.

    siren eval --data MANIFEST_OR_DIR --system NAME=SPEC [--system ...] --out DIR [--max-utts N] [--wandb-run RUN]

SPEC is a SIREN checkpoint URI (run dir, step dir, `wandb:` artifact; decoded through its flow + vocoder pipeline, or
`--pipeline-flow` / `--pipeline-vocoder`), `codec2:MODE` (Debian's `c2enc` / `c2dec`, 8 kHz), or `wav:DIR` (already
decoded files named `<id>.wav`/`.flac`/`.ogg`). Every coded system writes its bitstream files under
`DIR/bitstreams/NAME/`, and `bps` is their size ÷ the audio's duration, with the nominal rate beside it
(`bps_nominal`); decoded audio goes to `DIR/audio/NAME/`. The original audio is always the first row (`original`).

Per utterance and system: `mos` (DNSMOS P.835 overall, no reference), `stoi`, `pesq` (wide band), `spk_sim`, `wer`
(against the manifest text when there is one, else against pocketsphinx's transcript of the original; recorded in
`wer_reference`), `encode_rtf` / `decode_rtf` (compute seconds per audio second, torch and BLAS on one thread), and for
SIREN systems per stream `code_usage/STREAM` (fraction of the codebook seen, mean over levels) and
`code_entropy/STREAM` (entropy ÷ log2 K, mean over levels) over all the system's decoded codes.

Outputs: `DIR/eval.json` = {"systems": {NAME: {metric: value}}, "utterances": [rows]} and `DIR/eval.md` (also
printed). An utterance a system cannot code, or a metric a library cannot score, is listed in its row's `errors`
and counted in the system's `failures`; it is never averaged in as a value. With `--wandb-run RUN` (a SIREN run
directory or a W&B run id) the same tables go to W&B as `wandb.Table`s `eval/systems` and `eval/utterances`, in a run
of job type `eval` beside RUN (`WandbTarget`; offline files under `DIR/wandb/`).

Coding and scoring run on one thread: besides comparable real-time factors, a scorer's thread pool on a busy CPU
collapses (resemblyzer's embedding went from 20 ms to 0.5 s with two threads and the other core taken).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siren.errors import SirenError

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
# eval name → the quality module's scorer
QUALITY = {"mos": "dnsmos", "stoi": "stoi", "pesq": "pesq", "spk_sim": "spk_sim", "wer": "wer"}
MOS_PREDICTOR = "DNSMOS P.835 OVRL (speechmos)"
TABLE_METRICS = ("mos", "stoi", "pesq", "spk_sim", "wer", "encode_rtf", "decode_rtf")
# Codec 2 modes c2enc/c2dec know, with their nominal bit/s; every mode codes 8 kHz audio
CODEC2_MODES = {
    "3200": 3200,
    "2400": 2400,
    "1600": 1600,
    "1400": 1400,
    "1300": 1300,
    "1200": 1200,
    "700C": 700,
    "450": 450,
}
CODEC2_RATE = 8000
C2ENC, C2DEC = "c2enc", "c2dec"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
PCM_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64}


class EvalError(SirenError):
    """A bad `siren eval` request: an unknown system spec, a missing tool or scorer, an unusable data set."""


class CodingFailed(Exception):
    """One utterance could not be coded by one system; listed in its row, never dropped."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    path: Path
    text: str | None


@dataclass
class Coded:
    """One utterance through one system: decoded audio (N,) at 16 kHz, bitstream bytes, compute seconds."""

    wav: np.ndarray
    nbytes: int | None
    encode_s: float | None = None
    decode_s: float | None = None
    codes: object = None  # SIREN `Codes` read back from the bitstream (code statistics)


# ----------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def one_thread():
    """Torch and the BLAS/OpenMP pools on one thread, so real-time factors compare across machines and systems."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)


class Clock:
    """CPU seconds of this process plus its finished children (the Codec 2 binaries run as subprocesses)."""

    def __enter__(self):
        self.t0 = _cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = _cpu_seconds() - self.t0


def _cpu_seconds() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def resample(wav: np.ndarray, src: int, dst: int) -> np.ndarray:
    """(N,) float32 from `src` to `dst` Hz (torchaudio's windowed sinc; deterministic)."""
    if src == dst:
        return wav
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav, np.float32)), src, dst).numpy()


def _to_pcm16(wav: np.ndarray) -> bytes:
    return np.round(np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def _save(path: Path, wav: np.ndarray) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wav, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")


# -------------------------------------------------------------------------------------------------------- systems
class System:
    name: str
    spec: str
    kind: str
    bps_nominal: float | None = None

    def code(self, item: EvalItem, wav: np.ndarray, out: Path) -> Coded:
        raise NotImplementedError

    def code_stats(self, coded: Sequence[Coded]) -> dict:
        return {}

    def details(self) -> dict:
        return {}


class Original(System):
    """The input itself: its file size is its bit rate; nominal = sample rate × bits per sample of a PCM file."""

    kind = "original"

    def __init__(self):
        self.name, self.spec = "original", "original"

    def code(self, item, wav, out):
        import soundfile as sf

        info = sf.info(str(item.path))
        bits = PCM_BITS.get(info.subtype)
        self.bps_nominal = None if bits is None else float(info.samplerate * bits * info.channels)
        return Coded(wav=wav, nbytes=item.path.stat().st_size)


class Codec2(System):
    """Codec 2 through Debian's command-line coder: 16 kHz → 8 kHz raw PCM → c2enc → headerless bit file → c2dec →
    8 kHz raw → 16 kHz. c2enc writes each frame padded to whole bytes: that file is the bitstream measured."""

    kind = "codec2"

    def __init__(self, name: str, mode: str):
        if mode not in CODEC2_MODES:
            raise EvalError(f"system {name}: unknown Codec 2 mode {mode!r}; known: {', '.join(CODEC2_MODES)}")
        missing = [b for b in (C2ENC, C2DEC) if shutil.which(b) is None]
        if missing:
            raise EvalError(
                f"system {name}: codec2:{mode} needs Codec 2's {' and '.join(missing)} on PATH "
                "(Debian package `codec2`)"
            )
        self.name, self.spec, self.mode = name, f"codec2:{mode}", mode
        self.bps_nominal = float(CODEC2_MODES[mode])

    def _run(self, *args: str) -> None:
        res = subprocess.run([*args], capture_output=True, text=True)
        if res.returncode != 0:
            raise CodingFailed(f"{args[0]} exited {res.returncode}: {res.stderr.strip()[-300:]}")

    def code(self, item, wav, out):
        bits = out / "bitstreams" / self.name / f"{item.id}.bin"
        bits.parent.mkdir(parents=True, exist_ok=True)
        raw_in, raw_out = bits.with_suffix(".in.raw"), bits.with_suffix(".out.raw")
        try:
            with Clock() as enc:
                raw_in.write_bytes(_to_pcm16(resample(wav, SAMPLE_RATE, CODEC2_RATE)))
                self._run(C2ENC, self.mode, str(raw_in), str(bits))
            with Clock() as dec:
                self._run(C2DEC, self.mode, str(bits), str(raw_out))
                pcm = np.frombuffer(raw_out.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
                decoded = resample(pcm, CODEC2_RATE, SAMPLE_RATE)
        finally:
            raw_in.unlink(missing_ok=True)
            raw_out.unlink(missing_ok=True)
        return Coded(wav=decoded, nbytes=bits.stat().st_size, encode_s=enc.seconds, decode_s=dec.seconds)


class WavDir(System):
    """Audio another tool already decoded: `DIR/<id>.wav` (or .flac/.ogg). No bitstream, so no bit rate."""

    kind = "wav"

    def __init__(self, name: str, folder: str):
        self.name, self.spec, self.folder = name, f"wav:{folder}", Path(folder)
        if not self.folder.is_dir():
            raise EvalError(f"system {name}: wav:{folder} is not a directory")

    def code(self, item, wav, out):
        from siren.data.audio import load_audio

        found = [self.folder / f"{item.id}{s}" for s in AUDIO_SUFFIXES if (self.folder / f"{item.id}{s}").is_file()]
        if not found:
            raise CodingFailed(f"no {item.id}{{{','.join(AUDIO_SUFFIXES)}}} in {self.folder}")
        return Coded(wav=load_audio(found[0], SAMPLE_RATE).numpy(), nbytes=None)


class Siren(System):
    """A SIREN checkpoint: Codec.encode → to_bytes → file; file → from_bytes → decode through flow + vocoder."""

    kind = "siren"

    def __init__(self, name: str, uri: str, flow: str | None = None, vocoder: str | None = None):
        from siren.codec import Codec

        self.name, self.spec = name, uri
        self.codec = Codec.from_checkpoint(uri, flow, vocoder)
        if not self.codec.has("vocoder"):
            raise EvalError(
                f"system {name}: {uri} has no vocoder to render audio with: pass --pipeline-vocoder URI or set "
                "pipeline.vocoder in its config"
            )
        self.codec._extractor()  # load the feature extractor now, so its loading is not timed as encoding
        self.bps_nominal = float(self.codec.bps_nominal())

    def code(self, item, wav, out):
        import torch

        from siren.errors import USER_ERRORS

        sr = self.codec.sample_rate
        path = out / "bitstreams" / self.name / f"{item.id}.siren"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Clock() as enc:
                codes = self.codec.encode(torch.from_numpy(resample(wav, SAMPLE_RATE, sr)))
                path.write_bytes(self.codec.to_bytes(codes))
            with Clock() as dec:
                read = self.codec.from_bytes(path.read_bytes())
                decoded = resample(self.codec.decode(read)[0].cpu().numpy(), sr, SAMPLE_RATE)
        except (*USER_ERRORS, ValueError) as exc:  # too short, non-finite, damaged bitstream: this utterance only
            raise CodingFailed(f"{type(exc).__name__}: {exc}") from exc
        return Coded(wav=decoded, nbytes=path.stat().st_size, encode_s=enc.seconds, decode_s=dec.seconds, codes=read)

    def details(self):
        """Which checkpoints rendered the audio, and through which path (flow or the decoder head, then vocoder)."""
        return {"pipeline": dict(self.codec.source), "render_path": self.codec.render_path}

    def code_stats(self, coded):
        """Usage and normalised entropy per stream over every code read back from this system's bitstreams."""
        import torch

        from siren.metrics.codebook import entropy_bits, histogram
        from siren.models.analysis import code_layout

        codes = [c.codes for c in coded if c.codes is not None]
        if not codes:
            return {}
        out = {}
        for stream, (K, _) in code_layout(self.codec.components).items():
            h = sum(histogram(getattr(c, stream), None, K) for c in codes)  # (L, K)
            out[f"code_usage/{stream}"] = float(((h > 0).sum(-1) / K).mean())
            norm = entropy_bits(h) / math.log2(K) if K > 1 else torch.zeros(h.shape[0])
            out[f"code_entropy/{stream}"] = float(norm.mean())
        return out


def parse_system(arg: str, flow: str | None = None, vocoder: str | None = None) -> System:
    """`NAME=SPEC` → a System ready to code (binaries found, checkpoint loaded), or EvalError naming the problem."""
    name, eq, spec = arg.partition("=")
    if not eq or not name or not spec:
        raise EvalError(f"--system {arg!r}: expected NAME=SPEC (SPEC: a checkpoint URI, codec2:MODE or wav:DIR)")
    if not NAME_RE.match(name):
        raise EvalError(f"--system {arg!r}: the name {name!r} must be letters, digits, and _ . + - (it names folders)")
    if name == "original":
        raise EvalError("--system original=...: `original` is the input audio's own row, always present")
    m = SCHEME_RE.match(spec)
    scheme = m.group(1) if m else None
    if scheme == "codec2":
        return Codec2(name, spec[len("codec2:") :])
    if scheme == "wav":
        return WavDir(name, spec[len("wav:") :])
    if scheme not in (None, "wandb"):
        raise EvalError(
            f"--system {arg!r}: unknown system kind {scheme!r}; a SPEC is a SIREN checkpoint URI (path or wandb:...), "
            "codec2:MODE or wav:DIR"
        )
    return Siren(name, spec, flow, vocoder)


# ----------------------------------------------------------------------------------------------------------- data
def load_items(data: str | Path, max_utts: int | None = None) -> list[EvalItem]:
    """A JSONL manifest (ids, paths, texts) or a directory of audio files (id = file name without suffix)."""
    p = Path(data)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        ids: dict[str, Path] = {}
        for f in files:
            if f.stem in ids:
                raise EvalError(f"--data {data}: two files with id {f.stem!r}: {ids[f.stem]} and {f}")
            ids[f.stem] = f
        items = [EvalItem(i, f, None) for i, f in ids.items()]
    elif p.is_file():
        from siren.data.manifest import read_manifest

        items = [EvalItem(u.id, Path(u.path), u.text or None) for u in read_manifest(p)]
    else:
        raise EvalError(f"--data {data}: no such manifest or directory")
    if max_utts is not None:
        if max_utts < 1:
            raise EvalError(f"--max-utts must be at least 1, got {max_utts}")
        items = items[:max_utts]
    if not items:
        raise EvalError(
            f"--data {data}: no utterances (looking for {', '.join(AUDIO_SUFFIXES)} files or manifest rows)"
        )
    return items


def check_eval_extra() -> None:
    """EvalError naming the `eval` extra's missing packages: a missing scorer never makes a shorter table."""
    import importlib.util

    from siren.metrics.quality import missing_eval_libraries

    missing = missing_eval_libraries() + [m for m in ("threadpoolctl",) if importlib.util.find_spec(m) is None]
    if missing:
        raise EvalError(
            f"siren eval needs the `eval` extra (pip install 'siren-codec[eval]'); missing: {', '.join(missing)}"
        )


# ------------------------------------------------------------------------------------------------------- the run
def score(item: EvalItem, original: np.ndarray, coded: np.ndarray, scorers: dict) -> tuple[dict, dict]:
    """Every quality metric of one coded utterance → (values, errors); a failed metric is None with its reason."""
    from siren.metrics.quality import MetricFailed, wer_reference

    values, errors = {}, {}
    for name, q in QUALITY.items():
        try:
            if not (np.isfinite(original).all() and np.isfinite(coded).all()):
                raise MetricFailed("non-finite samples")
            values[name] = float(scorers[q](item.id, original, coded, item.text))
        except MetricFailed as exc:
            values[name], errors[name] = None, str(exc)
    values["wer_reference"] = wer_reference(item.text)
    return values, errors


def evaluate(
    data: str | Path,
    systems: Sequence[str],
    out: str | Path,
    *,
    max_utts: int | None = None,
    pipeline_flow: str | None = None,
    pipeline_vocoder: str | None = None,
    wandb_run: str | None = None,
) -> dict:
    """Run every system on every utterance, score it, write DIR/eval.json and DIR/eval.md; → the eval.json object.
    With `wandb_run` (a SIREN run directory or a W&B run id, see `WandbTarget`) the tables also go to W&B."""
    from siren.data.audio import load_audio
    from siren.errors import USER_ERRORS
    from siren.metrics.quality import build_scorers

    if not systems:
        raise EvalError("give at least one --system NAME=SPEC")
    names = [s.partition("=")[0] for s in systems]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"--system names must be unique; repeated: {', '.join(dup)}")
    check_eval_extra()
    target = WandbTarget.parse(wandb_run) if wandb_run is not None else None  # a bad --wandb-run fails before scoring
    items = load_items(data, max_utts)
    runs: list[System] = [Original()] + [parse_system(s, pipeline_flow, pipeline_vocoder) for s in systems]
    scorers = build_scorers(tuple(QUALITY.values()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows, coded_by = [], {s.name: [] for s in runs}
    for item in items:
        try:
            wav = np.clip(load_audio(item.path, SAMPLE_RATE).numpy(), -1.0, 1.0)
        except USER_ERRORS as exc:
            rows += [_failed_row(item, s, f"unreadable original: {exc}") for s in runs]
            continue
        seconds = len(wav) / SAMPLE_RATE
        for system in runs:
            try:
                with one_thread():
                    coded = system.code(item, wav, out)
            except CodingFailed as exc:
                rows.append(_failed_row(item, system, str(exc), seconds))
                continue
            _save(out / "audio" / system.name / f"{item.id}.wav", coded.wav)
            with one_thread():  # scorers too: a thread pool on a busy CPU collapses (resemblyzer 20 ms → 0.5 s)
                values, errors = score(item, wav, coded.wav, scorers)
            coded_by[system.name].append(coded)
            rows.append(
                {
                    "id": item.id,
                    "system": system.name,
                    "seconds": seconds,
                    "bytes": coded.nbytes,
                    "bps": None if coded.nbytes is None else coded.nbytes * 8 / seconds,
                    **values,
                    "encode_rtf": None if coded.encode_s is None else coded.encode_s / seconds,
                    "decode_rtf": None if coded.decode_s is None else coded.decode_s / seconds,
                    "errors": errors,
                }
            )
    result = {"systems": {s.name: _summary(s, rows, coded_by[s.name]) for s in runs}, "utterances": rows}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(result))
    write_eval_html(result, out)
    if target is not None:
        result_wandb = log_wandb(result, target, out, data=str(data))
        print(f"W&B: eval tables logged to run {result_wandb['id']} ({result_wandb['mode']}, {result_wandb['dir']})")
    return result


def _failed_row(item: EvalItem, system: System, why: str, seconds: float | None = None) -> dict:
    row = {"id": item.id, "system": system.name, "seconds": seconds, "bytes": None, "bps": None}
    row.update({m: None for m in (*QUALITY, "encode_rtf", "decode_rtf")})
    row.update({"wer_reference": None, "errors": {"coding": why}})
    return row


def _summary(system: System, rows: list[dict], coded: list[Coded]) -> dict:
    mine = [r for r in rows if r["system"] == system.name]
    ok = [r for r in mine if "coding" not in r["errors"]]
    with_bytes = [r for r in ok if r["bytes"] is not None]
    out: dict = {
        "kind": system.kind,
        "spec": system.spec,
        # measured over the whole set: all the bits it wrote ÷ all the audio they cover
        "bps": sum(r["bytes"] for r in with_bytes) * 8 / sum(r["seconds"] for r in with_bytes) if with_bytes else None,
        "bps_nominal": system.bps_nominal,
    }
    for m in (*QUALITY, "encode_rtf", "decode_rtf"):
        vals = [r[m] for r in ok if r[m] is not None]
        out[m] = float(np.mean(vals)) if vals else None
    for m in ("encode_rtf", "decode_rtf"):  # compute over audio of the whole set, as bps
        timed = [r for r in ok if r[m] is not None]
        out[m] = sum(r[m] * r["seconds"] for r in timed) / sum(r["seconds"] for r in timed) if timed else None
    out.update(system.details())
    out.update(system.code_stats(coded))
    refs = sorted({r["wer_reference"] for r in ok})
    out["mos_predictor"] = MOS_PREDICTOR
    out["wer_reference"] = refs[0] if len(refs) == 1 else ("mixed" if refs else None)
    out["num_utts"] = len(mine)
    out["failures"] = sum(len(r["errors"]) for r in mine)
    return out


# ---------------------------------------------------------------------------------------------------------- output
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    """The eval as a markdown table (system, measured and nominal bit/s, the metrics), code statistics and failures."""
    systems = result["systems"]
    heads = ["system", "bit/s (files)", "bit/s nominal", *TABLE_METRICS, "failures"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, s in systems.items():
        cells = [name, _fmt(s["bps"], 1), _fmt(s["bps_nominal"], 1), *(_fmt(s[m]) for m in TABLE_METRICS)]
        lines.append("| " + " | ".join([*cells, str(s["failures"])]) + " |")
    n = len({r["id"] for r in result["utterances"]})
    refs = ", ".join(f"{k}: {v['wer_reference']}" for k, v in systems.items() if k == "original")
    notes = [
        "",
        f"{n} utterances. mos: {MOS_PREDICTOR}. pesq: wide band, 16 kHz. wer reference ({refs}): manifest = the "
        "manifest text, asr = pocketsphinx's transcript of the original. encode/decode: CPU seconds per second of "
        "audio on one thread.",
    ]
    stats = {k: {m: v for m, v in s.items() if m.startswith("code_")} for k, s in systems.items()}
    stats = {k: v for k, v in stats.items() if v}
    if stats:
        cols = sorted({m for v in stats.values() for m in v})
        notes += ["", "| system | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        notes += ["| " + " | ".join([k] + [_fmt(v.get(c)) for c in cols]) + " |" for k, v in stats.items()]
    failed = [r for r in result["utterances"] if r["errors"]]
    if failed:
        notes += ["", "Failures:"]
        notes += [f"- {r['system']} / {r['id']}: {k}: {v}" for r in failed for k, v in r["errors"].items()]
    return "\n".join(lines + notes) + "\n"


MAX_MEDIA_UTTS = 8  # utterances with players on the page: it embeds every file and must stay a few MB


def plot_rate_quality(result: dict, path: Path) -> Path | None:
    """PNG of measured bit/s (log axis) against PESQ, STOI and MOS, one point per system with a bitstream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {n: s for n, s in result["systems"].items() if s["bps"] is not None}
    if not pts:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    for ax, m in zip(axes, ("pesq", "stoi", "mos"), strict=True):
        for name, s in pts.items():
            if s[m] is not None:
                ax.scatter(s["bps"], s[m])
                ax.annotate(name, (s["bps"], s[m]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("bit/s (measured from files)")
        ax.set_ylabel(m)
        ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_eval_html(result: dict, out: Path) -> Path:
    """`out/report.html`: the table, the bit-rate-versus-quality plot and, per utterance, a player for every system,
    media embedded as data: URIs (the verify report's page parts and its media check)."""
    from siren.report_html import _CSS, _MEDIA_CHECK_JS, _data_uri, _esc, _table

    systems = result["systems"]
    heads = ["system", "bit/s (files)", "bit/s nominal", *TABLE_METRICS, "failures"]
    rows = [
        "<tr>"
        + "".join(
            f"<td>{_esc(c)}</td>"
            for c in (name, _fmt(s["bps"], 1), _fmt(s["bps_nominal"], 1), *(_fmt(s[m]) for m in TABLE_METRICS))
        )
        + f"<td>{s['failures']}</td></tr>"
        for name, s in systems.items()
    ]
    body = [f'<h1>SIREN eval</h1><p class="note">mos: {_esc(MOS_PREDICTOR)}</p>']
    body.append(_table("Systems", heads, rows, table_id="systems"))
    png = plot_rate_quality(result, out / "rate_quality.png")
    if png is not None:
        body.append(
            f'<h2>Bit rate vs quality</h2><img data-media="{png.name}" alt="bit rate vs quality" '
            f'src="{_esc(_data_uri(png))}">'
        )
    ids = list(dict.fromkeys(r["id"] for r in result["utterances"]))
    body.append("<h2>Listen</h2>")
    for uid in ids[:MAX_MEDIA_UTTS]:
        cells = []
        for name in systems:
            wav = out / "audio" / name / f"{uid}.wav"
            player = (
                f'<audio controls preload="metadata" data-media="{_esc(f"{name}/{wav.name}")}" '
                f'src="{_esc(_data_uri(wav))}"></audio>'
                if wav.is_file()
                else '<p class="note">no audio (see the failures)</p>'
            )
            cells.append(f'<figure class="variant"><figcaption>{_esc(name)}</figcaption>{player}</figure>')
        body.append(f'<section class="utt"><h3>{_esc(uid)}</h3><div class="row">{"".join(cells)}</div></section>')
    if len(ids) > MAX_MEDIA_UTTS:
        body.append(f'<p class="note">{len(ids) - MAX_MEDIA_UTTS} more utterances: audio/ beside this page.</p>')
    body.append('<p class="note" id="media-summary">Media check: needs JavaScript (the page itself does not).</p>')
    body.append('<pre id="media-status" hidden>{"settled": false}</pre>')
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>SIREN eval</title>',
            f"<style>{_CSS}</style></head><body>",
            *body,
            f"<script>{_MEDIA_CHECK_JS}</script>",
            "</body></html>",
        ]
    )
    path = out / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    return path


# ------------------------------------------------------------------------------------------------------------ W&B
WANDB_ID_RE = re.compile(r"^(?:(?:([A-Za-z0-9_.-]+)/)?([A-Za-z0-9_.-]+)/)?([A-Za-z0-9_-]+)$")
DEFAULT_PROJECT = "siren"


@dataclass(frozen=True)
class WandbTarget:
    """Where `--wandb-run RUN` puts the eval tables. RUN is a SIREN run directory (project, entity, group and
    tracking mode from its config.yaml; its W&B run id from its `wandb_run_id`) or a W&B run id
    `[[ENTITY/]PROJECT/]ID` (project `siren` when not given; mode from WANDB_MODE and the login).

    The tables go to a new W&B run (job type `eval`) in that run's project and group, with the evaluated run's id in
    its config, rather than into the trained run itself: that run has finished at its last step, and a table logged
    into it again (offline, resumed) starts at step 0, which W&B drops on sync as a step below the run's current one."""

    project: str
    entity: str | None
    group: str | None
    mode: str  # as configured: auto, online, offline
    run_id: str | None  # the evaluated run's W&B id (None: a run directory trained without W&B)
    run_dir: str | None

    @classmethod
    def parse(cls, spec: str) -> WandbTarget:
        p = Path(spec)
        if p.is_dir():
            import yaml

            from siren.checkpoints.layout import RunDir

            run = RunDir(p)
            cfg_path = run.config
            if not cfg_path.is_file():
                raise EvalError(f"--wandb-run {spec}: a directory but not a SIREN run (no config.yaml in it)")
            tracking = (yaml.safe_load(cfg_path.read_text()) or {}).get("tracking") or {}
            mode = tracking.get("mode") or "auto"
            if mode == "disabled":
                raise EvalError(
                    f"--wandb-run {spec}: that run was trained with tracking.mode=disabled, so it has no W&B project "
                    "to log beside; pass a W&B run id ([[ENTITY/]PROJECT/]ID) or leave --wandb-run out"
                )
            id_file = run.wandb_run_id
            run_id = id_file.read_text().strip() or None if id_file.is_file() else None
            target = cls(
                tracking.get("project") or DEFAULT_PROJECT,
                tracking.get("entity"),
                tracking.get("group"),
                mode,
                run_id,
                str(p),
            )
        else:
            if spec.startswith(("/", ".", "~")) or (("/" in spec) and Path(spec.split("/")[0]).is_dir()):
                raise EvalError(f"--wandb-run {spec}: no such run directory")  # not read as ENTITY/PROJECT/ID
            m = WANDB_ID_RE.match(spec)
            if m is None:
                raise EvalError(
                    f"--wandb-run {spec!r}: neither a run directory nor a W&B run id ([[ENTITY/]PROJECT/]ID)"
                )
            entity, project, run_id = m.groups()
            target = cls(project or DEFAULT_PROJECT, entity, None, "auto", run_id, None)
        target.resolved_mode()  # WANDB_MODE=disabled: an error now, not after the scoring
        return target

    def resolved_mode(self) -> str:
        from siren.train.tracking import wandb_mode

        mode = wandb_mode(self.mode)
        if mode == "disabled":
            raise EvalError(
                "--wandb-run: W&B is disabled here (WANDB_MODE=disabled); unset it or leave --wandb-run out"
            )
        return mode


def wandb_tables(result: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The eval as two tables, (columns, rows): `eval/systems` (one row per system: rates, every metric, failures,
    code statistics) and `eval/utterances` (one row per utterance and system; its errors as JSON text)."""
    systems = result["systems"]
    code_cols = sorted({k for s in systems.values() for k in s if k.startswith("code_")})
    cols = ["system", "kind", "spec", "bps", "bps_nominal", *TABLE_METRICS, "failures", "num_utts", "wer_reference"]
    cols += code_cols
    sys_rows = [[name, *(s.get(c) for c in cols[1:])] for name, s in systems.items()]
    ucols = ["id", "system", "seconds", "bytes", "bps", *QUALITY, "encode_rtf", "decode_rtf", "wer_reference"]
    utt_rows = [[*(r.get(c) for c in ucols), json.dumps(r["errors"], sort_keys=True)] for r in result["utterances"]]
    return {"eval/systems": (cols, sys_rows), "eval/utterances": ([*ucols, "errors"], utt_rows)}


def log_wandb(result: dict, target: WandbTarget, out: Path, data: str) -> dict:
    """Log the eval's tables (and each system's averages as summary scalars `eval/NAME/METRIC`) to a new W&B run
    beside `target`; its files go under `out/wandb/`. → {"id", "mode", "dir"}. A W&B failure is an EvalError
    (eval.json and eval.md are already written)."""
    mode = target.resolved_mode()
    try:
        import wandb

        run = wandb.init(
            project=target.project,
            entity=target.entity,
            group=target.group,
            job_type="eval",
            name=f"eval-{Path(target.run_dir).name if target.run_dir else target.run_id}",
            dir=str(out),
            mode=mode,
            reinit="create_new",
            config={
                "evaluated_run": target.run_id,
                "evaluated_run_dir": target.run_dir,
                "data": data,
                "systems": {n: s["spec"] for n, s in result["systems"].items()},
            },
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        try:
            run.log({key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in wandb_tables(result).items()})
            for name, s in result["systems"].items():
                run.summary.update(
                    {f"eval/{name}/{m}": s[m] for m in ("bps", *TABLE_METRICS) if isinstance(s.get(m), float)}
                )
            run_dir = run.dir
            run_id = run.id
        finally:
            run.finish()
    except Exception as exc:
        raise EvalError(f"W&B logging of the eval failed ({out / 'eval.json'} is written): {exc!r}") from exc
    return {"id": run_id, "mode": mode, "dir": str(Path(run_dir).parent)}


def eval_cli(args) -> int:
    result = evaluate(
        args.data,
        args.system,
        args.out,
        max_utts=args.max_utts,
        pipeline_flow=args.pipeline_flow,
        pipeline_vocoder=args.pipeline_vocoder,
        wandb_run=args.wandb_run,
    )
    print((Path(args.out) / "eval.md").read_text(), end="")
    n_fail = sum(s["failures"] for s in result["systems"].values())
    print(f"wrote {Path(args.out) / 'eval.json'} and eval.md" + (f" ({n_fail} failures listed)" if n_fail else ""))
    return 0
