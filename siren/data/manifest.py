"""JSONL manifests: one utterance per line (`path`, `duration`, `speaker`; optional `id`, `text`, `sample_rate`,
`channels`, `size`, `mtime`).

Training reads a manifest into a `ManifestTable`: a handful of numpy arrays (strings as one byte blob plus offsets), not
one Python object per row, so a million-row manifest costs tens of MB and DataLoader workers share it without
copy-on-write growth (docs/scale.md). Small manifests (val, samples, verify) can still be read as a list of `Utterance`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siren.errors import SirenError

REQUIRED_FIELDS = ("path", "duration", "speaker")
_CHUNK = 20_000  # lines parsed per json.loads call


class ManifestError(SirenError, ValueError):
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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def record_problem(rec) -> str | None:
    """Why a parsed manifest line is malformed (the whole manifest is then refused), or None. The one structural rule
    for every reader: a JSON object with `path` (a non-empty string), `duration` (a JSON number) and `speaker`;
    `sample_rate`/`channels` positive integers, `size` a non-negative integer, `mtime` a number, when present. A
    duration that is a number but not a usable one (0, negative, NaN) is not malformed: `row_problems` skips the row."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        return f"missing required field(s) {', '.join(missing)} (required: {REQUIRED_FIELDS})"
    if not isinstance(rec["path"], str) or not rec["path"]:
        return f"path must be a non-empty string, got {rec['path']!r}"
    if not _is_number(rec["duration"]):
        return f"duration must be a number, got {rec['duration']!r}"
    for key in ("sample_rate", "channels"):
        v = rec.get(key)
        if v is not None and not (_is_count(v) and v > 0):
            return f"{key} must be a positive integer, got {v!r}"
    if rec.get("size") is not None and not (_is_count(rec["size"]) and rec["size"] >= 0):
        return f"size must be a non-negative integer, got {rec['size']!r}"
    if rec.get("mtime") is not None and not _is_number(rec["mtime"]):
        return f"mtime must be a number, got {rec['mtime']!r}"
    return None


def _parse_line(line: str, where: str) -> dict:
    """One line → its record, or a ManifestError naming the line and the problem."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    problem = record_problem(rec)
    if problem:
        raise ManifestError(f"{where}: {problem}")
    return rec


def _chunk_records(lines: list[str], linenos: list[int], path: Path) -> list[dict]:
    # One json.loads for the whole chunk is several times faster than one per line; the records are checked by the
    # same `record_problem` as a single line, and on any problem parsed line by line so the error names the line.
    try:
        recs = json.loads("[" + ",".join(lines) + "]")
        if len(recs) == len(lines) and not any(map(record_problem, recs)):
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
        dur = np.array([r["duration"] for r in recs], dtype=np.float64)
        rpaths = [str(r["path"]) for r in recs]
        rids = [str(r.get("id") or _stem(p)) for r, p in zip(recs, rpaths, strict=True)]
        # Ids key caches and eval samples; a duplicate would silently alias two files.
        for uid, n in zip(rids, linenos, strict=True):
            first = seen.setdefault(uid, n)
            if first != n:
                raise ManifestError(f"{path}:{n}: duplicate id {uid!r} (first on line {first})")
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


def duration_problem(duration: float) -> str | None:
    """Why a duration (seconds) cannot be a clip's: not a positive finite number. Shared by the manifest readers and
    `siren manifest` (which rejects such files), so both give the same reason."""
    if math.isfinite(duration) and duration > 0:
        return None
    return f"empty or invalid duration ({duration!r} s; must be a positive finite number)"


def row_problems(table: ManifestTable, sample_rate: int, min_samples: int, policy: str = "convert") -> dict[int, str]:
    """Rows the manifest itself shows to be unusable → reason: a duration that is not a positive finite number, one
    shorter than `min_samples` at `sample_rate`, or a recorded format that `policy` (`data.on_format_mismatch`) does
    not use. The one judge of a row: the dataset, the samples and verify all ask it. Vectorised: only the excluded
    rows cost Python, so it is cheap for a million rows."""
    from siren.data.audio import format_problem

    out: dict[int, str] = {}
    dur = table.duration
    with np.errstate(invalid="ignore"):
        invalid = ~np.isfinite(dur) | (dur <= 0)
        # A tolerance of a millionth of a sample: duration × rate of a file of exactly min_samples may round below.
        short = ~invalid & (dur * sample_rate < min_samples - 1e-6)
    for r in np.nonzero(invalid)[0]:
        out[int(r)] = duration_problem(float(dur[r]))
    for r in np.nonzero(short)[0]:
        out[int(r)] = (
            f"too short: {float(dur[r]):.3f} s in the manifest < {min_samples / sample_rate:.3f} s "
            f"(min_samples {min_samples} at {sample_rate} Hz)"
        )
    known = table.sample_rate > 0
    suspect = np.nonzero(known & ((table.sample_rate != sample_rate) | (table.channels > 1)))[0]
    for r in suspect:
        reason = format_problem(int(table.sample_rate[r]), max(1, int(table.channels[r])), sample_rate, policy)
        if reason and int(r) not in out:
            out[int(r)] = reason
    return out


def usable_utterances(
    utterances: Sequence[Utterance], sample_rate: int, min_samples: int, policy: str = "convert"
) -> tuple[list[Utterance], list[tuple[Utterance, str]]]:
    """(usable, [(excluded, reason)]) of a small list of utterances, judged by `row_problems`."""
    if not utterances:
        return [], []
    bad = row_problems(ManifestTable.from_utterances(utterances), sample_rate, min_samples, policy)
    keep = [u for i, u in enumerate(utterances) if i not in bad]
    return keep, [(utterances[i], why) for i, why in sorted(bad.items())]


def log_excluded(who: str, excluded: Sequence[tuple[Utterance, str]], total: int, source) -> None:
    """One log line for the rows a consumer (samples, verify) leaves out, with the first as an example."""
    if excluded:
        import logging

        first, why = excluded[0]
        logging.getLogger("siren").info(
            "%s: %d of %d rows of %s left out (e.g. %s: %s)", who, len(excluded), total, source, first.id, why
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
    # The exact duration (a float round-trips through JSON): rounding could turn a very short clip into 0 s or move
    # a clip across the minimum duration.
    rec = {"id": u.id, "path": p.as_posix(), "duration": float(u.duration), "speaker": u.speaker}
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
