"""fp32 islands under mixed precision (docs/scale.md): code decisions never depend on the autocast dtype.

Quantizer projections and rounding, the speaker codebook search, the entropy model's log-probabilities and the mel
targets run in fp32 whatever `train.mixed_precision` says, so a bf16 step makes the same codes as an fp32 step for
the same weights and inputs. `fp32_island` disables autocast for the wrapped call and casts its floating-point tensor
arguments (also inside dicts, lists and tuples) to float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def _device_type(args: tuple, kwargs: dict) -> str:
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.device.type
        if isinstance(x, dict):
            for v in x.values():
                if isinstance(v, torch.Tensor):
                    return v.device.type
    return "cpu"


def fp32_island(fn: F) -> F:
    """Decorator: run `fn` with autocast off and its floating tensor arguments in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = _device_type(args, kwargs)
        if not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=dev, enabled=False):
            return fn(*_to_fp32(args), **_to_fp32(kwargs))

    return wrapper  # type: ignore[return-value]


# Measured on a 2-core x86 CPU, tiny adapt stage: a bf16 step took about 20× as long as an fp32 one (CPUs without
# native bf16 matrix units emulate it). Reduced precision pays on accelerators, not here.
CPU_REDUCED_PRECISION_COST = 20


def reduced_precision_warning(device_type: str, mixed_precision: str | None) -> str | None:
    """The warning a run gets when it asks for fp16/bf16 autocast on a CPU, else None."""
    if device_type != "cpu" or mixed_precision not in ("fp16", "bf16"):
        return None
    return (
        f"mixed precision {mixed_precision} on a CPU: steps run about {CPU_REDUCED_PRECISION_COST}× slower than in "
        f"fp32 here (measured, tiny adapt stage, 2-core x86); set train.mixed_precision=no for CPU runs"
    )
