"""eval.report end to end: tiny synthetic predictions for three fake models, and the gallery on real demo shards."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import report
from eval.metrics import CATEGORIES
from eval.predictions import (
    IN9_NOT_COMPUTED,
    Predictions,
    predictions_path,
    read_predictions,
    write_predictions,
)
from pipeline.classes import in9_names
from pipeline.variants import VARIANTS

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 40
KEYS = np.array([f"n0000_{i:04d}" for i in range(N)], dtype=object)
ALL_VARIANTS = ("original", "only_fg", "only_bg_b", "only_bg_t", "no_fg", "mixed_same", "mixed_rand", "texture")
# Per-model accuracy level per variant; the generator draws correctness around these.
LEVELS = {
    "net_small": {"original": 0.6, "only_fg": 0.4, "texture": 0.3, "mixed_rand": 0.35, "mixed_same": 0.5,
                  "only_bg_b": 0.1, "only_bg_t": 0.15, "no_fg": 0.2},
    "net_mid": {"original": 0.75, "only_fg": 0.6, "texture": 0.5, "mixed_rand": 0.55, "mixed_same": 0.65,
                "only_bg_b": 0.2, "only_bg_t": 0.25, "no_fg": 0.3},
    "net_big": {"original": 0.9, "only_fg": 0.8, "texture": 0.7, "mixed_rand": 0.75, "mixed_same": 0.8,
                "only_bg_b": 0.3, "only_bg_t": 0.35, "no_fg": 0.4},
}
MISSING_VARIANT = ("net_small", "texture")
DROPPED_KEYS = ("net_mid", "mixed_rand", KEYS[[3, 17, 29]])
# original lacks keys the other variants have: paired invariance must differ from plain accuracy.
DROPPED_FROM_ORIGINAL = ("net_small", "original", KEYS[[5, 11, 23]])
SHUFFLED = ("net_big", "mixed_same")
FIGURES = ("fig_invariance", "fig_influence", "fig_bg_gap", "fig_categories")


def make_predictions(keys: np.ndarray, correct: np.ndarray, rng: np.random.Generator) -> Predictions:
    n = len(keys)
    label = rng.integers(0, 1000, size=n)
    pred = np.where(correct, label, (label + 1) % 1000)
    top5 = np.stack([pred, (pred + 2) % 1000, (pred + 3) % 1000, (pred + 4) % 1000, (pred + 5) % 1000], axis=1)
    in9_label = rng.integers(0, 9, size=n)
    in9_label[::5] = -1  # some samples outside the 370 IN-9 classes
    in9_pred = np.where(correct, in9_label, (in9_label + 1) % 9)
    in9_pred[in9_label < 0] = 0
    return Predictions(
        keys=keys.copy(), label=label.astype(np.int64), pred=pred.astype(np.int64), top5=top5.astype(np.int64),
        p_true=np.where(correct, 0.9, 0.01), in9_label=in9_label.astype(np.int64), in9_pred=in9_pred.astype(np.int64),
    )


def colored_pixels(path: Path) -> int:
    """Pixels that are clearly not gray: empty axes (black lines, gray text on white) have none."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def build_demo_shards(out: Path, variants: tuple[str, ...], shard_size: int = 5) -> dict[str, dict[str, dict]]:
    """The embedded demo built for real; per variant, each sample's label, bg_key and bg_label as the shards hold them."""
    from builders.make_shards import build, parse_args
    from eval.stream import samples

    config, _ = parse_args(["--variant", ",".join(variants), "--out", str(out), "--shard-size", str(shard_size),
                            "--no-progress"])
    build(config, progress=False)
    return {v: {s.key: {"label": s.label, "in9_label": s.in9_label, "bg_key": s.meta.get("bg_key"),
                        "bg_label": s.bg_label} for s in samples(str(out / v))} for v in variants}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    """Write predictions for 3 models; return the folder and the correctness truth by (model, variant)."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(1234)
    truth: dict[tuple[str, str], dict[str, bool]] = {}
    for model, levels in LEVELS.items():
        for variant in ALL_VARIANTS:
            if (model, variant) == MISSING_VARIANT:
                continue
            keys = KEYS
            for dropped in (DROPPED_KEYS, DROPPED_FROM_ORIGINAL):
                if (model, variant) == dropped[:2]:
                    keys = np.array([k for k in KEYS if k not in set(dropped[2])], dtype=object)
            correct = rng.random(len(keys)) < levels[variant]
            truth[(model, variant)] = dict(zip(keys.tolist(), correct.tolist(), strict=True))
            path = predictions_path(root, model, variant)
            write_predictions(path, make_predictions(keys, correct, rng))
            if (model, variant) == SHUFFLED:
                # Reverse the data rows: the report must join by key, not by position.
                lines = path.read_text().splitlines()
                path.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    models_json = root / "models.json"
    models_json.write_text(json.dumps({"models": [
        {"id": "net_small", "params": 3.5e6, "train_images": 1.28e6},
        {"id": "net_mid", "params": 25e6, "train_images": 1.28e6},
        {"id": "net_big", "params": 800e6, "train_images": 1e9},
    ]}))
    return root, truth


@pytest.fixture(scope="module")
def built(results, tmp_path_factory) -> tuple[Path, dict, dict]:
    root, truth = results
    out = tmp_path_factory.mktemp("report")
    summary = report.build_report(root, out, n_boot=200, seed=0, models_json=root / "models.json")
    return out, summary, truth


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _row(rows, model, metric, variant, ls="in1k", category="", klass="") -> dict:
    hits = [r for r in rows if (r["model"], r["label_space"], r["metric"], r["variant"], r["category"], r["class"])
            == (model, ls, metric, variant, category, klass)]
    assert len(hits) == 1, (model, metric, variant, ls, category, klass, len(hits))
    return hits[0]


def _value(rows, model, metric, variant, ls="in1k", category="", klass="") -> float:
    return float(_row(rows, model, metric, variant, ls, category, klass)["value"])


def _mean(truth: dict[str, bool], keys) -> float:
    return float(np.mean([truth[k] for k in keys]))


def test_outputs_exist_and_every_figure_has_data(built):
    out, summary, _ = built
    for name in ("metrics.csv", "trends.csv", "metrics.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    on_disk = sorted(p.name for p in out.glob("fig_*.png"))
    assert on_disk == sorted(summary["figures"]["written"])
    # Every variant exists for some model, so all four figures are drawn in both label spaces.
    assert on_disk == sorted(f"{stem}{suffix}.png" for stem in FIGURES for suffix in ("", "_in9"))
    for name in on_disk:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert colored_pixels(out / name) > 500, name
    assert summary["figures"]["not_drawn"] == []
    assert set(summary["models_seen"]) == set(LEVELS)
    assert json.loads((out / "metrics.json").read_text())["notes"] == summary["notes"]


def test_empty_axes_are_not_counted_as_data(tmp_path):
    """The figure check above would catch today's empty-axes PNGs: such an image has no coloured pixel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_title("BG-Gap: acc(mixed_same) − acc(mixed_rand)")
    fig.savefig(tmp_path / "empty.png", dpi=110)
    assert colored_pixels(tmp_path / "empty.png") == 0


