"""`siren verify --wav FILE` (siren/verify.py): one recording judged against the baseline with the run's thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import stage_config
from report_page import CHROMIUM, NO_BROWSER, assert_media_playable, media_status, parse_page

from siren.data.manifest import read_manifest
from siren.train.trainer import Trainer
from siren.verify import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, verify_cli


@pytest.fixture(scope="module")
def adapt_run(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify_wav")
    mp = pytest.MonkeyPatch()  # module scope: the per-test hermetic W&B and artifact cache are not set up yet
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("SIREN_ARTIFACT_CACHE", str(root / "artifacts"))
    common = {
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "samples.enabled": "false",
        "tracking.mode": "disabled",
    }
    try:
        Trainer(stage_config("codec", corpus_dir, teacher_dir, root / "codec", **common)).fit()
        Trainer(stage_config("distill", corpus_dir, teacher_dir, root / "distill", **common)).fit()
        extra = {**common, "verify.real_clip": None, "student_ssl.path": str(root / "distill")}
        Trainer(
            stage_config("adapt", corpus_dir, teacher_dir, root / "adapt", baseline=str(root / "codec"), **extra)
        ).fit()
    finally:
        mp.undo()
    return root / "adapt"


def _verify(run: Path, *, wav=None, data=None, threshold=("min/agreement/sem=0.0",)) -> int:
    args = SimpleNamespace(run=str(run), step=2, data=data, wav=wav, threshold=list(threshold), no_wandb=True)
    return verify_cli(args)


def test_verify_one_wav(adapt_run, corpus_dir, capsys):
    """The report judges exactly that file (one utterance, named by its stem) and the verdict follows the thresholds;
    a missing file, or a file together with a manifest, is an error (exit 2) naming the problem."""
    utts = read_manifest(corpus_dir / "val.jsonl")
    wav = Path(utts[0].path)
    assert _verify(adapt_run, wav=str(wav)) == EXIT_PASS, capsys.readouterr().out
    out = adapt_run / "verify" / "step_2" / "wav" / wav.stem
    report = json.loads((out / "report.json").read_text())
    assert report["eval_set"] == str(wav) and report["num_utts"] == 1
    assert [u["id"] for u in report["per_utterance"]] == [wav.stem]
    assert (out / f"{wav.stem}_original.wav").is_file() and (out / f"{wav.stem}_adapted.png").is_file()
    assert not (adapt_run / "verify" / "step_2" / "report.json").exists(), "a one-file check overwrote the eval report"
    assert report["metrics"]["agreement/sem"] <= 1.0
    page = parse_page((out / "report.html").read_text())  # the page a person opens shows this very report
    assert page.verdict == "PASS" and [c[0] for c in page.tables["checks"][1:]] == [
        c["threshold"] for c in report["checks"]
    ]
    played = ["original", "adapted", "baseline"] if "vocoder" in report["pipeline"] else ["original"]
    assert [a["data-media"] for a in page.audio] == [f"{wav.stem}_{v}.wav" for v in played] and len(page.img) == 3
    assert _verify(adapt_run, wav=str(wav), threshold=["min/agreement/sem=1.01"]) == EXIT_FAIL

    capsys.readouterr()
    assert _verify(adapt_run, wav=str(wav.with_name("missing.wav"))) == EXIT_ERROR
    assert "missing.wav: file not found" in capsys.readouterr().out
    assert _verify(adapt_run, wav=str(wav), data=str(corpus_dir / "val.jsonl")) == EXIT_ERROR
    assert "not both" in capsys.readouterr().out


@pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
def test_verify_report_opens_in_a_browser(adapt_run, corpus_dir):
    """The report.html a real verify wrote opens in headless Chromium with playable audio and decoded mel images."""
    wav = Path(read_manifest(corpus_dir / "val.jsonl")[1].path)
    assert _verify(adapt_run, wav=str(wav)) == EXIT_PASS
    out = adapt_run / "verify" / "step_2" / "wav" / wav.stem
    report = json.loads((out / "report.json").read_text())
    audio = 3 if "vocoder" in report["pipeline"] else 1  # this run has no vocoder: the original plays, mels show
    assert_media_playable(media_status(out / "report.html"), audio=audio, images=3)
