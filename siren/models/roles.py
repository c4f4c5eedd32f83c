"""Component roles as protocols (docs/bring-your-own-codec.md): what stages, metrics, verify and the bitstream call, with shapes.

SIREN's own modules (factorizer.py, quantizers.py, ...) are one implementation of these roles; a foreign module plugs
in through `target:` (and `adapter:` when its interface differs) as long as it satisfies the role. Stages and metrics
depend on these protocols, never on a concrete SIREN class. `check_role` asserts a module at the boundary (when it is
built), so a foreign class that lacks a member fails at start-up with a message naming the role and the member, not in
the middle of a step.

Shapes: B batch, N samples, T feature frames (sample_rate / hop), Ts = T / sem_downsample semantic frames,
Tp = T / pro_downsample prosody frames, L residual levels, G speaker groups, K codes per level.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from siren.errors import SirenError

log = logging.getLogger("siren")


class RoleError(SirenError):
    """A module does not satisfy the role it is used for."""


# ------------------------------------------------------------------------------------------------------------- results
class FactorizerResult(Protocol):
    """sem (B, Ts, sem_dim), pro (B, Tp, pro_dim), spk (B, spk_dim)."""

    sem: torch.Tensor
    pro: torch.Tensor
    spk: torch.Tensor


class QuantizerResult(Protocol):
    """quantized: same shape as the input; codes: long (B, Ts, L) (or (B, G) for the speaker); commit_loss: 0-dim."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor


class EntropyResultLike(Protocol):
    """Per stream: bits (B, T) per frame, total_bits (B,) over valid frames; loss: mean cross-entropy (nats), 0-dim."""

    bits: dict[str, torch.Tensor]
    total_bits: dict[str, torch.Tensor]
    loss: torch.Tensor


