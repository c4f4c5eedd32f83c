"""`siren eval` (siren/evaluation.py) on real human speech from Debian's codec2-examples: the original, Codec 2 700C and
450 through their real bit files, a `wav:DIR` system, and a tiny SIREN checkpoint through its .siren files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import mechanisms
import numpy as np
import pytest
from helpers import finished_wandb_records, isolated_tracking, stage_config, with_fault
from test_quality import CODEC2_WAVS, codec2_clip

import siren.evaluation as ev
from siren.cli import main

# 1.6 s of a female speaker: one real clip runs every system through every real scorer (the scorers' own properties,
# on several clips, are tests/test_quality.py's); DNSMOS alone scores a 2-s clip as 7 windows of 9 s
CLIPS = ("forig",)
METRICS = ("mos", "stoi", "pesq", "spk_sim", "wer")


def _clip_dir(root: Path, clips: tuple[str, ...] = CLIPS) -> Path:
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    for n in clips:
        sf.write(root / f"{n}.wav", codec2_clip(n), 16000, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def siren_run(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    """A codec checkpoint whose pipeline.vocoder is a vocoder checkpoint (2 steps each: cheap, untrained)."""
    from siren.train.trainer import Trainer

    root = tmp_path_factory.mktemp("eval_siren")
    common = {
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "samples.enabled": "false",
        "tracking.mode": "disabled",
    }
    with isolated_tracking(root):  # module scope: the per-test hermetic W&B is not set up yet
        Trainer(stage_config("vocoder", corpus_dir, teacher_dir, root / "vocoder", **common)).fit()
        extra = {**common, "pipeline.vocoder": str(root / "vocoder")}  # eval decodes through the run's own pipeline
        Trainer(stage_config("codec", corpus_dir, teacher_dir, root / "codec", **extra)).fit()
    return root / "codec"


@pytest.fixture(scope="module")
def evaluated(siren_run, tmp_path_factory):
    """One eval of every kind of system, run once; the threads each system coded with are recorded."""
    import torch

    for lib in ("pesq", "pystoi", "resemblyzer", "pocketsphinx", "speechmos"):
        pytest.importorskip(lib)
    if shutil.which("c2enc") is None:
        pytest.skip("Debian's codec2 (c2enc, c2dec) is not installed")
    root = tmp_path_factory.mktemp("eval")
    data = _clip_dir(root / "data")
    copy = root / "copy"  # the 8 kHz originals: another rate, resampled on reading
    copy.mkdir()
    for n in CLIPS:
        shutil.copy(Path(CODEC2_WAVS) / f"{n}.wav", copy / f"{n}.wav")
    (root / "empty").mkdir()
    threads = []
    mp = pytest.MonkeyPatch()
    for cls in (ev.Codec2, ev.Siren):
        real = cls.code

        def spy(self, *a, _real=real, **k):
            threads.append(torch.get_num_threads())
            return _real(self, *a, **k)

        mp.setattr(cls, "code", spy)
    score_threads, real_score = [], ev.score

    def score_spy(*a, **k):
        score_threads.append(torch.get_num_threads())
        return real_score(*a, **k)

    mp.setattr(ev, "score", score_spy)
    try:
        result = ev.evaluate(
            data,
            [
                "c2_700C=codec2:700C",
                "c2_450=codec2:450",
                f"copy=wav:{copy}",
                f"gone=wav:{root / 'empty'}",
                f"siren={siren_run}",
            ],
            root / "out",
        )
    finally:
        mp.undo()
    return {
        "result": result,
        "out": root / "out",
        "threads": threads,
        "score_threads": score_threads,
        "torch_threads": torch.get_num_threads(),
    }


def _rows(result, system):
    return {r["id"]: r for r in result["utterances"] if r["system"] == system}


def test_eval_json_schema_and_file(evaluated):
    result, out = evaluated["result"], evaluated["out"]
    assert set(result) == {"systems", "utterances"}
    assert list(result["systems"]) == ["original", "c2_700C", "c2_450", "copy", "gone", "siren"]
    assert json.loads((out / "eval.json").read_text()) == result
    assert len(result["utterances"]) == len(CLIPS) * 6
    for row in result["utterances"]:
        assert {"id", "system", "bps", "encode_rtf", "decode_rtf", "errors", *METRICS} <= set(row)
    for s in result["systems"].values():
        assert {"bps", "bps_nominal", "mos_predictor", "encode_rtf", "decode_rtf", *METRICS} <= set(s)
        assert "DNSMOS" in s["mos_predictor"]


def test_codec2_bit_rate_is_measured_from_its_files(evaluated):
    """bps = bytes of the bit file ÷ audio seconds. c2enc pads every 40 ms frame to whole bytes: 700C's 28 bits are
    4 bytes (800 bit/s on file), 450's 18 bits are 3 bytes (600 bit/s); the nominal rate stands beside it."""
    result, out = evaluated["result"], evaluated["out"]
    for name, nominal, frame_bytes in (("c2_700C", 700, 4), ("c2_450", 450, 3)):
        s = result["systems"][name]
        assert s["bps_nominal"] == nominal
        for uid, row in _rows(result, name).items():
            f = out / "bitstreams" / name / f"{uid}.bin"
            assert row["bytes"] == f.stat().st_size > 0
            assert row["bps"] == pytest.approx(row["bytes"] * 8 / row["seconds"])
            frames = math.ceil(row["seconds"] * 8000 / 320)
            assert row["bytes"] in (frames * frame_bytes, (frames - 1) * frame_bytes)  # a partial last frame
        assert s["bps"] == pytest.approx(frame_bytes * 8 / 0.04, rel=0.03)
    assert result["systems"]["siren"]["bps"] == pytest.approx(
        sum(r["bytes"] for r in _rows(result, "siren").values())
        * 8
        / sum(r["seconds"] for r in _rows(result, "siren").values())
    )
    for uid, row in _rows(result, "siren").items():
        assert row["bytes"] == (out / "bitstreams" / "siren" / f"{uid}.siren").stat().st_size
    assert result["systems"]["copy"]["bps"] is None  # decoded files only: no bitstream to measure


