"""verify's `report.html` (siren/report_html.py): one self-contained page with the verdict, every threshold, the metric
tables and, per utterance, playable original / adapted / baseline audio beside their mel images.

The structure tests run everywhere (stdlib parser); the browser tests open the page in headless Chromium, which `make
test` installs, and are skipped only where it is absent. The media come from siren's own writers (`save_audio`,
`save_mel_png`), as `run_verify` leaves them."""

from __future__ import annotations

import base64
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import mechanisms
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from report_page import CHROMIUM, NO_BROWSER, assert_media_playable, media_status, parse_page, screenshot

from siren.data.audio import save_audio
from siren.report_html import VARIANTS, write_report_html
from siren.train.samples import MEL_IMAGE_MAX_WIDTH, MEL_RANGE, save_mel_png

needs_browser = pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
IDS = ("spk0_utt0", "spk1_utt3")


def _metrics() -> dict[str, float]:
    m = {"bps_ratio": 1.01}
    for s, levels in (("sem", ["l0", "l1"]), ("pro", ["l0"]), ("spk", ["g0", "g1"])):
        m[f"agreement/{s}"] = 0.9
        m |= {f"agreement/{s}/{lv}": 0.8 + 0.05 * i for i, lv in enumerate(levels)}
        m[f"js/{s}"], m[f"entropy_delta_bits/{s}"] = 0.01, -0.02
    for w in ("adapted", "baseline"):
        m[f"bps_entropy/{w}"], m[f"bps_real/{w}"], m[f"bps_real_payload/{w}"] = 640.0, 700.5, 650.25
    for k in ("adapted_vs_truth", "baseline_vs_truth", "adapted_vs_baseline", "silence_vs_truth", "noise_vs_truth"):
        m[f"mel_l1/{k}"] = 1.5
    return m


