"""Foreign (bring-your-own) codec modules are described truthfully: `siren info` reports the built modules and the
trainer's own bit/s; per-digit FSQ metrics name the member they need and warn once when a quantizer seems to lack it;
import errors say what is wrong in words that fit (buffer-only modules, wrapper prefixes with the exact `rename:` rule,
dropped tensors, buffers that contradict `args:`); a foreign run's config.yaml shows what was built.

Every test here fails with its mechanism switched off: each asserts a number or a message that the old behaviour
(preset numbers, silent loads, parameter-only wording, native preset keys) does not produce.
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from acme_codec import nets
from acme_codec.siren_adapters import GridAsQuantizer
from helpers import ROOT
from test_byoc_e2e import acme_yaml, write_acme_checkpoints
from torch import nn

from siren.config.loader import load_config
from siren.models.builders import build_component
from siren.models.io import StrictLoadError

TINY = ROOT / "configs/model/tiny.yaml"
HERE = "test_foreign_truth"  # this module, importable by `target:` (tests/ is on sys.path)


@pytest.fixture(scope="module")
def acme_cfg_path(teacher_dir, tmp_path_factory):
    root = write_acme_checkpoints(tmp_path_factory.mktemp("acme"))
    path = root / "acme.yaml"
    path.write_text(yaml.safe_dump(acme_yaml(root, teacher_dir)))
    return path


# ------------------------------------------------------------------------------------------------------- siren info
def test_info_reports_the_built_foreign_modules_and_the_trainers_bit_rate(acme_cfg_path):
    from siren.info import component_info
    from siren.models.builders import nominal_bps
    from siren.train.stages.codec import CodecStage

    cfg = load_config(acme_cfg_path)
    info = component_info(cfg)
    # The trainer's number: the codec stage builds the same modules and logs `stage.nominal_bps()`.
    stage = CodecStage(load_config(acme_cfg_path))
    stage.build()
    assert info["bps_nominal"] == pytest.approx(stage.nominal_bps(), rel=1e-12)
    assert info["bps_nominal"] != pytest.approx(nominal_bps(cfg)["total"])  # not the preset's 81-code layout
    rows = info["components"]
    assert "1 × 75" in rows["sem_quantizer"]["rate"] and "1 × 27" in rows["pro_quantizer"]["rate"]
    assert "4 × 16" in rows["spk_quantizer"]["rate"]
    assert "× 32" in rows["factorizer"]["rate"] and "× 16" in rows["factorizer"]["rate"]  # sem_ch 32, pro_ch 16
    q = build_component("sem_quantizer", cfg, load_weights=False)
    assert rows["sem_quantizer"]["params"] == sum(p.numel() for p in q.parameters())
    assert rows["sem_quantizer"]["class"] == "acme_codec.siren_adapters:GridAsQuantizer"
    assert info["layout"]["sem"] == {"codebook_size": 75, "levels": 1, "rate_hz": 25.0}
    assert "rate only" in rows["entropy_model"]["rate"]


def test_info_cli_prints_the_built_bit_rate(acme_cfg_path, capsys):
    from siren.cli import main
    from siren.info import component_info

    bps = component_info(load_config(acme_cfg_path))["bps_nominal"]
    capsys.readouterr()
    assert main(["info", "--config", str(acme_cfg_path)]) == 0
    out = capsys.readouterr().out
    assert f"nominal bit/s: {bps:.1f}" in out and "198.1" not in out


# ---------------------------------------------------------------------------------------------- FSQ digit levels
class GridWithDigits(GridAsQuantizer):
    """ACME's grid quantizer exposing its grid as the documented `digit_levels`."""

    @property
    def digit_levels(self) -> list[int]:
        return list(self.net.grid)


class PlainVQ(nn.Module):
    """A nearest-neighbour codebook of 1024 entries: no digit structure, nothing to warn about."""

    num_levels = 1
    codebook_size = 1024
    bits_per_code = 10.0

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1024, 4))


@pytest.fixture
def fresh_warnings(monkeypatch):
    from siren.models import roles

    monkeypatch.setattr(roles, "_DIGIT_WARNED", set())


def test_digit_levels_is_read_from_the_documented_member(fresh_warnings, caplog):
    from siren.models.quantizers import ResidualFSQ
    from siren.models.roles import DigitLevels, fsq_digit_levels

    q = GridWithDigits(nets.ScalarGrid(8, [5, 5, 3]))
    assert isinstance(q, DigitLevels) and "digit_levels" in DigitLevels.__doc__
    with caplog.at_level(logging.WARNING, logger="siren"):
        assert fsq_digit_levels("sem_quantizer", q) == [5, 5, 3]
        assert fsq_digit_levels("sem_quantizer", ResidualFSQ(8, [3, 3, 3, 3], 1)) == [3, 3, 3, 3]
        assert fsq_digit_levels("sem_quantizer", PlainVQ()) is None
    assert not caplog.records