def test_every_metric_on_every_utterance_and_failures_listed(evaluated):
    result = evaluated["result"]
    for name in ("original", "c2_700C", "c2_450", "copy"):
        rows = _rows(result, name)
        assert set(rows) == set(CLIPS)
        for row in rows.values():
            assert row["errors"] == {}
            assert all(isinstance(row[m], float) and np.isfinite(row[m]) for m in METRICS), row
    # an utterance a system cannot produce is a row with its reason, never dropped
    gone = _rows(result, "gone")
    assert set(gone) == set(CLIPS) and all("coding" in r["errors"] for r in gone.values())
    assert result["systems"]["gone"]["failures"] == len(CLIPS) and result["systems"]["gone"]["stoi"] is None
    # the untrained SIREN checkpoint still makes a row per utterance; whatever a scorer refused is listed by name
    for row in _rows(result, "siren").values():
        assert all(row[m] is not None or m in row["errors"] for m in METRICS)


def test_original_row_has_the_ceilings_and_codecs_score_below(evaluated):
    s = evaluated["result"]["systems"]
    o = s["original"]
    assert o["stoi"] == pytest.approx(1.0, abs=1e-6) and o["spk_sim"] == pytest.approx(1.0, abs=1e-5)
    assert o["wer"] == 0.0 and o["pesq"] > 4.6 and o["wer_reference"] == "asr"
    assert o["bps_nominal"] == 256000 and o["encode_rtf"] is None
    assert s["copy"]["stoi"] > 0.95 and s["copy"]["spk_sim"] > 0.95  # the same speech through another sample rate
    for name in ("c2_700C", "c2_450"):
        assert s[name]["stoi"] < 0.9 and s[name]["pesq"] < 3.5
    assert s["c2_700C"]["pesq"] > s["c2_450"]["pesq"]  # more bits, better audio


