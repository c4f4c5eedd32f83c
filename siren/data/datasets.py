"""Training dataset: deterministic crops (exact resume), bad files excluded up front or replaced deterministically."""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import torch

from siren.data.audio import AudioError, audio_info, load_audio
from siren.data.manifest import Utterance

log = logging.getLogger("siren")


def _resampled_length(frames: int, file_rate: int, sample_rate: int) -> int:
    # torchaudio's resample returns ceil(frames * new / orig) samples.
    return -(-frames * sample_rate // file_rate)


class AudioDataset(torch.utils.data.Dataset):
    """Utterances as fixed-length segments (or whole, `segment_samples=None`).

    Items: wav (S,) float32, length (valid samples before padding), offset (crop start, a multiple of `align`),
    index, id, speaker, replaced_from (path of a file that failed to load and was replaced by this item, or None).

    A file at another sample rate or with several channels is excluded and counted like a corrupt one, unless `convert`
    (config `data.on_format_mismatch: convert`): then it is resampled and mixed down to mono when loaded.
    """

    def __init__(
        self,
        utterances: list[Utterance],
        sample_rate: int,
        segment_samples: int | None,
        min_samples: int,
        seed: int = 0,
        align: int = 2560,
        train: bool = True,
        convert: bool = False,
    ):
        if segment_samples is not None and segment_samples <= 0:
            raise ValueError(f"segment_samples must be positive or None, got {segment_samples}")
        if align <= 0:
            raise ValueError(f"align must be positive, got {align}")
        self.sample_rate, self.segment_samples, self.min_samples = sample_rate, segment_samples, min_samples
        self.seed, self.align, self.train = seed, align, train
        self.epoch = 0
        self.skipped: dict[str, str] = {}
        self.load_failures = 0
        self.utterances: list[Utterance] = []
        # Header probes only: cheap, and they catch missing/unreadable/empty/short files before training starts.
        for u in utterances:
            try:
                sr, frames, channels = audio_info(u.path)
            except AudioError as exc:
                self.skipped[u.path] = exc.reason
                continue
            n = _resampled_length(frames, sr, sample_rate)
            if not convert and sr != sample_rate:
                self.skipped[u.path] = f"sample rate {sr} Hz, expected {sample_rate} Hz (data.on_format_mismatch=skip)"
            elif not convert and channels != 1:
                self.skipped[u.path] = f"{channels} channels, expected mono (data.on_format_mismatch=skip)"
            elif frames == 0:
                self.skipped[u.path] = "empty audio (0 samples)"
            elif n < min_samples:
                self.skipped[u.path] = f"too short: {n} samples at {sample_rate} Hz < min_samples {min_samples}"
            else:
                self.utterances.append(u)
        if self.skipped:
            first = next(iter(self.skipped.items()))
            log.warning(
                "dataset: %d of %d files excluded (e.g. %s: %s); see dataset.skipped",
                len(self.skipped),
                len(utterances),
                *first,
            )
        if not self.utterances:
            reasons = "; ".join(f"{p}: {r}" for p, r in list(self.skipped.items())[:5])
            raise ValueError(
                f"no usable utterances: all {len(utterances)} manifest entries were excluded "
                f"(min_samples={min_samples} at {sample_rate} Hz). First problems: {reasons or 'empty manifest'}"
            )

    def __len__(self) -> int:
        return len(self.utterances)

    def set_epoch(self, epoch: int) -> None:
        """Crops depend on (seed, epoch, index) only, so any process reproduces them."""
        self.epoch = int(epoch)

    def crop_offset(self, i: int, num_samples: int) -> int:
        """Crop start for item i of an utterance with `num_samples` samples: a multiple of `align`, 0 when not training."""
        if not self.train or self.segment_samples is None or num_samples <= self.segment_samples:
            return 0
        # String seeds hash with SHA-512 inside `random`, independent of PYTHONHASHSEED, worker or process.
        rng = random.Random(f"siren-crop:{self.seed}:{self.epoch}:{i}")
        return self.align * rng.randint(0, (num_samples - self.segment_samples) // self.align)

    def __getitem__(self, i: int) -> dict:
        n = len(self.utterances)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} utterances")
        replaced_from = None
        for k in range(n):
            j = (i + k) % n
            u = self.utterances[j]
            try:
                wav = load_audio(u.path, self.sample_rate)
            except AudioError as exc:
                # Data past the header can still be bad; replace deterministically instead of training on zeros.
                if u.path not in self.skipped:
                    log.warning(
                        "dataset: %s failed to load (%s); replaced by the next usable utterance", u.path, exc.reason
                    )
                self.skipped[u.path] = exc.reason
                self.load_failures += 1
                replaced_from = replaced_from or u.path
                continue
            return self._item(wav, i, j, u, replaced_from)
        raise RuntimeError(f"dataset: all {n} utterances failed to load; see dataset.skipped: {self.skipped}")

    def _item(self, wav: torch.Tensor, i: int, j: int, u: Utterance, replaced_from: str | None) -> dict:
        offset = self.crop_offset(i, wav.shape[0])
        if self.segment_samples is not None:
            wav = wav[offset : offset + self.segment_samples]
            length = wav.shape[0]
            if length < self.segment_samples:
                wav = torch.nn.functional.pad(wav, (0, self.segment_samples - length))
        else:
            length = wav.shape[0]
        return {
            "wav": wav,
            "length": int(length),
            "offset": int(offset),
            "index": j,
            "id": u.id,
            "speaker": u.speaker,
            "replaced_from": replaced_from,
        }


def collate(items: list[dict]) -> dict:
    """Stack items: wav (B, N) zero-padded to the longest, lengths/offsets/index (B,) long, ids, speakers, replaced."""
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
        "ids": [it["id"] for it in items],
        "speakers": [it["speaker"] for it in items],
        "replaced": [it["replaced_from"] for it in items if it["replaced_from"] is not None],
    }


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
