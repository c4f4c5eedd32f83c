from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from siren.models.io import StrictLoadError, fingerprint, load_component, save_component


class Net(nn.Module):
    def __init__(self, hidden: int = 4, extra: bool = False):
        super().__init__()
        self.lin = nn.Linear(3, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        if extra:
            self.extra = nn.Linear(2, 2)


def test_round_trip_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    a = Net()
    path = save_component(a, tmp_path / "c" / "net.safetensors")
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    b = Net()
    assert fingerprint(a) != fingerprint(b)
    assert load_component(b, path) == []
    assert fingerprint(a) == fingerprint(b)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_fingerprint_changes_when_a_buffer_changes():
    net = Net()
    before = fingerprint(net)
    net.bn.running_mean += 1e-3
    assert fingerprint(net) != before
    net.bn.running_mean -= 1e-3
    net.bn.num_batches_tracked += 1
    assert fingerprint(net) != before


def test_fingerprint_changes_with_dtype():
    net = Net()
    before = fingerprint(net)
    net.double()
    assert fingerprint(net) != before


def test_strict_errors_list_every_problem(tmp_path):
    path = save_component(Net(hidden=4, extra=True), tmp_path / "net.safetensors")
    target = Net(hidden=5)
    before = fingerprint(target)
    with pytest.raises(StrictLoadError) as err:
        load_component(target, path)
    msg = str(err.value)
    for name in ("unexpected: extra.weight", "unexpected: extra.bias", "lin.weight", "lin.bias", "bn.running_mean"):
        assert name in msg
    assert "mismatch" in msg and str(path) in msg
    assert fingerprint(target) == before  # nothing was half-loaded


def test_missing_tensor_is_an_error(tmp_path):
    path = save_component(Net(), tmp_path / "net.safetensors")
    with pytest.raises(StrictLoadError, match="missing: extra.weight"):
        load_component(Net(extra=True), path)


def test_allow_list_skips_and_logs(tmp_path, caplog):
    torch.manual_seed(0)
    src = Net(hidden=4, extra=True)
    path = save_component(src, tmp_path / "net.safetensors")
    target = Net(hidden=4)
    with caplog.at_level(logging.WARNING, logger="siren"):
        patched = load_component(target, path, allow=["extra.*"])
    assert sorted(patched) == ["extra.bias", "extra.weight"]
    assert "extra.weight" in caplog.text
    assert torch.equal(target.lin.weight, src.lin.weight)
    # an allow pattern that covers only part of the problems still fails on the rest
    with pytest.raises(StrictLoadError, match="extra.bias"):
        load_component(Net(hidden=4), path, allow=["extra.weight"])


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_component(Net(), tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StrictLoadError, match="bad.safetensors"):
        load_component(Net(), bad)
