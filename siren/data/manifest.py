"""JSONL manifests: one utterance per line (`path`, `duration`, `speaker`; optional `id`, `text`, `sample_rate`,
`channels`, `size`, `mtime`).

Training reads a manifest into a `ManifestTable`: a handful of numpy arrays (strings as one byte blob plus offsets), not
one Python object per row, so a million-row manifest costs tens of MB and DataLoader workers share it without
copy-on-write growth (DESIGN §17). Small manifests (val, samples, verify) can still be read as a list of `Utterance`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_FIELDS = ("path", "duration", "speaker")
_CHUNK = 20_000  # lines parsed per json.loads call


class ManifestError(ValueError):
    """A manifest is missing or malformed; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str
    duration: float
    speaker: str
    text: str = ""
    sample_rate: int | None = None  # from the file header when the manifest was made; None = unknown
    channels: int | None = None
    size: int | None = None  # bytes and modification time of the file when the manifest was made (cache keys)
    mtime: float | None = None


class StringColumn:
    """n strings as one UTF-8 byte blob and n + 1 offsets: two arrays whatever n is."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, values: Sequence[str]) -> StringColumn:
        encoded = [v.encode("utf-8") for v in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    @classmethod
    def concat(cls, parts: Sequence[StringColumn]) -> StringColumn:
        if not parts:
            return cls(np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64))
        blob = np.concatenate([p.blob for p in parts])
        offs, base = [np.zeros(1, dtype=np.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(blob, np.concatenate(offs))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def take(self, idx: np.ndarray) -> StringColumn:
        return StringColumn.from_strings([self[int(i)] for i in idx])

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes


class ManifestTable:
    """A manifest as columns. `table[i]` builds one `Utterance` on demand; `len`, iteration and `rows(idx)` work too.

    Relative paths stay relative to `base` (the manifest's directory) and are joined on access.
    """

    def __init__(
        self,
        base: str,
        ids: StringColumn,
        paths: StringColumn,
        texts: StringColumn | None,
        speaker_codes: np.ndarray,
        speakers: list[str],
        duration: np.ndarray,
        sample_rate: np.ndarray,
        channels: np.ndarray,
        size: np.ndarray,
        mtime: np.ndarray,
        source: str = "",
    ):
        self.base, self.ids, self.paths, self.texts = base, ids, paths, texts
        self.speaker_codes, self.speakers = speaker_codes, speakers
        self.duration, self.sample_rate, self.channels = duration, sample_rate, channels
        self.size, self.mtime, self.source = size, mtime, source

    def __len__(self) -> int:
        return len(self.duration)

    def path(self, i: int) -> str:
        # os.path.join keeps an absolute stored path as it is.
        return os.path.normpath(os.path.join(self.base, self.paths[i]))

    def speaker(self, i: int) -> str:
        return self.speakers[int(self.speaker_codes[i])]

    def __getitem__(self, i: int) -> Utterance:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a manifest of {len(self)} rows")
        i %= len(self)
        sr, ch, size, mtime = (
            int(self.sample_rate[i]),
            int(self.channels[i]),
            int(self.size[i]),
            float(self.mtime[i]),
        )
        return Utterance(
            id=self.ids[i],
            path=self.path(i),
            duration=float(self.duration[i]),
            speaker=self.speaker(i),
            text=self.texts[i] if self.texts is not None else "",
            sample_rate=sr or None,
            channels=ch or None,
            size=size if size >= 0 else None,
            mtime=mtime if np.isfinite(mtime) else None,
        )

    def __iter__(self) -> Iterator[Utterance]:
        for i in range(len(self)):
            yield self[i]

    def to_list(self) -> list[Utterance]:
        return list(self)

    @property
    def nbytes(self) -> int:
        cols = [self.ids, self.paths] + ([self.texts] if self.texts is not None else [])
        arrays = (self.speaker_codes, self.duration, self.sample_rate, self.channels, self.size, self.mtime)
        return sum(c.nbytes for c in cols) + sum(a.nbytes for a in arrays)

    @classmethod
    def from_utterances(cls, utterances: Sequence[Utterance], base: str = "/") -> ManifestTable:
        """A table of in-memory utterances (absolute paths), e.g. for tests or a subset."""
        spk_names = sorted({u.speaker for u in utterances})
        code = {s: k for k, s in enumerate(spk_names)}
        return cls(
            base=base,
            ids=StringColumn.from_strings([u.id for u in utterances]),
            paths=StringColumn.from_strings([u.path for u in utterances]),
            texts=StringColumn.from_strings([u.text for u in utterances]),
            speaker_codes=np.array([code[u.speaker] for u in utterances], dtype=np.int32),
            speakers=spk_names,
            duration=np.array([u.duration for u in utterances], dtype=np.float64),
            sample_rate=np.array([u.sample_rate or 0 for u in utterances], dtype=np.int32),
            channels=np.array([u.channels or 0 for u in utterances], dtype=np.int16),
            size=np.array([-1 if u.size is None else u.size for u in utterances], dtype=np.int64),
            mtime=np.array([np.nan if u.mtime is None else u.mtime for u in utterances], dtype=np.float64),
        )


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _parse_line(line: str, where: str) -> dict:
    """One line → its record, or a ManifestError naming the line and the problem."""
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
        float(rec["duration"])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: duration must be a number, got {rec['duration']!r}") from exc
    for key in ("sample_rate", "channels", "size"):
        if rec.get(key) is not None and not isinstance(rec[key], int):
            raise ManifestError(f"{where}: {key} must be an integer, got {rec[key]!r}")
    return rec


def _chunk_records(lines: list[str], linenos: list[int], path: Path) -> list[dict]:
    # One json.loads for the whole chunk is several times faster than one per line; on any problem, parse line by
    # line so the error names the exact line.
    try:
        recs = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(r, dict) and "path" in r and "duration" in r and "speaker" in r for r in recs):
            return recs
    except json.JSONDecodeError:
        pass
    return [_parse_line(line, f"{path}:{n}") for line, n in zip(lines, linenos, strict=True)]


def read_table(path: str | Path, *, text: bool = True) -> ManifestTable:
    """Read a JSONL manifest into columns; blank lines are ignored, ids must be unique. `text=False` drops transcripts
    (training never reads them)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist (build one with `siren manifest` or `siren corpus`)")
    base = str(path.resolve().parent)
    ids_p, paths_p, texts_p, spk_p = [], [], [], []
    num_p: dict[str, list[np.ndarray]] = {k: [] for k in ("duration", "sample_rate", "channels", "size", "mtime")}
    spk_code: dict[str, int] = {}
    seen: dict[str, int] = {}

    def flush(lines: list[str], linenos: list[int]) -> None:
        recs = _chunk_records(lines, linenos, path)
        try:
            dur = np.array([r["duration"] for r in recs], dtype=np.float64)
        except (TypeError, ValueError):
            for r, n in zip(recs, linenos, strict=True):
                _parse_line(json.dumps(r), f"{path}:{n}")
            raise
        rpaths = [str(r["path"]) for r in recs]
        rids = [str(r.get("id") or _stem(p)) for r, p in zip(recs, rpaths, strict=True)]
        # Ids key caches and eval samples; a duplicate would silently alias two files.
        for uid, n in zip(rids, linenos, strict=True):
            first = seen.setdefault(uid, n)
            if first != n:
                raise ManifestError(f"{path}:{n}: duplicate id {uid!r} (first on line {first})")
        for key in ("sample_rate", "channels", "size"):
            vals = [r.get(key) for r in recs]
            if any(v is not None and not isinstance(v, int) for v in vals):
                bad = next(n for v, n in zip(vals, linenos, strict=True) if v is not None and not isinstance(v, int))
                raise ManifestError(f"{path}:{bad}: {key} must be an integer")
        num_p["duration"].append(dur)
        num_p["sample_rate"].append(np.array([r.get("sample_rate") or 0 for r in recs], dtype=np.int32))
        num_p["channels"].append(np.array([r.get("channels") or 0 for r in recs], dtype=np.int16))
        num_p["size"].append(np.array([-1 if r.get("size") is None else r["size"] for r in recs], dtype=np.int64))
        num_p["mtime"].append(
            np.array([np.nan if r.get("mtime") is None else r["mtime"] for r in recs], dtype=np.float64)
        )
        ids_p.append(StringColumn.from_strings(rids))
        paths_p.append(StringColumn.from_strings(rpaths))
        if text:
            texts_p.append(StringColumn.from_strings([str(r.get("text", "")) for r in recs]))
        spk_p.append(np.array([spk_code.setdefault(str(r["speaker"]), len(spk_code)) for r in recs], dtype=np.int32))

    with path.open(encoding="utf-8") as f:
        lines: list[str] = []
        linenos: list[int] = []
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            lines.append(line)
            linenos.append(lineno)
            if len(lines) == _CHUNK:
                flush(lines, linenos)
                lines, linenos = [], []
        if lines:
            flush(lines, linenos)

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate(num_p[key]) if num_p[key] else np.zeros(0, dtype=dtype)

    return ManifestTable(
        base=base,
        ids=StringColumn.concat(ids_p),
        paths=StringColumn.concat(paths_p),
        texts=StringColumn.concat(texts_p) if text else None,
        speaker_codes=np.concatenate(spk_p) if spk_p else np.zeros(0, dtype=np.int32),
        speakers=list(spk_code),
        duration=cat("duration", np.float64),
        sample_rate=cat("sample_rate", np.int32),
        channels=cat("channels", np.int16),
        size=cat("size", np.int64),
        mtime=cat("mtime", np.float64),
        source=str(path),
    )


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest as a list of `Utterance` (for small manifests; training uses `read_table`)."""
    return read_table(path).to_list()


def utterance_record(u: Utterance, base: Path | None) -> dict:
    """The JSON object of one manifest line; paths inside `base` are written relative to it."""
    p = Path(u.path)
    if base is not None:
        p = p.resolve()
        p = p.relative_to(base) if p.is_relative_to(base) else p
    rec = {"id": u.id, "path": p.as_posix(), "duration": round(float(u.duration), 4), "speaker": u.speaker}
    rec["text"] = u.text
    for key in ("sample_rate", "channels", "size", "mtime"):
        if getattr(u, key) is not None:
            rec[key] = getattr(u, key)
    return rec


def write_manifest(path: str | Path, utterances: Sequence[Utterance]) -> Path:
    """Write utterances as JSONL atomically; paths inside the manifest's directory are written relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for u in utterances:
                f.write(json.dumps(utterance_record(u, base), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
