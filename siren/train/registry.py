"""Parameter-group registry: freeze components by name and guarantee they stay frozen (docs/training.md#freezing).

For every frozen module SIREN guarantees:
1. `requires_grad=False` and absent from every optimizer group (asserted when the optimizer is built);
2. eval mode always: its `train()` is pinned to `train(False)`, so a trainer calling `.train()` on a parent keeps
   dropout off and BatchNorm statistics fixed;
3. it is never wrapped for gradient sync: the trainer hands only trainable components to DDP;
4. a fingerprint (sha256 over parameters and buffers) is taken at start and re-checked at every checkpoint and at the end.
"""

from __future__ import annotations

import fnmatch
import logging
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from siren.errors import FrozenViolation, SirenError
from siren.models.io import fingerprint

log = logging.getLogger("siren")


class RegistryError(SirenError):
    """A freeze/trainable/optimizer-group pattern is invalid (matches nothing, conflicts, leaves a gap)."""


def _pinned_eval_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # Guarantee 2: whatever mode is asked for, a frozen module and its children stay in eval mode.
    return nn.Module.train(self, False)


@dataclass
class FreezePlan:
    frozen: list[str]  # module paths frozen ("decoder", "factorizer.speaker_pool", ...), top-most only
    trainable_components: list[str]  # components with at least one trainable parameter
    fingerprints: dict[str, str] = field(default_factory=dict)


