"""JSONL manifests: one utterance per line (`path`, `duration`, `speaker`, optional `id` and `text`)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REQUIRED_FIELDS = ("path", "duration", "speaker")


class ManifestError(ValueError):
    """A manifest is missing or malformed; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str
    duration: float
    speaker: str
    text: str = ""


def _parse_line(line: str, where: str, base: Path) -> Utterance:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(rec, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise ManifestError(f"{where}: missing required field(s) {', '.join(missing)} (required: {REQUIRED_FIELDS})")
    try:
        duration = float(rec["duration"])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: duration must be a number, got {rec['duration']!r}") from exc
    path = Path(str(rec["path"]))
    # Relative paths are relative to the manifest, so a corpus directory can be moved as a whole.
    if not path.is_absolute():
        path = base / path
    return Utterance(
        id=str(rec.get("id") or path.stem),
        path=str(path),
        duration=duration,
        speaker=str(rec["speaker"]),
        text=str(rec.get("text", "")),
    )


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest; blank lines are ignored, ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist (build one with `siren corpus --out DIR`)")
    base = path.resolve().parent
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            utt = _parse_line(line, f"{path}:{lineno}", base)
            # Ids key the feature cache and the eval samples; a duplicate would silently alias two files.
            if utt.id in seen:
                raise ManifestError(f"{path}:{lineno}: duplicate id {utt.id!r} (first on line {seen[utt.id]})")
            seen[utt.id] = lineno
            utts.append(utt)
    return utts


def write_manifest(path: str | Path, utterances: list[Utterance]) -> Path:
    """Write utterances as JSONL atomically; paths inside the manifest's directory are written relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    lines = []
    for u in utterances:
        p = Path(u.path).resolve()
        rel = p.relative_to(base) if p.is_relative_to(base) else p
        lines.append(
            json.dumps(
                {
                    "id": u.id,
                    "path": rel.as_posix(),
                    "duration": round(float(u.duration), 4),
                    "speaker": u.speaker,
                    "text": u.text,
                },
                ensure_ascii=False,
            )
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return path
