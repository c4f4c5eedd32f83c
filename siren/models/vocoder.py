"""Vocoder: log-mel → waveform, Vocos-style (ConvNeXt backbone + iSTFT head), plus the multi-resolution STFT loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from siren.models.layers import ConvNeXtBlock

STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop); window = n_fft


class Vocoder(nn.Module):
    """mel (B, n_mels, T) → wav (B, T·hop_length). The head predicts log-magnitude and phase for torch.istft."""

    def __init__(self, n_mels: int, dim: int, intermediate_dim: int, num_blocks: int, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.embed = nn.Conv1d(n_mels, dim, kernel_size=7, padding=3)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, 7, layer_scale=1.0 / num_blocks) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3:
            raise ValueError(f"expected mel (B, n_mels, T), got {tuple(mel.shape)}")
        h = self.embed(mel)
        h = self.embed_norm(h.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        out = self.head(self.norm(h.transpose(1, 2))).transpose(1, 2).float()  # (B, n_fft + 2, T)
        log_mag, phase = out.chunk(2, dim=1)
        # Clamp before exp: an early large activation must not overflow to inf.
        mag = torch.exp(log_mag.clamp(max=1e2))
        spec = torch.polar(mag, phase)
        t = mel.shape[-1]
        return torch.istft(
            spec, self.n_fft, self.hop_length, self.n_fft, window=self.window, center=True, length=t * self.hop_length
        )


def _stft_mag(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, n_fft, window=window, center=True, return_complex=True)
    return spec.abs().clamp_min(1e-7)


def multi_resolution_stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred/target (B, N) → mean over 3 resolutions of spectral convergence + L1 of log magnitudes."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    total = pred.new_zeros(())
    for n_fft, hop in STFT_RESOLUTIONS:
        p, t = _stft_mag(pred.float(), n_fft, hop), _stft_mag(target.float(), n_fft, hop)
        sc = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-7)
        total = total + sc + F.l1_loss(p.log(), t.log())
    return total / len(STFT_RESOLUTIONS)
