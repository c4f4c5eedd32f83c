"""Config system: extends chains, overrides, typo suggestions, wrong types, all problems reported together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siren.config.loader import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_extends_chain_and_overrides(tmp_path):
    write(tmp_path / "base" / "a.yaml", "train: {max_steps: 10, batch_size: 4}\noptim: {lr: 0.1}\n")
    write(tmp_path / "base" / "b.yaml", "extends: a.yaml\ntrain: {batch_size: 8}\n")
    top = write(tmp_path / "exp" / "c.yaml", "extends: [../base/b.yaml]\nstage: adapt\n")
    cfg = load_config(top, ["train.max_steps=40", "optim.lr=1e-4", "optim.groups.factorizer.lr=5e-4"])
    assert cfg.stage == "adapt"
    assert cfg.train.batch_size == 8  # b overrides a
    assert cfg.train.max_steps == 40  # command line overrides files
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.groups["factorizer"].lr == pytest.approx(5e-4)


def test_typo_names_closest_key(tmp_path):
    p = write(tmp_path / "c.yaml", "train:\n  max_setps: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.max_setps" in str(e.value) and "train.max_steps" in str(e.value)


def test_wrong_type_names_key_value_and_type(tmp_path):
    p = write(tmp_path / "c.yaml", "train:\n  batch_size: eight\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.batch_size" in msg and "'eight'" in msg and "int" in msg


def test_all_problems_reported_together(tmp_path):
    p = write(tmp_path / "c.yaml", "stag: codec\ntrain: {batch_size: x}\nstage: nope\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert len(e.value.problems) == 3
    assert "did you mean `stage`" in str(e.value)


def test_extends_missing_and_cycle(tmp_path):
    p = write(tmp_path / "c.yaml", "extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(p)
    write(tmp_path / "x.yaml", "extends: y.yaml\n")
    write(tmp_path / "y.yaml", "extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")


def test_repo_configs_validate():
    for p in sorted((ROOT / "configs").rglob("*.yaml")):
        load_config(p)
    for p in sorted((ROOT / "experiments").rglob("experiment.yaml")):
        load_config(p)


def test_cli_typo_error_is_clean(tmp_path):
    p = write(tmp_path / "c.yaml", "extends: %s\nfactorizer:\n  hiden_dim: 3\n" % (ROOT / "configs/model/tiny.yaml"))
    r = subprocess.run(
        [sys.executable, "-m", "siren", "info", "--config", str(p)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    assert "factorizer.hidden_dim" in r.stderr and "Traceback" not in r.stderr


def test_help_imports_no_heavy_library():
    # `siren --help` stays fast because torch/transformers/wandb are imported inside the commands only.
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "siren", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0 and "train" in r.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "wandb", "accelerate", "torchaudio"}, imported


# ------------------------------------------------------------------------------------------------ value ranges
def _bounded_keys() -> list[tuple[str, type, float, bool]]:
    """(dotted key, number type, lower bound, strictly) of every schema field that declares a bound."""
    import dataclasses
    import typing

    from siren.config.schema import SirenConfig

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif "low" in f.metadata:
                num = float if float in (tp, *typing.get_args(tp)) else int
                out.append((prefix + f.name, num, f.metadata["low"], f.metadata["strictly"]))

    walk(SirenConfig, "")
    return out


BOUNDED = _bounded_keys()


def test_counts_sizes_and_rates_declare_their_bounds():
    keys = {k for k, *_ in BOUNDED}
    assert {"train.batch_size", "train.max_steps", "data.num_workers", "optim.lr", "audio.hop_length"} <= keys


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(BOUNDED), below=st.integers(1, 10**6), above=st.integers(0, 10**6))
def test_a_value_out_of_range_is_named_at_load_and_one_in_range_loads(tmp_path_factory, which, below, above):
    """Any value under a field's bound (or at it, for a strict one) is a config error naming the key, the bound and
    the value, before anything runs; any value from the bound up (above it, for a strict one) loads as given."""
    key, num, low, strictly = which
    base = tmp_path_factory.mktemp("bounds") / "c.yaml"
    base.write_text("stage: codec\n")
    bad = low - below if num is int else low - below / 1000
    with pytest.raises(ConfigError) as e:
        load_config(base, [f"{key}={bad}"])
    assert f"`{key}` must be {'>' if strictly else '>='} {low}, got {bad!r}" in str(e.value)
    if strictly:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(base, [f"{key}={num(low)}"])
    good = low + above + (1 if strictly else 0) if num is int else low + above / 1000 + (0.5 if strictly else 0)
    cfg = load_config(base, [f"{key}={good}"])
    section, field = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, field) == good