def test_metrics_csv_matches_truth(built):
    out, _, truth = built
    rows = _rows(out)
    assert {r["model"] for r in rows} == set(LEVELS)
    for model in LEVELS:
        clean = truth[(model, "original")]
        assert _value(rows, model, "accuracy", "original") == pytest.approx(_mean(clean, clean))
        fg = truth[(model, "only_fg")]
        shared = sorted(set(clean) & set(fg))
        drop = _mean(clean, shared) - _mean(fg, shared)
        assert _value(rows, model, "invariance_drop", "only_fg") == pytest.approx(drop)
        assert _value(rows, model, "invariance_clean_accuracy", "only_fg") == pytest.approx(_mean(clean, shared))
        assert _value(rows, model, "invariance_accuracy", "only_fg") == pytest.approx(_mean(fg, shared))
        assert _value(rows, model, "invariance_ratio", "only_fg") == pytest.approx(_mean(fg, shared) / _mean(clean, shared))
        bg = truth[(model, "only_bg_t")]
        assert _value(rows, model, "influence_above_chance", "only_bg_t") == pytest.approx(_mean(bg, bg) - 0.001)
        assert _value(rows, model, "accuracy", "only_bg_t") == pytest.approx(_mean(bg, bg))
    # original lacks three keys: the paired numbers run over the 37 keys both have.
    assert int(_row(rows, "net_small", "invariance_accuracy", "only_fg")["n"]) == N - 3
    assert int(_row(rows, "net_small", "accuracy", "only_fg")["n"]) == N


