"""eval.report picks up the Backgrounds Challenge: a real challenge (test_challenge's world) beside real scores.

The two tiny models of test_challenge are scored by eval.score and searched by
eval.challenge --exhaustive into one results folder; the report must show
challenge.csv's numbers, the report's own clean accuracy beside them, the
figure, and composites whose pixels are the foreground's masked pixels over
the background that fooled it, read from the shards the challenge recorded.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import report, score
from eval.challenge import results as R
from eval.predictions import predictions_path, read_predictions, write_predictions
from eval.report import challenge as C
from eval.report.thumbnails import thumbnail_jpeg
from eval.stream import samples
from tests.test_challenge import N_IMAGES, build, run_challenge, trained
from tests.test_ground_truth import SCORE_ARGS, _quiet_torchscript, write_registry, write_val_tree
from tests.test_report import PNG_MAGIC, colored_pixels
from tests.test_report_html import LOAD_LAZY_IMAGES, _probe, needs_chromium

FAILED = "broken"
FAILED_ERROR = "weights unavailable: broken.pt not found"
GALLERY_SIZE = 4
# Injected into a copy of the page: bring each (lazy) image of the challenge section into view, wait for it,
# then say what the browser rendered.
PROBE = """<script>""" + LOAD_LAZY_IMAGES + """
window.addEventListener('load', async () => {
  const imgs = await loadLazyImages('#challenge-section img');
  const b = document.body.dataset;
  b.probeImages = String(imgs.length);
  b.probeBroken = JSON.stringify(imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt));
  b.probeRows = String(document.querySelectorAll('#challenge-section .gallery-row').length);
  b.probeCells = String(document.querySelectorAll('table[data-table="challenge"] tbody tr').length);
  b.probeDone = '1';
});
</script>"""
WRONG = {"fg": (12, 6), "bg": (3, 9)}  # original answers made wrong per model: (in1k, in9)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Shards, scores for fg and bg, an exhaustive challenge of both, and a model whose challenge failed."""
    root = tmp_path_factory.mktemp("report-challenge")
    (root / "zoo").mkdir()
    registry = write_registry(root / "zoo", {"fg": trained("fg"), "bg": trained("bg")})
    images, boxes = write_val_tree(root / "imagenet", N_IMAGES, seed=3)
    shards = build(root, images, boxes, ("original", "only_bg_t"))
    results = root / "results"
    with _quiet_torchscript():
        assert score.main(["--shards", str(shards / "original"), "--shards", str(shards / "only_bg_t"),
                           "--registry", str(registry), "--models", "fg,bg", "--out", str(results),
                           *SCORE_ARGS]) == 0
    # Both nets are right on every original: make some answers wrong, differently in in1k and in9 and per
    # model, so the clean-accuracy column can only match the one right number.
    for model, (in1k_wrong, in9_wrong) in WRONG.items():
        path = predictions_path(results, model, "original")
        p = read_predictions(path)
        p.pred[:in1k_wrong] = (p.label[:in1k_wrong] + 1) % 1000
        p.in9_pred[:in9_wrong] = (p.in9_label[:in9_wrong] + 1) % 9
        write_predictions(path, p)
    world = {"root": root, "registry": registry, "shards": shards, "results": results}
    assert run_challenge(world, results, "--exhaustive", "--batch-size", "64") == 0
    R.write_summary(results, [{**dict.fromkeys(R.SUMMARY_COLUMNS, ""), "model": FAILED, "label_space": "in9",
                               "backgrounds": str(N_IMAGES), "error": FAILED_ERROR}])
    return world


@pytest.fixture(scope="module")
def built(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    summary = report.build_report(world["results"], out, n_boot=20, models_json=world["registry"],
                                  gallery_size=GALLERY_SIZE)
    return out, summary


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _challenge_table(md: str) -> dict[str, dict[str, str]]:
    """report.md's Backgrounds Challenge table by model."""
    section = md[md.index("## Backgrounds Challenge"):]
    section = section[:section.index("\n## ", 1)]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells, strict=True))
            for ln in lines[1:] if (cells := [c.strip() for c in ln.strip("|").split("|")])}


def _value_and_interval(text: str) -> tuple[float, float, float]:
    m = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", text)
    assert m, text
    return float(m[1]), float(m[2]), float(m[3])