class Registry:
    """Named components of a stage, with pattern resolution, freezing and fingerprint checks.

    Patterns: a component name (`decoder`), an fnmatch glob over component names (`*_quantizer`), or a dotted path into a
    component (`factorizer.speaker_*`), matched against the component's submodule paths.
    """

    def __init__(self, components: Mapping[str, nn.Module]):
        self.components: dict[str, nn.Module] = dict(components)
        self.plan: FreezePlan | None = None

    # ------------------------------------------------------------------------------------------------------- patterns
    def resolve(self, pattern: str) -> list[str]:
        """Module paths matched by `pattern`, top-most only; a pattern that matches nothing is an error."""
        head, _, rest = pattern.partition(".")
        comps = [n for n in self.components if fnmatch.fnmatchcase(n, head)]
        matches: list[str] = []
        for comp in comps:
            if not rest:
                matches.append(comp)
                continue
            for sub, _ in self.components[comp].named_modules():
                if sub and fnmatch.fnmatchcase(sub, rest):
                    path = f"{comp}.{sub}"
                    if not any(path.startswith(m + ".") for m in matches):
                        matches.append(path)
        if not matches:
            raise RegistryError(
                f"pattern `{pattern}` matches no component or submodule; components: {', '.join(self.components)}"
            )
        return matches

    def module(self, path: str) -> nn.Module:
        comp, _, sub = path.partition(".")
        mod = self.components[comp]
        return mod.get_submodule(sub) if sub else mod

    # --------------------------------------------------------------------------------------------------------- freeze
    def apply(self, trainable: Iterable[str], freeze: Iterable[str], required_frozen: Iterable[str] = ()) -> FreezePlan:
        """Make `trainable` components trainable, everything else frozen, then freeze `freeze` (also inside trainable
        components). `required_frozen` (the stage's own list) may not be made trainable."""
        trainable_paths = [p for pat in trainable for p in self.resolve(pat)]
        bad = [p for p in trainable_paths if "." in p]
        if bad:
            raise RegistryError(f"`trainable` takes components, not submodules: {bad}; freeze submodules with `freeze`")
        required = {p for pat in required_frozen for p in self.resolve(pat)}
        clash = sorted(required & set(trainable_paths))
        if clash:
            raise RegistryError(f"this stage requires {clash} to stay frozen, but `trainable` lists them")
        frozen = [n for n in self.components if n not in trainable_paths]
        for pat in freeze:
            for path in self.resolve(pat):
                covered = any(path == f or path.startswith(f + ".") for f in frozen)
                if not covered:
                    frozen.append(path)
        for path in frozen:
            self._freeze(self.module(path))
        for name in trainable_paths:
            for pname, p in self.components[name].named_parameters():
                if not any(f"{name}.{pname}".startswith(f + ".") for f in frozen):
                    p.requires_grad_(True)
        trainable_components = [
            n for n in self.components if any(p.requires_grad for p in self.components[n].parameters())
        ]
        if not trainable_components:
            raise RegistryError("nothing is trainable: every parameter is frozen")
        self.plan = FreezePlan(frozen=frozen, trainable_components=trainable_components)
        self.plan.fingerprints = self.fingerprints()
        return self.plan

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        module.requires_grad_(False)
        for sub in module.modules():
            sub.train = types.MethodType(_pinned_eval_train, sub)
        nn.Module.train(module, False)

    # ---------------------------------------------------------------------------------------------------- fingerprints
    def fingerprints(self) -> dict[str, str]:
        assert self.plan is not None, "apply() first"
        return {path: fingerprint(self.module(path)) for path in self.plan.frozen}

    def check_frozen(self) -> dict[str, str]:
        """Guarantee 4: recompute frozen fingerprints; raise FrozenViolation naming every changed module."""
        assert self.plan is not None, "apply() first"
        now = self.fingerprints()
        changed = [p for p, fp in self.plan.fingerprints.items() if now[p] != fp]
        if changed:
            raise FrozenViolation(
                f"frozen component(s) changed during training: {', '.join(changed)} "
                "(weights or buffers differ from the fingerprint taken at start)"
            )
        return now

    def frozen_in_eval(self) -> bool:
        assert self.plan is not None
        return all(not m.training for p in self.plan.frozen for m in self.module(p).modules())

    # ----------------------------------------------------------------------------------------------- optimizer groups
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"{c}.{n}": p for c, mod in self.components.items() for n, p in mod.named_parameters() if p.requires_grad
        }

    def param_groups(
        self, groups: Mapping[str, tuple[float | None, float | None]], lr: float, weight_decay: float
    ) -> list[dict]:
        """Optimizer groups from `{pattern: (lr, weight_decay)}`; unmatched trainable parameters go to `default`.

        A pattern matches a parameter by fnmatch on its full name or on a module prefix of it. Asserted: every trainable
        parameter is in exactly one group, no frozen parameter is in any group, and every pattern matches something.
        """
        params = self.trainable_parameters()
        assigned: dict[str, str] = {}
        for pat in groups:
            hits = [n for n in params if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, pat + ".*")]
            if not hits:
                raise RegistryError(f"optim.groups pattern `{pat}` matches no trainable parameter")
            for n in hits:
                if n in assigned:
                    raise RegistryError(f"parameter {n} matches optimizer groups `{assigned[n]}` and `{pat}`")
                assigned[n] = pat
        out = []
        for pat, (g_lr, g_wd) in groups.items():
            ps = [params[n] for n, g in assigned.items() if g == pat]
            out.append(
                {
                    "name": pat,
                    "params": ps,
                    "lr": lr if g_lr is None else g_lr,
                    "weight_decay": weight_decay if g_wd is None else g_wd,
                }
            )
        rest = [p for n, p in params.items() if n not in assigned]
        if rest:
            out.append({"name": "default", "params": rest, "lr": lr, "weight_decay": weight_decay})
        self.assert_groups(out)
        return out

    def assert_groups(self, param_groups: list[dict]) -> None:
        """Guarantee 1: groups cover every trainable parameter exactly once and hold no frozen parameter."""
        seen: dict[int, str] = {}
        for g in param_groups:
            for p in g["params"]:
                if id(p) in seen:
                    raise RegistryError(f"a parameter is in optimizer groups `{seen[id(p)]}` and `{g['name']}`")
                seen[id(p)] = g["name"]
        trainable = {id(p) for p in self.trainable_parameters().values()}
        frozen_in_opt = [n for n, p in self._all_named_parameters() if id(p) in seen and id(p) not in trainable]
        if frozen_in_opt:
            raise RegistryError(f"frozen parameters in the optimizer: {frozen_in_opt[:5]}")
        missing = trainable - set(seen)
        if missing:
            raise RegistryError(f"{len(missing)} trainable parameters are in no optimizer group")

    def _all_named_parameters(self):
        for c, mod in self.components.items():
            for n, p in mod.named_parameters():
                yield f"{c}.{n}", p


def assert_optimizer_excludes_frozen(optimizer: torch.optim.Optimizer, registry: Registry) -> None:
    """Guarantee 1, checked on the real optimizer object after Accelerate prepared it."""
    trainable = {id(p) for p in registry.trainable_parameters().values()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in trainable:
                raise RegistryError("the optimizer holds a parameter that is frozen or unknown to the registry")
