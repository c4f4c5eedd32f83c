"""ACME's codec networks. Nothing here knows SIREN: channel-first (B, C, T) tensors, tuples and dicts as outputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SpeechAnalyzer(nn.Module):
    """(B, feat_ch, T) → (sem (B, sem_ch, T/2), pro (B, pro_ch, T/8), spk (B, spk_ch)). T must be a multiple of 8."""

    def __init__(self, feat_ch: int, width: int, sem_ch: int, pro_ch: int, spk_ch: int):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv1d(feat_ch, width, 3, padding=1), nn.GELU(), nn.Conv1d(width, width, 3, padding=1), nn.GELU()
        )
        self.heads = nn.ModuleDict(
            {
                "semantic": nn.Conv1d(width, sem_ch, kernel_size=2, stride=2),
                "prosodic": nn.Conv1d(width, pro_ch, kernel_size=8, stride=8),
            }
        )
        self.speaker = nn.Linear(width, spk_ch)

    def forward(self, x: torch.Tensor):
        h = self.trunk(x)
        return self.heads["semantic"](h), self.heads["prosodic"](h), self.speaker(h.mean(-1))


class ScalarGrid(nn.Module):
    """Channel-first finite scalar quantizer with one grid: (B, ch, T) → {"zq": (B, ch, T), "idx": (B, T)}."""

    def __init__(self, ch: int, grid: list[int]):
        super().__init__()
        self.grid = list(grid)
        self.down = nn.Conv1d(ch, len(grid), 1)
        self.up = nn.Conv1d(len(grid), ch, 1)
        self.register_buffer("radix", torch.cumprod(torch.tensor([1, *grid[:-1]]), 0), persistent=False)
        self.register_buffer("halfw", torch.tensor([(g - 1) / 2 for g in grid])[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> dict:
        z = torch.tanh(self.down(x)) * self.halfw
        q = z + (torch.round(z) - z).detach()
        idx = ((q.detach() + self.halfw).round().long() * self.radix[:, None]).sum(1)
        return {"zq": self.up(q / self.halfw), "idx": idx}

    def from_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, ch, T)."""
        g = torch.tensor(self.grid, device=idx.device)[:, None]
        digits = (idx[:, None, :] // self.radix[:, None]) % g
        return self.up((digits.float() - self.halfw) / self.halfw)


class VoiceTable(nn.Module):
    """Speaker vector (B, ch) → nearest entry of `books` tables of `entries` each; returns (zq, idx (B, books))."""

    def __init__(self, ch: int, books: int, entries: int):
        super().__init__()
        self.books = books
        self.table = nn.Parameter(torch.randn(books, entries, ch // books))

    def forward(self, x: torch.Tensor):
        xs = x.view(x.shape[0], self.books, -1)
        idx = torch.cdist(xs.transpose(0, 1), self.table).argmin(-1).transpose(0, 1)
        zq = self.lookup(idx)
        return x + (zq - x).detach(), idx

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        b = torch.arange(self.books, device=idx.device)[None].expand_as(idx)
        return self.table[b, idx].reshape(idx.shape[0], -1)


class ByteRate(nn.Module):
    """Rate-only entropy model: each code is written as bytes (little-endian, `num_bytes` per code); a small GRU
    predicts each byte from the previous ones and reports bits per code. It never exposes per-code probabilities."""

    def __init__(self, num_bytes: int, hidden: int):
        super().__init__()
        self.num_bytes = num_bytes
        self.emb = nn.Embedding(257, hidden)  # 256 byte values + start
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 256)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) long → bits (B, T) per code."""
        b, t = codes.shape
        by = torch.stack([(codes >> (8 * i)) & 255 for i in range(self.num_bytes)], -1).reshape(b, -1)
        inp = torch.cat([torch.full_like(by[:, :1], 256), by[:, :-1]], 1)
        h, _ = self.rnn(self.emb(inp))
        nll = F.cross_entropy(self.out(h).transpose(1, 2), by, reduction="none")  # (B, T·nb) nats
        return nll.view(b, t, self.num_bytes).sum(-1) / math.log(2)


class WaveSynth(nn.Module):
    """(sem (B, s, Ts), pro (B, p, Tp), spk (B, k)) → waveform (B, 1, Ts · 2 · hop)."""

    def __init__(self, sem_ch: int, pro_ch: int, spk_ch: int, width: int, hop: int):
        super().__init__()
        self.hop = hop
        self.mix = nn.Conv1d(sem_ch + pro_ch + spk_ch, width, 3, padding=1)
        self.to_samples = nn.Conv1d(width, hop, 1)

    def forward(self, sem, pro, spk):
        t = sem.shape[-1] * 2
        x = torch.cat(
            [sem.repeat_interleave(2, -1), pro.repeat_interleave(8, -1)[..., :t], spk[..., None].expand(-1, -1, t)], 1
        )
        frames = self.to_samples(torch.tanh(self.mix(x)))  # (B, hop, T)
        return 0.1 * torch.tanh(frames).transpose(1, 2).reshape(sem.shape[0], 1, -1)


class Conditioner(nn.Module):
    """Same inputs as WaveSynth → conditioning (B, cond_ch, 2·Ts) for the mel flow."""

    def __init__(self, sem_ch: int, pro_ch: int, spk_ch: int, cond_ch: int):
        super().__init__()
        self.cond_ch = cond_ch
        self.proj = nn.Conv1d(sem_ch + pro_ch + spk_ch, cond_ch, 3, padding=1)

    def forward(self, sem, pro, spk):
        t = sem.shape[-1] * 2
        x = torch.cat(
            [sem.repeat_interleave(2, -1), pro.repeat_interleave(8, -1)[..., :t], spk[..., None].expand(-1, -1, t)], 1
        )
        return self.proj(x)


class Log10PowerMelFlow(nn.Module):
    """Rectified flow on log10-power mels (B, n_mels, T) conditioned on (B, cond_ch, T)."""

    def __init__(self, n_mels: int, cond_ch: int, width: int):
        super().__init__()
        self.n_mels = n_mels
        self.net = nn.Sequential(
            nn.Conv1d(n_mels + cond_ch + 1, width, 3, padding=1), nn.GELU(), nn.Conv1d(width, n_mels, 1)
        )

    def velocity(self, x, t, cond):
        return self.net(torch.cat([x, cond, t[:, None, None].expand(-1, 1, x.shape[-1])], 1))

    def training_loss(self, x1, cond):
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        return F.mse_loss(self.velocity(xt, t, cond), x1 - x0)

    @torch.no_grad()
    def generate(self, cond, n_steps: int, rng=None):
        x = torch.randn(cond.shape[0], self.n_mels, cond.shape[-1], generator=rng, device=cond.device)
        for i in range(n_steps):
            t = torch.full((cond.shape[0],), i / n_steps, device=cond.device)
            x = x + self.velocity(x, t, cond) / n_steps
        return x - 2.0  # log10 power of quiet speech sits around −2


class Log10PowerMelVocoder(nn.Module):
    """log10-power mel (B, n_mels, T) → (B, 1, T · hop)."""

    def __init__(self, n_mels: int, width: int, hop: int):
        super().__init__()
        self.hop = hop
        self.body = nn.Sequential(nn.Conv1d(n_mels, width, 3, padding=1), nn.GELU(), nn.Conv1d(width, hop, 1))

    def forward(self, mel):
        frames = torch.tanh(self.body(mel + 2.0)) * 0.1
        return frames.transpose(1, 2).reshape(mel.shape[0], 1, -1)


class StreamRates(nn.Module):
    """ACME's entropy model: one ByteRate per stream, keyed by ACME's own stream names."""

    def __init__(self, num_bytes: int, hidden: int):
        super().__init__()
        self.by_stream = nn.ModuleDict({k: ByteRate(num_bytes, hidden) for k in ("semantic", "prosodic")})


class FrameEncoder(nn.Module):
    """ACME's small distilled speech encoder: wav (B, N) → (B, out_ch, T), channel-first, one strided conv front end
    and a pointwise stack (what ACME used instead of a TinyHubert). Its window is HuBERT's receptive field (hop × 5/4,
    400 samples at a 320 hop, no padding), so it gives the teacher's frames one for one: T = (N - window) // hop + 1."""

    def __init__(self, hop: int, width: int, out_ch: int):
        super().__init__()
        self.stride = hop
        self.window = hop + hop // 4
        self.frontend = nn.Conv1d(1, width, kernel_size=self.window, stride=hop)
        self.mix = nn.Sequential(nn.GELU(), nn.Conv1d(width, width, 1), nn.GELU(), nn.Conv1d(width, out_ch, 1))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.mix(self.frontend(wav[:, None]))
