"""Every clip duration works: a LibriTTS-shaped corpus (0.1 s to 35 s, a share under a second) through codec → adapt →
samples → verify → encode. The shortest clip the codec can encode is derived from the frame geometry of the modules
(sample rate, hops, feature frames per prosody frame), rows below it are excluded and counted when data is opened,
samples pick eligible utterances, verify lists what it skipped, and encoding a too-short clip is one clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import stage_config

from siren.codec import ClipTooShort, Codec, min_encodable_samples
from siren.data.manifest import Utterance, write_manifest
from siren.errors import SirenError
from siren.models.student_ssl import TinyHubert
from siren.train.trainer import Trainer

SR = 16000
# LibriTTS-like: most clips a few seconds, a share under a second, one very long.
TRAIN_SECONDS = [0.1, 0.15, 0.2, 0.25, 0.3, 0.45, 0.7, 0.9, 1.3, 1.8, 2.5, 3.2, 4.5, 6.0, 8.0, 11.0, 35.0]
VAL_SECONDS = {"a": [0.2, 1.1], "b": [0.25, 0.6], "c": [2.0, 0.12]}


def _wav(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * SR)))
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * math.pi * (150 + 40 * (seed % 7)) * t) + 0.02 * rng.standard_normal(n)
    sf.write(str(path), x.astype(np.float32), SR)


def build_libritts_like(root: Path) -> tuple[Path, Path]:
    """train.jsonl / val.jsonl of generated sine+noise wavs of LibriTTS-like durations (three speakers each)."""
    root.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for k, sec in enumerate(TRAIN_SECONDS):
        p = root / f"t{k:02d}.wav"
        _wav(p, sec, k)
        train.append(Utterance(f"t{k:02d}", str(p), sec, f"spk{k % 3}", sample_rate=SR, channels=1))
    for spk, secs in VAL_SECONDS.items():
        for k, sec in enumerate(secs):
            p = root / f"v{spk}{k}.wav"
            _wav(p, sec, 100 + k)
            val.append(Utterance(f"v{spk}{k}", str(p), sec, f"val_{spk}", sample_rate=SR, channels=1))
    # A row whose manifest claims a usable length, but whose file is too short: only loading finds it.
    liar = root / "vliar.wav"
    _wav(liar, 0.2, 7)
    val.append(Utterance("vliar", str(liar), 1.5, "val_c", sample_rate=SR, channels=1))
    return write_manifest(root / "train.jsonl", train), write_manifest(root / "val.jsonl", val)


@pytest.fixture(scope="module")
def short_pipeline(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    train, val = build_libritts_like(root / "corpus")
    torch.manual_seed(0)
    TinyHubert.from_config(32, 2, 2, 64, 16, teacher_dim=64).save_pretrained(root / "student")
    corpus = root / "corpus"
    common = {
        "data.train": str(train),
        "data.val": str(val),
        "data.min_seconds": 0.05,  # below the codec's own minimum: the frame geometry must govern
        "samples.num": 6,  # every val speaker, and more: an ineligible clip would be picked without the filter
        "verify.max_utts": 16,
        "verify.real_clip": None,
    }
    mp = pytest.MonkeyPatch()
    mp.setenv("SIREN_ARTIFACT_CACHE", str(root / "artifacts"))
    try:
        codec = Trainer(
            stage_config(
                "codec",
                corpus,
                teacher_dir,
                root / "codec",
                **{**common, "train.max_steps": 2, "train.checkpoint_every": 2},
            )
        )
        codec.fit()
        adapt = Trainer(
            stage_config(
                "adapt",
                corpus,
                teacher_dir,
                root / "adapt",
                baseline=str(root / "codec"),
                **{
                    **common,
                    "student_ssl.path": str(root / "student"),
                    "loss.teacher_targets": "full",  # the teacher runs on whole utterances, the shortest included
                    "train.max_steps": 2,
                    "train.checkpoint_every": 2,
                },
            )
        )
        adapt.fit()
    finally:
        mp.undo()
    return {"root": root, "codec": codec, "adapt": adapt, "val": val}


def _least(tr: Trainer) -> int:
    geo = tr.stage.geo
    fxs = [tr.modules[n] for n in ("ssl", "student_ssl") if n in tr.modules]
    return max(min_encodable_samples(fx.num_frames, geo.pro_hop, geo.pro_downsample) for fx in fxs)


def test_short_rows_are_excluded_and_counted_when_the_data_opens(short_pipeline):
    for name in ("codec", "adapt"):
        tr = short_pipeline[name]
        least = _least(tr)
        assert 0.16 * SR < least <= 0.5 * SR  # tiny HuBERT + factorizer: 0.32 s (7 frames in 0.16 s, 8 needed)
        short = [s for s in TRAIN_SECONDS if s * SR < least]
        assert short and tr.dataset.min_samples == least
        assert tr.dataset.excluded_count == len(short) and len(tr.dataset) == len(TRAIN_SECONDS) - len(short)
        rows = [json.loads(line) for line in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(r["data/skipped"] == len(short) for r in rows)  # counted once, not per attempt


def test_samples_pick_eligible_utterances(short_pipeline):
    step = short_pipeline["root"] / "adapt" / "checkpoints" / "step_2"
    assert (step / "meta.json").is_file()  # the checkpoint with samples was written (no .tmp-step left)
    assert not list((short_pipeline["root"] / "adapt" / "checkpoints").glob(".tmp-step*"))
    index = json.loads((step / "samples" / "index.json").read_text())
    ids = {s["id"] for s in index["samples"]}
    assert ids == {"va1", "vb1", "vc0"}  # the clips of at least 0.32 s; the liar is found short at load and left out


def test_verify_judges_the_rest_and_reports_what_it_skipped(short_pipeline, monkeypatch):
    import siren.verify
    from siren.verify import run_verify

    monkeypatch.setattr(
        siren.verify.judge, "_quality_scorers", lambda: None
    )  # the eval extra's scorers: slow, not tested here

    root = short_pipeline["root"]
    report = run_verify(root / "adapt", 2, thresholds={"min/agreement/sem": 0.0}, use_wandb=False)
    assert report["num_utts"] == 3 and report["checks"] and report["passed"] in (True, False)
    skipped = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"va0", "vb0", "vc1", "vliar"} and report["num_skipped"] == 4
    assert "too short" in skipped["va0"] and "too short" in skipped["vliar"]
    on_disk = json.loads((Path(report["out_dir"]) / "report.json").read_text())
    assert on_disk["num_skipped"] == 4
    # One file that is too short: an error naming its duration and the minimum, not a crash.
    with pytest.raises(SirenError, match=r"0\.200 s .*at least 0\.320 s"):
        run_verify(
            root / "adapt", 2, thresholds={"min/agreement/sem": 0.0}, use_wandb=False, wav=root / "corpus" / "va0.wav"
        )


def test_encode_too_short_is_one_clear_error(short_pipeline, capsys):
    """`siren encode` of a too-short clip through the CLI's `main` in this process: exit code 2 and one `error:` line,
    no exception escaping (what would be a traceback). `python -m siren` exits with what `main` returns; a user error
    through a real process: tests/test_config.py::test_cli_typo_error_is_clean."""
    from siren.cli import main

    root = short_pipeline["root"]
    codec = Codec.from_checkpoint(str(root / "adapt"), use_pipeline=False)
    least = codec.min_samples
    assert least == _least(short_pipeline["adapt"])
    ok = codec.encode(torch.randn(least) * 0.1)
    assert int(ok.sem_frames[0]) >= 1 and ok.pro.shape[1] >= 1
    with pytest.raises(ClipTooShort, match=rf"{(least - 1) / SR:.3f} s .*at least {least / SR:.3f} s"):
        codec.encode(torch.randn(least - 1) * 0.1)
    capsys.readouterr()
    code = main(
        ["encode", "--checkpoint", str(root / "adapt"), str(root / "corpus" / "va0.wav"), str(root / "va0.siren")]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "too short" in lines[0], err
    assert "Traceback" not in err and not (root / "va0.siren").exists()


def test_encode_without_the_guard_is_the_raw_crash(short_pipeline, monkeypatch):
    """Negative control: with the minimum switched off (one prosody hop, the old check) the same clip reaches the
    factorizer and fails with a bare ValueError, which is what the guard turns into ClipTooShort."""
    codec = Codec.from_checkpoint(str(short_pipeline["root"] / "adapt"), use_pipeline=False)
    least = codec.min_samples
    monkeypatch.setattr(Codec, "min_samples", property(lambda self: self.pro_hop))
    with pytest.raises(ValueError, match="input frames") as e:
        codec.encode(torch.randn(least - 1) * 0.1)
    assert not isinstance(e.value, SirenError)


def test_min_samples_follow_the_extractor_not_a_constant():
    """An extractor that eats more edge samples needs a longer clip; one prosody hop more per missing frame."""

    def hubert_like(extra: int):
        return lambda n: max(0, (n - 400 - extra) // 320 + 1)

    assert min_encodable_samples(hubert_like(0), 2560, 8) == 5120
    assert min_encodable_samples(hubert_like(2560), 2560, 8) == 7680
    assert min_encodable_samples(lambda n: n // 320, 2560, 8) == 2560
    assert min_encodable_samples(lambda n: n // 160, 1280, 4) == 1280
    with pytest.raises(SirenError, match="never yields"):
        min_encodable_samples(lambda n: 0, 2560, 8, limit_samples=100_000)


def test_samples_choose_among_eligible_rows_only(corpus_dir, teacher_dir, tmp_path):
    """Each val speaker has a clip under the minimum; the speaker-balanced pick takes only eligible ones, and an
    explicitly named clip that is too short is an error naming it (before step 1, not at the first checkpoint)."""
    from helpers import stage_config

    from siren.train.samples import eval_utterances

    _, val = build_libritts_like(tmp_path / "c")
    cfg = stage_config("codec", corpus_dir, teacher_dir, tmp_path / "run", **{"data.val": str(val), "samples.num": 3})
    for seed_shift in range(3):  # whatever order the shuffle gives, no short clip is picked
        cfg.samples.num = 3 + seed_shift
        picked = eval_utterances(cfg, 5120)
        assert picked and all(u.duration * SR >= 5120 for u in picked)
    assert {u.id for u in eval_utterances(cfg, 5120)} <= {"va1", "vb1", "vc0", "vliar"}
    assert len(eval_utterances(cfg, 0)) == 5  # without a minimum the short clips are candidates
    cfg.samples.utterances = ["va1", "vb0"]
    with pytest.raises(SirenError, match=r"vb0 \(too short: 0\.250 s"):
        eval_utterances(cfg, 5120)
