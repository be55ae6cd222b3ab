"""report.html in a real browser: headless Chromium opens it from disk, every table, figure and thumbnail must be there."""

from __future__ import annotations

import base64
import html
import io
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
from eval.predictions import IN9_OUTSIDE, Predictions, predictions_path, read_predictions, write_predictions
from pipeline.classes import imagenet_classes, to_in9
from tests.test_report import ALL_VARIANTS, KEYS, build_demo_shards, colored_pixels, make_predictions

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

# A probe's helper: bring each lazy image of ``selector`` into view and wait for it (or its failure).
LOAD_LAZY_IMAGES = """
async function loadLazyImages(selector) {
  const imgs = [...document.querySelectorAll(selector)];
  for (const img of imgs) {
    img.scrollIntoView();
    if (!img.complete || img.naturalWidth === 0) {
      await new Promise(done => {
        img.addEventListener('load', done, {once: true});
        img.addEventListener('error', done, {once: true});
        setTimeout(done, 3000);
      });
    }
  }
  return imgs;
}
"""
# Injected into a copy of the page (the page itself carries no script): after load, write what the
# browser actually rendered into data attributes that --dump-dom shows.
PROBE = """<script>""" + LOAD_LAZY_IMAGES + """
window.addEventListener('load', async () => {
  const b = document.body.dataset;
  // Gallery thumbnails load lazily: wait for each (or its failure) before counting.
  const thumbs = await loadLazyImages('#gallery img');
  b.probeThumbs = String(thumbs.length);
  b.probeLoaded = String(thumbs.filter(i => i.complete && i.naturalWidth > 0).length);
  b.probeLazy = String(thumbs.filter(i => i.getAttribute('loading') === 'lazy').length);
  b.probeRows = JSON.stringify(Object.fromEntries([...document.querySelectorAll('.gallery-section')].map(s =>
    [s.dataset.section, [...s.querySelectorAll('.gallery-row')].map(r => ({
      key: r.dataset.key,
      figures: [...r.querySelectorAll('figure')].map(f => ({
        label: f.querySelector('.label').textContent, img: !!f.querySelector('img'),
        lines: [...f.querySelectorAll('figcaption div:not(.label)')].map(d => d.textContent)})),
    }))])));
  const imgs = [...document.images];
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


def _probe(html_path: Path, tmp_path: Path, probe: str = PROBE) -> tuple[dict, str]:
    """Open a copy of the page with ``probe`` next to the original; return the data attributes and the browser log."""
    probed = html_path.with_name("probed-" + html_path.name)
    probed.write_text(html_path.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = _chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                     probed.resolve().as_uri(), user_dir=tmp_path / "profile-dom")
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stderr[-2000:]
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-probe-(\w+)="([^"]*)"', body.group(1))}
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
    good = colored_thumbnail_uri()
    page.write_text('<!DOCTYPE html><html><body><figure data-figure="x.png"><img src="data:image/png;base64,AAAA" '
                    'alt="x"></figure><div style="height:6000px"></div><section id="gallery">'
                    f'<img loading="lazy" src="{good}" alt="good"><img src="data:image/jpeg;base64,AAAA" alt="bad">'
                    '</section><script>throw new Error("deliberate")</script></body></html>')
    attrs, log = _probe(page, tmp_path)
    assert json.loads(attrs["broken"]) == ["x", "bad"] and json.loads(attrs["figures"]) == []
    # A thumbnail far below the fold loads once scrolled to; a broken one never counts as loaded or lazy.
    assert (attrs["thumbs"], attrs["loaded"], attrs["lazy"]) == ("2", "1", "1")
    assert any("deliberate" in line for line in _console_errors(log))


# ---------------------------------------------------------------- the gallery, on a small real build


def colored_thumbnail_uri() -> str:
    """A real 8 x 8 JPEG as a data: URI."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

GALLERY_VARIANTS = ("original", "only_fg", "only_bg_t", "mixed_rand")
GALLERY_SIZE = 3
REFERENCE = "net_ref"  # the most accurate on original, so the default picks its rows
# (O, M, B): right on original, mixed_rand, only_bg_t, cycled over the reference model's keys so that every
# gallery category has members and BG Required has more than GALLERY_SIZE (the sample must choose).
PATTERNS = ((1, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1), (1, 0, 1), (1, 0, 0),
            (0, 1, 0), (1, 0, 1), (0, 0, 0), (1, 0, 1), (0, 1, 1), (1, 0, 1), (1, 0, 0))
