"""One cache subsystem for everything computed from the audio by frozen models (SSL features, the adapt stage's teacher
latents and codes), for train and val alike.

- Filling: every rank computes its share `todo[rank::world]` of the entries still missing, in length-sorted order, and
  writes its own shard files; barriers only separate the phases (recover → verify → fill → index), so no rank works
  alone while the others wait. `siren cache` and `siren train` run the same `ShardCache.ensure`.
- Storage: a few large shard files (`*.bin`, fp16 values and small-int codes, entries back to back) each with an index
  (`*.idx.npz`: entry positions, byte offsets, frame counts, the shard's CRC-32). Every file is written as a temp file
  named after its writer (token, pid, process start, host), fsynced, renamed into place, and the directory fsynced.
  A shard exists only once its index is renamed (data first, then index; both are durable before either rename), so a
  kill mid-fill loses at most the shard being written; a kill between the two renames leaves the index's temp file,
  and the next start adopts the pair. Temp files are removed only when their writer is dead (same host) or they are
  older than `stale_seconds`, so a second job filling the same cache keeps its files. A shard whose index is
  unreadable (empty, truncated) or whose checksum does not match is reported, set aside and recomputed; a shard that
  vanishes while being read (another rank or job removing it as damaged) counts as missing.
- Reading: `CacheView.item` cuts an entry to a crop by memory-mapped slices, inside DataLoader workers; nothing is
  memoised, so host memory does not grow with the corpus.
- Key: the directory name is a digest of everything that changes the values: what is computed (the modules' weights
  and architecture, SSL layer, batching), the audio settings, and the manifest rows (path, size, mtime: as the
  manifest records them, else from the file). A changed key is a new cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siren.data.audio import AudioError
from siren.data.manifest import ManifestTable
from siren.errors import SirenError
from siren.ranks import Ranks

log = logging.getLogger("siren")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Field:
    """One stored tensor per entry: `axis` names its time axis (entries of one axis share a frame count), or "" for
    a per-utterance tensor of fixed shape. `dtype`: float16, int16 or int32."""

    name: str
    axis: str
    dtype: str


class CacheCorrupt(SirenError):
    """A shard's index is unreadable, or its bytes do not match the recorded checksum or size, or it vanished."""


# ------------------------------------------------------------------------------------------ crash-safe file writes
STALE_SECONDS = 3600.0  # a temp file this old has no live writer: a shard's temp files live for seconds


def _machine() -> str:
    """This host and PID namespace (and boot): pids mean the same process only between processes that share them."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    ident = ""
    try:
        ident += Path("/proc/sys/kernel/random/boot_id").read_text().strip() + os.readlink("/proc/self/ns/pid")
    except OSError:
        pass  # no /proc: the host name alone
    return f"{host}@{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def _start_time(pid: int) -> int:
    """Start of process `pid` in clock ticks since boot (so a reused pid is not taken for a dead writer); 0: unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_MACHINE = _machine()
_STARTS: dict[int, int] = {}  # pid → start time, for this process (and forked children)
_LIVE: set[str] = set()  # tokens of this process's writes in progress
# <final name>.<token>~<pid>~<start>~<machine>.tmp
_TMP = re.compile(
    r"^(?P<final>.+)\.(?P<token>[0-9a-f]+)~(?P<pid>\d+)~(?P<start>\d+)~(?P<machine>[A-Za-z0-9._@-]+)\.tmp$"
)


def _own_start() -> int:
    pid = os.getpid()
    if pid not in _STARTS:
        _STARTS[pid] = _start_time(pid)
    return _STARTS[pid]


def _tmp_path(final: Path, token: str) -> Path:
    return final.with_name(f"{final.name}.{token}~{os.getpid()}~{_own_start()}~{_MACHINE}.tmp")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(final: Path, token: str, write: Callable) -> Path:
    """`write(f)` into a temp file beside `final` named after this writer, flushed and fsynced; returns its path."""
    tmp = _tmp_path(final, token)
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete temp file into place and fsync the directory, so the rename survives a node crash."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def atomic_write(final: Path, write: Callable) -> None:
    """Write `final` so that a reader or a crash sees the old state or the whole new file, never a part of it."""
    token = uuid.uuid4().hex[:8]
    _LIVE.add(token)
    tmp = None
    try:
        tmp = _write_tmp(final, token, write)
        _publish(tmp, final)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _LIVE.discard(token)


