"""Bring your own codec, end to end (docs/bring-your-own-codec.md), with the foreign ACME codec in tests/acme_codec:

torch.save checkpoints (nested dicts, `module.` prefixes) → `siren import` (codec, flow, vocoder) → `adapt` trains only
the foreign factorizer (frozen components bit-identical, drift metrics every step) → samples through ACME's own
fuser/flow/vocoder (log10-power mels, converted exactly) → `siren verify` gives a verdict; `siren encode` refuses the
rate-only entropy model. And `codec` trains from scratch with a foreign factorizer chosen by `target:`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mechanisms
import pytest
import torch
import yaml
from helpers import ROOT, stage_config

from siren.config import load_config, to_dict
from siren.train.trainer import Trainer

DIMS = {"feat_ch": 64, "width": 32, "sem_ch": 32, "pro_ch": 16, "spk_ch": 32}  # tiny preset latent dims
MEL = {"sample_rate": 16000, "n_mels": 80, "hop": 320, "n_fft": 1024, "f_min": 0.0, "f_max": 8000.0}
AD = "acme_codec.siren_adapters:"
NETS = "acme_codec.nets:"


def _prefixed(sd: dict) -> dict:
    return {f"module.{k}": v.clone() for k, v in sd.items()}


def _nested(sd: dict) -> dict:
    out: dict = {}
    for k, v in sd.items():
        node = out
        *path, leaf = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v.clone()
    return out


def write_acme_checkpoints(root):
    """ACME's "golden standard" bundle, saved the way ACME's own scripts save it."""
    from acme_codec import nets

    torch.manual_seed(7)
    step = root / "step_87000"
    step.mkdir(parents=True)
    analyzer = nets.SpeechAnalyzer(**DIMS)
    torch.save({"model": _prefixed(analyzer.state_dict()), "epoch": 12}, step / "factorizer.pt")
    torch.save({"state_dict": _prefixed(nets.ScalarGrid(32, [5, 5, 3]).state_dict())}, step / "sem_rfsq.pt")
    torch.save({"state_dict": _prefixed(nets.ScalarGrid(16, [3, 3, 3]).state_dict())}, step / "pro_rfsq.pt")
    torch.save({"state_dict": _prefixed(nets.VoiceTable(32, 4, 16).state_dict())}, step / "spk_pq.pt")
    torch.save({"ema": _prefixed(nets.StreamRates(1, 16).state_dict()), "step": 87000}, step / "entropy.pt")
    dec = _prefixed(nets.WaveSynth(32, 16, 32, 32, 320).state_dict())
    dec["module.legacy_gain"] = torch.ones(1)  # a tensor ACME's current class no longer has: allowed by name
    torch.save(dec, step / "decoder.pt")
    torch.save({"model": _prefixed(nets.Log10PowerMelFlow(80, 16, 32).state_dict())}, root / "flow_epoch20.pt")
    torch.save({"model": _prefixed(nets.Conditioner(32, 16, 32, 16).state_dict())}, root / "fuser_epoch20.pt")
    torch.save({"generator": _nested(nets.Log10PowerMelVocoder(80, 32, 320).state_dict())}, root / "vocoder_latest.pt")
    return root


def acme_yaml(root, teacher) -> dict:
    strip = {"^module\\.": ""}
    step = root / "step_87000"

    def comp(target, args, adapter, weights, key=None, adapter_args=None, **extra):
        c = {"target": NETS + target, "args": args, "adapter": AD + adapter, "weights": str(weights), "rename": strip}
        if key:
            c["weights_key"] = key
        if adapter_args:
            c["adapter_args"] = adapter_args
        return {**c, **extra}

    return {
        "extends": str(ROOT / "configs/demo/base.yaml"),
        "ssl": {"name": str(teacher)},
        "tracking": {"mode": "disabled", "project": "acme"},
        "factorizer": comp(
            "SpeechAnalyzer", DIMS, "AnalyzerAsFactorizer", step / "factorizer.pt", "model", {"input_dim": 64}
        ),
        "sem_quantizer": comp(
            "ScalarGrid", {"ch": 32, "grid": [5, 5, 3]}, "GridAsQuantizer", step / "sem_rfsq.pt", "state_dict"
        ),
        "pro_quantizer": comp(
            "ScalarGrid", {"ch": 16, "grid": [3, 3, 3]}, "GridAsQuantizer", step / "pro_rfsq.pt", "state_dict"
        ),
        "spk_quantizer": comp(
            "VoiceTable",
            {"ch": 32, "books": 4, "entries": 16},
            "TableAsSpeakerQuantizer",
            step / "spk_pq.pt",
            "state_dict",
        ),
        "entropy_model": comp(
            "StreamRates", {"num_bytes": 1, "hidden": 16}, "ByteRateAsEntropyModel", step / "entropy.pt", "ema"
        ),
        "decoder": comp(
            "WaveSynth",
            {"sem_ch": 32, "pro_ch": 16, "spk_ch": 32, "width": 32, "hop": 320},
            "WaveSynthAsDecoder",
            step / "decoder.pt",
            adapter_args=MEL,
            allow_unexpected=["legacy_gain"],
        ),
        "fuser": comp(
            "Conditioner",
            {"sem_ch": 32, "pro_ch": 16, "spk_ch": 32, "cond_ch": 16},
            "ConditionerAsFuser",
            root / "fuser_epoch20.pt",
            "model",
        ),
        "flow": comp(
            "Log10PowerMelFlow",
            {"n_mels": 80, "cond_ch": 16, "width": 32},
            "MelFlowAsFlow",
            root / "flow_epoch20.pt",
            "model",
            MEL,
        ),
        "vocoder": comp(
            "Log10PowerMelVocoder",
            {"n_mels": 80, "width": 32, "hop": 320},
            "MelVocoderAsVocoder",
            root / "vocoder_latest.pt",
            "generator",
            MEL,
            rename={},  # saved as nested dicts without a prefix
        ),
    }


@pytest.fixture(scope="module")
def acme(corpus_dir, teacher_dir, tmp_path_factory):
    """ACME's bundle imported into three SIREN runs, then an adapt run on them."""
    from siren.importer import import_run
    from siren.models.student_ssl import TinyHubert

    root = write_acme_checkpoints(tmp_path_factory.mktemp("acme"))
    mp = pytest.MonkeyPatch()
    mp.setenv("SIREN_ARTIFACT_CACHE", str(root / "artifacts"))
    cfg_path = root / "acme.yaml"
    cfg_path.write_text(yaml.safe_dump(acme_yaml(root, teacher_dir)))
    runs = root / "runs"
    try:
        # The codec import goes through the command line, as a user would run it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        cmd = [sys.executable, "-m", "siren", "import", "--config", str(cfg_path), "--stage", "codec"]
        proc = subprocess.run([*cmd, "--out", str(runs / "codec")], env=env, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        import_run(load_config(cfg_path, [f"baseline={runs / 'codec'}"]), "flow", runs / "flow")
        import_run(load_config(cfg_path), "vocoder", runs / "vocoder")
        torch.manual_seed(0)
        TinyHubert.from_config(48, 2, 4, 96, 32, teacher_dim=64).save_pretrained(root / "student")
        extra = {
            "student_ssl.path": str(root / "student"),
            "pipeline.flow": str(runs / "flow"),
            "pipeline.vocoder": str(runs / "vocoder"),
            "train.max_steps": 3,
            "train.checkpoint_every": 3,
            "verify.max_utts": 2,
            "verify.real_clip": None,
            "tracking.mode": "disabled",
        }
        adapt_cfg = stage_config(
            "adapt", corpus_dir, teacher_dir, runs / "adapt", baseline=str(runs / "codec"), **extra
        )
        as_loaded = to_dict(adapt_cfg)
        Trainer(adapt_cfg).fit()
    finally:
        mp.undo()
    return {"root": root, "runs": runs, "proc": proc, "adapt_cfg": (as_loaded, to_dict(adapt_cfg))}


def _meta(run, step):
    return json.loads((run / "checkpoints" / f"step_{step}" / "meta.json").read_text())


def test_import_writes_a_normal_run_with_sources_and_targets(acme, monkeypatch):
    runs, root = acme["runs"], acme["root"]
    from siren.importer import sha256_file

    codec = runs / "codec"
    assert (codec / "checkpoints" / "latest").read_text().strip() == "step_0"
    meta = _meta(codec, 0)
    assert meta["stage"] == "codec" and meta["step"] == 0
    comps = {p.stem for p in (codec / "checkpoints/step_0/components").glob("*.safetensors")}
    assert comps == {"factorizer", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model", "decoder"}
    assert meta["targets"]["factorizer"]["class"] == "acme_codec.siren_adapters:AnalyzerAsFactorizer"
    assert meta["targets"]["factorizer"]["target"] == "acme_codec.nets:SpeechAnalyzer"
    src = meta["imported"]["sources"]["entropy_model"]
    assert src["sha256"] == sha256_file(root / "step_87000" / "entropy.pt") and src["weights_key"] == "ema"
    assert "ssl" in meta["fingerprints"] and meta["code_layout"]["sem"] == [75, 1]
    # The renames and the allowed unexpected tensor were logged by the import command.
    assert "module.trunk.0.weight -> trunk.0.weight" in acme["proc"].stderr
    assert "legacy_gain allowed by allow_unexpected" in acme["proc"].stderr
    # The imported weights are the file's weights, not a fresh initialisation.
    from safetensors.torch import load_file

    saved = load_file(str(codec / "checkpoints/step_0/components/factorizer.safetensors"))
    orig = torch.load(root / "step_87000" / "factorizer.pt", weights_only=True)["model"]
    assert torch.equal(saved["net.trunk.0.weight"], orig["module.trunk.0.weight"])
    # Flow import recorded the code language of the codec it reads.
    assert _meta(runs / "flow", 0)["fingerprints"]["sem_quantizer"] == meta["fingerprints"]["sem_quantizer"]
    # The local artifact index resolves the import like any run.
    from siren.checkpoints.artifacts import resolve_checkpoint

    monkeypatch.setenv("SIREN_ARTIFACT_CACHE", str(root / "artifacts"))
    assert resolve_checkpoint("wandb:local/acme/codec-codec:latest") == (codec / "checkpoints/step_0").resolve()


def test_building_a_run_never_changes_its_config_and_dumps_what_ran(acme):
    """Adapt resolves the codec's classes from its baseline (here ACME's foreign targets) and the student's
    architecture: into the run's own copy. The config the caller loaded is the same value after the run, and the run
    dir's config.yaml is the config its checkpoints were built from."""
    as_loaded, after = acme["adapt_cfg"]
    assert after == as_loaded
    assert as_loaded["factorizer"]["target"] != "acme_codec.nets:SpeechAnalyzer"  # the loaded config did not name it
    run = acme["runs"] / "adapt"
    ran = _meta(run, 3)["config"]
    assert ran["factorizer"]["target"] == "acme_codec.nets:SpeechAnalyzer"  # what ran: resolved from the baseline
    from siren.config.loader import config_from_dict, dump_config

    dumped = yaml.safe_load((run / "config.yaml").read_text())
    assert dumped == yaml.safe_load(dump_config(config_from_dict(ran)))
    assert dumped["factorizer"]["target"] == "acme_codec.nets:SpeechAnalyzer"


def test_adapt_trains_only_the_factorizer_and_reports_drift(acme):
    runs = acme["runs"]
    base, ad = _meta(runs / "codec", 0), _meta(runs / "adapt", 3)
    for n in ("sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model", "decoder"):
        assert ad["fingerprints"][n] == base["fingerprints"][n], n  # frozen: bit-identical to the import
    assert ad["fingerprints"]["teacher_factorizer"] == base["fingerprints"]["factorizer"]
    assert ad["fingerprints"]["factorizer"] != base["fingerprints"]["factorizer"]  # it trained
    assert ad["trainable"] == ["factorizer"]
    assert ad["targets"]["decoder"]["class"] == "acme_codec.siren_adapters:WaveSynthAsDecoder"
    rows = [json.loads(line) for line in (runs / "adapt" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "drift/sem/js" in r]
    assert len(steps) == 3
    for r in steps:
        for k in (
            "drift/sem/agreement",
            "drift/pro/js",
            "drift/bps_delta",
            "rate/bps_entropy",
            "codebook/sem/l0/usage",
        ):
            assert k in r and r[k] == r[k], k  # present and not NaN
        assert r["frozen/ok"] == 1.0


def test_samples_render_through_the_foreign_pipeline(acme):
    import soundfile as sf

    samples = acme["runs"] / "adapt" / "checkpoints" / "step_3" / "samples"
    wavs = sorted(p.name for p in samples.glob("*.wav"))
    assert any(n.endswith("_adapted.flow-vocoder.wav") for n in wavs)
    assert any(n.endswith("_baseline.flow-vocoder.wav") for n in wavs)
    data, sr = sf.read(str(next(samples.glob("*_adapted.flow-vocoder.wav"))))
    assert sr == 16000 and data.std() > 0


def test_verify_gives_a_verdict_and_encode_refuses_the_rate_only_model(acme, capsys, monkeypatch):
    from siren.cli import main

    # the verdict on a foreign codec, not the quality scorers (tests/test_quality.py), is what is tested here
    monkeypatch.setattr("siren.verify.judge._quality_scorers", mechanisms.stub_quality_scorers)
    runs = acme["runs"]
    rc = main(["verify", "--run", str(runs / "adapt"), "--step", "3", "--no-wandb"])
    assert rc in (0, 1)
    report = json.loads((runs / "adapt" / "verify" / "step_3" / "report.json").read_text())
    assert "agreement/sem" in report["metrics"] and "mel_l1/adapted_vs_baseline" in report["metrics"]
    assert "bps_real/adapted" not in report["metrics"]  # no bitstream from a rate-only model
    wav = next((runs.parent / "corpus").glob("*.wav"), None) if (runs.parent / "corpus").exists() else None
    if wav is None:
        import numpy as np
        import soundfile as sf

        wav = acme["root"] / "in.wav"
        sf.write(str(wav), (0.1 * np.random.default_rng(0).standard_normal(16000)).astype("float32"), 16000)
    capsys.readouterr()
    rc = main(["encode", str(wav), str(acme["root"] / "out.siren"), "--checkpoint", str(runs / "adapt")])
    assert rc == 2
    assert "rate-only" in capsys.readouterr().err


def test_codec_trains_from_scratch_with_a_foreign_factorizer(corpus_dir, teacher_dir, tmp_path):
    from siren.codec import Codec

    run = tmp_path / "codec"
    extra = {
        "factorizer.target": NETS + "SpeechAnalyzer",
        "factorizer.args": json.dumps(DIMS),
        "factorizer.adapter": AD + "AnalyzerAsFactorizer",
        "factorizer.adapter_args": "{input_dim: 64}",
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "tracking.mode": "disabled",
    }
    tr = Trainer(stage_config("codec", corpus_dir, teacher_dir, run, **extra))
    before = {k: v.clone() for k, v in tr.modules["factorizer"].state_dict().items()}
    last = tr.fit()
    assert "codebook/sem/l0/usage" in last and last["train/loss"] == last["train/loss"]
    after = tr.modules["factorizer"].state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    meta = _meta(run, 2)
    assert meta["targets"]["factorizer"]["target"] == NETS + "SpeechAnalyzer"
    # The checkpoint re-imports the foreign class and encodes/decodes through SIREN's own entropy coder.
    codec = Codec.from_checkpoint(str(run), use_pipeline=False)
    assert type(codec.components["factorizer"]).__name__ == "AnalyzerAsFactorizer"
    codes = codec.encode(0.1 * torch.randn(16000))
    assert torch.equal(codec.from_bytes(codec.to_bytes(codes)).sem, codes.sem)


def test_adapt_with_a_foreign_student_imported_from_torch_save(acme, corpus_dir, teacher_dir, tmp_path, monkeypatch):
    """A team's own distilled encoder (not a TinyHubert) enters through `siren import --stage distill` and drives an
    adapt run; the adapt checkpoint rebuilds the foreign student class and holds its exact weights."""
    from acme_codec import nets
    from safetensors.torch import load_file

    from siren.checkpoints.load import load_checkpoint
    from siren.importer import import_run

    monkeypatch.setenv("SIREN_ARTIFACT_CACHE", str(tmp_path / "artifacts"))
    torch.manual_seed(3)
    enc = nets.FrameEncoder(320, 32, 64)
    torch.save({"encoder": _prefixed(enc.state_dict())}, tmp_path / "student.pt")
    cfg_path = tmp_path / "acme.yaml"
    tree = acme_yaml(acme["root"], teacher_dir)
    tree["student_ssl"] = {
        "target": NETS + "FrameEncoder",
        "args": {"hop": 320, "width": 32, "out_ch": 64},
        "adapter": AD + "EncoderAsFeatures",
        "weights": str(tmp_path / "student.pt"),
        "weights_key": "encoder",
        "rename": {"^module\\.": ""},
    }
    cfg_path.write_text(yaml.safe_dump(tree))
    import_run(load_config(cfg_path), "distill", tmp_path / "student")
    run = tmp_path / "adapt"
    extra = {
        "student_ssl.path": str(tmp_path / "student"),
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "samples.enabled": "false",
        "tracking.mode": "disabled",
    }
    last = Trainer(
        stage_config("adapt", corpus_dir, teacher_dir, run, baseline=str(acme["runs"] / "codec"), **extra)
    ).fit()
    assert last["frozen/ok"] == 1.0 and "drift/sem/agreement" in last
    meta = _meta(run, 2)
    assert meta["targets"]["student_ssl"]["target"] == NETS + "FrameEncoder"
    assert meta["consumed"]["student_ssl"]["path"] == str((tmp_path / "student" / "checkpoints" / "step_0").resolve())
    saved = load_file(str(run / "checkpoints" / "step_2" / "components" / "student_ssl.safetensors"))
    assert torch.equal(saved["net.frontend.weight"], enc.state_dict()["frontend.weight"])  # frozen: the file's weights
    ck = load_checkpoint(str(run), ["student_ssl"])
    assert type(ck.modules["student_ssl"]).__name__ == "EncoderAsFeatures"