def test_real_time_factors_on_one_thread(evaluated):
    s = evaluated["result"]["systems"]
    for name in ("c2_700C", "c2_450", "siren"):
        assert s[name]["encode_rtf"] > 0 and s[name]["decode_rtf"] > 0
    assert s["copy"]["encode_rtf"] is None
    assert evaluated["threads"] and set(evaluated["threads"]) == {1}  # every system coded on one torch thread
    assert evaluated["score_threads"] and set(evaluated["score_threads"]) == {1}  # and scored on one
    assert evaluated["torch_threads"] == __import__("torch").get_num_threads()  # restored afterwards


def test_siren_code_statistics_per_stream(evaluated):
    s = evaluated["result"]["systems"]["siren"]
    for stream in ("sem", "pro", "spk"):
        assert 0 < s[f"code_usage/{stream}"] <= 1
        assert 0 <= s[f"code_entropy/{stream}"] <= 1
    assert s["bps_nominal"] > 0 and s["kind"] == "siren"
    assert s["render_path"] == "decoder_head-vocoder" and s["pipeline"]["vocoder"].endswith("step_2")
    assert not any(k.startswith("code_") for k in evaluated["result"]["systems"]["c2_700C"])


def test_eval_md_table(evaluated):
    md = (evaluated["out"] / "eval.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("| system | bit/s (files) | bit/s nominal | mos | stoi | pesq | spk_sim | wer |")
    body = {ln.split(" | ")[0].strip("| "): ln for ln in lines[2:8]}
    assert list(body) == ["original", "c2_700C", "c2_450", "copy", "gone", "siren"]
    bps = evaluated["result"]["systems"]["c2_700C"]["bps"]
    assert f"| c2_700C | {bps:.0f} | 700 |" in md  # measured from the files, nominal beside it
    assert "Failures:" in md and "gone / forig: coding" in md
    assert "code_usage/sem" in md


def test_report_html_plot_and_players(evaluated):
    """report.html: the systems table, the rate-quality plot and a player per utterance and system with audio; in
    headless Chromium every player loads and the plot decodes."""
    from report_page import CHROMIUM, assert_media_playable, media_status, parse_page

    page = evaluated["out"] / "report.html"
    parsed = parse_page(page.read_text())
    with_audio = [r for r in evaluated["result"]["utterances"] if "coding" not in r["errors"]]
    assert len(parsed.audio) == len(with_audio) and len(parsed.img) == 1
    assert [row[0] for row in parsed.tables["systems"][1:]] == list(evaluated["result"]["systems"])
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the structure was checked, playback was not")
    assert_media_playable(media_status(page), audio=len(with_audio), images=1)


@pytest.mark.parametrize(
    "system, message",
    [
        ("x=opus:6000", "unknown system kind 'opus'"),
        ("x=codec2:999", "unknown Codec 2 mode '999'"),
        ("codec2:700C", "expected NAME=SPEC"),
        ("original=codec2:700C", "always present"),
    ],
)
def test_bad_system_spec_is_one_error_line_exit_2(system, message, tmp_path, capsys):
    data = _clip_dir(tmp_path / "data")
    assert main(["eval", "--data", str(data), "--system", system, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_missing_codec2_binary_and_missing_scorer_are_errors(tmp_path, capsys, monkeypatch):
    data = _clip_dir(tmp_path / "data")
    args = ["eval", "--data", str(data), "--system", "c=codec2:700C", "--out", str(tmp_path / "o")]
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path))  # no c2enc / c2dec here
        assert main(args) == 2
    assert "needs Codec 2's c2enc and c2dec on PATH" in capsys.readouterr().err
    monkeypatch.setattr("siren.metrics.quality.missing_eval_libraries", lambda: ["pesq"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "`eval` extra" in err and "pesq" in err


def test_cli_smoke(tmp_path, subprocess_env):
    """`python -m siren eval` end to end: exit 0, the table on stdout, eval.json written. The scorers are stubbed in
    the process (the real ones score the `evaluated` fixture): this is the command's wiring through a real process."""
    if shutil.which("c2enc") is None:
        pytest.skip("Debian's codec2 is not installed")
    data = _clip_dir(tmp_path / "data")
    out = tmp_path / "out"
    cmd = ["eval", "--data", str(data), "--system", "c2=codec2:1200", "--out", str(out), "--max-utts", "1"]
    res = subprocess.run(
        [__import__("sys").executable, "-m", "siren", *cmd],
        env=with_fault(subprocess_env, "eval_quality_stub"),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "| c2 |" in res.stdout and "| original |" in res.stdout
    assert len(json.loads((out / "eval.json").read_text())["utterances"]) == 2  # 1 utterance × (original, c2)


def test_manifest_text_is_the_wer_reference_else_the_asr(tmp_path):
    """A manifest row with text is scored against it (recorded as `manifest`), one without against the original's ASR."""
    from siren.data.manifest import Utterance, write_manifest
    from siren.metrics.quality import _wer_scorer

    data = _clip_dir(tmp_path / "data")
    write_manifest(
        tmp_path / "m.jsonl",
        [
            Utterance("morig", str(data / "morig.wav"), 2.0, "m", text="That broad jump."),
            Utterance("forig", str(data / "forig.wav"), 1.6, "f"),
        ],
    )
    items = ev.load_items(tmp_path / "m.jsonl")
    assert [(i.id, i.text) for i in items] == [("morig", "That broad jump."), ("forig", None)]
    fake = {q: (lambda uid, ref, deg, text=None: 1.0) for q in ev.QUALITY.values()}
    fake["wer"] = _wer_scorer(transcribe=lambda wav: "that broad jump" if wav[0] > 0 else "a broad jump")
    x = np.full(8, 0.5, dtype=np.float32)
    values, errors = ev.score(items[0], x, -x, fake)
    assert values["wer_reference"] == "manifest" and values["wer"] == pytest.approx(1 / 3) and errors == {}
    values, _ = ev.score(items[1], x, -x, fake)
    assert values["wer_reference"] == "asr" and values["wer"] == pytest.approx(1 / 3)
    assert ev.score(items[1], x, x, fake)[0]["wer"] == 0.0


def test_bad_data_is_an_eval_error(tmp_path):
    with pytest.raises(ev.EvalError, match="no such manifest or directory"):
        ev.load_items(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvalError, match="no utterances"):
        ev.load_items(tmp_path / "empty")
    data = _clip_dir(tmp_path / "data", ("morig", "forig"))
    with pytest.raises(ev.EvalError, match="at least 1"):
        ev.load_items(data, max_utts=0)
    assert [i.id for i in ev.load_items(data, max_utts=1)] == ["forig"]
    (data / "sub").mkdir()
    shutil.copy(data / "morig.wav", data / "sub" / "morig.wav")
    with pytest.raises(ev.EvalError, match="two files with id 'morig'"):
        ev.load_items(data)


# ------------------------------------------------------------------------------------------------------ W&B tables
def logged_tables(out: Path) -> tuple[dict, dict]:
    """(tables {key: {"columns", "data"}} logged in the history of the one offline run under `out/wandb`, that run's
    record {"project", "group", "job_type", "config"}), from its .wandb file and the table files it points to."""
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    tables, run = {}, {}
    for rec in finished_wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            fields: dict[str, dict] = {}  # a media value is stored field by field: nested_key = [KEY, FIELD]
            for item in rec.history.item:
                if len(item.nested_key) == 2:
                    fields.setdefault(item.nested_key[0], {})[item.nested_key[1]] = json.loads(item.value_json)
            for key, value in fields.items():
                if value.get("_type") == "table-file":
                    tables[key] = json.loads((files[0].parent / "files" / value["path"]).read_text())
        elif kind == "run":
            r = rec.run
            run.update(project=r.project, group=r.run_group, job_type=r.job_type)
            run.setdefault("config", {}).update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run.setdefault("config", {}).update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return tables, run


def _trained_run_dir(root: Path, mode: str = "offline", run_id: str | None = "abc123") -> Path:
    """A run directory as the trainer leaves it, as far as --wandb-run reads it: config.yaml's tracking, wandb_run_id."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(
        f"tracking:\n  project: siren-test\n  entity: null\n  mode: {mode}\n  group: g1\n"
    )
    if run_id:
        (root / "wandb_run_id").write_text(run_id + "\n")
    return root


def _expected_tables(result: dict) -> dict:
    return {k: {"columns": c, "data": json.loads(json.dumps(r))} for k, (c, r) in ev.wandb_tables(result).items()}


def test_eval_tables_logged_to_wandb_offline_and_read_back(evaluated, tmp_path):
    """--wandb-run RUN_DIR: the systems and per-utterance tables are in the offline run's history (read back from the
    .wandb file), with every row; the run sits in RUN's project and group, job type eval, RUN's W&B id in its config."""
    result = evaluated["result"]
    target = ev.WandbTarget.parse(str(_trained_run_dir(tmp_path / "run")))
    info = ev.log_wandb(result, target, tmp_path / "out", data="clips/")
    assert info["mode"] == "offline"
    tables, run = logged_tables(tmp_path / "out")
    assert set(tables) == {"eval/systems", "eval/utterances"}
    for key, want in _expected_tables(result).items():
        assert tables[key]["columns"] == want["columns"]
        assert tables[key]["data"] == want["data"]
    systems = {row[0]: row for row in tables["eval/systems"]["data"]}
    assert list(systems) == list(result["systems"])
    pesq = tables["eval/systems"]["columns"].index("pesq")
    assert systems["c2_700C"][pesq] == pytest.approx(result["systems"]["c2_700C"]["pesq"])
    assert len(tables["eval/utterances"]["data"]) == len(result["utterances"]) == len(CLIPS) * 6
    errors = tables["eval/utterances"]["columns"].index("errors")
    assert any("coding" in json.loads(row[errors]) for row in tables["eval/utterances"]["data"])  # failures listed
    assert run["project"] == "siren-test" and run["group"] == "g1" and run["job_type"] == "eval"
    assert run["config"]["evaluated_run"] == "abc123"


def test_wandb_read_back_sees_a_switched_off_log(evaluated, tmp_path, monkeypatch):
    """Control: with the run's log call switched off the same read-back finds no table, so the test above fails."""
    import wandb

    monkeypatch.setattr(wandb.Run, "log", lambda self, *a, **k: None)
    target = ev.WandbTarget.parse("siren-test/abc123")
    ev.log_wandb(evaluated["result"], target, tmp_path / "out", data="clips/")
    tables, run = logged_tables(tmp_path / "out")  # the run itself was written
    assert tables == {} and run["project"] == "siren-test"


def test_eval_cli_wandb_run_end_to_end(tmp_path, capsys, monkeypatch):
    """`siren eval ... --wandb-run ID` logs the tables; without the flag no W&B run is made. Stub scorers: what is
    logged, not how it was scored, is tested here."""
    if shutil.which("c2enc") is None:
        pytest.skip("Debian's codec2 is not installed")
    monkeypatch.setattr("siren.metrics.quality.build_scorers", mechanisms.stub_eval_scorers)
    data = _clip_dir(tmp_path / "data")
    base = ["eval", "--data", str(data), "--system", "c2=codec2:1200", "--max-utts", "1"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "wandb").exists()
    assert main([*base, "--out", str(tmp_path / "out"), "--wandb-run", "team/siren-test/abc123"]) == 0
    assert "W&B: eval tables logged to run" in capsys.readouterr().out
    tables, run = logged_tables(tmp_path / "out")
    assert [row[0] for row in tables["eval/systems"]["data"]] == ["original", "c2"]
    assert len(tables["eval/utterances"]["data"]) == 2 and run["project"] == "siren-test"


@pytest.mark.parametrize(
    "case, message",
    [
        ("not an id!", "neither a run directory nor a W&B run id"),
        ("no_config_dir", "no config.yaml"),
        ("missing_dir", "no such run directory"),
        ("disabled_run", "tracking.mode=disabled"),
        ("env_disabled", "WANDB_MODE=disabled"),
    ],
)
def test_bad_wandb_run_is_an_error_before_scoring(case, message, tmp_path, capsys, monkeypatch):
    data = _clip_dir(tmp_path / "data")
    spec = case
    if case == "no_config_dir":
        (tmp_path / "bare").mkdir()
        spec = str(tmp_path / "bare")
    elif case == "missing_dir":
        spec = str(tmp_path / "runs" / "adpt")  # a typo of a run dir is not an ENTITY/PROJECT/ID
    elif case == "disabled_run":
        spec = str(_trained_run_dir(tmp_path / "run", mode="disabled", run_id=None))
    elif case == "env_disabled":
        monkeypatch.setenv("WANDB_MODE", "disabled")
        spec = "siren-test/abc123"
    called = []
    monkeypatch.setattr(ev, "load_items", lambda *a, **k: called.append(1))  # scoring never starts
    args = ["eval", "--data", str(data), "--system", "c=wav:" + str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "--wandb-run", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and not called


def test_wandb_target_from_a_run_dir_and_an_id(tmp_path):
    t = ev.WandbTarget.parse(str(_trained_run_dir(tmp_path / "r")))
    assert (t.project, t.group, t.mode, t.run_id) == ("siren-test", "g1", "offline", "abc123")
    assert ev.WandbTarget.parse("abc123") == ev.WandbTarget("siren", None, None, "auto", "abc123", None)
    t = ev.WandbTarget.parse("ent/proj/abc123")
    assert (t.entity, t.project, t.run_id) == ("ent", "proj", "abc123")


# ------------------------------------------------------------------------------------------------ human speech set
def _fake_package_roots(root: Path, alsa: bool = True) -> tuple[Path, Path]:
    """Stand-ins for /usr/share/codec2/wav (8 kHz mono) and /usr/share/sounds/alsa (48 kHz, here stereo)."""
    import soundfile as sf

    from siren.data import human

    c2, al = root / "codec2", root / "alsa"
    c2.mkdir(parents=True)
    t8 = np.arange(8000 * 3 // 2) / 8000
    for i, n in enumerate(human.CODEC2_CLIPS):
        sf.write(c2 / f"{n}.wav", 0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t8), 8000, subtype="PCM_16")
    sf.write(c2 / "all.wav", np.zeros(800), 8000)  # a file of the package that is not a clip
    if alsa:
        al.mkdir()
        t48 = np.arange(48000) / 48000
        for n in (*human.ALSA_CLIPS, "Noise"):
            x = 0.2 * np.sin(2 * np.pi * 300 * t48)
            sf.write(al / f"{n}.wav", np.stack([x, x], axis=1), 48000, subtype="PCM_16")
    return c2, al


def test_human_clips_found_and_resampled_to_16k_mono(tmp_path):
    import soundfile as sf

    from siren.data import human

    c2, al = _fake_package_roots(tmp_path / "pkgs")
    s = human.prepare_human_clips(tmp_path / "set", codec2_root=c2, alsa_root=al)
    ids = [c["id"] for c in s["clips"]]
    assert ids == [f"codec2_{n}" for n in human.CODEC2_CLIPS] + [f"alsa_{n}" for n in human.ALSA_CLIPS]
    assert s["packages"] == ["alsa-utils", "codec2-examples"]
    for c in s["clips"]:
        info = sf.info(str(tmp_path / "set" / f"{c['id']}.wav"))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == pytest.approx(16000 * (1.5 if c["package"] == "codec2-examples" else 1.0), abs=2)
        assert c["source_rate"] == (8000 if c["package"] == "codec2-examples" else 48000)
    assert json.loads((tmp_path / "set" / "sources.json").read_text()) == s
    assert [i.id for i in ev.load_items(tmp_path / "set")] == sorted(ids)  # a set `siren eval --data` reads


def test_human_clips_max_and_reuse(tmp_path):
    from siren.data import human

    c2, al = _fake_package_roots(tmp_path / "pkgs")
    human.prepare_human_clips(tmp_path / "set", codec2_root=c2, alsa_root=al)
    s = human.prepare_human_clips(tmp_path / "set", codec2_root=c2, alsa_root=al, max_clips=3)
    assert [c["id"] for c in s["clips"]] == ["codec2_big_dog", "codec2_cross", "alsa_Front_Center"]  # both packages
    assert sorted(p.stem for p in (tmp_path / "set").glob("*.wav")) == sorted(c["id"] for c in s["clips"])
    with pytest.raises(ValueError, match="at least 1"):
        human.prepare_human_clips(tmp_path / "set", codec2_root=c2, alsa_root=al, max_clips=0)


def test_human_clips_missing_packages_are_named(tmp_path):
    from siren.data import human

    with pytest.raises(human.HumanClipsMissing, match="codec2-examples is not installed") as e:
        human.prepare_human_clips(tmp_path / "set", codec2_root=tmp_path / "nowhere", alsa_root=None)
    assert "apt-get install -y codec2-examples" in str(e.value)
    c2, _ = _fake_package_roots(tmp_path / "pkgs", alsa=False)
    s = human.prepare_human_clips(tmp_path / "set", codec2_root=c2, alsa_root=tmp_path / "pkgs" / "alsa")
    assert s["packages"] == ["codec2-examples"] and len(s["clips"]) == len(human.CODEC2_CLIPS)  # alsa: when present
    (c2 / "morig.wav").unlink()
    with pytest.raises(human.HumanClipsMissing, match=r"codec2-examples .* lacks morig\.wav"):
        human.find_human_clips(c2, None)
    _, al = _fake_package_roots(tmp_path / "pkgs2")
    (al / "Rear_Left.wav").unlink()
    with pytest.raises(human.HumanClipsMissing, match=r"alsa-utils .* lacks Rear_Left\.wav"):
        human.find_human_clips(tmp_path / "pkgs2" / "codec2", al)


def test_human_clips_of_this_machine():
    """The real packages, when installed: codec2-examples' 8 kHz clips and alsa-utils' 48 kHz ones are all found."""
    from siren.data import human

    if not human.CODEC2_ROOT.is_dir():
        pytest.skip("Debian's codec2-examples is not installed")
    clips = human.find_human_clips()
    assert len(clips) >= len(human.CODEC2_CLIPS) and all(p.is_file() for _, _, p in clips)


# ----------------------------------------------------------------------------------------------------- demo's step
def test_demo_eval_step_on_a_trained_fixture(siren_run, tmp_path, subprocess_env, monkeypatch):
    """`siren demo`'s last step: human clips → `siren eval` of two SIREN runs and Codec 2 700C, 450 → the table."""
    from siren import demo

    for lib in ("pesq", "pystoi", "resemblyzer", "pocketsphinx", "speechmos"):
        pytest.importorskip(lib)
    if shutil.which("c2enc") is None:
        pytest.skip("Debian's codec2 (c2enc, c2dec) is not installed")
    if not Path(CODEC2_WAVS).is_dir():
        pytest.skip("Debian's codec2-examples (real speech clips) are not installed")
    root = tmp_path / "runs"
    root.mkdir()
    for name in demo.EVAL_SIREN:
        (root / name).symlink_to(siren_run)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    # The scorers are stubbed in the subprocess (tests/mechanisms.py): what is tested here is the step's wiring; the
    # `evaluated` fixture above scores every system with the real ones.
    env = with_fault(subprocess_env, "eval_quality_stub")
    r = demo.run_eval(str(root), str(tmp_path / "data"), env, max_clips=1, wandb=False)
    systems = json.loads((root / "eval" / "eval.json").read_text())["systems"]
    assert list(systems) == ["original", "adapt", "codec", "codec2_700C", "codec2_450"]
    assert systems["codec2_450"]["bps_nominal"] == 450 and systems["adapt"]["kind"] == "siren"
    assert "| codec2_700C |" in r["table"] and r["clips"]["clips"][0]["id"] == "codec2_big_dog"
    assert r["wall_s"] > 0