def test_a_quantizer_that_looks_like_fsq_without_digit_levels_warns_once(fresh_warnings, caplog, acme_cfg_path):
    from siren.models.roles import fsq_digit_levels
    from siren.train.stages.codec import CodecStage

    stage = CodecStage(load_config(acme_cfg_path))
    mods = stage.build()
    with caplog.at_level(logging.WARNING, logger="siren"):
        digits = stage.code_digits(mods)  # the one place the trainer builds the digit layout
        stage.code_digits(mods)
        assert fsq_digit_levels("sem_quantizer", mods["sem_quantizer"]) is None
    assert digits == {}
    warned = [r.getMessage() for r in caplog.records if "digit_levels" in r.getMessage()]
    assert len(warned) == 2, warned  # sem and pro, once each
    assert "sem_quantizer" in warned[0] and "net.grid" in warned[0] and "[5, 5, 3]" in warned[0]


def test_a_codebook_size_that_factors_like_an_fsq_grid_warns(fresh_warnings, caplog):
    from siren.models.roles import fsq_digit_levels

    class Opaque(PlainVQ):
        codebook_size = 1000  # 8·5·5·5, a common FSQ grid; no attribute tells the digits

    with caplog.at_level(logging.WARNING, logger="siren"):
        assert fsq_digit_levels("pro_quantizer", Opaque()) is None
    assert "pro_quantizer" in caplog.text and "1000" in caplog.text and "digit_levels" in caplog.text


# ----------------------------------------------------------------------------------------------- import messages
class BufferVocoder(nn.Module):
    """A vocoder with no parameters, only a persistent buffer (a fixed synthesis window)."""

    hop_length = 320

    def __init__(self, size: int = 4):
        super().__init__()
        self.register_buffer("window", torch.hann_window(size))

    def forward(self, mel):
        return mel.new_zeros(mel.shape[0], mel.shape[-1] * self.hop_length)


def test_a_buffer_only_module_without_weights_is_told_about_buffers(tmp_path):
    from siren.errors import SirenError
    from siren.importer import import_run

    cfg = load_config(TINY, [f"vocoder.target={HERE}:BufferVocoder", "tracking.mode=disabled"])
    with pytest.raises(SirenError) as info:
        import_run(cfg, "vocoder", tmp_path / "run")
    msg = str(info.value)
    assert "no parameters" in msg and "buffers" in msg and "window" in msg and "persistent=False" in msg, msg
    assert "has parameters" not in msg


@pytest.mark.parametrize("prefix, rule", [("module.", r"^module\."), ("_orig_mod.", r"^_orig_mod\.")])
def test_wrapper_prefixes_get_the_exact_rename_rule(tmp_path, prefix, rule):
    src = nets.ScalarGrid(8, [3, 3])
    torch.save({f"{prefix}{k}": v for k, v in src.state_dict().items()}, tmp_path / "q.pt")
    base = [
        "sem_quantizer.target=acme_codec.nets:ScalarGrid",
        "sem_quantizer.args={ch: 8, grid: [3, 3]}",
        "sem_quantizer.adapter=acme_codec.siren_adapters:GridAsQuantizer",
    ]
    with pytest.raises(StrictLoadError) as info:
        build_component("sem_quantizer", load_config(TINY, [*base, f"sem_quantizer.weights={tmp_path / 'q.pt'}"]))
    msg = str(info.value)
    assert {"_orig_mod.": "torch.compile", "module.": "DataParallel"}[prefix] in msg
    # The suggestion is YAML to paste: parsed, it is exactly the rule, and with it the weights load.
    snippet = msg[msg.index("sem_quantizer:\n") :]
    assert yaml.safe_load(snippet) == {"sem_quantizer": {"rename": {rule: ""}}}
    fixed = load_config(TINY, [*base, f"sem_quantizer.weights={tmp_path / 'q.pt'}"])
    fixed.sem_quantizer.rename = yaml.safe_load(snippet)["sem_quantizer"]["rename"]
    q = build_component("sem_quantizer", fixed)
    assert torch.equal(q.net.down.weight, src.down.weight)


