"""The trainer on tiny presets: codec → adapt, contract metric keys, frozen guarantees end to end, exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, stage_config, stage_overrides, train_cmd
from safetensors.torch import load_file

from siren.train.tracking import read_metrics
from siren.train.trainer import Trainer

FROZEN_IN_ADAPT = ["decoder", "sem_quantizer", "pro_quantizer", "spk_quantizer", "entropy_model"]


def contract_keys(stage: str) -> set[str]:
    keys = {"train/loss", "train/grad_norm", "train/step_time_s", "frozen/ok", "rate/bps_nominal", "rate/bps_entropy"}
    for s, levels in (("sem", ["l0"]), ("pro", ["l0"]), ("spk", ["g0", "g1", "g2", "g3"])):
        for lv in levels:
            keys |= {f"codebook/{s}/{lv}/{k}" for k in ("usage", "perplexity", "dead")}
        if stage == "adapt":
            keys |= {f"drift/{s}/{k}" for k in ("js", "entropy_delta_bits", "agreement")}
    if stage == "adapt":
        keys.add("drift/bps_delta")
    return keys


def test_codec_run_layout_and_metrics(codec_run):
    rows = read_metrics(codec_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        missing = contract_keys("codec") - set(r)
        assert not missing, missing
        assert any(k.startswith("train/lr/") for k in r)
    assert (codec_run / "checkpoints" / "latest").read_text().strip() == "step_6"
    meta = json.loads((codec_run / "checkpoints" / "step_6" / "meta.json").read_text())
    assert meta["stage"] == "codec" and meta["frozen"] == ["ssl"] and meta["wandb"]["id"]
    samples = codec_run / "checkpoints" / "step_6" / "samples"
    names = {p.name for p in samples.iterdir()}
    # No pipeline configured: the decoder head rendered a mel and nothing made audio; the file names say so.
    assert any(n.endswith("_decoder.decoder_head.png") for n in names), names
    assert not any("_decoder" in n and n.endswith(".wav") for n in names)
    assert json.loads((samples / "index.json").read_text())["pipeline"] == {}
    assert list((codec_run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_sample_without_its_rendering_path_is_an_error(corpus_dir, teacher_dir, tmp_path):
    """Sample files name the path that rendered them; a stage that does not say which path it used is refused."""
    from types import SimpleNamespace

    from siren.errors import SirenError
    from siren.train.samples import render_samples
    from siren.train.stages.base import Sample

    cfg = stage_config("codec", corpus_dir, teacher_dir, tmp_path / "run")

    def render(renderer, modules, inputs, paths):
        return [Sample(id=u.id, audio={"original": w}, mels={"decoder": w[None, :80]}, paths=paths) for u, w in inputs]

    def hook(paths):
        stage = SimpleNamespace(name="codec", render=lambda r, m, i: render(r, m, i, paths))
        tracker = SimpleNamespace(media_enabled=False)
        return SimpleNamespace(
            cfg=cfg, device=torch.device("cpu"), stage=stage, modules={}, tracker=tracker, pipeline_paths={}
        )

    written = render_samples(hook({"decoder": "decoder_head"}), tmp_path / "ok", 1)
    assert any(p.name.endswith("_decoder.decoder_head.png") for p in written)
    with pytest.raises(SirenError, match="without the path that rendered it"):
        render_samples(hook({}), tmp_path / "bad", 1)


def test_adapt_keeps_frozen_bit_identical_and_logs_drift(codec_run, corpus_dir, teacher_dir, tmp_path):
    run = tmp_path / "adapt"
    student = tmp_path / "student"
    from siren.models.student_ssl import TinyHubert

    torch.manual_seed(0)
    TinyHubert.from_config(48, 2, 4, 96, 32, teacher_dim=64).save_pretrained(student)
    cfg = stage_config(
        "adapt",
        corpus_dir,
        teacher_dir,
        run,
        baseline=str(codec_run),
        **{"student_ssl.path": str(student), "train.max_steps": 4},
    )
    Trainer(cfg).fit()
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 4
    for r in rows:
        missing = contract_keys("adapt") - set(r)
        assert not missing, missing
        assert r["frozen/ok"] == 1.0
        assert 0.0 <= r["drift/sem/agreement"] <= 1.0
    base = codec_run / "checkpoints" / "step_6" / "components"
    mine = run / "checkpoints" / "step_4" / "components"
    for name in FROZEN_IN_ADAPT:
        a, b = load_file(base / f"{name}.safetensors"), load_file(mine / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    fa = load_file(base / "factorizer.safetensors")
    fb = load_file(mine / "factorizer.safetensors")
    assert any(not torch.equal(fa[k], fb[k]) for k in fa)  # the factorizer did train
    meta = json.loads((run / "checkpoints" / "step_4" / "meta.json").read_text())
    assert set(FROZEN_IN_ADAPT) <= set(meta["frozen"]) and meta["trainable"] == ["factorizer"]
    assert meta["baseline"]["uri"] == str(codec_run) and meta["baseline"]["fingerprint"]
    prof = json.loads((run / "baseline_profile.json").read_text())
    assert prof["baseline_fingerprint"] == meta["baseline"]["fingerprint"]


def test_adapt_teacher_targets_full_and_crop_agree_on_a_whole_utterance(codec_run, corpus_dir, teacher_dir, tmp_path):
    from siren.data.cache_fill import TEACHER
    from siren.data.datasets import collate
    from siren.models.student_ssl import TinyHubert

    torch.manual_seed(0)
    TinyHubert.from_config(48, 2, 4, 96, 32, teacher_dim=64).save_pretrained(tmp_path / "student")
    common = {"student_ssl.path": str(tmp_path / "student"), "train.max_steps": 1, "data.segment_seconds": 8.0}
    full = Trainer(
        stage_config(
            "adapt",
            corpus_dir,
            teacher_dir,
            tmp_path / "full",
            baseline=str(codec_run),
            **common,
            **{"loss.teacher_targets": "full"},
        )
    )
    crop = Trainer(
        stage_config(
            "adapt",
            corpus_dir,
            teacher_dir,
            tmp_path / "crop",
            baseline=str(codec_run),
            **common,
            **{"loss.teacher_targets": "crop"},
        )
    )
    assert (tmp_path / "full" / "cache").is_dir() and not (tmp_path / "crop" / "cache").exists()  # crop: no cache
    item = full.dataset[0]  # an 8-s segment holds the whole utterance: both modes see the same audio
    assert item["length"] < full.dataset.segment_samples
    batch = collate([item])
    n = int(item["length"])
    an = full.stage.student(full.modules, batch["wav"][:, :n])
    n_sem, n_pro = an.sem.codes.shape[1], an.pro.codes.shape[1]
    cached = full.stage._teacher_targets(
        batch, batch[TEACHER]["sem_codes"].shape[1], batch[TEACHER]["pro_codes"].shape[1], "cpu"
    )
    live = crop.stage._crop_teacher(crop.modules, batch["wav"][:, :n], n_sem, n_pro)
    for k in ("sem_latent", "pro_latent"):
        assert torch.allclose(cached[k][:, : live[k].shape[1]], live[k], atol=2e-2, rtol=1e-2), k
    assert torch.allclose(cached["spk_latent"], live["spk_latent"], atol=2e-2, rtol=1e-2)
    for s in ("sem", "pro"):
        agree = (cached[f"{s}_codes"][:, : live[f"{s}_codes"].shape[1]] == live[f"{s}_codes"]).float().mean()
        assert agree > 0.95, (s, agree)
    full.tracker.finish()
    crop.tracker.finish()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended early"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_sigkill_and_resume_reproduces_losses_bitwise(corpus_dir, teacher_dir, tmp_path, subprocess_env):
    ov = {"train.max_steps": 14, "train.checkpoint_every": 4, "samples.enabled": "false"}

    def cmd(run: Path) -> list[str]:
        return train_cmd("codec", corpus_dir, teacher_dir, run, **ov)

    # The uninterrupted reference in this process: the losses are a function of the config and the seeds, not of the
    # process; the killed run and its resume are real processes.
    Trainer(stage_config("codec", corpus_dir, teacher_dir, tmp_path / "ref", **ov)).fit()
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd(run), env=subprocess_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(run / "checkpoints" / "step_4" / "meta.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "step_14").exists()
    Trainer(stage_config("codec", corpus_dir, teacher_dir, run, **ov)).fit()  # the resume, in this process
    a = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    b = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15))
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            if k.startswith(
                (
                    "train/loss",
                    "train/mel",
                    "train/commit",
                    "train/entropy",
                    "train/grad_norm",
                    "codebook/",
                    "rate/bps_entropy",
                )
            ):
                assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    wa = load_file(tmp_path / "ref" / "checkpoints" / "step_14" / "components" / "factorizer.safetensors")
    wb = load_file(run / "checkpoints" / "step_14" / "components" / "factorizer.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cache_cli_and_training_from_cache(corpus_dir, teacher_dir, tmp_path, capsys):
    """`siren cache` fills what training then reads, untouched; with a clip too short to encode in the manifest and
    `data.min_seconds: 0`, both leave it out by the same derived minimum, so both compute the same keys. The command
    runs in-process through the CLI's `main` (its 2-process form: tests/test_multiprocess.py)."""
    import soundfile as sf
    from helpers import reset_accelerate

    from siren.cli import main

    cache = tmp_path / "cache"
    sf.write(tmp_path / "short.wav", 0.1 * np.random.default_rng(0).standard_normal(3200).astype(np.float32), 16000)
    rows = (corpus_dir / "train.jsonl").read_text().splitlines()
    rows = [json.dumps({**json.loads(r), "path": str(corpus_dir / json.loads(r)["path"])}) for r in rows]
    rows.append(json.dumps({"id": "short", "path": str(tmp_path / "short.wav"), "duration": 0.2, "speaker": "slt"}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    short = {"data.feature_cache": str(cache), "data.train": str(tmp_path / "train.jsonl"), "data.min_seconds": 0}
    ov = stage_overrides("codec", corpus_dir, teacher_dir, tmp_path / "run", **short)
    try:
        code = main(["cache", "--config", str(ROOT / "configs/demo/base.yaml"), *ov])
    finally:
        reset_accelerate()  # the command's process state: the trainer below sets up its own
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "features train: computed" in out.out and "features val: computed" in out.out
    assert f"features train: computed {len(rows) - 1}, reused 0, entries {len(rows) - 1}" in out.out  # not the 0.2 s
    dirs = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(dirs) == 2  # train and val, each under its own key
    before = {p: p.stat().st_mtime_ns for d in dirs for p in d.iterdir()}
    cfg = stage_config(
        "codec",
        corpus_dir,
        teacher_dir,
        tmp_path / "run",
        **short,
        **{"train.max_steps": 2, "samples.enabled": "false"},
    )
    tr = Trainer(cfg)
    assert tr.dataset.excluded_count == 1  # the 0.2 s clip
    assert {p: p.stat().st_mtime_ns for d in dirs for p in d.iterdir()} == before  # found, nothing recomputed
    batch = tr.stream.next(0, 0)
    cached = tr.stage.feats(tr.modules["ssl"], batch)
    with torch.no_grad():
        live = tr.modules["ssl"](batch["wav"])
    # Cached features are fp16 of the whole utterance, cut to the crop: close to the crop's live features inside it.
    assert cached.shape == live.shape and cached.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(cached[:, 2:-2], live[:, 2:-2], dim=-1).mean() > 0.9
    tr.fit()
    assert {p: p.stat().st_mtime_ns for d in dirs for p in d.iterdir()} == before


def test_one_data_loader_across_epochs(corpus_dir, teacher_dir, tmp_path, monkeypatch):
    cfg = stage_config(
        "codec",
        corpus_dir,
        teacher_dir,
        tmp_path / "run",
        **{"train.max_steps": 7, "train.checkpoint_every": 7, "samples.enabled": "false", "data.num_workers": 1},
    )
    tr = Trainer(cfg)
    assert tr.batches.num_batches < 7  # the run crosses at least one epoch end
    calls = []
    real = tr.stream.sampler.start
    monkeypatch.setattr(tr.stream.sampler, "start", lambda e, p: calls.append((e, p)) or real(e, p))
    tr.fit()
    assert calls == [(0, 0)]  # one iterator, one worker pool, for every epoch
    assert tr.stream.loader.persistent_workers and tr.stream.loader.prefetch_factor == 4


def test_offline_wandb_run_holds_the_same_history(codec_run):
    (run_dir,) = list((codec_run / "wandb").glob("offline-run-*"))
    wandb_bin = Path(sys.executable).with_name("wandb")
    r = subprocess.run(
        [str(wandb_bin), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)["summary"]
    last = read_metrics(codec_run / "metrics.jsonl")[-1]
    assert summary["_step"] == last["step"] == 6
    for key in ("train/loss", "codebook/sem/l0/usage", "rate/bps_entropy", "frozen/ok"):
        assert summary[key] == last[key], key


def test_init_from_loads_weights_only(codec_run, corpus_dir, teacher_dir, tmp_path):
    cfg = stage_config("codec", corpus_dir, teacher_dir, tmp_path / "run", **{"train.max_steps": 1})
    tr = Trainer(cfg, init_from=str(codec_run), init_components=["decoder", "entropy_model"])
    assert tr.resume_step == 0  # weights only: the step, optimizer and history start fresh
    saved = load_file(codec_run / "checkpoints" / "step_6" / "components" / "decoder.safetensors")
    live = tr.modules["decoder"].state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    fact = load_file(codec_run / "checkpoints" / "step_6" / "components" / "factorizer.safetensors")
    assert any(not torch.equal(fact[k], tr.modules["factorizer"].state_dict()[k]) for k in fact)  # not selected
    from siren.errors import SirenError

    with pytest.raises(SirenError, match="vocoder"):
        Trainer(cfg, init_from=str(codec_run), init_components=["vocoder"])


def test_distill_checkpoint_holds_a_student_usable_outside_siren(corpus_dir, teacher_dir, tmp_path):
    import shutil

    from helpers import stage_config
    from transformers import HubertModel

    from siren.train.stages.adapt import load_student
    from siren.train.trainer import Trainer

    run = tmp_path / "distill"
    cfg = stage_config("distill", corpus_dir, teacher_dir, run, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    tr = Trainer(cfg)
    tr.fit()
    export = run / "checkpoints" / "step_2" / "student"
    elsewhere = tmp_path / "anywhere" / "my_student"
    shutil.copytree(export, elsewhere)  # the directory alone, away from its run
    hub = HubertModel.from_pretrained(elsewhere / "hubert").eval()
    student = tr.modules["student_ssl"].eval()
    wav = torch.randn(1, 16000)
    with torch.no_grad():
        assert torch.equal(hub(wav).last_hidden_state, student.hubert(wav).last_hidden_state)
        cfg.student_ssl.path = str(elsewhere)
        loaded, _record = load_student(cfg)
        loaded = loaded.eval()
        assert torch.equal(loaded(wav), student(wav))  # hubert + head
