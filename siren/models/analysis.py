"""The codec's analysis path, shared by training, inference, profiling, verify and eval.

features (B, T, D) → factorizer → sem / pro / spk quantizers (`analyse`), the masks of the frames that lie inside each
utterance's valid audio (`frame_mask`, `stream_masks`), the code layout the quantizers declare (`code_layout`) and the
nominal bit rate it implies (`layout_bps`), and the entropy model's rate over valid frames (`entropy_rate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from siren.models.roles import FrameGeometry


def frame_mask(lengths: torch.Tensor, hop: int, num_frames: int) -> torch.Tensor:
    """(B,) valid samples → (B, num_frames) bool, True where the frame lies inside the valid audio."""
    valid = torch.div(lengths, hop, rounding_mode="floor")
    return torch.arange(num_frames, device=lengths.device)[None, :] < valid[:, None]


@dataclass
class Analysis:
    """The codec's analysis path on a batch: factorizer output and the three quantizer results."""

    fact: object
    sem: object
    pro: object
    spk: object


def analyse(modules: dict[str, nn.Module], feats: torch.Tensor) -> Analysis:
    """feats (B, T, D) → factorizer → sem/pro/spk quantizers."""
    fact = modules["factorizer"](feats)
    return Analysis(
        fact=fact,
        sem=modules["sem_quantizer"](fact.sem),
        pro=modules["pro_quantizer"](fact.pro),
        spk=modules["spk_quantizer"](fact.spk),
    )


def code_layout(modules: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    return {
        "sem": (modules["sem_quantizer"].codebook_size, modules["sem_quantizer"].num_levels),
        "pro": (modules["pro_quantizer"].codebook_size, modules["pro_quantizer"].num_levels),
        "spk": (modules["spk_quantizer"].codebook_size, modules["spk_quantizer"].num_codebooks),
    }


def layout_bps(geo: FrameGeometry, modules: dict[str, nn.Module]) -> float:
    """Nominal sem + pro bit/s from the quantizers' own layout and the frame geometry."""
    sq, pq = modules["sem_quantizer"], modules["pro_quantizer"]
    return geo.sem_rate * sq.num_levels * sq.bits_per_code + geo.pro_rate * pq.num_levels * pq.bits_per_code


def stream_masks(lengths: torch.Tensor, an: Analysis, geo: FrameGeometry) -> dict[str, torch.Tensor]:
    return {
        "sem": frame_mask(lengths, geo.sem_hop, an.sem.codes.shape[1]),
        "pro": frame_mask(lengths, geo.pro_hop, an.pro.codes.shape[1]),
    }


def stream_codes(an: Analysis, masks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The codes a step reports for codebook metrics: stream → (codes, valid-frame mask or None for speaker codes)."""
    return {"sem": (an.sem.codes, masks["sem"]), "pro": (an.pro.codes, masks["pro"]), "spk": (an.spk.codes, None)}


def entropy_rate(ent, masks: dict[str, torch.Tensor], geo: FrameGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, seconds) over valid frames of the sem and pro streams, as sums (so they can be reduced across ranks)."""
    bits = sum((ent.bits[s] * masks[s].to(ent.bits[s].dtype)).sum() for s in ("sem", "pro"))
    seconds = masks["sem"].sum().to(torch.float64) * geo.sem_hop / geo.sample_rate
    return bits.to(torch.float64), seconds