def test_both_wrapper_prefixes_at_once_get_one_rule(tmp_path):
    src = nets.ScalarGrid(8, [3, 3])
    torch.save({f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, tmp_path / "q.pt")
    cfg = load_config(
        TINY,
        [
            "sem_quantizer.target=acme_codec.nets:ScalarGrid",
            "sem_quantizer.args={ch: 8, grid: [3, 3]}",
            f"sem_quantizer.weights={tmp_path / 'q.pt'}",
        ],
    )
    with pytest.raises(StrictLoadError) as info:
        build_component("sem_quantizer", cfg)
    msg = str(info.value)
    assert yaml.safe_load(msg[msg.index("sem_quantizer:\n") :]) == {
        "sem_quantizer": {"rename": {r"^module\._orig_mod\.": ""}}
    }


def test_allow_unexpected_says_the_tensors_are_dropped(tmp_path, caplog):
    src = nets.ScalarGrid(8, [3, 3])
    torch.save({**src.state_dict(), "legacy_gain": torch.ones(1)}, tmp_path / "q.pt")
    cfg = load_config(
        TINY,
        [
            "sem_quantizer.target=acme_codec.nets:ScalarGrid",
            "sem_quantizer.args={ch: 8, grid: [3, 3]}",
            f"sem_quantizer.weights={tmp_path / 'q.pt'}",
            "sem_quantizer.allow_unexpected=[legacy_*]",
            "sem_quantizer.adapter=acme_codec.siren_adapters:GridAsQuantizer",
        ],
    )
    with caplog.at_level(logging.INFO, logger="siren"):
        build_component("sem_quantizer", cfg)
    line = next(r.getMessage() for r in caplog.records if "legacy_gain" in r.getMessage())
    assert "dropped" in line and "allow_unexpected" in line, line


class SavedLevelsFSQ(nn.Module):
    """An FSQ that saves its `levels` as a persistent buffer (as some codebases do); a stream quantizer in its role."""

    num_levels = 1

    def __init__(self, dim: int, levels: list[int]):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels))
        self.proj = nn.Linear(dim, len(levels))

    @property
    def codebook_size(self) -> int:
        return int(self.levels.prod())

    @property
    def bits_per_code(self) -> float:
        return float(torch.log2(self.levels.prod().double()))

    @property
    def digit_levels(self) -> list[int]:
        return self.levels.tolist()

    def decode_codes(self, codes):
        raise NotImplementedError  # never called: these tests only build the module


@pytest.mark.parametrize("saved", [[5, 5, 5], [5, 5]], ids=["same-shape", "other-shape"])
def test_a_buffer_that_contradicts_args_is_one_clear_error(tmp_path, saved, capsys, teacher_dir):
    from siren.cli import main

    src = SavedLevelsFSQ(8, [5, 5, 3])
    sd = {**src.state_dict(), "levels": torch.tensor(saved)}
    if len(saved) != 3:
        sd["proj.weight"], sd["proj.bias"] = torch.zeros(len(saved), 8), torch.zeros(len(saved))
    torch.save(sd, tmp_path / "q.pt")
    ov = [
        f"sem_quantizer.target={HERE}:SavedLevelsFSQ",
        "sem_quantizer.args={dim: 8, levels: [5, 5, 3]}",
        f"sem_quantizer.weights={tmp_path / 'q.pt'}",
    ]
    with pytest.raises(StrictLoadError) as info:
        build_component("sem_quantizer", load_config(TINY, ov))
    msg = str(info.value)
    assert msg.startswith("sem_quantizer:") and "buffer `levels`" in msg, msg
    assert f"checkpoint has {saved}" in msg and "args.levels = [5, 5, 3]" in msg, msg
    # Through the command line: one message, no traceback.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(TINY), "tracking": {"mode": "disabled"}}))
    capsys.readouterr()
    args = ["import", "--config", str(cfg), "--stage", "codec", "--out", str(tmp_path / "run")]
    rc = main([*args, f"ssl.name={teacher_dir}", *ov])
    err = capsys.readouterr().err
    assert rc == 2 and "buffer `levels`" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------- config.yaml
