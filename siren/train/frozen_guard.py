"""`frozen/ok` every step: a cheap on-device check that no frozen component moved (DESIGN §5, §7).

The full guarantee is the sha256 fingerprint, recomputed at every checkpoint; hashing on the host every step would cost
more than the step. In between, every `train.frozen_check_every` steps, every frozen tensor (parameters and buffers,
non-persistent grid constants included) is read as integers with the same bits, and their exact int64 sum is compared
with the one taken at start. Any change of one element changes the sum; a change that keeps the sum of bit patterns
exactly equal (a permutation, say) is left to the checkpoint's sha256.

Cost: the integer views are made once at start and alias the tensors' storage, so a step costs one concatenation and
one sum per element width plus one host sync, whatever the number of tensors (per-tensor sums cost ~10 µs each, which
is milliseconds for a 100-tensor model and several % of a short step). A tensor re-bound to new storage (`p.data = …`)
would escape its view, so every check also compares storage pointers. Frozen modules must also still be in eval mode
with `requires_grad=False` (guarantees 1 and 2). On a mismatch the per-tensor sums name what moved.
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

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
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

    def _per_tensor(self) -> list[int]:
        return [int(bit_checksum(t)) for _, t in self.tensors]

    def check(self) -> bool:
        """One reduction per element width and one host sync; raises FrozenViolation naming each changed component."""
        rebound = [n for (n, t), p in zip(self.tensors, self._ptrs, strict=True) if t.data_ptr() != p]
        if rebound:
            comps = sorted({n.split(".", 1)[0] for n in rebound})
            raise FrozenViolation(
                f"frozen component(s) changed during training: {', '.join(comps)} "
                f"({', '.join(rebound[:5])}{' …' if len(rebound) > 5 else ''} were re-bound to new storage)"
            )
        if bool(torch.equal(self._checksum(), self.reference)):
            bad_mode = (
                {c for c, m in self.modules.items() if any(s.training for s in m.modules())}
                if any(s.training for s in self._submodules)
                else set()
            )
            if any(p.requires_grad for p in self._params):
                bad_mode |= {c for c, m in self.modules.items() if any(p.requires_grad for p in m.parameters())}
            if not bad_mode:
                return True
            raise FrozenViolation(
                f"frozen component(s) {', '.join(sorted(bad_mode))} left eval mode or require gradients"
            )
        now, ref = self._per_tensor(), self._reference_per_tensor
        names = [n for (n, _), a, b in zip(self.tensors, now, ref, strict=True) if a != b]
        comps = sorted({n.split(".", 1)[0] for n in names}) or sorted(self.modules)
        raise FrozenViolation(
            f"frozen component(s) changed during training: {', '.join(comps)} "
            f"({', '.join(names[:5])}{' …' if len(names) > 5 else ''} differ from the checksums taken at start)"
        )
