"""Log-mel front end: 16 kHz audio → 80-bin natural-log mel at 50 frames/s, aligned with HuBERT's frames."""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

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
