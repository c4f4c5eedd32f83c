"""A run made with relative paths works from any directory: the config's relative paths are resolved once, when it
is loaded, against the directory the command was started from, and the run records them absolute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import ROOT, reset_accelerate, stage_overrides

from siren.cli import main
from siren.config.loader import load_config


def test_relative_paths_are_made_absolute_against_the_start_directory(tmp_path):
    (tmp_path / "w" / "teacher").mkdir(parents=True)
    cfg = load_config(
        ROOT / "configs/demo/base.yaml",
        [
            "run_dir=runs/x",
            "data.train=data/train.jsonl",
            "baseline=../other/codec",
            "pipeline.flow=wandb:local/p/flow-run:latest",
            "ssl.name=teacher",
            "factorizer.weights=w.pt",
        ],
        base=tmp_path / "w",
    )
    w = (tmp_path / "w").resolve()
    assert cfg.run_dir == str(w / "runs/x") and cfg.data.train == str(w / "data/train.jsonl")
    assert cfg.baseline == str((tmp_path / "other/codec").resolve())
    assert cfg.pipeline.flow == "wandb:local/p/flow-run:latest"  # a URI stays a URI
    assert cfg.ssl.name == str(w / "teacher")  # on disk: a path
    assert cfg.factorizer.weights == str(w / "w.pt")
    hub = load_config(ROOT / "configs/demo/base.yaml", ["ssl.name=facebook/hubert-base-ls960"], base=tmp_path)
    assert hub.ssl.name == "facebook/hubert-base-ls960"  # not on disk: a hub id


@pytest.fixture(scope="module")
def relative_runs(corpus_dir, teacher_dir, tmp_path_factory):
    """A vocoder and a codec run trained from a scratch directory with relative paths only (corpus and teacher
    copied in beside them, as a user's project would hold them)."""
    from siren.train.trainer import Trainer

    work = tmp_path_factory.mktemp("project")
    shutil.copytree(corpus_dir, work / "corpus")
    shutil.copytree(teacher_dir, work / "teacher")
    for split in ("train", "val"):  # the manifest's rows point at the copies, by paths relative to the manifest
        rows = [json.loads(x) for x in (work / "corpus" / f"{split}.jsonl").read_text().splitlines()]
        for r in rows:
            r["path"] = str(Path(r["path"]).relative_to(corpus_dir)) if Path(r["path"]).is_absolute() else r["path"]
        (work / "corpus" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        common = {
            "data.train": "corpus/train.jsonl",
            "data.val": "corpus/val.jsonl",
            "ssl.name": "teacher",
            "train.max_steps": 2,
            "train.checkpoint_every": 2,
            "samples.enabled": "false",
            "tracking.mode": "disabled",
        }
        for stage, extra in (("vocoder", {}), ("codec", {"pipeline.vocoder": "runs/vocoder"})):
            ov = stage_overrides(stage, Path("corpus"), Path("teacher"), Path(f"runs/{stage}"), **{**common, **extra})
            reset_accelerate()
            Trainer(load_config(ROOT / "configs/demo/base.yaml", ov)).fit()
        reset_accelerate()
    finally:
        mp.undo()
    return work


def test_a_run_records_absolute_paths(relative_runs):
    meta = json.loads((relative_runs / "runs/codec/checkpoints/step_2/meta.json").read_text())
    cfg = meta["config"]
    for value in (cfg["run_dir"], cfg["data"]["train"], cfg["ssl"]["name"], cfg["pipeline"]["vocoder"]):
        assert Path(value).is_absolute() and Path(value).exists(), value


def test_codec_and_decode_work_from_another_directory(relative_runs, tmp_path, monkeypatch, capsys):
    from siren.codec import Codec

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = relative_runs / "runs/codec"
    codec = Codec.from_checkpoint(str(run))  # its pipeline.vocoder was given as `runs/vocoder`
    assert codec.has("vocoder")
    wav = torch.randn(codec.min_samples + 3000, generator=torch.Generator().manual_seed(0)) * 0.1
    sf.write(elsewhere / "in.wav", wav.numpy(), 16000)
    assert main(["encode", "in.wav", "x.siren", "--checkpoint", str(run)]) == 0, capsys.readouterr().err[-2000:]
    assert main(["decode", "x.siren", "y.wav", "--checkpoint", str(run)]) == 0, capsys.readouterr().err[-2000:]
    assert sf.info(elsewhere / "y.wav").frames == wav.shape[0]