def test_an_imported_runs_config_yaml_shows_what_was_built(acme_cfg_path, tmp_path, monkeypatch):
    from siren.importer import import_run

    monkeypatch.setenv("SIREN_ARTIFACT_CACHE", str(tmp_path / "artifacts"))
    import_run(load_config(acme_cfg_path), "codec", tmp_path / "run")
    dumped = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    fact = dumped["factorizer"]
    assert fact["target"] == "acme_codec.nets:SpeechAnalyzer" and fact["args"]["width"] == 32
    assert fact["adapter"] == "acme_codec.siren_adapters:AnalyzerAsFactorizer" and fact["weights_key"] == "model"
    for native in ("hidden_dim", "num_blocks", "sem_dim", "input_dim", "dropout"):
        assert native not in fact, native  # preset keys the foreign class never read
    assert "levels" not in dumped["sem_quantizer"] and "groups" not in dumped["spk_quantizer"]
    assert dumped["flow"]["target"] and {"steps", "solver"} <= set(dumped["flow"])  # SIREN reads these itself
    assert dumped["ssl"]["name"] and "layer" in dumped["ssl"]  # native section: every field
    load_config(tmp_path / "run" / "config.yaml")  # still a valid config


# ----------------------------------------------------------------------------------------------- negative controls
def _preset_bps(geo, modules):
    return 198.1203125901445  # what the preset's layout gives: info would print it for any modules


# (test, its parameters, attribute switched off, replacement, how the test must then fail)
CONTROLS = [
    (
        "test_info_reports_the_built_foreign_modules_and_the_trainers_bit_rate",
        {},
        "siren.models.analysis.layout_bps",
        _preset_bps,
        r"assert 198\.12",
    ),
    (
        "test_a_quantizer_that_looks_like_fsq_without_digit_levels_warns_once",
        {},
        "siren.models.roles._levels_like",
        lambda module, size: None,
        r"assert 0 == 2|assert .* in",
    ),
    (
        "test_a_codebook_size_that_factors_like_an_fsq_grid_warns",
        {},
        "siren.models.roles._small_factors",
        lambda n: False,
        r"assert .* in",
    ),
    (
        "test_a_buffer_only_module_without_weights_is_told_about_buffers",
        {},
        "siren.importer._refuse_unweighted",
        lambda unweighted, modules: None,
        r"DID NOT RAISE",
    ),
    (
        "test_wrapper_prefixes_get_the_exact_rename_rule",
        {"prefix": "_orig_mod.", "rule": r"^_orig_mod\."},
        "siren.models.weights._rename_hint",
        lambda missing, unexpected, where: "",
        r"assert 'torch\.compile' in",
    ),
    (
        "test_a_buffer_that_contradicts_args_is_one_clear_error",
        {"saved": [5, 5, 5]},
        "siren.models.weights._buffer_contradictions",
        lambda module, own, state, args: [],
        r"DID NOT RAISE",
    ),
    (
        "test_a_buffer_that_contradicts_args_is_one_clear_error",
        {"saved": [5, 5]},
        "siren.models.weights._buffer_contradictions",
        lambda module, own, state, args: [],
        r"assert .*buffer `levels`",
    ),
    (
        "test_an_imported_runs_config_yaml_shows_what_was_built",
        {},
        "siren.config.loader.built_tree",
        lambda tree: tree,
        r"assert 'hidden_dim' not in",
    ),
]


def test_every_guarantee_here_has_a_control():
    tests = {n for n, f in globals().items() if n.startswith("test_") and callable(f)}
    # Message-only tests (the wording is the mechanism) and the control machinery itself.
    uncontrolled = {
        "test_every_guarantee_here_has_a_control",
        "test_fails_with_mechanism_disabled",
        "test_info_cli_prints_the_built_bit_rate",
        "test_digit_levels_is_read_from_the_documented_member",
        "test_both_wrapper_prefixes_at_once_get_one_rule",
        "test_allow_unexpected_says_the_tensors_are_dropped",
    }
    assert tests - uncontrolled == {c[0] for c in CONTROLS}


@pytest.mark.parametrize(
    "test_name, params, target, replacement, failure",
    CONTROLS,
    ids=[f"{c[0][5:]}-{'-'.join(map(str, c[1].values())) or 'x'}-without-{c[2].rsplit('.', 1)[1]}" for c in CONTROLS],
)
def test_fails_with_mechanism_disabled(test_name, params, target, replacement, failure, request, monkeypatch):
    import importlib
    import inspect
    import re

    mod, attr = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(mod), attr, replacement)
    fn = globals()[test_name]
    kwargs = {n: params[n] if n in params else request.getfixturevalue(n) for n in inspect.signature(fn).parameters}
    with pytest.raises((Exception, pytest.fail.Exception)) as info:
        fn(**kwargs)
    text = f"{info.type.__name__}: {info.value}"
    assert re.search(failure, text), f"{test_name} failed without {target}, but not on its own check: {text[:2000]}"
