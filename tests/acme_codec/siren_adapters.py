"""ACME → SIREN adapters: each wraps one ACME network (kept as `self.net`, so its weights are saved, frozen and
fingerprinted) and presents it in the shape of its SIREN role (siren/models/roles.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from siren.models.factorizer import FactorizerOutput
from siren.models.mel import MelDomain, MelSpectrogram
from siren.models.quantizers import QuantizedResult


class AnalyzerAsFactorizer(nn.Module):
    """feats (B, T, D) channel-last → FactorizerOutput channel-last; T cropped to a multiple of 8."""

    sem_downsample = 2
    pro_downsample = 8

    def __init__(self, net: nn.Module, input_dim: int):
        super().__init__()
        self.net, self.input_dim = net, input_dim

    def forward(self, feats: torch.Tensor) -> FactorizerOutput:
        t = feats.shape[1] // self.pro_downsample * self.pro_downsample
        sem, pro, spk = self.net(feats[:, :t].transpose(1, 2))
        return FactorizerOutput(sem=sem.transpose(1, 2), pro=pro.transpose(1, 2), spk=spk)


class GridAsQuantizer(nn.Module):
    """(B, T, C) → QuantizedResult with codes (B, T, 1): one level of `prod(grid)` codes."""

    num_levels = 1

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def codebook_size(self) -> int:
        return math.prod(self.net.grid)

    @property
    def bits_per_code(self) -> float:
        return math.log2(self.codebook_size)

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        out = self.net(x.transpose(1, 2))
        return QuantizedResult(
            quantized=out["zq"].transpose(1, 2), codes=out["idx"][..., None], commit_loss=x.new_zeros(())
        )

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net.from_idx(codes[..., 0]).transpose(1, 2)


class TableAsSpeakerQuantizer(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def codebook_size(self) -> int:
        return self.net.table.shape[1]

    @property
    def num_codebooks(self) -> int:
        return self.net.books

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        zq, idx = self.net(x)
        return QuantizedResult(quantized=zq, codes=idx, commit_loss=(zq.detach() - x).pow(2).mean())

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net.lookup(codes)


@dataclass
class RateOnly:
    bits: dict
    total_bits: dict
    loss: torch.Tensor


class ByteRateAsEntropyModel(nn.Module):
    """ACME's StreamRates for SIREN's `sem`/`pro` streams. Rate only: there is deliberately no `coder(stream)`."""

    STREAMS = {"sem": "semantic", "pro": "prosodic"}

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, codes: dict, lengths: dict | None = None) -> RateOnly:
        bits, total, losses = {}, {}, []
        for s, acme in self.STREAMS.items():
            b = self.net.by_stream[acme](codes[s][..., 0])  # (B, T)
            t = b.shape[1]
            n = lengths[s] if lengths is not None else torch.full((b.shape[0],), t, device=b.device)
            mask = (torch.arange(t, device=b.device)[None] < n[:, None]).to(b.dtype)
            bits[s], total[s] = b, (b * mask).sum(1)
            losses.append((b * mask).sum() / mask.sum().clamp_min(1) * math.log(2))
        return RateOnly(bits=bits, total_bits=total, loss=sum(losses) / len(losses))


class WaveSynthAsDecoder(nn.Module):
    """Latents → ACME waveform → SIREN's front-end mel (B, n_mels, T): the decoder role judges through a mel."""

    def __init__(self, net: nn.Module, sample_rate: int, n_mels: int, hop: int, n_fft: int, f_min: float, f_max: float):
        super().__init__()
        self.net = net
        self.front = MelSpectrogram(sample_rate, n_mels, hop, n_fft, n_fft, f_min, f_max)

    def forward(self, sem, pro, spk):
        wav = self.net(sem.transpose(1, 2), pro.transpose(1, 2), spk)[:, 0]
        return self.front(wav)


class ConditionerAsFuser(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.cond_dim = net.cond_ch

    def forward(self, sem, pro, spk):
        return self.net(sem.transpose(1, 2), pro.transpose(1, 2), spk).transpose(1, 2)


def _acme_domain(sample_rate, n_mels, hop, n_fft, f_min, f_max) -> MelDomain:
    return MelDomain(sample_rate, n_fft, n_mels, hop, float(f_min), float(f_max), log="log10", power=2)


class MelFlowAsFlow(nn.Module):
    """SIREN's flow role over ACME's log10-power mel flow; declares its mel domain so SIREN converts exactly."""

    def __init__(self, net: nn.Module, sample_rate: int, n_mels: int, hop: int, n_fft: int, f_min: float, f_max: float):
        super().__init__()
        self.net = net
        self.mel_domain = _acme_domain(sample_rate, n_mels, hop, n_fft, f_min, f_max)

    def sample(self, cond, steps, solver="euler", generator=None):
        return self.net.generate(cond.transpose(1, 2), steps, rng=generator)

    def loss(self, mel, cond, generator=None):
        return self.net.training_loss(mel, cond.transpose(1, 2))


class MelVocoderAsVocoder(nn.Module):
    def __init__(self, net: nn.Module, sample_rate: int, n_mels: int, hop: int, n_fft: int, f_min: float, f_max: float):
        super().__init__()
        self.net = net
        self.hop_length = net.hop
        self.mel_domain = _acme_domain(sample_rate, n_mels, hop, n_fft, f_min, f_max)

    def forward(self, mel):
        return self.net(mel)[:, 0]


class EncoderAsFeatures(nn.Module):
    """ACME's FrameEncoder as a SIREN feature extractor: wav (B, N) → (B, T, out_ch) channel-last."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def dim(self) -> int:
        return self.net.mix[-1].out_channels

    def num_frames(self, num_samples: int) -> int:
        if num_samples < self.net.window:
            return 0
        return (num_samples - self.net.window) // self.net.stride + 1

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.net(wav).transpose(1, 2)