def make_report(out: Path, *, vocoder: bool = True, run: str = "runs/demo/adapt", ids=IDS) -> dict:
    """A report dict shaped like report.json, and the media run_verify writes beside it (1.2 s clips, 80-bin mels)."""
    out.mkdir(parents=True, exist_ok=True)
    t = torch.arange(19200) / 16000
    for i, uid in enumerate(ids):
        g = torch.Generator().manual_seed(i)
        save_audio(out / f"{uid}_original.wav", 0.3 * torch.sin(2 * math.pi * (180 + 40 * i) * t), 16000)
        for v in VARIANTS:
            if v != "original" and vocoder:
                save_audio(out / f"{uid}_{v}.wav", 0.1 * torch.randn(19200, generator=g), 16000)
            save_mel_png(out / f"{uid}_{v}.png", torch.randn(80, 25, generator=g) * 2 - 5, f"{uid} {v}")
    checks = [
        {"threshold": "min/agreement/sem", "limit": 0.5, "value": 0.9, "ok": True},
        {"threshold": "max/bps_ratio", "limit": 1.05, "value": 1.01, "ok": True},
        {"threshold": "min/quality/pesq/adapted", "limit": 2.0, "value": None, "ok": False, "missing": True},
    ]
    return {
        "run": run,
        "step": 4,
        "baseline": {"uri": "wandb:local/siren-demo/codec-codec:latest"},
        "eval_set": "data/val.jsonl",
        "out_dir": str(out),
        "num_utts": len(ids),
        "seconds": 1.0,
        "metrics": _metrics(),
        "checks": checks,
        "passed": False,
        "pipeline": ["flow", "fuser", "vocoder"] if vocoder else [],
        "per_utterance": [{"id": uid, "adapted_vs_truth": 1.2, "baseline_vs_truth": 1.3} for uid in ids],
        "created": "2025-01-01T00:00:00",
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report_media")
    return make_report(out), out


@settings(max_examples=25, deadline=None)
@given(
    bins=st.integers(1, 128),
    frames=st.one_of(st.integers(1, 500), st.integers(500, 60_000)),
    loud_bin=st.integers(0, 127),
    odd=st.sampled_from([None, float("nan"), float("inf"), -float("inf"), 1e9]),
)
def test_a_mel_image_of_any_shape_shows_loud_bins_bright_and_low_bins_low(
    tmp_path_factory, bins, frames, loud_bin, odd
):
    """Any mel shape gives a PNG: 2 px per bin under a 28 px title strip, 3 px per frame up to a fixed width (an hour
    of frames is shrunk to it); the loudest bin is the brightest and sits at the bottom when it is bin 0 (low
    frequencies low); odd values are clipped, not an error."""
    loud_bin %= bins
    mel = torch.full((bins, frames), MEL_RANGE[0])
    mel[loud_bin] = MEL_RANGE[1]
    if odd is not None and frames > 1:  # in the first frame; the last frame, read below, stays clean
        mel[:, 0] = odd
    path = tmp_path_factory.mktemp("mel") / "m.png"
    save_mel_png(path, mel, "utt title")
    img = Image.open(path).convert("L")
    width = min(frames * 3, MEL_IMAGE_MAX_WIDTH)
    assert img.size == (max(width, 320), bins * 2 + 28)
    column = [img.getpixel((width - 1, y)) for y in range(28, 28 + bins * 2)]
    brightest = max(range(len(column)), key=column.__getitem__)
    assert (bins - 1 - loud_bin) * 2 <= brightest <= (bins - 1 - loud_bin) * 2 + 1  # flipped: bin 0 at the bottom
    assert column[brightest] > min(column) or bins == 1


@pytest.mark.parametrize("shape", [(0, 5), (80, 0), (80,), (2, 80, 5)])
def test_a_mel_image_of_no_or_wrong_shape_is_a_clear_error(tmp_path, shape):
    with pytest.raises(ValueError, match=r"\(n_mels, frames\)"):
        save_mel_png(tmp_path / "m.png", torch.zeros(shape), "x")
    assert not (tmp_path / "m.png").exists()


def test_page_structure(media, tmp_path):
    """The verdict, every threshold (a missing metric reads "not computed"), each metric table, and per utterance one
    player per wav and one image per png, each embedding exactly that file's bytes; no URL leaves the page."""
    report, out = media
    page = parse_page(write_report_html(report, out).read_text())
    assert page.verdict == "FAIL"
    checks = page.tables["checks"][1:]
    assert [r[0] for r in checks] == [c["threshold"] for c in report["checks"]]
    assert checks[2][2] == "not computed" and checks[2][3] == "✗" and checks[0][3] == "✓"
    assert [r[0] for r in page.tables["agreement"][1:]] == ["sem", "pro", "spk"]
    assert page.tables["agreement"][1][2:] == ["l0 0.8000", "l1 0.8500"]
    assert [r[0] for r in page.tables["drift"][1:]] == ["sem", "pro", "spk"]
    assert page.tables["bitrates"][1] == ["adapted", "640.0", "700.5", "650.2"]
    assert len(page.tables["mel"]) == 1 + 5 and len(page.tables["per-utterance"]) == 1 + len(IDS)
    assert "other" not in page.tables, "a metric of the standard report fell through to 'other metrics'"
    want = {f"{uid}_{v}" for uid in IDS for v in VARIANTS}
    for tags, ext, mime in ((page.audio, "wav", "audio/wav"), (page.img, "png", "image/png")):
        assert {t["data-media"] for t in tags} == {f"{n}.{ext}" for n in want}
        for t in tags:
            prefix = f"data:{mime};base64,"
            assert t["src"].startswith(prefix), f"{t['data-media']} is not embedded: src={t['src'][:80]!r}"
            assert base64.b64decode(t["src"][len(prefix) :]) == (out / t["data-media"]).read_bytes()
    assert all(u.startswith("data:") for u in page.urls), [u[:80] for u in page.urls if not u.startswith("data:")]
    assert "wandb:local/siren-demo/codec-codec:latest" in page.text and "flow, fuser, vocoder" in page.text


def test_page_without_vocoder(tmp_path):
    """No vocoder in the pipeline: the original plays, adapted and baseline show their mel and say why there is no
    audio; the pipeline line says "decoder head only"."""
    report = make_report(tmp_path, vocoder=False, ids=IDS[:1])
    page = parse_page(write_report_html(report, tmp_path).read_text())
    assert [a["data-media"] for a in page.audio] == [f"{IDS[0]}_original.wav"]
    assert len(page.img) == 3
    assert page.text.count("no audio: the pipeline has no vocoder") == 2
    assert "decoder head only" in page.text


def test_page_escapes_text(tmp_path):
    """Run names and utterance ids are text, never markup: a name holding a tag shows as written."""
    run = 'runs/<script>alert("x")</script>&'
    uid = "spk<b>0</b>"
    report = make_report(tmp_path, run=run, ids=(uid,))
    page = parse_page(write_report_html(report, tmp_path).read_text())
    assert page.scripts == 1, "text from the report became a <script> element"
    assert run in page.text and uid in page.text


@needs_browser
def test_page_plays_in_headless_browser(media, tmp_path):
    """Chromium loads every player's audio (duration > 0, no media error) and decodes every image from the page
    alone — copied away from its media — and its screenshot is a real, non-blank PNG of the requested size."""
    from PIL import Image

    report, out = media
    alone = tmp_path / "elsewhere" / "report.html"
    alone.parent.mkdir()
    shutil.copy(write_report_html(report, out), alone)
    n = len(IDS) * len(VARIANTS)
    assert_media_playable(media_status(alone), audio=n, images=n)

    shot = screenshot(alone, tmp_path / "report.png", 1400, 1200)
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1400, 1200)
        px = np.asarray(im.convert("RGB"))
    colours = len(np.unique(px.reshape(-1, 3), axis=0))
    assert px.std() > 20 and colours > 2000, f"screenshot looks blank: std {px.std():.1f}, {colours} colours"