def test_variant_columns_hold_variant_names(built):
    out, _, _ = built
    rows = _rows(out)
    for r in rows:
        assert r["variant"] in (*VARIANTS, ""), r
        variants = r["variants"].split(",")
        assert set(variants) <= set(VARIANTS), r
        assert r["variant"] in variants or r["variant"] == "", r
    gap = _row(rows, "net_big", "bg_gap", "")
    assert gap["variants"] == "mixed_same,mixed_rand"
    assert _row(rows, "net_big", "invariance_drop", "texture")["variants"] == "original,texture"
    cats = [r for r in rows if r["metric"] == "category_share" and r["model"] == "net_big" and r["label_space"] == "in1k"]
    assert sorted(r["category"] for r in cats) == sorted(CATEGORIES)
    assert {r["variants"] for r in cats} == {"original,mixed_rand,only_bg_t"}
    assert sum(float(r["value"]) for r in cats) == pytest.approx(1.0)


def test_no_duplicate_or_constant_metric(built):
    """No metric repeats another one value for value (the old infl_acc), and none is a constant (infl_chance)."""
    out, _, _ = built
    by_metric: dict[str, dict[tuple, tuple]] = {}
    for r in _rows(out):
        key = (r["model"], r["label_space"], r["variant"], r["category"], r["class"])
        cell = by_metric.setdefault(r["metric"], {})
        assert key not in cell, ("duplicate row", r)
        cell[key] = (r["value"], r["lo"], r["hi"], r["n"])
    names = sorted(by_metric)
    for i, a in enumerate(names):
        values = {v[0] for v in by_metric[a].values()}
        assert len(values) > 1, (a, "is a constant")
        for b in names[i + 1:]:
            common = set(by_metric[a]) & set(by_metric[b])
            if common:
                assert any(by_metric[a][k] != by_metric[b][k] for k in common), (a, b, "duplicate metrics")


def test_join_by_key_with_dropped_and_shuffled_rows(built):
    out, summary, truth = built
    rows = _rows(out)
    # net_mid mixed_rand lacks 3 keys: paired metrics run over the 37 shared keys.
    clean, mixed = truth[("net_mid", "original")], truth[("net_mid", "mixed_rand")]
    shared = sorted(set(clean) & set(mixed))
    assert len(shared) == N - 3
    expected = _mean(clean, shared) - _mean(mixed, shared)
    assert _value(rows, "net_mid", "invariance_drop", "mixed_rand") == pytest.approx(expected)
    gap = summary["label_spaces"]["in1k"]["net_mid"]["bg_gap"]
    same = truth[("net_mid", "mixed_same")]
    assert gap["n"] == N - 3
    assert gap["value"] == pytest.approx(_mean(same, shared) - _mean(mixed, shared))
    # net_big mixed_same was written in reverse row order; BG-Gap must still pair by key.
    same, rand = truth[("net_big", "mixed_same")], truth[("net_big", "mixed_rand")]
    gap = summary["label_spaces"]["in1k"]["net_big"]["bg_gap"]
    assert gap["value"] == pytest.approx(_mean(same, KEYS) - _mean(rand, KEYS))
    assert gap["lo"] <= gap["value"] <= gap["hi"]
    o, m, b = (truth[("net_big", v)] for v in ("original", "mixed_rand", "only_bg_t"))
    bg_required = sum(o[k] and not m[k] and b[k] for k in KEYS)
    cats = summary["label_spaces"]["in1k"]["net_big"]["categories"]
    assert cats["counts"]["bg_required"] == bg_required
    assert sum(cats["counts"].values()) == cats["n"] == N
    assert _value(rows, "net_big", "category_share", "", category="bg_required") == pytest.approx(bg_required / N)


