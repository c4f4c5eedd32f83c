"""`frozen/ok` every step: a cheap on-device check that no frozen component moved (DESIGN §5, §7).

The full guarantee is the sha256 fingerprint, recomputed at every checkpoint; hashing on the host every step would cost
more than the step. In between, every `train.frozen_check_every` steps, each frozen tensor (parameters and buffers,
non-persistent grid constants included) is reduced on its device to an exact integer checksum of its bit pattern
(int64 sum of its elements reinterpreted as integers). Any change of one element changes the sum; a change that keeps
the sum of bit patterns exactly equal (a permutation, say) is left to the checkpoint's sha256. The checksums of all
tensors are compared with the reference in one device operation and one host sync. Frozen modules must also still be
in eval mode with `requires_grad=False` (guarantees 1 and 2).
"""

from __future__ import annotations

import torch
from torch import nn

from siren.errors import FrozenViolation


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers with the same bits (1-D): 1-byte types as uint8, 2-byte as int16, wider
    ones as int32 words."""
    flat = t.detach().reshape(-1)
    return flat.view({1: torch.uint8, 2: torch.int16}.get(flat.element_size(), torch.int32))


def bit_checksum(t: torch.Tensor) -> torch.Tensor:
    """0-dim int64 on t's device: the sum of t's bit patterns read as integers (exact, no rounding)."""
    return _bits(t).sum(dtype=torch.int64)


class FrozenGuard:
    """Reference checksums taken at start; `check()` → True, or raises FrozenViolation naming what moved."""

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
        self.reference = self._checksums()

    def _checksums(self) -> torch.Tensor:
        if not self.tensors:
            return torch.zeros(0, dtype=torch.int64)
        device = self.tensors[0][1].device
        return torch.stack([bit_checksum(t).to(device, non_blocking=True) for _, t in self.tensors])

    def check(self) -> bool:
        """One device reduction and one host sync; raises FrozenViolation naming each changed component."""
        now = self._checksums()
        if now.shape == self.reference.shape and bool(torch.equal(now, self.reference)):
            bad_mode = [c for c, m in self.modules.items() if any(s.training for s in m.modules())]
            bad_mode += [c for c, m in self.modules.items() if any(p.requires_grad for p in m.parameters())]
            if not bad_mode:
                return True
            raise FrozenViolation(
                f"frozen component(s) {', '.join(sorted(set(bad_mode)))} left eval mode or require gradients"
            )
        moved = (now != self.reference).nonzero().flatten().tolist() if now.shape == self.reference.shape else []
        names = [self.tensors[i][0] for i in moved]
        comps = sorted({n.split(".", 1)[0] for n in names}) or sorted(self.modules)
        raise FrozenViolation(
            f"frozen component(s) changed during training: {', '.join(comps)} "
            f"({', '.join(names[:5])}{' …' if len(names) > 5 else ''} differ from the checksums taken at start)"
        )
