"""The assembled codec: features → factorizer → quantizers → codes, and codes → (fuser → flow | decoder) → vocoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from siren.models.builders import PRO, SEM, SPK
from siren.models.quantizers import QuantizedResult


@dataclass
class Codes:
    """sem (B, Ts, L) long at 25 Hz, pro (B, Tp, L) long at 6.25 Hz, spk (B, G) long per utterance."""

    sem: torch.Tensor
    pro: torch.Tensor
    spk: torch.Tensor


class Codec(nn.Module):
    """Holds registry components in `self.components` (an nn.ModuleDict) and runs the encode/decode paths."""

    def __init__(
        self,
        components: dict[str, nn.Module],
        *,
        feature_extractor: str = "ssl",
        flow_steps: int = 8,
        flow_solver: Literal["euler", "midpoint"] = "euler",
    ):
        super().__init__()
        if feature_extractor not in ("ssl", "student_ssl"):
            raise ValueError(f"feature_extractor must be 'ssl' or 'student_ssl', got {feature_extractor!r}")
        self.components = nn.ModuleDict(components)
        self.feature_extractor = feature_extractor
        self.flow_steps, self.flow_solver = flow_steps, flow_solver

    def _need(self, *names: str) -> list[nn.Module]:
        missing = [n for n in names if n not in self.components]
        if missing:
            raise KeyError(f"codec is missing component(s) {missing}; it has {sorted(self.components)}")
        return [self.components[n] for n in names]

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, N) → (B, T, D) at 50 Hz from the configured feature extractor."""
        (fx,) = self._need(self.feature_extractor)
        return fx(wav)

    def quantize(self, fact_out) -> dict[str, QuantizedResult]:
        """FactorizerOutput → {"sem", "pro", "spk"} QuantizedResult."""
        sq, pq, kq = self._need("sem_quantizer", "pro_quantizer", "spk_quantizer")
        return {SEM: sq(fact_out.sem), PRO: pq(fact_out.pro), SPK: kq(fact_out.spk)}

    def encode(self, wav: torch.Tensor) -> Codes:
        """wav (B, N) → Codes."""
        (fact,) = self._need("factorizer")
        q = self.quantize(fact(self.features(wav)))
        return Codes(sem=q[SEM].codes, pro=q[PRO].codes, spk=q[SPK].codes)

    def dequantize(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes → quantized latents sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk)."""
        sq, pq, kq = self._need("sem_quantizer", "pro_quantizer", "spk_quantizer")
        return sq.decode_codes(codes.sem), pq.decode_codes(codes.pro), kq.decode_codes(codes.spk)

    def decode_mel(
        self, codes: Codes, steps: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Codes → log-mel (B, n_mels, 2·Ts) through fuser + flow."""
        fuser, flow = self._need("fuser", "flow")
        cond = fuser(*self.dequantize(codes))
        return flow.sample(
            cond, steps=self.flow_steps if steps is None else steps, solver=self.flow_solver, generator=generator
        )

    def decode(self, codes: Codes, steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes → wav (B, 2·Ts·hop) through fuser + flow + vocoder."""
        (vocoder,) = self._need("vocoder")
        return vocoder(self.decode_mel(codes, steps=steps, generator=generator))

    def decoder_mel(self, codes: Codes) -> torch.Tensor:
        """Codes → log-mel (B, n_mels, 2·Ts) through the training-time decoder head."""
        (decoder,) = self._need("decoder")
        return decoder(*self.dequantize(codes))

    def bps_nominal(self, utterance_seconds: float = 4.0) -> float:
        """sem + pro bit/s from the quantizers' layout, as `nominal_bps(cfg)["total"]`.

        Speaker bits are per utterance and not part of the total; `utterance_seconds` is kept for symmetry with
        `builders.nominal_bps` and does not change the result.
        """
        sq, pq = self._need("sem_quantizer", "pro_quantizer")
        frame_rate = 50.0  # SSL/mel frames per second; sem is ÷2, pro ÷8
        return frame_rate / 2 * sq.num_levels * sq.bits_per_code + frame_rate / 8 * pq.num_levels * pq.bits_per_code