def test_missing_variant_and_key_mismatch_noted(built):
    out, summary, _ = built
    notes = summary["notes"]
    assert any("net_small" in n and "texture missing" in n for n in notes)
    mismatch = [n for n in notes if n.startswith("net_mid: mixed_rand lacks 3 key")]
    assert len(mismatch) == 1
    assert all(str(k) in mismatch[0] for k in DROPPED_KEYS[2])
    for page in ("report.md", "report.html"):
        text = (out / page).read_text()
        assert "texture missing" in text and "lacks 3 key" in text
    rows = _rows(out)
    assert not [r for r in rows if r["model"] == "net_small" and r["variant"] == "texture"]


def test_in9_label_space_class_names_and_trends(built, results):
    out, summary, truth = built
    root, _ = results
    rows = _rows(out)
    # in9: samples with in9_label >= 0 only (every fifth key is outside IN-9).
    clean = truth[("net_mid", "original")]
    eligible = [k for i, k in enumerate(KEYS) if i % 5 != 0]
    assert _value(rows, "net_mid", "accuracy", "original", "in9") == pytest.approx(_mean(clean, eligible))
    assert summary["chance"] == pytest.approx({"in1k": 1 / 1000, "in9": 1 / 9})
    # Per-class accuracy carries the IN-9 class name, computed from the file's own labels.
    preds = read_predictions(predictions_path(root, "net_mid", "original"))
    names = in9_names()
    for c in np.unique(preds.in9_label[preds.in9_label >= 0]).tolist():
        mask = preds.in9_label == c
        got = _value(rows, "net_mid", "class_accuracy", "original", "in9", klass=names[c])
        assert got == pytest.approx(float(np.mean(preds.in9_correct[mask])))
    assert {r["class"] for r in rows if r["metric"] == "class_accuracy"} <= set(names)
    assert not [r for r in rows if r["metric"] == "class_accuracy" and r["label_space"] == "in1k"]
    md = (out / "report.md").read_text()
    assert all(name in md for name in np.array(names)[np.unique(preds.in9_label[preds.in9_label >= 0])])
    # Trends against all three axes exist, from 3 models.
    in1k = summary["trends"]["in1k"]
    assert {t["x"] for t in in1k} == set(report.TREND_AXES)
    gap_vs_params = [t for t in in1k if t["metric"] == "bg_gap" and t["x"] == "log10_params"]
    assert len(gap_vs_params) == 1 and gap_vs_params[0]["n"] == 3
    xs = np.log10([3.5e6, 25e6, 800e6])
    ys = [summary["label_spaces"]["in1k"][m]["bg_gap"]["value"] for m in ("net_small", "net_mid", "net_big")]
    assert gap_vs_params[0]["slope"] == pytest.approx(np.polyfit(xs, ys, 1)[0])


def _solo_results(root: Path, variants: tuple[str, ...], in9_pred_value: int | None, seed: int = 5) -> None:
    rng = np.random.default_rng(seed)
    for variant in variants:
        preds = make_predictions(KEYS, rng.random(N) < 0.5, rng)
        if in9_pred_value is not None:
            preds.in9_pred[:] = in9_pred_value
        write_predictions(predictions_path(root, "solo", variant), preds)


def test_single_model_without_metadata_draws_only_figures_with_data(tmp_path):
    _solo_results(tmp_path, ("original", "only_fg", "only_bg_b"), IN9_NOT_COMPUTED)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig_bg_gap.png").write_bytes(PNG_MAGIC)  # left over from an earlier run into the same folder
    summary = report.build_report(tmp_path, out, label_space="both", n_boot=50, models_json=tmp_path / "absent.json")
    assert sorted(p.name for p in out.glob("fig_*.png")) == ["fig_influence.png", "fig_invariance.png"]
    assert all(colored_pixels(out / n) > 100 for n in ("fig_influence.png", "fig_invariance.png"))
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in ("fig_bg_gap.png", "fig_categories.png"):
        reason = next(r for r in summary["figures"]["not_drawn"] if r.startswith(name))
        assert f"{name} not drawn: no model has" in reason
        assert reason in md and f"]({name})" not in md
        assert reason in page and name not in page.replace(reason, "")
    notes = " | ".join(summary["notes"])
    assert "absent.json not found" in notes
    assert "BG-Gap is left out" in notes and "prediction categories are left out" in notes
    assert "in9" not in summary["label_spaces"]
    assert "solo: no in9 predictions for original (not computed), left out of in9 metrics" in summary["notes"]
    assert len(summary["label_spaces"]["in1k"]["solo"]["accuracy"]) == 3


