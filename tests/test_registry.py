"""Freezing guarantees (docs/training.md#freezing), each shown to hold with the registry and to fail when the mechanism is bypassed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from siren.errors import FrozenViolation
from siren.train.registry import Registry, RegistryError


class Block(nn.Module):
    """A component with BatchNorm and dropout: the two things eval mode must pin."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(0.5)
        self.speaker_pool = nn.Linear(d, d)
        self.speaker_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.speaker_proj(self.speaker_pool(self.drop(self.bn(self.lin(x)))))


def make_components():
    torch.manual_seed(0)
    return {"factorizer": Block(), "sem_quantizer": Block(), "pro_quantizer": Block(), "decoder": Block()}


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def train_steps(comps: dict[str, nn.Module], optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    root = nn.ModuleDict(comps)
    for _ in range(steps):
        root.train()  # what a trainer does every epoch: must not unfreeze BN/dropout of frozen parts
        x = torch.randn(16, 8)
        y = comps["decoder"](comps["sem_quantizer"](comps["factorizer"](x)))
        optimizer.zero_grad()
        y.pow(2).mean().backward()
        optimizer.step()


def test_frozen_component_bit_identical_with_bn_and_dropout():
    comps = make_components()
    reg = Registry(comps)
    reg.apply(trainable=["factorizer"], freeze=[])
    before = snapshot(comps["decoder"])
    opt = torch.optim.SGD(reg.param_groups({}, lr=0.1, weight_decay=0.0), lr=0.1)
    train_steps(comps, opt)
    after = snapshot(comps["decoder"])
    assert all(torch.equal(before[k], after[k]) for k in before)  # params AND running stats
    assert not comps["decoder"].training and not comps["decoder"].bn.training
    assert comps["factorizer"].training  # trainable parts do follow .train()
    reg.check_frozen()


def test_bypassing_eval_pin_lets_batchnorm_drift():
    # Only requires_grad=False (what the seed's script did): BN running statistics still move under .train().
    comps = make_components()
    for name in ("sem_quantizer", "pro_quantizer", "decoder"):
        comps[name].requires_grad_(False)
    before = snapshot(comps["decoder"])
    opt = torch.optim.SGD(comps["factorizer"].parameters(), lr=0.1)
    train_steps(comps, opt)
    after = snapshot(comps["decoder"])
    assert not torch.equal(before["bn.running_mean"], after["bn.running_mean"])


def test_changed_frozen_weight_is_detected_by_name():
    comps = make_components()
    reg = Registry(comps)
    reg.apply(trainable=["factorizer"], freeze=[])
    with torch.no_grad():
        comps["pro_quantizer"].lin.weight[0, 0] += 1e-3
    with pytest.raises(FrozenViolation, match="pro_quantizer"):
        reg.check_frozen()


def test_changed_frozen_buffer_is_detected():
    comps = make_components()
    reg = Registry(comps)
    reg.apply(trainable=["factorizer"], freeze=[])
    comps["decoder"].bn.running_var.mul_(1.01)
    with pytest.raises(FrozenViolation, match="decoder"):
        reg.check_frozen()


def test_frozen_parameters_absent_from_optimizer_and_injection_caught():
    comps = make_components()
    reg = Registry(comps)
    reg.apply(trainable=["factorizer", "decoder"], freeze=["factorizer.speaker_*"])
    groups = reg.param_groups({"decoder": (1e-4, None)}, lr=1e-3, weight_decay=0.0)
    in_opt = {id(p) for g in groups for p in g["params"]}
    frozen = [p for n, p in comps["factorizer"].named_parameters() if n.startswith("speaker_")]
    frozen += list(comps["sem_quantizer"].parameters())
    assert frozen and not any(id(p) in in_opt for p in frozen)
    assert all(not p.requires_grad for p in frozen)
    assert {g["name"]: g["lr"] for g in groups} == {"decoder": 1e-4, "default": 1e-3}
    # Bypass: a frozen parameter smuggled into a group is rejected.
    groups[0]["params"].append(comps["sem_quantizer"].lin.weight)
    with pytest.raises(RegistryError, match="frozen"):
        reg.assert_groups(groups)


def test_patterns_globs_and_submodules():
    reg = Registry(make_components())
    assert reg.resolve("*_quantizer") == ["sem_quantizer", "pro_quantizer"]
    assert reg.resolve("factorizer.speaker_*") == ["factorizer.speaker_pool", "factorizer.speaker_proj"]
    with pytest.raises(RegistryError, match="matches no component"):
        reg.resolve("vocoder")
    with pytest.raises(RegistryError, match="matches no component"):
        reg.resolve("factorizer.nothing_*")


def test_required_frozen_cannot_be_trainable():
    reg = Registry(make_components())
    with pytest.raises(RegistryError, match="requires"):
        reg.apply(trainable=["factorizer", "decoder"], freeze=[], required_frozen=["decoder", "*_quantizer"])


def test_group_overlap_and_empty_group_rejected():
    reg = Registry(make_components())
    reg.apply(trainable=["factorizer", "decoder"], freeze=[])
    with pytest.raises(RegistryError, match="matches optimizer groups"):
        reg.param_groups({"factorizer": (1e-3, None), "factorizer.lin.*": (1e-4, None)}, lr=1e-3, weight_decay=0)
    with pytest.raises(RegistryError, match="matches no trainable"):
        reg.param_groups({"sem_quantizer": (1e-3, None)}, lr=1e-3, weight_decay=0)
