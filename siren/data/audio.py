"""Audio I/O with soundfile (torchaudio.load needs torchcodec): read (crops of) files as mono float32 at a target rate,
resampling only what is read; save PCM_16."""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import soundfile as sf
import torch

from siren.errors import SirenError


class AudioError(SirenError):
    """An audio file cannot be used: missing, unreadable, empty, non-finite or too short."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Keep the exception picklable across DataLoader worker processes.
        return (type(self), (self.path, self.reason))


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """(sample_rate, frames, channels) from the header only."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(path, f"unreadable audio header ({exc})") from exc
    return int(info.samplerate), int(info.frames), int(info.channels)


FORMAT_POLICIES = ("resample_down", "skip", "convert")


def format_problem(file_rate: int, channels: int, sample_rate: int, policy: str) -> str | None:
    """Why a file of this rate/channel count is not used under `data.on_format_mismatch=policy`, or None."""
    if policy not in FORMAT_POLICIES:
        raise ValueError(f"unknown on_format_mismatch {policy!r}; choose one of {', '.join(FORMAT_POLICIES)}")
    if policy == "skip":
        if file_rate != sample_rate:
            return f"sample rate {file_rate} Hz, expected {sample_rate} Hz (data.on_format_mismatch=skip)"
        if channels != 1:
            return f"{channels} channels, expected mono (data.on_format_mismatch=skip)"
    if policy == "resample_down" and file_rate < sample_rate:
        return (
            f"sample rate {file_rate} Hz is below {sample_rate} Hz (narrowband; data.on_format_mismatch=resample_down "
            "skips it, `convert` upsamples it)"
        )
    return None


def resampled_length(frames: int, file_rate: int, sample_rate: int) -> int:
    """Samples at `sample_rate` of a `frames`-long file at `file_rate` (torchaudio's resample returns the ceiling)."""
    g = gcd(file_rate, sample_rate)
    return -(-frames * (sample_rate // g) // (file_rate // g))


def _margin(file_rate: int, sample_rate: int) -> int:
    """Target samples either side of a crop that cover torchaudio's sinc kernel (lowpass width 6, rolloff 0.99)."""
    g = gcd(file_rate, sample_rate)
    up, down = sample_rate // g, file_rate // g
    width_src = math.ceil(6 * down / (min(up, down) * 0.99)) + down + 1
    return math.ceil(width_src * up / down) + up


@functools.lru_cache(maxsize=16)
def _resampler(file_rate: int, sample_rate: int):
    """torchaudio's sinc resampler with its kernel built once per rate pair (per process), not once per crop."""
    import torchaudio.transforms as T

    return T.Resample(file_rate, sample_rate)


@dataclass
class Decoded:
    """A (cropped) waveform at the target rate and what reading it cost.

    wav (num,) float32 mono; offset/total: crop start and full length in target samples; decoded_bytes: float32 bytes
    decoded from the file (all channels, file rate) to produce it; used_bytes: the float32 bytes of the file that the
    crop spans (all channels, file rate), so decoded ÷ used is the read amplification."""

    wav: torch.Tensor
    offset: int
    total: int
    decoded_bytes: int
    used_bytes: int = 0


def read_audio(
    path: str | Path,
    sample_rate: int,
    *,
    policy: str = "convert",
    crop: Callable[[int], tuple[int, int]] | None = None,
    min_samples: int = 0,
) -> Decoded:
    """Read a file as mono float32 at `sample_rate`, decoding only the frames a crop needs.

    `crop(total) -> (start, num)` picks the crop in target samples from the file's full length; without it the whole
    file is read. A file at another rate is resampled over the crop plus a kernel margin (aligned to the resampler's
    phase), which gives the same samples as resampling the whole file. Every failure is an AudioError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            sr, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
            reason = format_problem(sr, channels, sample_rate, policy)
            if reason:
                raise AudioError(path, reason)
            if frames <= 0:
                raise AudioError(path, "empty audio (0 samples)")
            total = resampled_length(frames, sr, sample_rate)
            if total < min_samples:
                raise AudioError(path, f"too short: {total} samples at {sample_rate} Hz < min_samples {min_samples}")
            start, num = crop(total) if crop is not None else (0, total)
            num = max(0, min(num, total - start))
            if sr == sample_rate:
                t0, s0, s1 = start, start, start + num
            else:
                g = gcd(sr, sample_rate)
                up, down = sample_rate // g, sr // g
                margin = _margin(sr, sample_rate)
                t0 = max(0, start - margin) // up * up  # a phase-aligned start: resampler blocks line up
                s0 = t0 // up * down
                s1 = min(frames, -(-(start + num + margin) * down // up))
            f.seek(s0)
            data = f.read(s1 - s0, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        if isinstance(exc, AudioError):
            raise
        raise AudioError(path, f"unreadable or corrupt audio ({exc})") from exc
    if data.shape[0] != s1 - s0:
        raise AudioError(path, f"truncated: the header promises {frames} frames, frames {s0 + data.shape[0]}+ fail")
    wav = torch.from_numpy(data).mean(dim=1)
    if not torch.isfinite(wav).all():
        raise AudioError(path, f"{int((~torch.isfinite(wav)).sum())} non-finite (NaN/Inf) samples")
    if sr != sample_rate:
        wav = _resampler(sr, sample_rate)(wav)[start - t0 : start - t0 + num]
    used = round(num * sr / sample_rate) * channels * 4
    return Decoded(wav=wav.contiguous(), offset=start, total=total, decoded_bytes=int(data.size) * 4, used_bytes=used)


def load_audio(path: str | Path, sample_rate: int = 16000, min_seconds: float = 0.0) -> torch.Tensor:
    """Load a whole file as mono (mean of channels) float32 at `sample_rate` → (N,)."""
    dec = read_audio(path, sample_rate, policy="convert")
    if dec.wav.shape[0] < min_seconds * sample_rate:
        raise AudioError(path, f"too short: {dec.wav.shape[0] / sample_rate:.3f} s < min_seconds {min_seconds} s")
    return dec.wav


def save_audio(path: str | Path, wav: torch.Tensor, sample_rate: int) -> Path:
    """Write (N,) or (1, N) audio as PCM_16 wav atomically (tmp + os.replace); samples are clamped to [-1, 1]."""
    path = Path(path)
    wav = wav.detach().float().cpu()
    if wav.dim() == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.dim() != 1:
        raise ValueError(f"save_audio({path}): expected a (N,) or (1, N) tensor, got shape {tuple(wav.shape)}")
    if not torch.isfinite(wav).all():
        raise ValueError(f"save_audio({path}): the waveform has non-finite samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.wav")
    os.close(fd)
    try:
        sf.write(tmp, wav.clamp(-1.0, 1.0).numpy(), int(sample_rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temporary next to the target; the error itself propagates.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