# --------------------------------------------------------------------------------------------------------------- roles
@runtime_checkable
class FeatureExtractor(Protocol):
    """`ssl` and `student_ssl`: wav (B, N) → features (B, T, dim) at sample_rate / hop frames per second."""

    @property
    def dim(self) -> int: ...

    def num_frames(self, num_samples: int) -> int: ...

    def __call__(self, wav: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Factorizer(Protocol):
    """feats (B, T, input_dim) → FactorizerResult. `sem_downsample`/`pro_downsample`: feature frames per semantic /
    prosody frame (SIREN's: 2 and 8); the frame geometry is derived from them."""

    input_dim: int
    sem_downsample: int
    pro_downsample: int

    def __call__(self, feats: torch.Tensor) -> FactorizerResult: ...


@runtime_checkable
class StreamQuantizer(Protocol):
    """`sem_quantizer`/`pro_quantizer`: latents (B, T, dim) → QuantizerResult with codes (B, T, L) in [0, K).
    `decode_codes(codes)` reproduces `quantized` for the same codes (the decoder side never sees latents).
    Optional: `digit_levels` (see `DigitLevels`) when the codes are FSQ grid points."""

    @property
    def codebook_size(self) -> int: ...

    @property
    def num_levels(self) -> int: ...

    @property
    def bits_per_code(self) -> float: ...

    def __call__(self, x: torch.Tensor) -> QuantizerResult: ...

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class DigitLevels(Protocol):
    """Optional member of a `StreamQuantizer` whose codes are FSQ grid points: `digit_levels` lists the number of
    levels of each grid dimension, and a code is the mixed-radix number Σ_j digit_j · Π_{i<j} digit_levels[i] (digit 0
    least significant), so Π digit_levels == codebook_size. With it, the trainer logs per-dimension metrics
    `codebook/<stream>/<level>/digit<j>/{usage,perplexity}`; without it, only whole-code metrics. A quantizer that
    looks like an FSQ grid but lacks it gets one warning per run (`fsq_digit_levels`)."""

    @property
    def digit_levels(self) -> list[int]: ...


@runtime_checkable
class SpeakerQuantizer(Protocol):
    """`spk_quantizer`: embedding (B, dim) → QuantizerResult with codes (B, G) in [0, K); `decode_codes` inverts."""

    @property
    def codebook_size(self) -> int: ...

    @property
    def num_codebooks(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> QuantizerResult: ...

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class EntropyModel(Protocol):
    """`entropy_model`, rate only: ({stream: codes (B, T, L)}, {stream: valid frames (B,)} or None) → EntropyResultLike.
    Enough for the `rate/*` and `drift/*` metrics and the entropy loss; not enough for a range coder."""

    def __call__(
        self, codes: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor] | None = None
    ) -> EntropyResultLike: ...


@runtime_checkable
class CodingEntropyModel(EntropyModel, Protocol):
    """An entropy model that can drive the range coder: `coder(stream)` gives an incremental next-frame model with
    `logits() -> (B, L, K)` and `push(codes (B, L))` (see `siren.models.entropy.StreamCoder`)."""

    def coder(self, stream: str, batch: int = 1) -> Any: ...


@runtime_checkable
class LatentsToMel(Protocol):
    """`decoder`: sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk) → mel (B, n_mels, T) in its `mel_domain`
    (default: the run's `audio` front end, natural-log magnitude)."""

    def __call__(self, sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Fuser(Protocol):
    """sem (B, Ts, Ds), pro (B, Tp, Dp), spk (B, Dk) → conditioning (B, T, cond_dim) at mel rate."""

    cond_dim: int

    def __call__(self, sem: torch.Tensor, pro: torch.Tensor, spk: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Flow(Protocol):
    """cond (B, T, C) → mel (B, n_mels, T) in its `mel_domain` by `sample`; `loss(mel, cond)` trains it."""

    def sample(self, cond: torch.Tensor, steps: int, solver: str = "euler", generator: Any = None) -> torch.Tensor: ...

    def loss(self, mel: torch.Tensor, cond: torch.Tensor, generator: Any = None) -> torch.Tensor: ...


@runtime_checkable
class Vocoder(Protocol):
    """mel (B, n_mels, T) in its `mel_domain` → wav (B, T · hop_length)."""

    hop_length: int

    def __call__(self, mel: torch.Tensor) -> torch.Tensor: ...


ROLES: dict[str, type] = {
    "ssl": FeatureExtractor,
    "student_ssl": FeatureExtractor,
    "factorizer": Factorizer,
    "teacher_factorizer": Factorizer,
    "sem_quantizer": StreamQuantizer,
    "pro_quantizer": StreamQuantizer,
    "spk_quantizer": SpeakerQuantizer,
    "entropy_model": EntropyModel,
    "decoder": LatentsToMel,
    "fuser": Fuser,
    "flow": Flow,
    "vocoder": Vocoder,
}


def _members(proto: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(proto.__mro__):
        if klass in (Protocol, object, Any) or not getattr(klass, "_is_protocol", False):
            continue
        for n in (*getattr(klass, "__annotations__", {}), *vars(klass)):
            if not n.startswith("_") and n not in names:
                names.append(n)
    return names


def check_role(name: str, module: nn.Module) -> nn.Module:
    """`module` satisfies the role of component `name`, or RoleError naming every missing member."""
    proto = ROLES.get(name)
    if proto is None:
        return module
    missing = [m for m in _members(proto) if not hasattr(module, m)]
    if missing:
        raise RoleError(
            f"{name}: {type(module).__module__}:{type(module).__qualname__} does not satisfy the {proto.__name__} "
            f"role; missing {', '.join(missing)} (wrap it with an `adapter:`; see siren/models/roles.py)"
        )
    return module


# Names under which foreign FSQ implementations commonly keep their per-dimension levels.
_LEVELS_LIKE = ("levels", "fsq_levels", "grid", "level_sizes", "num_levels_per_dim", "_levels")
_DIGIT_WARNED: set[tuple[str, str]] = set()  # (component, class) already warned in this process


def _int_list(value: Any) -> list[int] | None:
    """A list/tuple or 1-D integer tensor of ints >= 2 (a grid's levels), else None."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point and not bool((value == value.round()).all()):
            return None
        value = [int(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 2 for v in value):
        return list(value)
    return None


def _levels_like(module: nn.Module, size: int) -> tuple[str, list[int]] | None:
    """(dotted name, levels) of a levels-like attribute in `module` or a submodule whose product is `size`."""
    for prefix, sub in module.named_modules():
        for attr in _LEVELS_LIKE:
            levels = _int_list(getattr(sub, attr, None))
            if levels and math.prod(levels) == size:
                return (f"{prefix}.{attr}" if prefix else attr), levels
    return None


def _small_factors(n: int) -> bool:
    """n > 1 is not a power of two and has no prime factor above 8: the shape of common FSQ grids (8·5·5·5 = 1000,
    7·5·5·5·5, 5·5·3); power-of-two sizes are left alone, as most VQ/LFQ codebooks have them."""
    if n < 2 or n & (n - 1) == 0:
        return False
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def fsq_digit_levels(name: str, quantizer: nn.Module | None) -> list[int] | None:
    """The quantizer's `digit_levels` (see `DigitLevels`), or None. When it has none but looks like an FSQ grid, one
    warning per (component, class) and process says what to add: either a levels-like attribute (`levels`, `grid`,
    ... on it or a submodule, such as an adapter's wrapped net) multiplies to its codebook size, or the codebook size
    is not a power of two and factors into primes <= 7 as FSQ grids do."""
    if quantizer is None:
        return None
    levels = getattr(quantizer, "digit_levels", None)
    if levels:
        return [int(v) for v in levels]
    size = getattr(quantizer, "codebook_size", None)
    if not isinstance(size, int):
        return None
    found = _levels_like(quantizer, size)
    if found is None and not _small_factors(size):
        return None
    key = (name, f"{type(quantizer).__module__}:{type(quantizer).__qualname__}")
    if key in _DIGIT_WARNED:
        return None
    _DIGIT_WARNED.add(key)
    if found:
        why = f"its `{found[0]}` = {found[1]} multiplies to its codebook size {size}"
    else:
        why = f"its codebook size {size} factors like an FSQ grid"
    log.warning(
        "%s: %s has no `digit_levels`, but %s; if its codes are mixed-radix FSQ digits, expose the per-dimension "
        "levels as the `digit_levels` property (siren.models.roles.DigitLevels) to get per-digit codebook metrics",
        name,
        key[1],
        why,
    )
    return None


def can_range_code(entropy_model: nn.Module) -> bool:
    """True when the entropy model gives per-code next-symbol probabilities (a range coder can use it)."""
    return callable(getattr(entropy_model, "coder", None))


# ------------------------------------------------------------------------------------------------------ frame geometry
@dataclass(frozen=True)
class FrameGeometry:
    """One frame geometry for a run, derived from `audio` and the factorizer (never from constants).

    hop: samples per feature/mel frame; sem_hop / pro_hop: samples per semantic / prosody code frame.
    """

    sample_rate: int
    hop: int
    sem_downsample: int
    pro_downsample: int

    @property
    def sem_hop(self) -> int:
        return self.hop * self.sem_downsample

    @property
    def pro_hop(self) -> int:
        return self.hop * self.pro_downsample

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def sem_rate(self) -> float:
        return self.sample_rate / self.sem_hop

    @property
    def pro_rate(self) -> float:
        return self.sample_rate / self.pro_hop

    @classmethod
    def of(cls, audio, factorizer: nn.Module) -> FrameGeometry:
        """From the `audio` config section and a module in the factorizer role."""
        for attr in ("sem_downsample", "pro_downsample"):
            if not isinstance(getattr(factorizer, attr, None), int):
                raise RoleError(
                    f"factorizer {type(factorizer).__qualname__} has no integer `{attr}` (feature frames per code "
                    "frame); the frame geometry is derived from it"
                )
        return cls(int(audio.sample_rate), int(audio.hop_length), factorizer.sem_downsample, factorizer.pro_downsample)
