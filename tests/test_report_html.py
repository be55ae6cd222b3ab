"""report.html in a real browser: headless Chromium opens it from disk, every table and figure must be there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import report
from eval.predictions import predictions_path, write_predictions
from tests.test_report import ALL_VARIANTS, KEYS, colored_pixels, make_predictions

# A model id is user data (a folder name): markup in it must come out as text.
TRICKY = 'tricky<i>&"id'
MODELS = {"small": 0.55, "mid": 0.7, TRICKY: 0.85}
# Every metric table the page must show for a run with all variants in both label spaces.
EXPECTED_TABLES = {"models", "definitions"} | {
    f"{ls}-{name}" for ls in ("in1k", "in9")
    for name in ("accuracy", "invariance", "influence", "bg_gap", "categories", "trends")
} | {"in9-class_accuracy"}
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                               "google-chrome-stable")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")

# Injected into a copy of the page (the page itself carries no script): after load, write what the
# browser actually rendered into data attributes that --dump-dom shows.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const b = document.body.dataset;
  b.probeImages = String(imgs.length);
  b.probeBroken = JSON.stringify(imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt));
  b.probeFigures = JSON.stringify([...document.querySelectorAll('figure[data-figure]')]
    .filter(f => { const i = f.querySelector('img'); return i && i.naturalWidth > 0; }).map(f => f.dataset.figure));
  b.probeTables = JSON.stringify([...document.querySelectorAll('table[data-table]')]
    .filter(t => t.tBodies[0] && t.tBodies[0].rows.length > 0).map(t => t.dataset.table));
  b.probeIntervals = String(document.querySelectorAll('.ci').length);
  b.probeItalic = String(document.querySelectorAll('i').length);
  b.probeDone = '1';
});
</script>"""


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("html-results")
    rng = np.random.default_rng(7)
    for model, level in MODELS.items():
        for i, variant in enumerate(ALL_VARIANTS):
            correct = rng.random(len(KEYS)) < level * (1.0 - 0.08 * i)
            write_predictions(predictions_path(root, model, variant), make_predictions(KEYS, correct, rng))
    out = root / "report"
    summary = report.build_report(root, out, n_boot=100, models_json=root / "none.json")
    return out, summary


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "poster", "data")]


def test_page_is_self_contained_and_escaped(page):
    out, summary = page
    text = (out / "report.html").read_text(encoding="utf-8")
    parser = _Resources()
    parser.feed(text)
    assert parser.urls and all(u.startswith(("data:", "#")) for u in parser.urls), "page would fetch something"
    assert not {"script", "link", "iframe", "object"} & set(parser.tags)
    assert "url(" not in text and "@import" not in text
    assert parser.tags.count("img") == len(summary["figures"]["written"]) == 8
    assert "tricky&lt;i&gt;&amp;&quot;id" in text and "<i>" not in text


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_dir}", *args],
        capture_output=True, text=True, timeout=120,
    )


def _probe(html_path: Path, tmp_path: Path) -> tuple[dict, str]:
    """Open a probed copy of the page next to the original; return the data attributes and the browser log."""
    probed = html_path.with_name("probed-" + html_path.name)
    probed.write_text(html_path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = _chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                     probed.resolve().as_uri(), user_dir=tmp_path / "profile-dom")
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stderr[-2000:]
    attrs = {k: v.replace("&quot;", '"').replace("&amp;", "&") for k, v in re.findall(r'data-probe-(\w+)="([^"]*)"',
                                                                                      body.group(1))}
    return attrs, proc.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line)]


@needs_chromium
def test_chromium_renders_every_table_and_figure(page, tmp_path):
    out, summary = page
    attrs, log = _probe(out / "report.html", tmp_path)
    assert attrs.get("done") == "1", log[-2000:]
    assert json.loads(attrs["broken"]) == []
    assert int(attrs["images"]) == len(summary["figures"]["written"])
    assert sorted(json.loads(attrs["figures"])) == sorted(summary["figures"]["written"])
    assert set(json.loads(attrs["tables"])) == EXPECTED_TABLES
    assert int(attrs["intervals"]) > 50  # values carry their 95% intervals
    assert attrs["italic"] == "0"  # the model id's <i> stayed text
    assert _console_errors(log) == []

    shot = tmp_path / "report.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                     (out / "report.html").resolve().as_uri(), user_dir=tmp_path / "profile-shot")
    assert shot.is_file(), proc.stderr[-2000:]
    assert Image.open(shot).size == (1280, 2000)
    assert colored_pixels(shot) > 20_000  # figures, not a blank or unstyled page


@needs_chromium
def test_probe_sees_broken_images_and_script_errors(tmp_path):
    """The checks above can fail: a broken image and an uncaught error are both reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><figure data-figure="x.png"><img src="data:image/png;base64,AAAA" '
                    'alt="x"></figure><script>throw new Error("deliberate")</script></body></html>')
    attrs, log = _probe(page, tmp_path)
    assert json.loads(attrs["broken"]) == ["x"] and json.loads(attrs["figures"]) == []
    assert any("deliberate" in line for line in _console_errors(log))