def _section(page: str, ident: str) -> str:
    start = page.index(f'data-section="{ident}"')
    return page[start:page.index("</section>", start)]


def _images(section: str) -> dict[str, list[tuple[str, bytes]]]:
    """Row key -> [(alt, jpeg bytes)] of the row's images, in order."""
    rows = {}
    for chunk in section.split('<div class="gallery-row" data-key="')[1:]:
        key = chunk[:chunk.index('"')]
        rows[key] = [(alt, base64.b64decode(src)) for src, alt in
                     re.findall(r'<img [^>]*src="data:image/jpeg;base64,([^"]+)" alt="([^"]+)"', chunk)]
    return rows


def _by_key(spec: Path, masks: bool = False) -> dict:
    return {s.key: s for s in samples(str(spec), masks=masks)}


def test_table_holds_challenge_csv_numbers_and_the_reports_clean_accuracy(world, built):
    out, summary = built
    written = R.read_summary(world["results"])
    assert set(written) == {"fg", "bg", FAILED}
    table = _challenge_table((out / "report.md").read_text())
    assert set(table) == set(written)
    metrics = _csv(out / "metrics.csv")
    for model in ("fg", "bg"):
        row, shown = written[model], table[model]
        assert shown["label space"] == row["label_space"] == "in9"
        assert shown["foregrounds"] == row["foregrounds"] and shown["vulnerable"] == row["vulnerable"]
        value, lo, hi = _value_and_interval(shown["challenge accuracy (%)"])
        for got, want in ((value, "challenge_accuracy"), (lo, "ci_low"), (hi, "ci_high")):
            assert got == pytest.approx(float(row[want]), abs=0.05 + 1e-9), (model, want)
        # Clean accuracy: the report's own accuracy on original in the challenge's label space.
        (clean,) = [r for r in metrics if (r["model"], r["label_space"], r["metric"], r["variant"])
                    == (model, "in9", "accuracy", "original")]
        c_value, c_lo, c_hi = _value_and_interval(shown["clean accuracy (%)"])
        assert (c_value, c_lo, c_hi) == pytest.approx(
            tuple(100 * float(clean[k]) for k in ("value", "lo", "hi")), abs=0.05 + 1e-9)
        n_in9 = sum(1 for r in R.read_foregrounds(world["results"], model) if int(r["in9_label"]) >= 0)
        assert float(clean["value"]) == pytest.approx(1 - WRONG[model][1] / n_in9)
        assert shown["backgrounds"] == row["backgrounds"] == str(N_IMAGES)
        # metrics.csv: one challenge_accuracy row, a fraction recomputed from the counts.
        (mrow,) = [r for r in metrics if r["model"] == model and r["metric"] == "challenge_accuracy"]
        n, v = int(row["foregrounds"]), int(row["vulnerable"])
        assert mrow["label_space"] == "in9" and int(mrow["n"]) == n
        assert float(mrow["value"]) == pytest.approx((n - v) / n)
        assert float(mrow["lo"]) == pytest.approx(float(row["ci_low"]) / 100, abs=1e-5)
        assert float(mrow["hi"]) == pytest.approx(float(row["ci_high"]) / 100, abs=1e-5)
    # The world was built so that the background-reader is fooled far more often than the shape-reader.
    assert int(written["bg"]["vulnerable"]) > int(written["fg"]["vulnerable"])
    assert summary["challenge"]["results"][0]["model"] == "fg"  # the most robust first
    assert "22.3%" in (out / "report.md").read_text() and "12.0%" in (out / "report.md").read_text()


def test_failed_model_row_shows_its_error(built):
    out, summary = built
    shown = _challenge_table((out / "report.md").read_text())[FAILED]
    assert shown["error"] == FAILED_ERROR
    assert shown["challenge accuracy (%)"] == "–" and shown["clean accuracy (%)"] == "–"
    assert _challenge_table((out / "report.md").read_text())["fg"]["error"] == "–"
    page = (out / "report.html").read_text()
    table = page[page.index('data-table="challenge"'):]
    assert FAILED_ERROR in table[:table.index("</table>")]
    assert not [r for r in _csv(out / "metrics.csv") if r["model"] == FAILED]
    failed = next(r for r in summary["challenge"]["results"] if r["model"] == FAILED)
    assert failed["error"] == FAILED_ERROR and failed["challenge_accuracy"] is None


