"""`frozen/ok` every step: a cheap check that no frozen component moved (docs/training.md#freezing, docs/metrics.md).

The full guarantee is the sha256 fingerprint, recomputed at every checkpoint; hashing every step would cost more than
the step. In between, every `train.frozen_check_every` steps (default 1):

- every frozen tensor (parameters and buffers, non-persistent grid constants included) must still live in the storage
  it had at start (`p.data = …` re-binds a tensor) and carry the same autograd version counter (every in-place write
  through a tensor op — `add_`, `copy_`, an optimizer step, `load_state_dict` — bumps it). That costs a few µs per
  tensor and no device work;
- when a version moved, an exact integer checksum of the tensors' bits decides whether the values changed (writing the
  same values back is not a violation), and the per-tensor sums name what moved;
- every `checksum_every`-th check the checksum runs anyway: it also catches writes that bypass the version counter
  (through `.data` or a NumPy view). The checksum reads views made once at start (one concatenation and one sum per
  element width, one host sync); per-tensor sums would cost ~10 µs each, several % of a short step.

Frozen modules must also still be in eval mode with `requires_grad=False` (guarantees 1 and 2).
"""

from __future__ import annotations

import torch
from torch import nn

from siren.errors import FrozenViolation


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers with the same bits (1-D view of the same storage): 1-byte types as uint8,
    2-byte as int16, wider ones as int32 words."""
    flat = t.detach().reshape(-1)
    return flat.view({1: torch.uint8, 2: torch.int16}.get(flat.element_size(), torch.int32))


def bit_checksum(t: torch.Tensor) -> torch.Tensor:
    """0-dim int64 on t's device: the sum of t's bit patterns read as integers (exact, no rounding)."""
    return _bits(t).sum(dtype=torch.int64)


class FrozenGuard:
    """Reference checksum taken at start; `check()` → True, or raises FrozenViolation naming what moved."""

    def __init__(self, modules: dict[str, nn.Module], checksum_every: int = 50):
        self.modules, self.checksum_every = modules, max(1, checksum_every)
        self._calls = 0
        self.tensors: list[tuple[str, torch.Tensor]] = []
        for comp, m in modules.items():
            seen: set[int] = set()
            for _kind, named in (("param", m.named_parameters()), ("buffer", m.named_buffers())):
                for name, t in named:
                    if id(t) in seen or t.numel() == 0:
                        continue
                    seen.add(id(t))
                    self.tensors.append((f"{comp}.{name}", t))
        self._submodules = [s for m in modules.values() for s in m.modules()]
        self._params = [p for m in modules.values() for p in m.parameters()]
        self._arm()

    def _arm(self) -> None:
        # Views that alias each tensor's storage (contiguous tensors; a copy would not see later changes).
        for name, t in self.tensors:
            if not t.is_contiguous():
                raise ValueError(f"frozen tensor {name} is not contiguous; the per-step check needs a view of it")
        self._views = [_bits(t) for _, t in self.tensors]
        self._ptrs = [t.data_ptr() for _, t in self.tensors]
        self._versions = [t._version for _, t in self.tensors]
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for v in self._views:
            groups.setdefault((v.dtype, v.device), []).append(v)
        self._groups = list(groups.values())
        self.reference = self._checksum()
        self._reference_per_tensor = self._per_tensor()

    def _checksum(self) -> torch.Tensor:
        if not self._groups:
            return torch.zeros(0, dtype=torch.int64)
        sums = [torch.cat(g).sum(dtype=torch.int64) for g in self._groups]
        device = self._groups[0][0].device
        return torch.stack([s.to(device, non_blocking=True) for s in sums])

    def _check_modes(self) -> bool:
        bad = set()
        if any(s.training for s in self._submodules):
            bad |= {c for c, m in self.modules.items() if any(s.training for s in m.modules())}
        if any(p.requires_grad for p in self._params):
            bad |= {c for c, m in self.modules.items() if any(p.requires_grad for p in m.parameters())}
        if bad:
            raise FrozenViolation(f"frozen component(s) {', '.join(sorted(bad))} left eval mode or require gradients")
        return True

    def _per_tensor(self) -> list[int]:
        return [int(bit_checksum(t)) for _, t in self.tensors]

    def check(self) -> bool:
        """Storage pointers and version counters every call; the checksum (one reduction per element width, one host
        sync) when a version moved and on every `checksum_every`-th call. Raises FrozenViolation naming what changed."""
        rebound = [n for (n, t), p in zip(self.tensors, self._ptrs, strict=True) if t.data_ptr() != p]
        if rebound:
            comps = sorted({n.split(".", 1)[0] for n in rebound})
            raise FrozenViolation(
                f"frozen component(s) changed during training: {', '.join(comps)} "
                f"({', '.join(rebound[:5])}{' …' if len(rebound) > 5 else ''} were re-bound to new storage)"
            )
        self._calls += 1
        versions = [t._version for _, t in self.tensors]
        if versions == self._versions and self._calls % self.checksum_every != 0:
            return self._check_modes()
        if bool(torch.equal(self._checksum(), self.reference)):
            self._versions = versions  # written, but with the same values
            return self._check_modes()
        now, ref = self._per_tensor(), self._reference_per_tensor
        names = [n for (n, _), a, b in zip(self.tensors, now, ref, strict=True) if a != b]
        comps = sorted({n.split(".", 1)[0] for n in names}) or sorted(self.modules)
        raise FrozenViolation(
            f"frozen component(s) changed during training: {', '.join(comps)} "
            f"({', '.join(names[:5])}{' …' if len(names) > 5 else ''} differ from the checksums taken at start)"
        )