def test_in9_predictions_outside_the_370_classes_score_zero(tmp_path):
    """All IN-9 predictions outside IN-9 (-1) is a 0% variant, not a missing one; not computed stays out."""
    rng = np.random.default_rng(9)
    for variant in ("original", "mixed_rand", "only_bg_t", "only_bg_b", "no_fg"):
        # original all right: Wilson's upper end at 100% must not upset the error bars
        preds = make_predictions(KEYS, np.ones(N, bool) if variant == "original" else rng.random(N) < 0.6, rng)
        if variant in ("only_bg_t", "only_bg_b"):
            preds.in9_pred[:] = -1  # a 1000-way top-1 outside the 370 classes, as map-argmax writes it
        if variant == "no_fg":
            preds.in9_pred[:] = IN9_NOT_COMPUTED
        write_predictions(predictions_path(tmp_path, "m", variant), preds)
    out = tmp_path / "out"
    summary = report.build_report(tmp_path, out, label_space="in9", n_boot=20, models_json=tmp_path / "none.json")
    rows = _rows(out)
    eligible = N - N // 5
    for variant in ("only_bg_t", "only_bg_b"):
        row = _row(rows, "m", "accuracy", variant, "in9")
        assert float(row["value"]) == 0.0 and int(row["n"]) == eligible
        assert float(_row(rows, "m", "influence_above_chance", variant, "in9")["value"]) == pytest.approx(-1 / 9)
    cats = summary["label_spaces"]["in9"]["m"]["categories"]
    assert cats["n"] == eligible and cats["counts"]["bg_required"] == 0  # B is never right
    assert "fig_influence_in9.png" in summary["figures"]["written"]
    assert colored_pixels(out / "fig_influence_in9.png") > 100
    assert not [r for r in rows if r["variant"] == "no_fg"]
    assert "m: no in9 predictions for no_fg (not computed), left out of in9 metrics" in summary["notes"]
    md = (out / "report.md").read_text()
    influence = md[md.index("### Background influence"):md.index("### BG-Gap")]
    assert "only_bg_t (pp)" in influence and "only_bg_b (pp)" in influence and "no_fg" not in influence
    assert "| m | -11.1 [" in influence


def test_figures_at_100_percent(tmp_path):
    """Wilson's upper end at k = n = 21 is 1 - 1e-16, a hair below the value: the error bars must still draw."""
    rng = np.random.default_rng(4)
    keys = KEYS[:21]
    for variant in ("original", "only_bg_b", "only_fg"):
        write_predictions(predictions_path(tmp_path, "perfect", variant), make_predictions(keys, np.ones(21, bool), rng))
    summary = report.build_report(tmp_path, tmp_path / "out", label_space="in1k", n_boot=0,
                                  models_json=tmp_path / "none.json")
    assert {"fig_influence.png", "fig_invariance.png"} <= set(summary["figures"]["written"])