@needs_browser
def test_browser_check_catches_broken_audio(media, tmp_path):
    """The playability check can fail: one player whose data URI is not audio is reported, by name."""
    report, out = media
    html = write_report_html(report, out).read_text()
    first = html.index('src="data:audio/wav;base64,') + len('src="')
    broken = html[:first] + "data:audio/wav;base64,UklGRiQAAABXQVZF" + html[html.index('"', first) :]
    page = tmp_path / "report.html"
    page.write_text(broken)
    with pytest.raises(AssertionError, match=r"audio that does not play: \[\{'media': 'spk0_utt0_original.wav'"):
        assert_media_playable(media_status(page), audio=6, images=6)


def test_verify_logs_the_page_to_wandb(media, tmp_path):
    """verify's W&B run carries the page itself (a wandb.Html with the embedded media)."""
    from siren.checkpoints.meta import CheckpointMeta
    from siren.verify.report import log_wandb

    report, out = media
    write_report_html(report, out)
    tracking = SimpleNamespace(mode="offline", project="siren-test", entity=None, group=None)
    meta = CheckpointMeta(step=4, stage="adapt", config={}, fingerprints={})  # no baseline: no artifact to use
    adapted = SimpleNamespace(cfg=SimpleNamespace(tracking=tracking), meta=meta)
    log_wandb(report, adapted, tmp_path / "run", 4)
    logged = list((tmp_path / "run" / "verify").glob("wandb/offline-run-*/files/media/html/verify/report_*.html"))
    assert len(logged) == 1, sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    assert logged[0].read_text() == (out / "report.html").read_text()


# Each test above, rerun with the mechanism it relies on switched off (tests/mechanisms.py), must fail on its own check.
CONTROLS = [
    ("test_page_structure", "report_embeds_media", r"is not embedded"),
    ("test_page_plays_in_headless_browser", "report_embeds_media", r"audio that does not play"),
    ("test_page_escapes_text", "report_escapes_text", r"became a <script> element"),
]


@pytest.mark.parametrize(
    "test_name, mechanism, failure", CONTROLS, ids=[f"{t[5:]}-without-{m}" for t, m, _ in CONTROLS]
)
def test_fails_with_mechanism_disabled(test_name, mechanism, failure, request, monkeypatch, tmp_path):
    (tmp_path / "control").mkdir()  # a fresh folder: the page the control writes is not the one the test wrote
    mechanisms.assert_fails_without(
        globals()[test_name], mechanism, failure, request, monkeypatch, {"tmp_path": tmp_path / "control"}
    )