def _pid_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    now = _start_time(pid)
    return start == 0 or now == 0 or now == start


def abandoned(path: Path, stale_seconds: float = STALE_SECONDS) -> bool:
    """Whether temp file `path` belongs to no live writer: its writer (named in the file name) is a dead process of
    this host, or (another host's, or a name without an owner) it has not been written for `stale_seconds`."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # gone: its writer renamed it, or another job cleaned it
    m = _TMP.match(path.name)
    if m is None or m["machine"] != _MACHINE:
        return age > stale_seconds
    pid, start = int(m["pid"]), int(m["start"])
    if pid == os.getpid() and start == _own_start():
        return m["token"] not in _LIVE
    return not _pid_alive(pid, start)


def row_digest(table: ManifestTable, rows: np.ndarray) -> str:
    """sha256 over (path, size, mtime) of the rows; size/mtime come from the manifest, or from the file when the
    manifest does not record them."""
    h = hashlib.sha256()
    for r in rows:
        r = int(r)
        path = table.path(r)
        size, mtime = int(table.size[r]), float(table.mtime[r])
        if size < 0 or not np.isfinite(mtime):
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                size, mtime = -1, float("nan")  # a missing file keys as missing; it fails when loaded
        h.update(f"{path}\0{size}\0{mtime!r}\n".encode())
    return h.hexdigest()


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


class ShardCache:
    """Entries (dicts of `fields`) for `rows` of `table` (entry j ↔ rows[j]) under `root/<kind>-<digest>/`."""

    def __init__(
        self,
        root: str | Path,
        kind: str,
        key: dict,
        fields: Sequence[Field],
        table: ManifestTable,
        rows: np.ndarray,
        *,
        shard_bytes: int = 256 << 20,
        stale_seconds: float = STALE_SECONDS,
    ):
        self.kind, self.fields, self.table = kind, list(fields), table
        self.rows = np.asarray(rows, dtype=np.int64)
        self.axes = sorted({f.axis for f in self.fields if f.axis})
        self.key = {"format": FORMAT_VERSION, "kind": kind, **key, "fields": [vars(f) for f in self.fields]}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode())
        digest.update(row_digest(table, self.rows).encode())
        self.digest = digest.hexdigest()
        self.dir = Path(root) / f"{kind}-{self.digest[:16]}"
        self.shard_bytes, self.stale_seconds = shard_bytes, stale_seconds
        self.shapes: dict[str, list[int]] | None = None  # trailing shape per field, known once something is stored
        self._index: dict | None = None

    # ---------------------------------------------------------------------------------------------------- listing
    def _shards(self, *, trusted: bool) -> list[Path]:
        """Index files of complete shards; `trusted` leaves out those marked corrupt."""
        if not self.dir.is_dir():
            return []
        out = sorted(self.dir.glob("*.idx.npz"))
        if trusted:
            out = [p for p in out if not p.with_name(p.name[: -len(".idx.npz")] + ".corrupt").exists()]
        return out

    @staticmethod
    def _bin(idx: Path) -> Path:
        return idx.with_name(idx.name[: -len(".idx.npz")] + ".bin")

    @staticmethod
    def _read_index(idx: Path) -> dict | None:
        """The arrays and meta of a shard index; None if it vanished (removed as damaged by another rank or job);
        CacheCorrupt if it is unreadable (an empty or truncated file, as a node crash can leave)."""
        try:
            with np.load(idx) as z:
                out = {k: z[k] for k in ("positions", "offsets", "frames", "bad", "nbytes", "crc")}
                meta = json.loads(str(z["meta"]))
            out["meta"] = {k: meta[k] for k in ("digest", "shapes", "bad")}
        except FileNotFoundError:
            return None
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise CacheCorrupt(f"cache index {idx} is unreadable ({type(exc).__name__}: {exc})") from exc
        return out

    def verify_shard(self, idx: Path, *, crc: bool = True) -> None:
        """Raise CacheCorrupt unless the shard's index reads and its data has the recorded size (and, with `crc`,
        CRC-32). A shard that vanishes meanwhile (removed by another rank or job) is not an error: it is not listed
        again, and its entries count as missing."""
        z = self._read_index(idx)
        if z is None:
            return
        nbytes, want = int(z["nbytes"]), int(z["crc"])
        b = self._bin(idx)
        try:
            size = b.stat().st_size
            got = _crc(b) if crc and size == nbytes else want
        except FileNotFoundError:
            if not idx.exists():
                return
            raise CacheCorrupt(f"cache shard {b} is missing (its index {idx.name} exists)") from None
        if size != nbytes:
            raise CacheCorrupt(f"cache shard {b} has {size} bytes, its index records {nbytes}")
        if got != want:
            raise CacheCorrupt(f"cache shard {b} fails its checksum (CRC-32 {got:08x}, recorded {want:08x})")

    def _load_index(self) -> dict:
        """Entry → (shard, byte offset, frames per axis), from every trusted shard; -1 = missing, -2 = unusable."""
        n = len(self.rows)
        shard = np.full(n, -1, dtype=np.int32)
        offset = np.zeros(n, dtype=np.int64)
        frames = np.zeros((n, max(1, len(self.axes))), dtype=np.int32)
        reasons: dict[int, str] = {}
        bins: list[str] = []
        for idx in self._shards(trusted=True):
            try:
                z = self._read_index(idx)
            except CacheCorrupt as exc:
                log.warning("%s; its entries count as missing", exc)
                continue
            if z is None:
                continue  # vanished since listing (a damaged shard being removed): its entries count as missing
            pos, off, fr, bad, meta = z["positions"], z["offsets"], z["frames"], z["bad"], z["meta"]
            if meta["digest"] != self.digest:
                raise CacheCorrupt(f"cache shard {idx} belongs to another key ({meta['digest'][:16]})")
            self.shapes = self.shapes or meta["shapes"]
            if meta["shapes"] and self.shapes and meta["shapes"] != self.shapes:
                raise CacheCorrupt(f"cache shard {idx} stores shapes {meta['shapes']}, others {self.shapes}")
            k = len(bins)
            bins.append(str(self._bin(idx)))
            shard[pos] = np.where(bad, -2, k)
            offset[pos], frames[pos] = off, fr
            for p, why in meta["bad"].items():
                reasons[int(p)] = why
        return {"shard": shard, "offset": offset, "frames": frames, "bins": bins, "reasons": reasons}

    def missing(self) -> np.ndarray:
        return np.nonzero(self._load_index()["shard"] == -1)[0]

    # ---------------------------------------------------------------------------------------------------- filling
    def ensure(
        self,
        load: Callable[[int], torch.Tensor],
        compute: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]],
        ranks: Ranks | None = None,
        *,
        batch_seconds: float = 0.0,
        sample_rate: int = 16000,
        verify: bool = True,
        progress: bool = True,
    ) -> dict:
        """Verify (each rank a share of the shards), fill the missing entries (each rank `todo[rank::world]`), index.
        `ranks`: this process's place in the job's process group (rank 0 of 1 when None).

        `load(j)` → (N,) waveform of entry j (an AudioError marks the entry unusable); `compute(wavs)` → one dict of
        field → tensor per waveform. Returns {'computed': this rank's count, 'reused': ..., 'total': ...}.
        """
        ranks = ranks or Ranks()
        if ranks.is_main and self.dir.is_dir():
            self._recover()  # this job writes nothing before the barrier below; other jobs' live files are kept
        ranks.barrier()
        listed = self._shards(trusted=False)
        # Every index is read (cheap) so that a damaged one is set aside like a shard failing its checksum.
        for idx in ranks.shard(listed):
            try:
                self.verify_shard(idx, crc=verify)
            except CacheCorrupt as exc:
                log.warning("%s; its entries will be recomputed", exc)
                mark = idx.with_name(idx.name[: -len(".idx.npz")] + ".corrupt")
                atomic_write(mark, lambda f, why=str(exc): f.write(why.encode()))
        ranks.barrier()
        index = self._load_index()
        todo = np.nonzero(index["shard"] == -1)[0]
        # Length-sorted so each batch pads little; the stride gives every rank the same mix of lengths.
        order = np.lexsort((todo, self.table.duration[self.rows[todo]]))
        mine = ranks.shard(todo[order])
        t0 = time.perf_counter()
        computed = self._fill(mine, load, compute, batch_seconds * sample_rate, progress and ranks.is_main)
        log.info(
            "cache %s: rank %d computed %d of %d entries (%d reused) in %.1f s",
            self.dir,
            ranks.rank,
            computed,
            len(self.rows),
            len(self.rows) - len(todo),
            time.perf_counter() - t0,
        )
        ranks.barrier()
        if ranks.is_main:
            self._drop_corrupt()
        self._index = self._load_index()
        left = int((self._index["shard"] == -1).sum())
        if left:
            raise CacheCorrupt(
                f"cache {self.dir}: {left} entries are still missing after filling (a rank failed, or another job "
                "removed a damaged shard meanwhile); run again to compute them"
            )
        return {"computed": computed, "reused": len(self.rows) - len(todo), "total": len(self.rows)}

    def _recover(self) -> None:
        """Clear what killed fills left behind: adopt a shard whose data was renamed into place but whose index was
        not (its complete index is still the temp file), and delete the other temp files of dead writers. Files of a
        live writer (this job's or another's) are left alone."""
        for tmp in sorted(self.dir.glob("*.tmp")):
            if not abandoned(tmp, self.stale_seconds):
                continue
            m = _TMP.match(tmp.name)
            final = self.dir / m["final"] if m else None
            if final is not None and final.name.endswith(".idx.npz") and self._bin(final).exists():
                if not final.exists():
                    try:
                        _publish(tmp, final)
                    except FileNotFoundError:
                        continue  # another job adopted it first
                    log.warning("cache %s: adopted shard %s, left between its two renames", self.dir, final.name)
                    continue
            tmp.unlink(missing_ok=True)
            log.info("cache %s: removed %s, left by a dead writer", self.dir, tmp.name)
        # Data with neither an index nor an index temp to adopt (a writer always has the temp before renaming the
        # data; the temp is checked before the index, since the writer's rename makes one appear as the other goes).
        for b in sorted(self.dir.glob("*.bin")):
            stem = b.name[: -len(".bin")]
            if any(self.dir.glob(f"{stem}.idx.npz.*.tmp")) or (self.dir / f"{stem}.idx.npz").exists():
                continue
            try:
                old = time.time() - b.stat().st_mtime > self.stale_seconds
            except FileNotFoundError:
                continue
            if old:
                b.unlink(missing_ok=True)
                log.warning("cache %s: removed %s, shard data without an index", self.dir, b.name)

    def _drop_corrupt(self) -> None:
        for mark in self.dir.glob("*.corrupt"):
            stem = mark.name[: -len(".corrupt")]
            for suffix in (".idx.npz", ".bin", ".corrupt"):
                (self.dir / f"{stem}{suffix}").unlink(missing_ok=True)

    def _fill(self, mine: np.ndarray, load, compute, batch_samples: float, progress: bool) -> int:
        from tqdm import tqdm

        if not len(mine):
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        key = json.dumps(self.key, indent=1, sort_keys=True).encode()
        atomic_write(self.dir / "key.json", lambda f: f.write(key))
        writer = _ShardWriter(self, uuid.uuid4().hex[:8])
        bar = tqdm(total=len(mine), desc=f"cache {self.kind}", unit="utt", disable=not progress)
        batch: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            outs = compute([w for _, w in batch])
            if len(outs) != len(batch):
                raise ValueError(f"cache compute returned {len(outs)} entries for {len(batch)} waveforms")
            for (j, _), out in zip(batch, outs, strict=True):
                writer.add(j, out)
            bar.update(len(batch))
            batch.clear()

        try:
            for j in mine.tolist():
                try:
                    wav = load(j)
                except AudioError as exc:
                    writer.add_bad(j, exc.reason)
                    bar.update(1)
                    continue
                # Batches of similar lengths up to batch_samples of padded audio (0: one utterance per forward).
                if batch and (len(batch) + 1) * max(wav.shape[0], batch[0][1].shape[0]) > batch_samples:
                    flush()
                batch.append((j, wav))
            if batch:
                flush()
            writer.commit()
        finally:
            _LIVE.discard(writer.token)  # from here on its leftovers (if it failed) are a dead writer's
            bar.close()
        return len(mine)

    # ---------------------------------------------------------------------------------------------------- reading
    def view(self, crops: dict[str, tuple[int, int | None]], valid: Sequence[str] = ()) -> CacheView:
        """A reader for DataLoader workers: `crops` axis → (hop in samples, frames per item or None for all)."""
        if self._index is None:
            self._index = self._load_index()
        if self.shapes is None:
            raise RuntimeError(f"cache {self.dir} holds no entries")
        return CacheView(self, crops, tuple(valid))


class _ShardWriter:
    """Appends entries to the current shard of one rank; a shard is committed (data, then index) when it is full."""

    def __init__(self, cache: ShardCache, token: str):
        self.cache, self.token, self.seq = cache, token, 0
        _LIVE.add(token)
        self._reset()

    def _reset(self) -> None:
        self.parts: list[bytes] = []
        self.positions, self.offsets, self.frames, self.bad = [], [], [], []
        self.bad_reasons: dict[str, str] = {}
        self.nbytes = 0

    def add(self, j: int, out: dict[str, torch.Tensor]) -> None:
        c = self.cache
        frames = [0] * max(1, len(c.axes))
        shapes = {}
        blobs = []
        for f in c.fields:
            if f.name not in out:
                raise ValueError(f"cache compute gave no {f.name!r} (gave {sorted(out)})")
            x = out[f.name].detach().cpu()
            if f.axis:
                t = int(x.shape[0])
                k = c.axes.index(f.axis)
                if frames[k] and frames[k] != t:
                    raise ValueError(f"fields on axis {f.axis!r} disagree in length ({frames[k]} vs {t} for {f.name})")
                frames[k] = t
                shapes[f.name] = list(x.shape[1:])
            else:
                shapes[f.name] = list(x.shape)
            a = x.numpy().astype(f.dtype, copy=False)
            if f.dtype.startswith("int") and not np.array_equal(a, x.numpy()):
                raise ValueError(f"{f.name}: values do not fit {f.dtype}")
            blobs.append(np.ascontiguousarray(a).tobytes())
        if c.shapes is None:
            c.shapes = shapes
        elif shapes != c.shapes:
            raise ValueError(f"entry {j}: shapes {shapes} differ from the cache's {c.shapes}")
        self.positions.append(j)
        self.offsets.append(self.nbytes)
        self.frames.append(frames)
        self.bad.append(False)
        for b in blobs:
            self.parts.append(b)
            self.nbytes += len(b)
        if self.nbytes >= c.shard_bytes:
            self.commit()

    def add_bad(self, j: int, reason: str) -> None:
        self.positions.append(j)
        self.offsets.append(self.nbytes)
        self.frames.append([0] * max(1, len(self.cache.axes)))
        self.bad.append(True)
        self.bad_reasons[str(j)] = reason

    def commit(self) -> None:
        if not self.positions:
            return
        d = self.cache.dir
        stem = f"shard-{self.token}-{self.seq:05d}"
        self.seq += 1
        crc = 0
        for p in self.parts:
            crc = zlib.crc32(p, crc)
        meta = {"digest": self.cache.digest, "shapes": self.cache.shapes, "bad": self.bad_reasons}
        arrays = {
            "positions": np.array(self.positions, dtype=np.int64),
            "offsets": np.array(self.offsets, dtype=np.int64),
            "frames": np.array(self.frames, dtype=np.int32).reshape(len(self.positions), -1),
            "bad": np.array(self.bad, dtype=bool),
            "nbytes": np.int64(self.nbytes),
            "crc": np.int64(crc),
            "meta": np.array(json.dumps(meta)),
        }
        # Both files complete and durable before either rename: a kill between the renames leaves data in place
        # and the index as its temp file, which the next start adopts.
        bin_, idx = d / f"{stem}.bin", d / f"{stem}.idx.npz"
        tmp_idx = _write_tmp(idx, self.token, lambda f: np.savez(f, **arrays))
        tmp_bin = _write_tmp(bin_, self.token, lambda f: [f.write(p) for p in self.parts])
        _publish(tmp_bin, bin_)
        _publish(tmp_idx, idx)  # the shard exists from here on
        self._reset()


class CacheView:
    """Cuts entries to crops by memory-mapped slices; picklable, and each process maps the shards it touches."""

    def __init__(self, cache: ShardCache, crops: dict[str, tuple[int, int | None]], valid: tuple[str, ...]):
        idx = cache._index
        self.shard, self.offset, self.frames, self.bins = idx["shard"], idx["offset"], idx["frames"], idx["bins"]
        self.reasons = idx["reasons"]
        self.fields, self.axes, self.shapes = cache.fields, cache.axes, cache.shapes
        self.crops, self.valid = crops, valid
        for axis in (f.axis for f in self.fields if f.axis):
            if axis not in crops:
                raise ValueError(f"no crop rule for axis {axis!r} (have {sorted(crops)})")
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}  # maps are per process

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            try:
                self._maps[k] = np.memmap(self.bins[k], dtype=np.uint8, mode="r")
            except FileNotFoundError:
                raise CacheCorrupt(
                    f"cache shard {self.bins[k]} vanished after the cache was indexed (removed as damaged by another "
                    "job?); run again to recompute its entries"
                ) from None
        return self._maps[k]

    def entry(self, j: int) -> dict[str, np.ndarray]:
        """Entry j uncut: field → array (read-only views into the shard)."""
        k = int(self.shard[j])
        if k == -2:
            raise AudioError(f"cache entry {j}", f"unusable when the cache was filled: {self.reasons.get(j, '?')}")
        if k < 0:
            raise RuntimeError(f"cache entry {j} is missing; run `siren cache` (or the cache fill at start) again")
        mm, pos = self._map(k), int(self.offset[j])
        out = {}
        for f in self.fields:
            shape = ([int(self.frames[j, self.axes.index(f.axis)])] if f.axis else []) + self.shapes[f.name]
            n = int(np.prod(shape)) * np.dtype(f.dtype).itemsize
            out[f.name] = mm[pos : pos + n].view(f.dtype).reshape(shape)
            pos += n
        return out

    def item(self, j: int, offset: int, length: int) -> dict[str, torch.Tensor]:
        """Entry j cut to a crop starting at `offset` samples: frames [offset // hop, + n) per axis, zero-padded past
        the end of the utterance, plus `<axis>_valid` masks for the axes in `valid`."""
        e = self.entry(j)
        out = {}
        for f in self.fields:
            x = e[f.name]
            if f.axis:
                hop, n = self.crops[f.axis]
                start = offset // hop
                t = x.shape[0]
                if start >= t and t > 0 and f.axis not in self.valid:
                    raise ValueError(f"cache entry {j}: a crop at frame {start} starts past its {t} frames")
                n = t - start if n is None else n
                y = np.zeros((n, *x.shape[1:]), dtype=x.dtype)
                take = max(0, min(n, t - start))
                y[:take] = x[start : start + take]
                x = y
            out[f.name] = torch.from_numpy(np.array(x))
        for axis in self.valid:
            hop, n = self.crops[axis]
            t = int(self.frames[j, self.axes.index(axis)])
            start = offset // hop
            out[f"{axis}_valid"] = torch.arange(n) < max(0, min(n, t - start))
        return out