def test_predictions_file_marks_not_computed_and_tolerates_extra_columns(tmp_path):
    rng = np.random.default_rng(3)
    preds = make_predictions(KEYS[:6], np.array([1, 0, 1, 0, 1, 0], bool), rng)
    preds.in9_pred[:] = [IN9_NOT_COMPUTED, -1, 4, IN9_NOT_COMPUTED, 0, 8]
    path = tmp_path / "p.csv"
    write_predictions(path, preds)
    with open(path, newline="") as fh:
        cells = [row["in9_pred"] for row in csv.DictReader(fh)]
    assert cells == ["", "-1", "4", "", "0", "8"]
    back = read_predictions(path)
    assert back.in9_pred.tolist() == preds.in9_pred.tolist()
    assert back.in9_computed.tolist() == [False, True, True, False, True, True]
    # A newer writer adds columns (anywhere): read by name, ignore the rest.
    with open(path, newline="") as fh:
        table = list(csv.DictReader(fh))
    columns = ["extra_first", *table[0].keys(), "p_top5"]
    with open(tmp_path / "wide.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in table:
            writer.writerow({**r, "extra_first": "x", "p_top5": "0.5"})
    wide = read_predictions(tmp_path / "wide.csv")
    assert wide.keys.tolist() == back.keys.tolist() and wide.in9_pred.tolist() == back.in9_pred.tolist()
    (tmp_path / "narrow.csv").write_text("key,label,pred\nk,1,1\n")
    with pytest.raises(ValueError, match="missing column"):
        read_predictions(tmp_path / "narrow.csv")


def test_published_figures_shown_beside_ours(tmp_path):
    rng = np.random.default_rng(21)
    truth = {}
    for model in ("resnet50", "resnet18"):
        for variant in ("original", "mixed_same", "mixed_rand"):
            preds = make_predictions(KEYS, rng.random(N) < 0.8, rng)
            truth[(model, variant)] = preds
            write_predictions(predictions_path(tmp_path, model, variant), preds)
    (tmp_path / "scores.csv").write_text("model,variant,weights,precision\nresnet50,original,IMAGENET1K_V2,fp32\n")
    out = tmp_path / "out"
    summary = report.build_report(tmp_path, out, n_boot=50, models_json=tmp_path / "none.json")
    rows = {(p["model"], p["label_space"], p["metric"], p["variant"]): p for p in summary["published"]}
    assert {k[0] for k in rows} == {"resnet50"} and {k[1] for k in rows} == {"in9"}
    original = truth[("resnet50", "original")]
    ours = float(np.mean(original.in9_correct[original.in9_label >= 0]))
    anchor = rows[("resnet50", "in9", "accuracy", "original")]
    assert anchor["ours"] == pytest.approx(ours) and anchor["published"] == pytest.approx(0.956)
    assert ("resnet50", "in9", "bg_gap", "") in rows
    md = (out / "report.md").read_text()
    published = md[md.index("## Published figures"):md.index("## Label space")]
    assert f"| resnet50 | in9 | accuracy | original | 95.6 | {100 * ours:.1f} [" in published
    assert "resnet18" not in published
    assert any("resnet50" in n and "IMAGENET1K_V2" in n for n in summary["notes"])


def test_readme_metric_section_is_generated_from_the_table(built):
    generated = report.metrics_reference_markdown()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = generated.splitlines()[0], generated.splitlines()[-1]
    assert begin in readme and end in readme, "README lacks the generated metric section"
    section = readme[readme.index(begin):readme.index(end) + len(end)] + "\n"
    assert section == generated, "README metric section is stale: paste `python -m eval.report --markdown-metrics`"
    out, _, _ = built
    for name in {r["metric"] for r in _rows(out)}:
        assert f"| `{name}` |" in section, name
    for column in _rows(out)[0]:
        assert re.search(rf"\b{column}\b", section), column


def test_cli_errors_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no predictions" in err and "\n" not in err
    assert report.main([str(tmp_path), "--bootstrap", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert report.main([]) == 2
    assert "RESULTS_DIR" in capsys.readouterr().err
    assert report.main(["--markdown-metrics"]) == 0
    assert capsys.readouterr().out == report.metrics_reference_markdown()


def test_cli_module_runs_without_progress_bars_in_pipes(results, tmp_path):
    root, _ = results
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.report", str(root), "--out", str(out), "--label-space", "in1k",
         "--bootstrap", "20", "--models-json", str(root / "models.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and (out / "report.html").resolve().as_uri() in proc.stdout
    assert (out / "metrics.csv").stat().st_size > 0 and (out / "fig_bg_gap.png").exists()
    assert "models:" not in proc.stderr and "\r" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the gallery: where its images come from

GALLERY_KEYS = 14  # the embedded demo's photos


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """Demo shards (original, mixed_rand; 5 samples a shard) scored by eval.score with the tiny zoo: real ledgers.

    The random net's answers are then rewritten so that every key is a flip (right on original, wrong on
    mixed_rand, p(true) falling by a different amount each): the gallery has rows whatever the net said.
    """
    from tests.helpers import score_cli
    from tests.tiny_zoo import tiny_zoo_registered

    root = tmp_path_factory.mktemp("scored")
    build_demo_shards(root / "shards", ("original", "mixed_rand"))
    with tiny_zoo_registered():
        assert score_cli("--shards", root / "shards" / "original", "--shards", root / "shards" / "mixed_rand",
                         "--models", "tiny_a", "--out", root / "results", "--random-weights", "--device", "cpu",
                         "--workers", "0", "--batch-size", "4") == 0
    for variant, right in (("original", True), ("mixed_rand", False)):
        path = predictions_path(root / "results", "tiny_a", variant)
        p = read_predictions(path)
        p.pred[:] = p.label if right else (p.label + 1) % 1000
        p.p_true[:] = 0.9 if right else np.linspace(0.0, 0.5, len(p))
        write_predictions(path, p)
    return root


def _gallery(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["gallery"]


def _row_keys(out: Path) -> list[str]:
    return re.findall(r'<div class="gallery-row" data-key="([^"]+)"', (out / "report.html").read_text())


def test_gallery_finds_the_shards_eval_score_recorded(scored, tmp_path):
    results, shards = scored / "results", scored / "shards"
    urls = {e["url"] for ledger in (results / "predictions" / "tiny_a" / ".done").glob("*.json")
            for e in json.loads(ledger.read_text())["shards"].values()}
    assert len(urls) == 6 and all(Path(u).is_file() for u in urls)  # 3 shards a variant, where they were read
    out = tmp_path / "report"
    assert report.main([str(results), "--out", str(out), "--gallery-size", "4", "--bootstrap", "0"]) == 0
    gallery = _gallery(out)
    assert gallery["shown"] and gallery["reference_model"] == "tiny_a"
    # Each ledger url lies beside the manifest that lists it: read through the manifest, verified.
    assert sorted(gallery["sources"]) == sorted(str((shards / v / "manifest.json").resolve())
                                                for v in ("original", "mixed_rand"))
    assert gallery["variants"] == ["original", "mixed_rand"]
    flips = gallery["sections"]["flips"]
    assert len(flips) == len(set(flips)) == 4 and _row_keys(out) == flips
    # mixed_rand's p(true) rises with the key's rank, so the largest drops are the first keys (none switched).
    keys = sorted(read_predictions(predictions_path(results, "tiny_a", "original")).keys)
    switched = read_predictions(predictions_path(results, "tiny_a", "mixed_rand"))
    assert not (switched.pred == switched.bg_label).any()
    assert flips == keys[:4]
    text = (out / "report.html").read_text()
    assert "no only_bg_t predictions: showing the largest flips on mixed_rand instead." in text
    # every thumbnail read is shown; a row's background may also be another row's image: read once, shown twice
    shown = text.count('<img loading="lazy"')
    assert gallery["thumbnails"] >= 4 * 2 and gallery["thumbnails"] <= shown <= gallery["thumbnails"] + len(flips)


def test_gallery_reads_only_what_it_shows(scored, tmp_path, monkeypatch):
    """It stops reading a variant once its chosen keys are found, and keeps thumbnails of those keys alone."""
    import eval.stream

    yielded: list[tuple[str, str]] = []
    real = eval.stream.samples

    def counting(spec, **kwargs):
        for sample in real(spec, **kwargs):
            yielded.append((sample.variant, sample.key))
            yield sample

    monkeypatch.setattr(eval.stream, "samples", counting)
    summary = report.build_report(scored / "results", tmp_path / "out", n_boot=0, models_json=tmp_path / "none.json",
                                  gallery_size=1)
    gallery = summary["gallery"]
    (key,) = gallery["sections"]["flips"]
    assert ("original", key) in yielded and ("mixed_rand", key) in yielded
    assert len(yielded) < 2 * GALLERY_KEYS  # not every sample of both variants
    assert gallery["thumbnails"] <= 3  # the key in both variants, and the photo its mixed background came from


def test_gallery_from_shards_option_when_the_recorded_shards_are_gone(scored, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(scored / "results", results)
    shards = str((scored / "shards").resolve())
    for ledger in (results / "predictions" / "tiny_a" / ".done").glob("*.json"):
        ledger.write_text(ledger.read_text().replace(shards, str(tmp_path / "moved-away")))
    out = tmp_path / "stale"
    summary = report.build_report(results, out, n_boot=0, models_json=tmp_path / "none.json")
    assert not summary["gallery"]["shown"]
    reason = summary["gallery"]["reason"]
    assert reason.startswith("No gallery: none of the 6 chosen images was found") and "\n" not in reason
    assert html.escape(reason) in (out / "report.html").read_text() and reason in (out / "report.md").read_text()
    assert any(n.startswith("gallery: shards ") and "moved-away" in n for n in summary["notes"])
    # --shards takes what eval.score --shards takes: here one brace pattern for both variant folders.
    out = tmp_path / "given"
    spec = f"{scored / 'shards'}/{{original,mixed_rand}}"
    assert report.main([str(results), "--out", str(out), "--shards", spec, "--bootstrap", "0"]) == 0
    gallery = _gallery(out)
    assert gallery["shown"] and gallery["sources"] == [str(scored / "shards" / v) for v in ("original", "mixed_rand")]
    assert _row_keys(out) == gallery["sections"]["flips"] and len(_row_keys(out)) == 6


def test_no_gallery_without_shards_says_why_in_one_line(scored, tmp_path, capsys):
    results = tmp_path / "results"
    for variant in ("original", "mixed_rand"):  # predictions without their ledgers
        target = predictions_path(results, "tiny_a", variant)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(predictions_path(scored / "results", "tiny_a", variant), target)
    out = tmp_path / "report"
    assert report.main([str(results), "--out", str(out), "--bootstrap", "0"]) == 0
    reason = _gallery(out)["reason"]
    assert reason.startswith("No gallery: no --shards given and no ledger under ") and "pass --shards SPEC" in reason
    assert reason in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert html.escape(reason) in page and 'id="gallery"' in page and "<img loading" not in page
    assert 'data-table="in1k-accuracy"' in page  # the rest of the page is all there
    assert reason in (out / "report.md").read_text()
    assert report.main([str(results), "--out", str(out), "--gallery-size", "0"]) == 0
    assert _gallery(out)["reason"] == "No gallery: --gallery-size 0."
    assert report.main([str(results), "--out", str(out), "--gallery-model", "nope"]) == 2
    assert "--gallery-model nope" in capsys.readouterr().err


def test_gallery_sample_is_seeded_by_key_alone():
    """Same seed, same rows; another seed, other rows; and a key's chance never depends on the other keys."""
    from eval.report.gallery import PredictionStore, choose_sections

    rng = np.random.default_rng(2)
    keys = np.array([f"k{i:03d}" for i in range(60)], dtype=object)
    correct = {"original": np.ones(60, bool), "mixed_rand": np.zeros(60, bool), "only_bg_t": np.ones(60, bool)}
    base = {v: make_predictions(keys, c, rng) for v, c in correct.items()}  # all 60 are BG Required

    def bg_required(preds: dict[str, Predictions], seed: int) -> list[str]:
        store = PredictionStore()
        store.add("m", preds)
        sections, _ = choose_sections(store, "m", 5, seed)
        (section,) = [s for s in sections if s.ident == "bg_required"]
        assert section.candidates == len(preds["original"])
        return [r.key for r in section.rows]

    chosen = bg_required(base, 0)
    assert len(chosen) == len(set(chosen)) == 5
    assert bg_required(base, 0) == chosen
    assert len({tuple(bg_required(base, s)) for s in range(6)}) > 1
    # Drop ten keys that were not chosen: the chosen five stay the chosen five.
    dropped = [k for k in keys if k not in chosen][:10]
    fewer = {v: p.where(~np.isin(p.keys, dropped)) for v, p in base.items()}
    assert bg_required(fewer, 0) == chosen