CATEGORY_RULES = {  # README's definitions, written out here rather than imported
    "bg_required": lambda o, m, b: o and not m and b,
    "bg_fools": lambda o, m, b: not o and m and not b,
    "bg_fg_required": lambda o, m, b: o and not m and not b,
    "bg_fg_fools": lambda o, m, b: not o and m and b,
}


def predictions_for(truth: dict[str, dict], correct: dict[str, bool], p_true: dict[str, float],
                    wrong: dict[str, int]) -> Predictions:
    """A predictions file for the samples in ``truth``: right where ``correct`` says, else class ``wrong[key]``."""
    keys = sorted(truth)
    label = np.array([truth[k]["label"] for k in keys], dtype=np.int64)
    pred = np.array([truth[k]["label"] if correct[k] else wrong[k] for k in keys], dtype=np.int64)
    in9_pred = np.array([to_in9(int(c)) if to_in9(int(c)) >= 0 else IN9_OUTSIDE for c in pred], dtype=np.int64)
    return Predictions(
        keys=np.array(keys, dtype=object), label=label, pred=pred,
        top5=np.stack([pred, *((pred + i) % 1000 for i in range(1, 5))], axis=1),
        p_true=np.array([p_true[k] for k in keys]), in9_label=np.array([truth[k]["in9_label"] for k in keys]),
        in9_pred=in9_pred, bg_label=np.array([truth[k]["bg_label"] for k in keys], dtype=np.int64),
    )


