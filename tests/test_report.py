"""eval.report end to end on tiny synthetic predictions for three fake models."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import report
from eval.predictions import Predictions, predictions_path, write_predictions

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
SHUFFLED = ("net_big", "mixed_same")


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
            if (model, variant) == DROPPED_KEYS[:2]:
                keys = np.array([k for k in KEYS if k not in set(DROPPED_KEYS[2])], dtype=object)
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


def _value(rows, model, metric, variant, ls="in1k") -> float:
    hits = [r for r in rows if (r["model"], r["label_space"], r["metric"], r["variant"]) == (model, ls, metric, variant)]
    assert len(hits) == 1, (model, metric, variant, ls)
    return float(hits[0]["value"])


def test_outputs_exist_and_figures_are_png(built):
    out, summary, _ = built
    for name in ("metrics.csv", "trends.csv", "metrics.json", "report.md"):
        assert (out / name).stat().st_size > 0
    for stem in ("fig_invariance", "fig_influence", "fig_bg_gap", "fig_categories"):
        for suffix in ("", "_in9"):
            data = (out / f"{stem}{suffix}.png").read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert set(summary["models_seen"]) == set(LEVELS)
    assert json.loads((out / "metrics.json").read_text())["notes"] == summary["notes"]


def test_metrics_csv_matches_truth(built):
    out, _, truth = built
    rows = _rows(out)
    assert {r["model"] for r in rows} == set(LEVELS)
    assert {"acc", "inv_drop", "inv_ratio", "infl_above_chance", "bg_gap", "category"} <= {r["metric"] for r in rows}
    for model in LEVELS:
        clean = truth[(model, "original")]
        assert _value(rows, model, "acc", "original") == pytest.approx(np.mean(list(clean.values())))
        # Invariance on only_fg, paired by key.
        fg = truth[(model, "only_fg")]
        shared = sorted(set(clean) & set(fg))
        drop = np.mean([clean[k] for k in shared]) - np.mean([fg[k] for k in shared])
        assert _value(rows, model, "inv_drop", "only_fg") == pytest.approx(drop)
        bg = truth[(model, "only_bg_t")]
        assert _value(rows, model, "infl_above_chance", "only_bg_t") == pytest.approx(np.mean(list(bg.values())) - 0.001)


def test_join_by_key_with_dropped_and_shuffled_rows(built):
    out, summary, truth = built
    rows = _rows(out)
    # net_mid mixed_rand lacks 3 keys: paired metrics run over the 37 shared keys.
    clean, mixed = truth[("net_mid", "original")], truth[("net_mid", "mixed_rand")]
    shared = sorted(set(clean) & set(mixed))
    assert len(shared) == N - 3
    expected = np.mean([clean[k] for k in shared]) - np.mean([mixed[k] for k in shared])
    assert _value(rows, "net_mid", "inv_drop", "mixed_rand") == pytest.approx(expected)
    gap = summary["label_spaces"]["in1k"]["net_mid"]["bg_gap"]
    same = truth[("net_mid", "mixed_same")]
    assert gap["n"] == N - 3
    assert gap["value"] == pytest.approx(np.mean([same[k] for k in shared]) - np.mean([mixed[k] for k in shared]))
    # net_big mixed_same was written in reverse row order; BG-Gap must still pair by key.
    same, rand = truth[("net_big", "mixed_same")], truth[("net_big", "mixed_rand")]
    expected = np.mean([same[k] for k in KEYS]) - np.mean([rand[k] for k in KEYS])
    gap = summary["label_spaces"]["in1k"]["net_big"]["bg_gap"]
    assert gap["value"] == pytest.approx(expected)
    assert gap["lo"] <= gap["value"] <= gap["hi"]
    # Categories over the shuffled-free triple also come from keyed truth.
    o, m, b = (truth[("net_big", v)] for v in ("original", "mixed_rand", "only_bg_t"))
    bg_required = sum(o[k] and not m[k] and b[k] for k in KEYS)
    cats = summary["label_spaces"]["in1k"]["net_big"]["categories"]
    assert cats["counts"]["bg_required"] == bg_required
    assert sum(cats["fractions"].values()) == pytest.approx(1.0)


def test_missing_variant_and_key_mismatch_noted(built):
    out, summary, _ = built
    notes = summary["notes"]
    assert any("net_small" in n and "texture missing" in n for n in notes)
    mismatch = [n for n in notes if n.startswith("net_mid: mixed_rand lacks 3 key")]
    assert len(mismatch) == 1
    assert all(str(k) in mismatch[0] for k in DROPPED_KEYS[2])
    md = (out / "report.md").read_text()
    assert "texture missing" in md and "lacks 3 key" in md
    rows = _rows(out)
    assert not [r for r in rows if r["model"] == "net_small" and r["variant"] == "texture"]


def test_in9_label_space_and_trends(built):
    out, summary, truth = built
    rows = _rows(out)
    # in9: samples with in9_label >= 0 only (every fifth key is outside IN-9).
    clean = truth[("net_mid", "original")]
    eligible = [k for i, k in enumerate(KEYS) if i % 5 != 0]
    assert _value(rows, "net_mid", "acc", "original", "in9") == pytest.approx(np.mean([clean[k] for k in eligible]))
    chance_rows = [r for r in rows if r["label_space"] == "in9" and r["metric"] == "infl_chance"]
    assert chance_rows and all(float(r["value"]) == pytest.approx(1 / 9) for r in chance_rows)
    # Trends against all three axes exist, from 3 models.
    in1k = summary["trends"]["in1k"]
    assert {t["x"] for t in in1k} == set(report.TREND_AXES)
    gap_vs_params = [t for t in in1k if t["metric"] == "bg_gap" and t["x"] == "log10_params"]
    assert len(gap_vs_params) == 1 and gap_vs_params[0]["n"] == 3


def test_single_model_without_metadata(tmp_path):
    rng = np.random.default_rng(5)
    for variant in ("original", "only_fg", "only_bg_b"):
        preds = make_predictions(KEYS, rng.random(N) < 0.5, rng)
        preds.in9_pred[:] = -1  # run without an IN-9 rule
        write_predictions(predictions_path(tmp_path, "solo", variant), preds)
    out = tmp_path / "out"
    summary = report.build_report(tmp_path, out, label_space="both", n_boot=50,
                                  models_json=tmp_path / "absent.json")
    assert (out / "fig_invariance.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "fig_categories.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "fig_invariance_in9.png").exists()
    notes = " | ".join(summary["notes"])
    assert "absent.json not found" in notes
    assert "BG-Gap is left out" in notes and "prediction categories are left out" in notes
    assert "in9" not in summary["label_spaces"]
    assert "solo: no in9 predictions for original, left out of in9 metrics" in summary["notes"]
    assert len(summary["label_spaces"]["in1k"]["solo"]["accuracy"]) == 3


def test_cli_errors_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no predictions" in err and "\n" not in err
    assert report.main([str(tmp_path), "--bootstrap", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_cli_module_runs(results, tmp_path):
    root, _ = results
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.report", str(root), "--out", str(out), "--label-space", "in1k",
         "--bootstrap", "20", "--models-json", str(root / "models.json")],
        capture_output=True, text=True, cwd=Path(report.__file__).resolve().parent.parent, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert (out / "metrics.csv").stat().st_size > 0 and (out / "fig_bg_gap.png").exists()
