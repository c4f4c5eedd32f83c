"""Training dataset over a columnar manifest: nothing opened at start, crops read only their frames, bad files replaced.

Start-up trusts the manifest (`duration`, and `sample_rate`/`channels` when present) and only does vectorised checks,
so it costs the same for 1,000 or 1,000,000 rows; a file that turns out unreadable, short, non-finite or of an unusable
format when loaded is replaced deterministically by the next usable one and counted (docs/scale.md).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from siren.data.audio import AudioError, format_problem, read_audio
from siren.data.manifest import ManifestError, ManifestTable, Utterance, row_problems

log = logging.getLogger("siren")


class Rows(Sequence):
    """The dataset's rows as `Utterance` objects, built on access (no list of a million objects)."""

    def __init__(self, table: ManifestTable, rows: np.ndarray):
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.table[int(r)] for r in self.rows[i]]
        return self.table[int(self.rows[i])]


def start_exclusions(table: ManifestTable, sample_rate: int, min_samples: int, policy: str) -> dict[int, str]:
    """Rows the manifest already shows to be unusable → reason (`siren.data.manifest.row_problems`)."""
    return row_problems(table, sample_rate, min_samples, policy)


class LoadFailures:
    """The rows whose file failed to load, in two fixed-size arrays (never one Python object per file or per row):

    - `seen`: one byte per row in shared memory. The process that meets a bad file (a DataLoader worker or the main
      process) marks its row, so no worker of this rank reads that file again.
    - `counted`: one bit per row, the rows that every rank has agreed are bad; identical on every rank, so `count`
      (their number) is a count of distinct files whatever the number of processes or workers.

    The main process `note`s the rows each batch reports; when any rank noted a new one, every rank calls `sync` with
    a gather collective (rare: once per step in which a new bad file was met) and all add the same rows.
    """

    def __init__(self, n_rows: int):
        self.n_rows = int(n_rows)
        self.seen = torch.zeros(max(1, self.n_rows), dtype=torch.uint8).share_memory_()
        self.counted = np.zeros((self.n_rows + 7) // 8, dtype=np.uint8)
        self.count = 0
        self.pending: set[int] = set()  # noted since the last sync: at most the rows one step met

    def _is_counted(self, row: int) -> bool:
        return bool(self.counted[row >> 3] & (1 << (row & 7)))

    def note(self, rows) -> int:
        """Rows a batch reports as failed (main process) → how many this rank had not noted or counted yet."""
        new = 0
        for r in rows:
            r = int(r)
            if not self._is_counted(r) and r not in self.pending:
                self.pending.add(r)
                self.seen[r] = 1
                new += 1
        return new

    def sync(self, gather) -> int:
        """Every rank: add the rows any rank noted (`gather(obj)` → every rank's obj) → how many were new."""
        rows = sorted(set().union(*(set(p) for p in gather(sorted(self.pending)))))
        self.pending.clear()
        return self.add(rows)

    def add(self, rows) -> int:
        new = 0
        for r in rows:
            r = int(r)
            if not 0 <= r < self.n_rows:
                raise IndexError(f"failed row {r} is outside the manifest's {self.n_rows} rows")
            if not self._is_counted(r):
                self.counted[r >> 3] |= np.uint8(1 << (r & 7))
                self.seen[r] = 1
                new += 1
        self.count += new
        return new

    def rows(self) -> np.ndarray:
        """The counted rows, ascending."""
        return np.nonzero(np.unpackbits(self.counted, bitorder="little")[: self.n_rows])[0]


class AudioDataset(torch.utils.data.Dataset):
    """Utterances as fixed-length segments (or whole, `segment_samples=None`).

    Index with `i` (the current `epoch`) or `(epoch, i)`: crops depend on (seed, epoch, i) only, so any worker or
    process reproduces them, and a persistent DataLoader needs no per-epoch state in its workers.

    Items: wav (S,) float32, length (valid samples before padding), offset (crop start, a multiple of `align`),
    index, row (manifest row), id, speaker, replaced_from (path of a file that failed to load and was replaced by this
    item, or None), plus one entry per attached cache view (`attach`).

    `on_format_mismatch`: `resample_down` (default: higher rates resampled down, several channels mixed to mono, lower
    rates skipped), `skip` (anything but mono at `sample_rate` skipped) or `convert` (everything resampled and mixed).
    """

    def __init__(
        self,
        utterances: ManifestTable | Sequence[Utterance],
        sample_rate: int,
        segment_samples: int | None,
        min_samples: int,
        seed: int = 0,
        align: int = 1,
        train: bool = True,
        on_format_mismatch: str = "resample_down",
    ):
        if segment_samples is not None and segment_samples <= 0:
            raise ValueError(f"segment_samples must be positive or None, got {segment_samples}")
        if align <= 0:
            raise ValueError(f"align must be positive, got {align}")
        format_problem(sample_rate, 1, sample_rate, on_format_mismatch)  # validates the policy name
        table = utterances if isinstance(utterances, ManifestTable) else ManifestTable.from_utterances(utterances)
        self.table = table
        self.sample_rate, self.segment_samples, self.min_samples = sample_rate, segment_samples, min_samples
        self.seed, self.align, self.train, self.policy = seed, align, train, on_format_mismatch
        self.epoch = 0
        self.load_failures = 0  # reads that failed in this process (a file fails once per process, then is known)
        self.decoded_bytes = 0  # read amplification: float32 bytes decoded vs bytes of the items returned
        self.used_bytes = 0
        self.views: dict[str, object] = {}
        excluded = start_exclusions(table, sample_rate, min_samples, on_format_mismatch)
        self.skipped: dict[str, str] = {table.path(r): why for r, why in excluded.items()}
        keep = np.ones(len(table), dtype=bool)
        keep[list(excluded)] = False
        self.rows = np.nonzero(keep)[0].astype(np.int64)
        self.excluded_count = len(excluded)
        self.failures = LoadFailures(len(table))
        if self.skipped:
            first = next(iter(self.skipped.items()))
            log.warning(
                "dataset: %d of %d files excluded by their manifest entry (e.g. %s: %s); see dataset.skipped",
                self.excluded_count,
                len(table),
                *first,
            )
        if not len(self.rows):
            reasons = "; ".join(f"{p}: {r}" for p, r in list(self.skipped.items())[:5])
            raise ManifestError(
                f"no usable utterances: all {len(table)} manifest entries were excluded "
                f"(min_samples={min_samples} at {sample_rate} Hz). First problems: {reasons or 'empty manifest'}"
            )

    @property
    def utterances(self) -> Rows:
        return Rows(self.table, self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """The epoch used when items are requested by a plain index."""
        self.epoch = int(epoch)

    def attach(self, name: str, view) -> None:
        """Add `view.item(j, offset, length)` to every item j under `name` (e.g. cached features cut to the crop).

        From now on crops start on a multiple of every hop the view cuts by (its frame geometry, e.g. the feature hop
        and the semantic and prosody code hops), so a cached frame of the whole utterance is the crop's frame."""
        self.views[name] = view
        hops = [int(hop) for hop, _ in getattr(view, "crops", {}).values()]
        self.align = math.lcm(self.align, *hops)

    def load_full(self, j: int) -> torch.Tensor:
        """Item j's whole utterance (N,) under this dataset's format policy (what caches are computed from)."""
        path = self.table.path(int(self.rows[j]))
        return read_audio(path, self.sample_rate, policy=self.policy, min_samples=self.min_samples).wav

    def crop_offset(self, i: int, num_samples: int, epoch: int | None = None) -> int:
        """Crop start for item i of an utterance with `num_samples` samples: a multiple of `align`, 0 when not training."""
        if not self.train or self.segment_samples is None or num_samples <= self.segment_samples:
            return 0
        epoch = self.epoch if epoch is None else epoch
        # String seeds hash with SHA-512 inside `random`, independent of PYTHONHASHSEED, worker or process.
        rng = random.Random(f"siren-crop:{self.seed}:{epoch}:{i}")
        return self.align * rng.randint(0, (num_samples - self.segment_samples) // self.align)

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        n = len(self.rows)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} utterances")
        seg = self.segment_samples

        def crop(total: int) -> tuple[int, int]:
            return self.crop_offset(i, total, epoch), (total if seg is None else seg)

        replaced_from, failed_rows = None, []
        seen = self.failures.seen
        for k in range(n):
            j = (i + k) % n
            row = int(self.rows[j])
            if seen[row]:  # failed before, here or in another worker of this rank (or agreed by all ranks): not read
                failed_rows.append(row)
                replaced_from = replaced_from or self.table.path(row)
                continue
            path = self.table.path(row)
            try:
                dec = read_audio(path, self.sample_rate, policy=self.policy, crop=crop, min_samples=self.min_samples)
                extra = {name: v.item(j, dec.offset, dec.wav.shape[0]) for name, v in self.views.items()}
            except AudioError as exc:
                # Data past the header can still be bad; replace deterministically (the next usable row, as a known
                # bad row is skipped the same way) instead of training on zeros.
                log.warning("dataset: %s failed to load (%s); replaced by the next usable utterance", path, exc.reason)
                seen[row] = 1
                self.skipped[path] = exc.reason
                self.load_failures += 1
                failed_rows.append(row)
                replaced_from = replaced_from or path
                continue
            self.decoded_bytes += dec.decoded_bytes
            self.used_bytes += dec.used_bytes
            return self._item(dec, j, row, replaced_from, extra, failed_rows)
        raise RuntimeError(f"dataset: all {n} utterances failed to load; see dataset.skipped: {self.skipped}")

    def _item(self, dec, j: int, row: int, replaced_from: str | None, extra: dict, failed_rows=()) -> dict:
        wav = dec.wav
        length = wav.shape[0]
        if self.segment_samples is not None and length < self.segment_samples:
            wav = torch.nn.functional.pad(wav, (0, self.segment_samples - length))
        return {
            "wav": wav,
            "length": int(length),
            "offset": int(dec.offset),
            "index": j,
            "row": row,
            "id": self.table.ids[row],
            "speaker": self.table.speaker(row),
            "replaced_from": replaced_from,
            "failed_rows": list(failed_rows),  # every row skipped to make this item (known bad or failed just now)
            **extra,
        }


def build_dataset(cfg, val: bool = False, min_samples: int = 0) -> AudioDataset:
    """The train (or val) dataset of a config; the trainer and `siren cache` both build it here, so they agree on the
    rows and therefore on the cache keys. Rows shorter than `data.min_seconds` or than `min_samples` (the shortest clip
    the run's models can encode, from their frame geometry) are excluded and counted when it opens."""
    from siren.data.manifest import read_table

    d, sr = cfg.data, cfg.audio.sample_rate
    return AudioDataset(
        read_table(d.val if val else d.train, text=False),
        sr,
        int(d.segment_seconds * sr),
        max(int(d.min_seconds * sr), int(min_samples)),
        seed=cfg.train.seed,
        train=not val,
        on_format_mismatch=d.on_format_mismatch,
    )


def restored_failures(ds: AudioDataset, data_meta: dict) -> list[int]:
    """The failed rows a checkpoint's meta recorded (`data.load_failed_rows`, checked against the paths it names); a
    meta from before rows were recorded, or of another manifest, is matched by path."""
    rows = data_meta.get("load_failed_rows")
    paths = list(data_meta.get("load_failed", []))
    n = len(ds.table)
    if rows is not None and len(rows) == len(paths):
        if all(0 <= int(r) < n and ds.table.path(int(r)) == p for r, p in zip(rows, paths, strict=True)):
            return [int(r) for r in rows]
    if not paths:
        return []
    wanted = set(paths)  # one pass over the manifest, only when resuming an old or re-ordered run with failures
    return [r for r in range(n) if ds.table.path(r) in wanted]


class EpochBatchSampler:
    """Batch sampler for one long-lived DataLoader: yields batches of `(epoch, index)` keys from `start(epoch, pos)`
    on, through every later epoch. `batches.epoch(e)` gives epoch e's batches (this rank's share) and
    `batches.num_batches` their count. Keys carry the epoch, so persistent workers need no per-epoch state."""

    def __init__(self, batches):
        self.batches = batches
        self.position = (0, 0)

    def start(self, epoch: int, pos: int) -> None:
        self.position = (int(epoch), int(pos))

    def __iter__(self):
        epoch, pos = self.position
        while True:
            for b in self.batches.epoch(epoch)[pos:]:
                yield [(epoch, i) for i in b]
            epoch, pos = epoch + 1, 0


def collate(items: list[dict]) -> dict:
    """Stack items: wav (B, N) zero-padded to the longest, lengths/offsets/index/rows (B,) long, ids, speakers, replaced,
    and each attached view stacked."""
    if not items:
        raise ValueError("collate got an empty batch")
    n = max(it["wav"].shape[0] for it in items)
    wav = torch.zeros(len(items), n, dtype=torch.float32)
    for b, it in enumerate(items):
        wav[b, : it["wav"].shape[0]] = it["wav"]
    return {
        "wav": wav,
        "lengths": torch.tensor([it["length"] for it in items], dtype=torch.long),
        "offsets": torch.tensor([it["offset"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "rows": torch.tensor([it["row"] for it in items], dtype=torch.long),
        "ids": [it["id"] for it in items],
        "speakers": [it["speaker"] for it in items],
        "replaced": [it["replaced_from"] for it in items if it["replaced_from"] is not None],
        "failed_rows": [r for it in items for r in it.get("failed_rows", ())],
        **{k: _stack([it[k] for it in items]) for k in items[0] if k not in _ITEM_KEYS},
    }


_ITEM_KEYS = {"wav", "length", "offset", "index", "row", "id", "speaker", "replaced_from", "failed_rows"}


def _stack(values: list):
    """Attached views: a tensor per item → (B, ...); a dict of tensors per item → dict of (B, ...)."""
    if isinstance(values[0], dict):
        return {k: torch.stack([v[k] for v in values]) for k in values[0]}
    return torch.stack(values)


def speaker_balanced_subset(utterances: list[Utterance], n: int, seed: int) -> list[Utterance]:
    """n utterances taken round-robin over speakers (sorted), each speaker's utterances in seeded order by id."""
    by_spk: dict[str, list[Utterance]] = defaultdict(list)
    for u in sorted(utterances, key=lambda u: u.id):
        by_spk[u.speaker].append(u)
    queues = []
    for spk in sorted(by_spk):
        q = list(by_spk[spk])
        random.Random(f"siren-eval:{seed}:{spk}").shuffle(q)
        queues.append(q)
    out: list[Utterance] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return out
