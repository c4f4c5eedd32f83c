"""`siren verify` (siren/verify/): `--wav FILE`, one recording judged against the baseline with the run's thresholds;
quality scored on every eval utterance (WER against the manifest text when there is one); the eval set split across
processes under `accelerate launch` with the report of a single process; and the threshold names, which are the metrics
the judge computes."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mechanisms
import pytest
import torch
from helpers import ROOT, accelerate_launch, isolated_tracking, stage_config, with_fault
from report_page import CHROMIUM, NO_BROWSER, assert_media_playable, media_status, parse_page

from siren.config.loader import load_config
from siren.data.manifest import read_manifest, write_manifest
from siren.train.trainer import Trainer
from siren.verify import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, VerifyError, judge, threshold_names, verify_cli


@pytest.fixture(scope="module")
def adapt_run(corpus_dir, teacher_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify_wav")
    common = {
        "train.max_steps": 2,
        "train.checkpoint_every": 2,
        "samples.enabled": "false",
        "tracking.mode": "disabled",
    }
    with isolated_tracking(root):  # module scope: the per-test hermetic W&B is not set up yet
        Trainer(stage_config("codec", corpus_dir, teacher_dir, root / "codec", **common)).fit()
        Trainer(stage_config("distill", corpus_dir, teacher_dir, root / "distill", **common)).fit()
        Trainer(stage_config("vocoder", corpus_dir, teacher_dir, root / "vocoder", **common)).fit()
        extra = {
            **common,
            "verify.real_clip": None,
            "student_ssl.path": str(root / "distill"),
            "pipeline.vocoder": str(root / "vocoder"),  # rendered audio: quality metrics have something to score
        }
        Trainer(
            stage_config("adapt", corpus_dir, teacher_dir, root / "adapt", baseline=str(root / "codec"), **extra)
        ).fit()
    return root / "adapt"


def _verify(run: Path, *, wav=None, data=None, threshold=("min/agreement/sem=0.0",)) -> int:
    args = SimpleNamespace(run=str(run), step=2, data=data, wav=wav, threshold=list(threshold), no_wandb=True)
    return verify_cli(args)


def test_verify_one_wav(adapt_run, corpus_dir, capsys, monkeypatch):
    """The report judges exactly that file (one utterance, named by its stem) and the verdict follows the thresholds;
    a missing file, or a file together with a manifest, is an error (exit 2) naming the problem. Quality is scored by
    the stub scorers (tests/mechanisms.py): the real ones are `test_quality_on_every_utterance_and_wer_against_the_text`'s."""
    monkeypatch.setattr("siren.verify.judge._quality_scorers", mechanisms.stub_quality_scorers)
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
    # The baseline is judged too: this few-step baseline's prosody codebook collapsed to one code, so the floor the
    # shipped thresholds hold (configs/verify/default.yaml) fails it, although adapted and baseline agree.
    floor = "min/code_entropy/pro/baseline"
    shipped = load_config(ROOT / "configs/verify/default.yaml").verify.thresholds
    assert shipped[floor] > 0
    assert _verify(adapt_run, wav=str(wav), threshold=[f"{floor}={shipped[floor]}"]) == EXIT_FAIL
    report = json.loads((out / "report.json").read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [c["threshold"] for c in failed] == [floor] and report["metrics"]["code_entropy/pro/baseline"] < 0.1

    capsys.readouterr()
    assert _verify(adapt_run, wav=str(wav.with_name("missing.wav"))) == EXIT_ERROR
    assert "missing.wav: file not found" in capsys.readouterr().out
    assert _verify(adapt_run, wav=str(wav), data=str(corpus_dir / "val.jsonl")) == EXIT_ERROR
    assert "not both" in capsys.readouterr().out
    assert _verify(adapt_run, data=str(wav.with_name("nope.jsonl"))) == EXIT_ERROR
    assert "nope.jsonl (--data) does not exist; pass --data MANIFEST" in capsys.readouterr().out


@pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
def test_verify_report_opens_in_a_browser(adapt_run, corpus_dir):
    """The report.html a real verify wrote opens in headless Chromium with playable audio and decoded mel images. The
    suite's one verify with the real quality scorers (the eval extra): every other verify stubs or drops them."""
    wav = Path(read_manifest(corpus_dir / "val.jsonl")[1].path)
    assert _verify(adapt_run, wav=str(wav)) == EXIT_PASS
    out = adapt_run / "verify" / "step_2" / "wav" / wav.stem
    report = json.loads((out / "report.json").read_text())
    audio = 3 if "vocoder" in report["pipeline"] else 1  # this run has no vocoder: the original plays, mels show
    assert_media_playable(media_status(out / "report.html"), audio=audio, images=3)
    from siren.metrics.quality import METRICS, missing_eval_libraries

    if not missing_eval_libraries():  # the real scorers scored the utterance (a metric's failures are counted)
        m = report["metrics"]
        assert m["quality/num_utts"] == 1
        assert all(f"quality/{n}/failed" in m for n in METRICS), sorted(m)
        assert "quality/dnsmos/adapted" in m and "quality/stoi/adapted" in m, sorted(m)


def _eval_manifest(corpus_dir: Path, path: Path, n: int, untexted: int) -> Path:
    """n training utterances (several speakers); the last `untexted` of them without their text."""
    utts = read_manifest(corpus_dir / "train.jsonl")[:n]
    assert all(u.text for u in utts)
    utts = [dataclasses.replace(u, text="") if k >= n - untexted else u for k, u in enumerate(utts)]
    return write_manifest(path, utts)


def test_quality_on_every_utterance_and_wer_against_the_text(adapt_run, corpus_dir, tmp_path, monkeypatch, capsys):
    """With the eval extra (stub scorers here), every eval utterance is scored — not only the few written as files —
    and WER is against the manifest text when the utterance has one, else against the ASR of the original."""
    import siren.verify

    calls: list = []
    monkeypatch.setattr(siren.verify.judge, "_quality_scorers", lambda: mechanisms.stub_quality_scorers(calls))
    data = _eval_manifest(corpus_dir, tmp_path / "eval.jsonl", n=6, untexted=2)
    rc = _verify(adapt_run, data=str(data))
    assert rc == EXIT_PASS, capsys.readouterr().out
    report = json.loads((adapt_run / "verify" / "step_2" / "report.json").read_text())
    ids = [u["id"] for u in report["per_utterance"]]
    assert len(ids) == report["num_utts"] == 6
    for metric in ("stoi", "wer"):  # one call per utterance and system
        assert sorted(uid for m, uid in calls if m == metric) == sorted(ids * 2)
    m = report["metrics"]
    assert m["quality/num_utts"] == 6
    assert (m["quality/wer/reference_manifest"], m["quality/wer/reference_asr"]) == (4, 2)
    texts = {u.id: u.text for u in read_manifest(data)}
    for row in report["per_utterance"]:
        q = row["quality"]
        if texts[row["id"]]:  # the fake ASR hears "one two three", which is not the text
            assert q["wer_reference"] == "manifest" and q["wer/adapted"] > 0.5
        else:  # the fake ASR of the original is the reference, so the coded audio's transcript matches it
            assert q["wer_reference"] == "asr" and q["wer/adapted"] == q["wer/baseline"] == 0.0
    stoi = [r["quality"]["stoi/adapted"] for r in report["per_utterance"]]
    assert m["quality/stoi/adapted"] == pytest.approx(sum(stoi) / 6)
    # every metric of a real report is a name a threshold may use (the layout's streams and levels read off the report)
    streams = {k.split("/")[1] for k in m if k.startswith("agreement/")}
    layout = {s: (0, sum(k.startswith(f"agreement/{s}/") for k in m)) for s in streams}
    assert set(m) <= threshold_names(layout), sorted(set(m) - threshold_names(layout))


# ------------------------------------------------------------------------------- threshold names = computed metrics
LAYOUT = {"sem": (8, 2), "pro": (4, 1), "spk": (4, 2)}  # streams with 2, 1 and 2 levels (spk: groups)


def _share(layout: dict, first: int, n: int, quality: list | None, rangeable: bool) -> dict:
    """One rank's `judge_share` result for utterances first, first + 2, … (n of them), with made-up values."""
    import siren.metrics.quality as q

    g = torch.Generator().manual_seed(first)
    hist = {w: {s: torch.randint(0, 5, (L, K), generator=g).double() for s, (K, L) in layout.items()} for w in "ab"}
    records = []
    for i in range(first, first + 2 * n, 2):
        rec = {"index": i, "samples": 16000 + i, "bits": {}, "real_bits": {}, "header_bits": {}}
        for w in ("adapted", "baseline"):
            rec["bits"][w] = 100.0 + i
            if rangeable:
                rec["real_bits"][w], rec["header_bits"][w] = 800 + i, 64
        rec["row"] = {"id": f"u{i}", **{k: 0.5 + i for k in judge.DISTANCES}}
        if quality:
            rec["quality"] = {f"{m}/{w}": 0.25 for m in quality for w in q.SYSTEMS} | {"wer_reference": "asr"}
        records.append(rec)
    return {
        "hist": {"adapted": hist["a"], "baseline": hist["b"]},
        "eq": {s: torch.full((L,), 3.0, dtype=torch.float64) for s, (K, L) in layout.items()},
        "tot": {s: torch.full((L,), 5.0, dtype=torch.float64) for s, (K, L) in layout.items()},
        "records": records,
        "skipped": [],
        "pipeline": [],
        "rangeable": {"adapted": rangeable, "baseline": rangeable},
        "quality": quality,
    }


def _computed(layout: dict, quality: list | None, rangeable: bool) -> set[str]:
    """The names of the metrics the judge computes from a small two-rank run (reduce → compute_metrics)."""
    audio = SimpleNamespace(sample_rate=16000)
    job = SimpleNamespace(
        layout=layout,
        skipped=[],
        wav=None,
        manifest="eval.jsonl",
        adapted=SimpleNamespace(cfg=SimpleNamespace(audio=audio)),
    )
    parts = [_share(layout, r, 3, quality, rangeable) for r in range(2)]
    return set(judge.compute_metrics(judge.reduce(job, parts)))


def _assert_names_match(names) -> None:
    """Every metric the judge computes (with everything there is to compute) is a threshold name and vice versa;
    with less to compute (a rate-only entropy model, no eval extra), only names of that list are computed."""
    from siren.metrics.quality import METRICS

    for layout in (LAYOUT, {"sem": (8, 1)}):
        full = _computed(layout, list(METRICS), rangeable=True)
        assert full == names(layout), f"computed, not a threshold name: {sorted(full - names(layout))}; " + (
            f"a threshold name never computed: {sorted(names(layout) - full)}"
        )
        assert _computed(layout, None, rangeable=False) < names(layout)


def test_threshold_names_are_the_metrics_the_judge_computes():
    _assert_names_match(threshold_names)


def _hand_written_names(layout: dict) -> set[str]:
    """The threshold list as it was kept by hand beside the judge (before both read one declaration): it had fallen
    behind the judge, which also reports quality/num_utts and the WER reference counts."""
    from siren.metrics.codebook import level_names

    names = {"bps_ratio"}
    for s, (_, L) in layout.items():
        names |= {f"agreement/{s}", f"js/{s}", f"entropy_delta_bits/{s}"}
        names |= {f"agreement/{s}/{lv}" for lv in level_names(s, L)}
    for w in ("adapted", "baseline"):
        names |= {f"bps_entropy/{w}", f"bps_real/{w}", f"bps_real_payload/{w}"}
    names |= {f"mel_l1/{k}" for k in judge.DISTANCES}
    for m in ("pesq", "stoi", "spk_sim", "wer", "dnsmos"):
        names |= {f"quality/{m}/adapted", f"quality/{m}/baseline", f"quality/{m}/failed"}
    return names


def test_a_hand_kept_threshold_list_is_caught():
    """The control of the test above: a threshold list not read from the judge's declaration diverges, and is caught."""
    with pytest.raises(AssertionError, match=r"computed, not a threshold name: \[.*'quality/num_utts'"):
        _assert_names_match(_hand_written_names)


def test_a_threshold_on_any_computed_metric_is_accepted_and_a_typo_is_not():
    from siren.verify.judge import check_thresholds

    known = threshold_names(LAYOUT)
    check_thresholds({f"min/{k}": 0.0 for k in _computed(LAYOUT, ["stoi", "wer"], rangeable=True)}, known)
    with pytest.raises(VerifyError, match=r"did you mean `min/agreement/sem`"):
        check_thresholds({"min/agreement/semm": 0.5}, known)


def _compare_reports(one: dict, two: dict) -> None:
    assert two["num_utts"] == one["num_utts"], "num_utts differs between 1 and 2 processes"
    assert [r["id"] for r in two["per_utterance"]] == [r["id"] for r in one["per_utterance"]], "per_utterance differs"
    assert two["seconds"] == pytest.approx(one["seconds"], rel=1e-9)
    assert set(two["metrics"]) == set(one["metrics"])
    exact = re.compile(r"^(agreement/|js/|entropy_delta_bits/|quality/num_utts|quality/\w+/failed|quality/wer/ref)")
    for k, v in one["metrics"].items():
        if exact.match(k):  # from code counts: the same codes give the same numbers
            assert two["metrics"][k] == v, k
        else:
            assert two["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    for r1, r2 in zip(one["per_utterance"], two["per_utterance"], strict=True):
        for k, v in r1.items():
            if isinstance(v, float):
                assert r2[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (r1["id"], k)
        assert r2.get("quality", {}).keys() == r1.get("quality", {}).keys()
    assert [c["ok"] for c in two["checks"]] == [c["ok"] for c in one["checks"]]


def _verify_cmd(run: Path, data: Path, launch: bool) -> list[str]:
    launcher = accelerate_launch()
    args = ["--run", str(run), "--step", "2", "--data", str(data), "--threshold", "min/agreement/sem=0.0"]
    return [sys.executable, *(launcher if launch else []), "-m", "siren", "verify", *args, "--no-wandb"]


@pytest.fixture(scope="module")
def one_process_report(adapt_run, corpus_dir, tmp_path_factory) -> dict:
    """The single-process report the 2-process launch must reproduce: verify in this process, on one thread as the
    launched ranks (OMP_NUM_THREADS=1), with the stub scorers the launch injects."""
    data = _eval_manifest(corpus_dir, tmp_path_factory.mktemp("one_process") / "eval.jsonl", n=5, untexted=2)
    out = adapt_run / "verify" / "step_2"
    shutil.rmtree(out, ignore_errors=True)
    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    mp.setattr("siren.verify.judge._quality_scorers", mechanisms.stub_quality_scorers)
    torch.set_num_threads(1)
    try:
        assert _verify(adapt_run, data=str(data)) == EXIT_PASS
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return {"data": data, "report": json.loads((out / "report.json").read_text())}


def test_two_processes_give_the_one_process_report(adapt_run, one_process_report, subprocess_env):
    """`accelerate launch` with 2 gloo processes: each judges utterances i % 2, rank 0 reduces, and the report (metrics,
    quality included, and per-utterance rows in utterance order) is the single-process one; the media files of the
    first utterances are written by the rank that judged them. The split's negative control (`verify_split`, every
    rank judging everything) is tests/test_ranks.py's; here each rank must report judging its own share."""
    data = one_process_report["data"]  # 5 utterances, odd: ranks get 3 and 2
    env = {**with_fault(subprocess_env, "verify_quality_stub"), "OMP_NUM_THREADS": "1"}  # one thread, as the reference
    out = adapt_run / "verify" / "step_2"
    reports = {False: one_process_report["report"]}
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run(
        _verify_cmd(adapt_run, data, launch=True), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reports[True] = json.loads((out / "report.json").read_text())
    _compare_reports(reports[False], reports[True])
    assert reports[True]["metrics"]["quality/num_utts"] == 5
    assert "rank 0/2 judged 3 of 5 utterances" in r.stdout and "rank 1/2 judged 2 of 5 utterances" in r.stdout, r.stdout
    assert "rank 0/2 exits 0" in r.stdout and "rank 1/2 exits 0" in r.stdout
    for row in reports[True]["per_utterance"][:4]:  # rows 0, 2 from rank 0; rows 1, 3 from rank 1
        for w in ("original", "adapted", "baseline"):
            assert (out / f"{row['id']}_{w}.wav").is_file() and (out / f"{row['id']}_{w}.png").is_file()


def test_a_crash_on_one_rank_is_exit_2_on_every_rank(adapt_run, corpus_dir, tmp_path, subprocess_env):
    """An exception on rank 1 alone: both ranks exit 2 (rank 0 names rank 1's error) and nobody waits for the other.
    Rank 0 scores quality with the stub scorers: the crash, not the scoring, is what this test is about."""
    data = _eval_manifest(corpus_dir, tmp_path / "eval.jsonl", n=3, untexted=0)
    r = subprocess.run(
        _verify_cmd(adapt_run, data, launch=True),
        env=with_fault(subprocess_env, "verify_rank_crash:1,verify_quality_stub"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 0/2 exits 2" in text and "rank 1/2 exits 2" in text, text[-4000:]
    assert "verify failed on another process (rank 1: RuntimeError: injected crash on rank 1)" in text
