"""Embedded default corpus (docs/data.md#the-embedded-corpus-demo-and-tests): stdlib docstring sentences spoken by Debian TTS voices, 16 kHz mono.

Deterministic: the same (n, seed) always gives the same texts, speakers and audio. Built in a temporary directory next
to the target and renamed into place, so an interrupted build never leaves a half corpus.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from siren.data.manifest import Utterance, write_manifest
from siren.errors import SirenError

log = logging.getLogger("siren")

CORPUS_VERSION = 1
SAMPLE_RATE = 16000
INSTALL_HINT = "sudo apt-get install -y flite festival festlex-cmu festlex-poslex festvox-kdlpc16k sox"
PROGRAMS = ("flite", "text2wave", "sox")
# (speaker name, engine, engine voice); round-robin over this order.
VOICES = (
    ("slt", "flite", "slt"),
    ("rms", "flite", "rms"),
    ("awb", "flite", "awb"),
    ("kal16", "flite", "kal16"),
    ("ked", "festival", "ked_diphone"),
)
# Fixed and sorted: pure-Python stdlib modules whose docstrings feed the sentence pool.
STDLIB_MODULES = tuple(
    sorted(
        (
            "argparse",
            "ast",
            "asyncio",
            "base64",
            "bdb",
            "bisect",
            "calendar",
            "cmd",
            "code",
            "codecs",
            "collections",
            "colorsys",
            "configparser",
            "contextlib",
            "copy",
            "csv",
            "dataclasses",
            "datetime",
            "decimal",
            "difflib",
            "dis",
            "doctest",
            "email",
            "enum",
            "filecmp",
            "fileinput",
            "fnmatch",
            "fractions",
            "ftplib",
            "functools",
            "getopt",
            "gettext",
            "glob",
            "gzip",
            "heapq",
            "hmac",
            "html",
            "http",
            "imaplib",
            "inspect",
            "ipaddress",
            "json",
            "logging",
            "mailbox",
            "mimetypes",
            "netrc",
            "numbers",
            "operator",
            "optparse",
            "os",
            "pathlib",
            "pdb",
            "pickle",
            "pickletools",
            "platform",
            "plistlib",
            "poplib",
            "pprint",
            "pydoc",
            "queue",
            "quopri",
            "random",
            "re",
            "reprlib",
            "sched",
            "secrets",
            "selectors",
            "shlex",
            "shutil",
            "smtplib",
            "socket",
            "socketserver",
            "statistics",
            "string",
            "subprocess",
            "tarfile",
            "tempfile",
            "textwrap",
            "threading",
            "timeit",
            "tokenize",
            "trace",
            "traceback",
            "turtle",
            "typing",
            "unittest",
            "urllib",
            "uuid",
            "warnings",
            "wave",
            "weakref",
            "zipfile",
            "zipimport",
        )
    )
)
_SENTENCE = re.compile(r"^[A-Z][A-Za-z ,;:'\-]*[A-Za-z][.!?]$")


class CorpusError(SirenError):
    """The corpus cannot be built (missing TTS programs, a failed synthesis, a conflicting output directory)."""


@dataclass(frozen=True)
class _Job:
    id: str
    text: str
    speaker: str
    engine: str
    voice: str


def check_voices() -> list[str]:
    """Names of the required programs that are not on PATH (empty when everything is installed)."""
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _module_sources(name: str) -> list[Path]:
    # Read the stdlib's source files directly: some modules are frozen (no spec origin) and importing has side effects.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if (stdlib / name / "__init__.py").is_file():
        # Packages contribute every module file in their own directory, in sorted order.
        return sorted((stdlib / name).glob("*.py"))
    if (stdlib / f"{name}.py").is_file():
        return [stdlib / f"{name}.py"]
    raise CorpusError(f"stdlib module {name!r} has no Python source under {stdlib}; the sentence pool needs it")


def _first_sentence(doc: str) -> str | None:
    """The first sentence-like line (the summary line, usually): 4-20 words, ASCII letters and punctuation only."""
    for line in doc.splitlines():
        line = " ".join(line.split())
        if 4 <= len(line.split()) <= 20 and line.isascii() and _SENTENCE.match(line):
            return line
    return None


def mine_sentences() -> list[str]:
    """The first sentence-like line of every docstring in STDLIB_MODULES, deduplicated and sorted."""
    return list(_mine_sentences())


@functools.cache
def _mine_sentences() -> tuple[str, ...]:
    # Parsing ~100 modules takes about a second; the result never changes within a process.
    found: set[str] = set()
    for name in STDLIB_MODULES:
        for src in _module_sources(name):
            tree = ast.parse(src.read_text(encoding="utf-8"), filename=str(src))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    sentence = _first_sentence(doc) if doc else None
                    if sentence:
                        found.add(sentence)
    return tuple(sorted(found))


def _plan(n: int, seed: int) -> list[_Job]:
    pool = mine_sentences()
    if len(pool) < n:
        raise CorpusError(
            f"only {len(pool)} distinct sentences could be mined from the stdlib; ask for n <= {len(pool)}"
        )
    random.Random(seed).shuffle(pool)
    jobs = []
    for k, text in enumerate(pool[:n]):
        speaker, engine, voice = VOICES[k % len(VOICES)]
        jobs.append(_Job(id=f"utt{k:05d}_{speaker}", text=text, speaker=speaker, engine=engine, voice=voice))
    return jobs


def _run(cmd: list[str], job: _Job) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(
            f"synthesis of {job.id} ({job.speaker}) failed: `{' '.join(cmd)}` exited {proc.returncode}: "
            f"{proc.stderr.strip()[-500:]}\nIf a voice is missing: {INSTALL_HINT}"
        )


def _synthesise(job: _Job, wav_dir: Path) -> float:
    """Speak one sentence and normalise it to 16 kHz mono PCM_16; returns its duration in seconds."""
    import soundfile as sf

    raw = wav_dir / f".{job.id}.raw.wav"
    if job.engine == "flite":
        _run(["flite", "-voice", job.voice, "-t", job.text, "-o", str(raw)], job)
    else:
        txt = wav_dir / f".{job.id}.txt"
        txt.write_text(job.text + "\n", encoding="ascii")
        _run(["text2wave", "-eval", f"(voice_{job.voice})", str(txt), "-o", str(raw)], job)
        txt.unlink()
    out = wav_dir / f"{job.id}.wav"
    # -R: repeatable dither, so the same (n, seed) gives byte-identical audio.
    _run(["sox", "-R", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out), "norm", "-3"], job)
    raw.unlink()
    info = sf.info(str(out))
    if info.frames == 0:
        raise CorpusError(f"synthesis of {job.id} ({job.speaker}) produced an empty file for text {job.text!r}")
    return info.frames / info.samplerate


def _existing_summary(out: Path, n: int, seed: int) -> dict | None:
    """The summary of a complete corpus with the same (n, seed) at `out`, else None; a conflicting one raises."""
    meta_path = out / "corpus.json"
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not meta_path.is_file():
        raise CorpusError(f"{out} exists and is not a SIREN corpus (no corpus.json); remove it or choose another --out")
    meta = json.loads(meta_path.read_text())
    if (meta.get("n"), meta.get("seed"), meta.get("version")) != (n, seed, CORPUS_VERSION):
        raise CorpusError(
            f"{out} holds a corpus with n={meta.get('n')}, seed={meta.get('seed')} "
            f"(version {meta.get('version')}), not n={n}, seed={seed}; remove it or choose another --out"
        )
    from siren.data.manifest import read_manifest

    for split in ("train", "val"):
        for u in read_manifest(out / f"{split}.jsonl"):
            if not Path(u.path).is_file():
                raise CorpusError(f"corpus {out} is incomplete ({u.path} is missing); remove {out} to rebuild it")
    return meta


def _with_paths(meta: dict, out: Path) -> dict:
    return {**meta, "dir": str(out), "train": str(out / "train.jsonl"), "val": str(out / "val.jsonl")}


def build_corpus(
    out_dir: str | Path, n: int = 200, seed: int = 0, val_fraction: float = 0.1, jobs: int = 2, progress: bool = True
) -> dict:
    """Build (or reuse) the corpus at `out_dir`; returns its summary (counts, speakers, seconds, manifest paths)."""
    from tqdm import tqdm

    if n < 2:
        raise CorpusError(f"n must be at least 2 (one train and one held-out utterance), got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    existing = _existing_summary(out, n, seed)
    if existing is not None:
        log.info("corpus %s already built (n=%d, seed=%d); reusing it", out, n, seed)
        return _with_paths(existing, out)
    missing = check_voices()
    if missing:
        raise CorpusError(
            f"the corpus builder needs {', '.join(missing)} (not on PATH). Install with:\n  {INSTALL_HINT}"
        )

    plan = _plan(n, seed)
    # The held-out split is the last utterances: consecutive indices cycle through the voices, so it spans speakers.
    n_val = min(n - 1, max(1, round(n * val_fraction), min(3, n // 3)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        wav_dir = tmp / "wavs"
        wav_dir.mkdir()
        # Threads suffice: each job waits on TTS subprocesses, which run in parallel.
        pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        try:
            durations = list(
                tqdm(
                    pool.map(lambda j: _synthesise(j, wav_dir), plan),
                    total=len(plan),
                    desc="corpus",
                    disable=not progress,
                )
            )
        finally:
            # On failure or Ctrl-C, do not start the queued syntheses.
            pool.shutdown(wait=True, cancel_futures=True)
        utts = [
            Utterance(id=j.id, path=str(wav_dir / f"{j.id}.wav"), duration=round(d, 4), speaker=j.speaker, text=j.text)
            for j, d in zip(plan, durations, strict=True)
        ]
        train, val = utts[: n - n_val], utts[n - n_val :]
        write_manifest(tmp / "train.jsonl", train)
        write_manifest(tmp / "val.jsonl", val)
        speakers = sorted({u.speaker for u in utts})
        meta = {
            "version": CORPUS_VERSION,
            "n": n,
            "seed": seed,
            "val_fraction": val_fraction,
            "sample_rate": SAMPLE_RATE,
            "num_train": len(train),
            "num_val": len(val),
            "speakers": speakers,
            "speaker_counts": {s: sum(u.speaker == s for u in utts) for s in speakers},
            "val_speakers": sorted({u.speaker for u in val}),
            "total_seconds": round(sum(u.duration for u in utts), 3),
        }
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.rename cannot replace a directory
        os.rename(tmp, out)
    except BaseException:
        # An interrupted or failed build leaves nothing behind; the error itself propagates.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "corpus %s: %d train / %d val utterances, %.1f s, speakers %s",
        out,
        len(train),
        len(val),
        meta["total_seconds"],
        ", ".join(speakers),
    )
    return _with_paths(meta, out)
