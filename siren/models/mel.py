"""Log-mel front end: 16 kHz audio → 80-bin natural-log mel at 50 frames/s, aligned with HuBERT's frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torchaudio
from torch import nn

from siren.errors import SirenError
from siren.models.precision import fp32_island


class MelSpectrogram(nn.Module):
    """wav (B, N) → log-mel (B, n_mels, N // hop_length); magnitude mel, natural log, clamped at 1e-5."""

    def __init__(
        self,
        sample_rate: int,
        n_mels: int,
        hop_length: int,
        n_fft: int,
        win_length: int,
        f_min: float,
        f_max: float,
    ):
        super().__init__()
        self.hop_length = hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            f_min=f_min,
            f_max=f_max,
            n_mels=n_mels,
            power=1.0,
            center=True,
        )

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length

    @fp32_island
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 2:
            raise ValueError(f"expected wav (B, N), got shape {tuple(wav.shape)}")
        mel = self.mel(wav.float())
        # center=True yields N // hop + 1 frames; drop the last so frame t covers samples [t·hop, (t+1)·hop).
        return torch.log(mel[..., : self.num_frames(wav.shape[-1])].clamp_min(1e-5))


# ---------------------------------------------------------------------------------------------------------- mel domains
class MelDomainError(SirenError, ValueError):
    """Two components exchange mels in domains that no exact conversion links (other filterbank, other hop)."""


@dataclass(frozen=True)
class MelDomain:
    """What a mel tensor means (docs/bring-your-own-codec.md): the filterbank (sample_rate, n_fft, n_mels, f_min, f_max), the frame hop,
    the log base (`ln` or `log10`), magnitude (power 1) or power (2) spectrum, and an affine normalisation
    (stored = (log value − shift) / scale). A component declares its own as a `mel_domain` attribute; one without it
    uses the run's `audio` front end (`MelDomain.of_audio`: natural-log magnitude, no normalisation)."""

    sample_rate: int
    n_fft: int
    n_mels: int
    hop: int
    f_min: float
    f_max: float
    log: str = "ln"
    power: int = 1
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if self.log not in LOG_BASES:
            raise MelDomainError(f"mel log base must be one of {sorted(LOG_BASES)}, got {self.log!r}")
        if self.power not in (1, 2):
            raise MelDomainError(f"mel power must be 1 (magnitude) or 2 (power), got {self.power!r}")
        if self.scale == 0:
            raise MelDomainError("mel normalisation scale must be non-zero")

    @classmethod
    def of_audio(cls, audio, **changes) -> MelDomain:
        """The run's front end (`audio` config section: `MelSpectrogram`'s domain), with `changes` applied."""
        base = cls(audio.sample_rate, audio.n_fft, audio.n_mels, audio.hop_length, audio.f_min, audio.f_max)
        return replace(base, **changes)

    def grid(self) -> tuple:
        return (self.sample_rate, self.n_fft, self.n_mels, self.hop, self.f_min, self.f_max)


LOG_BASES = {"ln": math.e, "log10": 10.0}
_GRID_FIELDS = ("sample_rate", "n_fft", "n_mels", "hop", "f_min", "f_max")


def convert_mel(mel: torch.Tensor, src: MelDomain, dst: MelDomain, what: str = "mel") -> torch.Tensor:
    """Exact conversion between two domains on the same filterbank and hop: log base, magnitude ↔ power and the
    normalisation are all affine in the log domain (log_b(M^p) = p · ln M / ln b). Anything else raises."""
    differ = [f"{f} {getattr(src, f)} vs {getattr(dst, f)}" for f in _GRID_FIELDS if getattr(src, f) != getattr(dst, f)]
    if differ:
        raise MelDomainError(
            f"{what}: no exact conversion between these mel domains ({'; '.join(differ)}): a different filterbank "
            "or hop would need resampling, which changes the signal; use components that share the mel front end"
        )
    if src == dst:
        return mel
    ln_mag = (mel * src.scale + src.shift) * (math.log(LOG_BASES[src.log]) / src.power)
    value = ln_mag * (dst.power / math.log(LOG_BASES[dst.log]))
    return (value - dst.shift) / dst.scale


def domain_of(module, default: MelDomain | None) -> MelDomain | None:
    """A component's declared `mel_domain`, else `default` (the run's front end)."""
    return getattr(module, "mel_domain", None) or default
