"""Reading verify's `report.html` in tests: its structure with the stdlib parser (runs everywhere), and the page as a real
headless Chromium renders it (where `chromium` is installed; `make test` installs it)."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_BROWSER = "chromium is not installed (make test installs it: apt-get install chromium)"
# Headless on a closed network: without the networking flags Chromium waits on services it cannot reach.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
]


@dataclass
class Page:
    """What the parser saw: each <audio>/<img> as its attributes, each table's rows as cell texts, and the verdict."""

    audio: list[dict] = field(default_factory=list)
    img: list[dict] = field(default_factory=list)
    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    verdict: str = ""
    scripts: int = 0
    text: str = ""
    urls: list[str] = field(default_factory=list)


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._table = None
        self._row = None
        self._cell = None
        self._in_verdict = False
        self._text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.page.urls.append(a[k])
        if tag == "audio":
            self.page.audio.append(a)
        elif tag == "img":
            self.page.img.append(a)
        elif tag == "script":
            self.page.scripts += 1
        elif tag == "table" and "id" in a:
            self._table = self.page.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and "verdict" in a.get("class", "").split():
            self._in_verdict = True
        elif tag == "span":
            self._in_verdict = False  # the verdict word only, not its "k of n" line

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in_verdict:
            self.page.verdict += data.strip()


def parse_page(html: str) -> Page:
    p = _Parser()
    p.feed(html)
    p.close()
    p.page.text = "".join(p._text)
    return p.page


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if CHROMIUM is None:  # also reached by a negative control that calls a browser test directly
        import pytest

        pytest.skip(NO_BROWSER)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def media_status(page: Path) -> dict:
    """Load `page` in headless Chromium and return the JSON its script left in `#media-status` once media settled."""
    r = _run(["--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()])
    dom = parse_dom_status(r.stdout)
    assert dom is not None, f"no #media-status in Chromium's DOM (exit {r.returncode}): {r.stderr[-2000:]}"
    return dom


def parse_dom_status(dom: str) -> dict | None:
    start = dom.find('<pre id="media-status"')
    if start < 0:
        return None
    start = dom.index(">", start) + 1
    return json.loads(html.unescape(dom[start : dom.index("</pre>", start)]))


def assert_media_playable(status: dict, audio: int, images: int) -> None:
    """Every player loaded its audio (metadata read, duration > 0, no media error) and every image decoded."""
    assert status["settled"], f"media never settled: {status}"
    assert len(status["audio"]) == audio and len(status["img"]) == images, (
        f"page holds {len(status['audio'])} players and {len(status['img'])} images, want {audio} and {images}"
    )
    bad = [a for a in status["audio"] if a["error"] is not None or not (a["duration"] or 0) > 0]
    assert not bad, f"audio that does not play: {bad}"
    blank = [i for i in status["img"] if not i["naturalWidth"] > 0]
    assert not blank, f"images that did not decode: {blank}"


def screenshot(page: Path, out: Path, width: int, height: int) -> Path:
    # The virtual-time budget lets players read their metadata first, so they show each clip's length.
    args = [f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={out}"]
    r = _run([*args, page.resolve().as_uri()])
    assert out.is_file(), f"Chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-2000:]}"
    return out
