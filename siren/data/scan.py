"""`siren manifest SRC... --out DIR`: JSONL manifests from directories of audio in a known layout.

Layouts (speaker and transcript from where each corpus keeps them):
- `librispeech`: SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac, transcripts in SPEAKER-CHAPTER.trans.txt ("ID TEXT");
- `libritts`: SUBSET/SPEAKER/CHAPTER/SPEAKER_CHAPTER_*.wav, transcript in the sibling STEM.normalized.txt;
- `vctk`: wav48*/SPEAKER/STEM.{wav,flac} with transcripts in txt/SPEAKER/STEM.txt (a `_mic1`/`_mic2` suffix is ignored);
- `flat`: any tree; speaker = the file's parent folder, transcript from a sibling STEM.txt when there is one.

Headers are read in parallel threads (libsndfile releases the GIL); unreadable files go to DIR/rejected.jsonl with the
reason. Ids are the file stems for the corpus layouts and the path below SRC without extension for `flat`, so they are
stable across runs and machines; a duplicate id is an error naming both files. The split is by speaker: a speaker is
in train or in val, never both, chosen by a hash of the speaker name (stable when speakers are added).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from siren.data.manifest import ManifestError, Utterance, duration_problem, write_manifest

log = logging.getLogger("siren")

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")
LAYOUTS = ("auto", "librispeech", "libritts", "vctk", "flat")
_VCTK_MIC = re.compile(r"_mic\d$")


def _walk(src: Path) -> tuple[list[Path], list[Path]]:
    """(audio files, other files) under src, sorted."""
    audio, other = [], []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            (audio if name.lower().endswith(AUDIO_EXTENSIONS) else other).append(p)
    return audio, other


def detect_layout(src: Path, audio: list[Path], other: list[Path]) -> str:
    names = [p.name for p in other]
    if any(n.endswith(".trans.txt") for n in names):
        return "librispeech"
    if any(n.endswith(".normalized.txt") for n in names):
        return "libritts"
    if (src / "txt").is_dir() and any(p.name.startswith("wav48") for p in src.iterdir() if p.is_dir()):
        return "vctk"
    return "flat"


def _librispeech(src: Path, audio: list[Path], other: list[Path]) -> list[tuple[Path, str, str, str]]:
    texts: dict[str, str] = {}
    for p in other:
        if p.name.endswith(".trans.txt"):
            for line in p.read_text(encoding="utf-8").splitlines():
                uid, _, text = line.strip().partition(" ")
                if uid:
                    texts[uid] = text.strip()
    out = []
    for p in audio:
        uid = p.stem
        # SPEAKER-CHAPTER-NNNN; the speaker folder is the authority when the name is unusual.
        speaker = uid.split("-")[0] if "-" in uid else p.parent.parent.name
        out.append((p, uid, speaker, texts.get(uid, "")))
    return out


def _libritts(src: Path, audio: list[Path], other: list[Path]) -> list[tuple[Path, str, str, str]]:
    out = []
    for p in audio:
        t = p.with_name(p.stem + ".normalized.txt")
        text = t.read_text(encoding="utf-8").strip() if t.is_file() else ""
        speaker = p.stem.split("_")[0] if "_" in p.stem else p.parent.parent.name
        out.append((p, p.stem, speaker, text))
    return out


def _vctk(src: Path, audio: list[Path], other: list[Path]) -> list[tuple[Path, str, str, str]]:
    out = []
    for p in audio:
        speaker = p.parent.name
        base = _VCTK_MIC.sub("", p.stem)
        t = src / "txt" / speaker / f"{base}.txt"
        text = t.read_text(encoding="utf-8").strip() if t.is_file() else ""
        out.append((p, p.stem, speaker, text))
    return out


def _flat(src: Path, audio: list[Path], other: list[Path]) -> list[tuple[Path, str, str, str]]:
    out = []
    for p in audio:
        rel = p.relative_to(src).with_suffix("")
        t = p.with_suffix(".txt")
        text = t.read_text(encoding="utf-8").strip() if t.is_file() else ""
        speaker = p.parent.name if p.parent != src else src.name
        out.append((p, rel.as_posix(), speaker, text))
    return out


_READERS = {"librispeech": _librispeech, "libritts": _libritts, "vctk": _vctk, "flat": _flat}


def probe(path: Path) -> dict:
    """Header facts of one file, or {'reason': ...} when it cannot be used."""
    import soundfile as sf

    try:
        st = path.stat()
        info = sf.info(str(path))
    except (OSError, RuntimeError, sf.LibsndfileError) as exc:
        return {"reason": f"unreadable audio header ({exc})"}
    duration = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    why = duration_problem(duration)  # the manifest readers' own rule, so a row written here is one they keep
    if why:
        return {"reason": why}
    return {
        "duration": duration,
        "sample_rate": int(info.samplerate),
        "channels": int(info.channels),
        "size": int(st.st_size),
        "mtime": float(st.st_mtime),
    }


def speaker_order(speakers: list[str]) -> list[str]:
    """Speakers in a stable pseudo-random order (sha1 of the name): adding a speaker does not reshuffle the others."""
    return sorted(speakers, key=lambda s: (hashlib.sha1(s.encode("utf-8")).hexdigest(), s))


def split_by_speaker(
    utts: list[Utterance], val: float | None, val_speakers: int | None
) -> tuple[list[Utterance], list[Utterance]]:
    """Val speakers are taken in `speaker_order` until they hold `val` of the utterances (or `val_speakers` of them)."""
    by_spk: dict[str, list[Utterance]] = defaultdict(list)
    for u in utts:
        by_spk[u.speaker].append(u)
    order = speaker_order(list(by_spk))
    if val_speakers is not None:
        if val_speakers < 0 or (val_speakers > 0 and val_speakers >= len(order)):
            raise ManifestError(
                f"--val-speakers {val_speakers}: the sources have {len(order)} speakers; at least one must stay in train"
            )
        chosen = set(order[:val_speakers])
    else:
        frac = 0.0 if val is None else float(val)
        if not 0.0 <= frac < 1.0:
            raise ManifestError(f"--val {frac}: expected a fraction in [0, 1)")
        chosen, count, want = set(), 0, frac * len(utts)
        for s in order:
            if count >= want or len(chosen) == len(order) - 1:
                break
            chosen.add(s)
            count += len(by_spk[s])
        if frac > 0 and len(order) < 2:
            raise ManifestError(f"cannot split by speaker: the sources have only {len(order)} speaker(s)")
    train = [u for u in utts if u.speaker not in chosen]
    val_set = [u for u in utts if u.speaker in chosen]
    return train, val_set


def split_notes(
    utts: list[Utterance], val_set: list[Utterance], val: float | None, val_speakers: int | None
) -> list[str]:
    """What a user should know about the split they got: val goes by whole speakers, so it can hold far more (or
    less) than the fraction asked for."""
    if val_speakers is not None or not val:
        return []
    n, got = len(utts), len(val_set)
    speakers = sorted({u.speaker for u in val_set})
    want = float(val) * n
    if got <= max(1.5 * want, want + 1) and (got > 0 or want < 1):
        return []
    who = ", ".join(speakers[:5]) + (f" and {len(speakers) - 5} more" if len(speakers) > 5 else "")
    if got == 0:
        return [
            f"--val {val} asked for {want:.1f} of {n} utterances, but val is empty: the smallest speaker holds more"
        ]
    return [
        f"--val {val} asked for {100 * float(val):.1f} % of the utterances ({want:.1f} of {n}); the split keeps "
        f"speakers whole, so val holds {got} ({100 * got / n:.0f} %): all of speaker(s) {who}. Use --val-speakers N "
        "to choose by speakers, or add speakers"
    ]


def build_manifest(
    sources: list[str | Path],
    out: str | Path,
    *,
    layout: str = "auto",
    val: float | None = 0.02,
    val_speakers: int | None = None,
    jobs: int = 8,
    progress: bool = True,
) -> dict:
    """Scan `sources`, write OUT/train.jsonl, OUT/val.jsonl and OUT/rejected.jsonl; returns a summary."""
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise ManifestError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    rows: list[tuple[Path, str, str, str]] = []
    layouts = {}
    for s in sources:
        src = Path(s).resolve()
        if not src.is_dir():
            raise ManifestError(f"source {s} is not a directory")
        audio, other = _walk(src)
        if not audio:
            raise ManifestError(f"source {s} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        kind = detect_layout(src, audio, other) if layout == "auto" else layout
        layouts[str(src)] = kind
        rows += _READERS[kind](src, audio, other)
    first: dict[str, Path] = {}
    for p, uid, _, _ in rows:
        if uid in first:
            raise ManifestError(f"duplicate id {uid!r}: {first[uid]} and {p} (ids must be unique across sources)")
        first[uid] = p
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        facts = list(
            tqdm(
                pool.map(probe, [r[0] for r in rows], chunksize=64),
                total=len(rows),
                desc="reading headers",
                unit="file",
                disable=not progress,
            )
        )
    utts, rejected = [], []
    for (p, uid, speaker, text), f in zip(rows, facts, strict=True):
        if "reason" in f:
            rejected.append({"id": uid, "path": str(p), "reason": f["reason"]})
            continue
        utts.append(Utterance(id=uid, path=str(p), speaker=speaker, text=text, **f))
    if not utts:
        raise ManifestError(f"no readable audio in {', '.join(map(str, sources))}; see the reasons in the rejects")
    utts.sort(key=lambda u: u.id)
    train, val_set = split_by_speaker(utts, val, val_speakers)
    notes = split_notes(utts, val_set, val, val_speakers)
    for note in notes:
        log.warning("siren manifest: %s", note)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "train.jsonl", train)
    write_manifest(out / "val.jsonl", val_set)
    tmp = out / ".rejected.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected), encoding="utf-8")
    os.replace(tmp, out / "rejected.jsonl")
    rates: dict[int, int] = defaultdict(int)
    for u in utts:
        rates[int(u.sample_rate)] += 1
    return {
        "out": str(out),
        "layouts": layouts,
        "train": len(train),
        "val": len(val_set),
        "rejected": len(rejected),
        "speakers": {"train": len({u.speaker for u in train}), "val": len({u.speaker for u in val_set})},
        "hours": round(sum(u.duration for u in utts) / 3600, 3),
        "sample_rates": dict(sorted(rates.items())),
        "notes": notes,
    }