def test_figure_is_written_embedded_and_linked(built):
    out, summary = built
    path = out / "fig_challenge.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert colored_pixels(path) > 300  # the points and their bars, not empty axes
    assert "fig_challenge.png" in summary["figures"]["written"]
    assert str(path) in summary["outputs"]
    assert "](fig_challenge.png)" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert '<figure data-figure="fig_challenge.png"><img src="data:image/png;base64,' in page
    assert '<a href="#challenge">' in page


def test_no_challenge_csv_no_section_and_no_figure(world, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(world["results"], results)
    (results / R.SUMMARY_NAME).unlink()
    out = tmp_path / "report"
    out.mkdir()
    (out / "fig_challenge.png").write_bytes(PNG_MAGIC)  # left over from an earlier run into the same folder
    summary = report.build_report(results, out, n_boot=0, models_json=world["registry"], gallery_size=1)
    assert not (out / "fig_challenge.png").exists()
    assert "challenge" not in summary and "fig_challenge.png" not in summary["figures"]["written"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Backgrounds Challenge" not in md and "fig_challenge" not in md
    assert 'id="challenge' not in page and "challenge-fooled" not in page
    assert not [r for r in _csv(out / "metrics.csv") if r["metric"] == "challenge_accuracy"]


def test_fooled_foregrounds_show_the_composite_the_model_saw(world, built):
    out, summary = built
    page = (out / "report.html").read_text()
    fgs = _by_key(world["shards"] / "original", masks=True)
    bgs = _by_key(world["shards"] / "only_bg_t")
    for model in ("fg", "bg"):
        rows = R.read_foregrounds(world["results"], model)
        vulnerable = sorted(r["key"] for r in rows if r["vulnerable"] == "1")
        fooled_by = {r["key"]: r["fooled_by"] for r in rows}
        shown = _images(_section(page, f"challenge-fooled-{model}"))
        assert list(shown) == vulnerable[:GALLERY_SIZE]  # the first vulnerable foregrounds by key
        for key, images in shown.items():
            fg, bg = fgs[key], bgs[fooled_by[key]]
            mask = fg.mask.numpy() > 127
            assert 0 < mask.sum() < mask.size  # a composite that is neither image
            expected = np.where(mask[None], fg.image.numpy(), bg.image.numpy())
            (fg_alt, fg_jpeg), (bg_alt, bg_jpeg), (comp_alt, comp_jpeg) = images
            assert fg_alt == f"{key} foreground" and fooled_by[key] in bg_alt and "composite" in comp_alt
            assert fg_jpeg == thumbnail_jpeg(fg.image)[0]
            assert bg_jpeg == thumbnail_jpeg(bg.image)[0]
            assert comp_jpeg == thumbnail_jpeg(torch.from_numpy(expected))[0]
            assert comp_jpeg != thumbnail_jpeg(fg.image)[0] and comp_jpeg != bg_jpeg
    assert summary["challenge"]["gallery"]["sections"]["challenge-fooled-bg"] == list(
        _images(_section(page, "challenge-fooled-bg")))


def test_composite_image_is_mask_over_background(world):
    fg = next(iter(samples(str(world["shards"] / "original"), masks=True)))
    bg = list(samples(str(world["shards"] / "only_bg_t")))[-1]
    got = C.composite_image(fg.image, fg.mask, bg.image).numpy()
    mask = fg.mask.numpy() > 127
    assert np.array_equal(got, np.where(mask[None], fg.image.numpy(), bg.image.numpy()))
    assert not np.array_equal(got, fg.image.numpy()) and not np.array_equal(got, bg.image.numpy())


def test_strongest_backgrounds_per_class(world, built):
    out, _ = built
    page = (out / "report.html").read_text()
    bgs = _by_key(world["shards"] / "only_bg_t")
    strongest = R.read_strongest(world["results"], "bg")
    assert strongest
    section = _section(page, "challenge-strongest-bg")
    shown = _images(section)
    classes = sorted({(int(r["class"]), r["class_name"]) for r in strongest})
    assert list(shown) == [f"bg-{name}" for _, name in classes]
    for _, name in classes:
        top = sorted((r for r in strongest if r["class_name"] == name), key=lambda r: int(r["rank"]))[:3]
        images = shown[f"bg-{name}"]
        assert [alt.split()[0] for alt, _ in images] == [r["key"] for r in top]
        for (_, jpeg), r in zip(images, top, strict=True):
            assert jpeg == thumbnail_jpeg(bgs[r["key"]].image)[0]
            assert f"attack success {100 * float(r['attack_success_rate']):.1f}%" in section


def test_only_the_shards_holding_the_images_are_read(world, tmp_path, monkeypatch):
    import eval.stream

    read: list[str] = []
    real = eval.stream.iter_shard

    def counting(ref, options):
        read.append(ref.name)
        yield from real(ref, options)

    monkeypatch.setattr(eval.stream, "iter_shard", counting)
    summary = report.build_report(world["results"], tmp_path / "out", n_boot=0, models_json=world["registry"],
                                  gallery_size=1)
    index = R.read_background_index(world["results"])
    needed = set()
    for model in ("fg", "bg"):
        rows = R.read_foregrounds(world["results"], model)
        first = min((r for r in rows if r["vulnerable"] == "1"), key=lambda r: r["key"], default=None)
        if first is not None:
            needed |= {first["shard"], index.shards[index.shard_of[index.keys.index(first["fooled_by"])]]["name"]}
        needed |= {r["shard"] for r in R.read_strongest(world["results"], model) if int(r["rank"]) <= 3}
    assert sorted(read) == sorted(needed)  # each once, and no other
    assert summary["challenge"]["gallery"]["shards_read"] == len(needed) <= C.MAX_SHARDS


def test_recorded_shards_gone_then_found_with_shards_option(world, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(world["results"], results)
    shards = str(world["shards"].resolve())
    for path in results.glob("challenge/**/*.json"):
        path.write_text(path.read_text().replace(shards, str(tmp_path / "moved-away")))
    summary = report.build_report(results, tmp_path / "stale", n_boot=0, models_json=world["registry"],
                                  gallery_size=2)
    lines = summary["challenge"]["gallery"]["lines"]
    assert any(line.startswith("No challenge images: none of the") for line in lines)
    assert any("challenge gallery: shard" in n and "moved-away" in n for n in summary["notes"])
    assert "challenge-fooled" not in (tmp_path / "stale" / "report.html").read_text()
    summary = report.build_report(results, tmp_path / "given", n_boot=0, models_json=world["registry"],
                                  gallery_size=2, shards=[str(world["shards"] / v) for v in ("original", "only_bg_t")])
    page = (tmp_path / "given" / "report.html").read_text()
    assert len(_images(_section(page, "challenge-fooled-bg"))) == 2
    assert not summary["challenge"]["gallery"]["lines"]


def test_a_tampered_summary_is_noted(world, tmp_path):
    """challenge.csv whose counts disagree with foregrounds.csv: the numbers shown are flagged, nothing hidden."""
    results = tmp_path / "results"
    shutil.copytree(world["results"], results)
    rows = R.read_summary(results)
    rows["bg"]["vulnerable"] = str(int(rows["bg"]["vulnerable"]) - 1)
    (results / R.SUMMARY_NAME).unlink()
    R.write_summary(results, list(rows.values()))
    summary = report.build_report(results, tmp_path / "out", n_boot=0, models_json=world["registry"],
                                  gallery_size=1)
    notes = " | ".join(summary["notes"])
    assert "bg's foregrounds.csv holds" in notes and "challenge_accuracy" in notes
    assert "challenge-fooled-bg" not in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["challenge"]["results"]


@needs_chromium
def test_chromium_renders_the_challenge_section(built, tmp_path):
    out, summary = built
    attrs, log = _probe(out / "report.html", tmp_path, PROBE)
    assert attrs.get("done") == "1", log[-2000:]
    assert json.loads(attrs["broken"]) == []
    sections = summary["challenge"]["gallery"]["sections"]
    assert int(attrs["rows"]) == sum(map(len, sections.values())) > 0
    strongest_images = sum(len(images) for ident in sections if ident.startswith("challenge-strongest")
                           for images in _images(_section((out / "report.html").read_text(), ident)).values())
    fooled_images = 3 * sum(len(keys) for ident, keys in sections.items() if ident.startswith("challenge-fooled"))
    assert int(attrs["images"]) == 1 + fooled_images + strongest_images  # the figure, and every thumbnail
    assert int(attrs["cells"]) == len(summary["challenge"]["results"])
