"""Audio I/O with soundfile (torchaudio.load needs torchcodec): load as mono float32 at a target rate, save PCM_16."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import soundfile as sf
import torch


class AudioError(RuntimeError):
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


def load_audio(path: str | Path, sample_rate: int = 16000, min_seconds: float = 0.0) -> torch.Tensor:
    """Load a file as mono (mean of channels) float32 at `sample_rate` → (N,)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(path, f"unreadable or corrupt audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(path, "empty audio (0 samples)")
    wav = torch.from_numpy(data).mean(dim=1)
    if not torch.isfinite(wav).all():
        raise AudioError(path, f"{int((~torch.isfinite(wav)).sum())} non-finite (NaN/Inf) samples")
    if sr != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, orig_freq=int(sr), new_freq=int(sample_rate))
    if wav.shape[0] < min_seconds * sample_rate:
        raise AudioError(path, f"too short: {wav.shape[0] / sample_rate:.3f} s < min_seconds {min_seconds} s")
    return wav.contiguous()


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