@pytest.fixture(scope="module")
def gallery_page(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Real demo shards (4 variants, 5 samples a shard), hand-written predictions of two models, the report."""
    root = tmp_path_factory.mktemp("gallery")
    shards = root / "shards"
    truth = build_demo_shards(shards, GALLERY_VARIANTS)
    keys = sorted(truth["original"])
    rng = np.random.default_rng(11)
    view = {"original": 0, "mixed_rand": 1, "only_bg_t": 2}
    for model in (REFERENCE, TRICKY):
        for variant in GALLERY_VARIANTS:
            t = truth[variant]
            if model == REFERENCE:
                pattern = {k: PATTERNS[i % len(PATTERNS)] for i, k in enumerate(keys)}
                correct = {k: bool(pattern[k][view.get(variant, 0)]) and (variant != "only_fg" or i % 3 > 0)
                           for i, k in enumerate(keys) if k in t}
            else:
                correct = {k: bool(rng.random() < 0.3) for k in t}
            # Some wrong mixed_rand answers are the background's class: the flips section ranks those first.
            wrong = {k: t[k]["bg_label"] if variant == "mixed_rand" and i % 2 == 0 and t[k]["bg_label"] >= 0
                     and t[k]["bg_label"] != t[k]["label"] else (t[k]["label"] + 7) % 1000 for i, k in enumerate(t)}
            p_true = {k: float(rng.uniform(0.5, 1.0) if correct[k] else rng.uniform(0.0, 0.3)) for k in t}
            write_predictions(predictions_path(root, model, variant), predictions_for(t, correct, p_true, wrong))
    out = root / "report"
    summary = report.build_report(root, out, n_boot=20, models_json=root / "none.json", gallery_size=GALLERY_SIZE,
                                  shards=[str(shards / v) for v in GALLERY_VARIANTS])
    assert summary["gallery"]["shown"], summary["gallery"]
    preds = {(m, v): read_predictions(predictions_path(root, m, v)) for m in (REFERENCE, TRICKY)
             for v in GALLERY_VARIANTS}
    return out, truth, preds


def expected_sections(preds: dict[str, Predictions], size: int) -> tuple[dict[str, list[str]], list[str]]:
    """Category members and the expected flips, recomputed from the predictions files alone."""
    right = {v: {k: bool(c) for k, c in zip(p.keys, p.pred == p.label, strict=True)} for v, p in preds.items()}
    row = {v: {k: i for i, k in enumerate(p.keys)} for v, p in preds.items()}
    o, m, b = right["original"], right["mixed_rand"], right["only_bg_t"]
    members = {c: sorted(k for k in set(o) & set(m) & set(b) if rule(o[k], m[k], b[k]))
               for c, rule in CATEGORY_RULES.items()}
    switched, drop = {}, {}
    for variant in ("only_fg", "mixed_rand"):
        p, po = preds[variant], preds["original"]
        for k in set(o) & set(right[variant]):
            i, j = row[variant][k], row["original"][k]
            to_bg = bool(p.bg_label[i] >= 0 and p.pred[i] == p.bg_label[i] and p.pred[i] != po.pred[j])
            if not right[variant][k] and (o[k] or to_bg):
                switched[k] = switched.get(k, False) or to_bg
                drop[k] = max(drop.get(k, -1.0), float(po.p_true[j] - p.p_true[i]))
    flips = sorted(drop, key=lambda k: (not switched[k], -drop[k], k))[:size]
    return members, flips


@needs_chromium
def test_chromium_shows_the_gallery_rows_thumbnails_and_class_names(gallery_page, tmp_path):
    out, truth, preds = gallery_page
    attrs, log = _probe(out / "report.html", tmp_path)
    assert attrs.get("done") == "1", log[-2000:]
    rows = json.loads(attrs["rows"])
    members, flips = expected_sections({v: preds[(REFERENCE, v)] for v in GALLERY_VARIANTS}, GALLERY_SIZE)
    assert list(rows) == [*CATEGORY_RULES, "flips"]
    assert len(members["bg_required"]) > GALLERY_SIZE and all(members.values())  # the build exercises sampling
    for category, keys in members.items():
        shown = [r["key"] for r in rows[category]]
        assert len(set(shown)) == len(shown) == min(GALLERY_SIZE, len(keys)), category
        assert set(shown) <= set(keys), category
    assert [r["key"] for r in rows["flips"]] == flips

    names = imagenet_classes().names
    expected_images = 0
    for section in rows.values():
        for r in section:
            figures = {f["label"]: f for f in r["figures"]}
            for variant in GALLERY_VARIANTS:
                figure = figures[variant]
                if r["key"] not in truth[variant]:
                    assert not figure["img"]  # a key the variant rejected shows a placeholder, not a broken image
                    continue
                expected_images += 1
                assert figure["img"], (r["key"], variant)
                for model in (REFERENCE, TRICKY):
                    p = preds[(model, variant)]
                    i = list(p.keys).index(r["key"])
                    mark = "✓" if p.pred[i] == p.label[i] else "✗"
                    assert f"{mark} {names[p.pred[i]]} · p(true) {p.p_true[i]:.2f}" in figure["lines"], (r, model)
                assert TRICKY in figure["lines"]  # which model said it, as text (the <i> stays escaped)
            bg_key = truth["mixed_rand"][r["key"]]["bg_key"]
            assert any(line.startswith(f"background from {bg_key} (") for line in figures["mixed_rand"]["lines"])
            context = r["figures"][[f["label"] for f in r["figures"]].index("mixed_rand") + 1]
            assert context["label"] == "mixed_rand's background from" and context["img"]
            assert bg_key in context["lines"]
            expected_images += 1
    assert int(attrs["thumbs"]) == expected_images > 0
    assert int(attrs["loaded"]) == expected_images  # every thumbnail decoded to a real image
    assert int(attrs["lazy"]) == expected_images
    assert json.loads(attrs["broken"]) == [] and attrs["italic"] == "0"
    assert _console_errors(log) == []


def test_gallery_page_stays_light_and_self_contained(gallery_page):
    out, _, _ = gallery_page
    text = (out / "report.html").read_text(encoding="utf-8")
    parser = _Resources()
    parser.feed(text)
    thumbs = [u for u in parser.urls if u.startswith("data:image/jpeg;base64,")]
    assert thumbs and all(u.startswith(("data:", "#")) for u in parser.urls)
    sizes = [len(u) * 3 // 4 for u in thumbs]
    assert max(sizes) < 8_000  # small JPEG thumbnails, not the 224 px frames
    for uri in thumbs[:3]:
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert image.format == "JPEG" and max(image.size) == 96
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Gallery" in md and "rows of thumbnails" in md


def test_gallery_shows_a_placeholder_where_a_variant_lacks_the_key(gallery_page, tmp_path):
    """only_bg_t rejects photos whose box fills the frame: their rows say so instead of showing a broken image."""
    out, truth, _ = gallery_page
    root = out.parent
    summary = report.build_report(root, tmp_path / "big", n_boot=0, models_json=root / "none.json",
                                  gallery_size=len(truth["original"]),
                                  shards=[str(root / "shards" / v) for v in GALLERY_VARIANTS])
    lacking = {k for k in truth["original"] if k not in truth["only_bg_t"]}
    shown = {k for keys in summary["gallery"]["sections"].values() for k in keys}
    assert lacking & shown  # the flips include photos only_bg_t has no sample of
    page = (tmp_path / "big" / "report.html").read_text(encoding="utf-8")
    rows = dict(re.findall(r'<div class="gallery-row" data-key="([^"]+)">(.*?)</div></figcaption></figure></div>', page))
    assert set(rows) == shown
    for key, row in rows.items():
        placeholder = '<div class="label">only_bg_t</div><div class="muted">not in only_bg_t</div>' in row
        assert placeholder == (key in lacking), key
        assert row.count("<img ") == len(GALLERY_VARIANTS) + 1 - placeholder  # + the background's photo
