"""The background-class rate: how often a mixed image is called by its background's class, from the metric to the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval import metrics as M
from eval import report
from eval.device import ScoredModel
from eval.predictions import Predictions, predictions_path, write_predictions
from eval.scores_csv import SCORE_COLUMNS, score_row
from pipeline.classes import in9_members, to_in9
from pipeline.variants import VARIANT_SPECS
from tests.test_report import _row, _rows


def wilson_by_roots(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's interval as the two roots of (p_hat - p)^2 = z^2 p (1 - p) / n, solved as a quadratic in p."""
    p_hat, t = k / n, z * z / n
    a, b, c = 1 + t, -(2 * p_hat + t), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


OUTSIDE_IN9, OTHER_OUTSIDE_IN9 = [i for i in range(1000) if to_in9(i) < 0][:2]


def test_rate_counts_predictions_of_the_background_class():
    # 3 of the 4 samples with a background are called by the background's class; the -1 row has none.
    bg_label = np.array([10, 20, 30, 40, -1])
    pred = np.array([10, 20, 30, 7, 7])
    rate = M.background_class_rate(pred, bg_label)
    assert (rate.value, rate.n) == (0.75, 4)
    assert (rate.lo, rate.hi) == pytest.approx(wilson_by_roots(3, 4), abs=1e-12)
    assert 0.0 < rate.lo < 0.75 < rate.hi < 1.0


def test_rate_without_background_classes_is_empty_and_misaligned_input_fails():
    empty = M.background_class_rate(np.array([1, 2]), np.array([-1, -1]))
    assert empty.n == 0 and math.isnan(empty.value)
    with pytest.raises(ValueError, match="aligned"):
        M.background_class_rate(np.array([1, 2, 3]), np.array([1, 2]))


def test_in9_rate_leaves_out_backgrounds_outside_in9():
    dog, bird = in9_members()[0][0], in9_members()[1][0]
    bg_label = np.array([dog, bird, OUTSIDE_IN9, -1])
    in9_bg = M.in9_background_labels(bg_label)
    assert in9_bg.tolist() == [to_in9(dog), to_in9(bird), -1, -1]
    # Called by the background's superclass on the first sample only; the third (background outside IN-9)
    # would match on -1 == -1 if it were not left out.
    in9_pred = np.array([to_in9(dog), to_in9(dog), -1, 0])
    rate = M.background_class_rate(in9_pred, in9_bg)
    assert (rate.value, rate.n) == (0.5, 2)
    assert (rate.lo, rate.hi) == pytest.approx(wilson_by_roots(1, 2), abs=1e-12)


def test_the_metric_covers_exactly_the_variants_with_a_partner():
    metric = M.METRIC_BY_NAME["background_class_rate"]
    assert set(metric.per_variant) == {v for v, s in VARIANT_SPECS.items() if s.partner} == set(M.MIXED_VARIANTS)
    assert metric.label_spaces == ("in1k", "in9") and metric.interval == M.WILSON
    assert metric.group in {g.name for g in M.METRIC_GROUPS}


# ---------------------------------------------------------------- a results folder where the answer is known

N = 36
KEYS = np.array([f"n0000_{i:04d}" for i in range(N)], dtype=object)
# Labels cycle through one class of each IN-9 superclass; every sixth sample's class is outside IN-9.
LABELS = np.array([OUTSIDE_IN9 if i % 6 == 5 else in9_members()[i % 9][0] for i in range(N)], dtype=np.int64)


def backgrounds(variant: str) -> np.ndarray:
    """The background class of each sample: its own on mixed_same, another superclass's (or one outside IN-9)."""
    if variant == "original":
        return np.full(N, -1, dtype=np.int64)
    if variant == "mixed_same":
        return LABELS.copy()
    return np.array([OTHER_OUTSIDE_IN9 if i % 4 == 3 else in9_members()[(i + 1) % 9][1] for i in range(N)],
                    dtype=np.int64)


def fabricated(variant: str, follows: str) -> Predictions:
    """Predictions of a model that always answers the label ("fg") or the background's class ("bg")."""
    bg = backgrounds(variant)
    pred = np.where(bg >= 0, bg, LABELS) if follows == "bg" else LABELS.copy()
    in9_label = np.array([to_in9(int(c)) for c in LABELS], dtype=np.int64)
    return Predictions(
        keys=KEYS.copy(), label=LABELS.copy(), pred=pred,
        top5=np.stack([pred, *((pred + d) % 1000 for d in range(1, 5))], axis=1),
        p_true=np.where(pred == LABELS, 0.9, 0.01), in9_label=in9_label,
        in9_pred=np.array([to_in9(int(c)) for c in pred], dtype=np.int64), bg_label=bg,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bg-class-results")
    for model, follows in (("follows_bg", "bg"), ("follows_fg", "fg")):
        for variant in ("original", "mixed_same", "mixed_rand", "mixed_next"):
            write_predictions(predictions_path(root, model, variant), fabricated(variant, follows))
    # An older predictions file without bg_label: no rate, and a note instead of a made-up number.
    old = fabricated("mixed_rand", "bg")
    old.bg_label = np.full(N, -1, dtype=np.int64)
    write_predictions(predictions_path(root, "no_bg_label", "mixed_rand"), old)
    out = root / "report"
    summary = report.build_report(root, out, n_boot=0, models_json=root / "none.json")
    return root, out, summary


def test_report_rate_is_one_for_the_background_model_and_zero_for_the_foreground_model(results):
    _, out, summary = results
    rows = _rows(out)
    for variant in ("mixed_rand", "mixed_next"):
        bg = _row(rows, "follows_bg", "background_class_rate", variant)
        assert float(bg["value"]) == 1.0 and int(bg["n"]) == N and bg["variants"] == variant
        assert float(_row(rows, "follows_fg", "background_class_rate", variant)["value"]) == 0.0
        # Accuracy is the mirror image here: the background model is never right.
        assert float(_row(rows, "follows_bg", "accuracy", variant)["value"]) == 0.0
    # On mixed_same the background's class is the label: the rate is accuracy.
    for model in ("follows_bg", "follows_fg"):
        same = float(_row(rows, model, "background_class_rate", "mixed_same")["value"])
        assert same == float(_row(rows, model, "accuracy", "mixed_same")["value"]) == 1.0
    assert not [r for r in rows if r["metric"] == "background_class_rate" and r["variant"] == "original"]
    # in9: over IN-9 samples whose background class is in IN-9 too.
    bg = backgrounds("mixed_rand")
    counted = sum(1 for c, b in zip(LABELS.tolist(), bg.tolist(), strict=True) if to_in9(c) >= 0 and to_in9(b) >= 0)
    assert 0 < counted < N
    in9 = _row(rows, "follows_bg", "background_class_rate", "mixed_rand", "in9")
    assert float(in9["value"]) == 1.0 and int(in9["n"]) == counted
    assert float(_row(rows, "follows_fg", "background_class_rate", "mixed_rand", "in9")["value"]) == 0.0
    json_rate = summary["label_spaces"]["in1k"]["follows_bg"]["background_class"]["mixed_rand"]
    assert json_rate["value"] == 1.0 and json_rate["lo"] == pytest.approx(wilson_by_roots(N, N)[0])


def test_report_without_background_classes_leaves_the_rate_out_with_a_note(results):
    _, out, summary = results
    rows = _rows(out)
    assert not [r for r in rows if r["model"] == "no_bg_label" and r["metric"] == "background_class_rate"]
    assert any(n.startswith("no_bg_label [in1k]: no mixed_rand sample carries a background class")
               for n in summary["notes"])


def test_report_tables_show_the_rate_beside_accuracy(results):
    _, out, _ = results
    md = (out / "report.md").read_text()
    section = md[md.index("### Background-class rate"):]
    section = section[:section.index("\n### ", 1)]
    assert "| model | variant | n | top-1 (%) | bg-class rate (%) |" in section
    assert "| follows_bg | mixed_rand | 36 | 0.0 [" in section and "| 100.0 [" in section
    assert "| follows_fg | mixed_rand | 36 | 100.0 [" in section and section.count("| 0.0 [") >= 2
    page = (out / "report.html").read_text()
    for ls in ("in1k", "in9"):
        assert f'data-table="{ls}-background_class"' in page
    assert "`background_class_rate`" in md[md.index("## Metric definitions"):]


def test_scores_csv_rates_use_the_metric(results):
    root, _, _ = results
    assert SCORE_COLUMNS.index("in9_bg_class_rate") == SCORE_COLUMNS.index("bg_class_rate") + 1
    def model_named(model_id: str) -> ScoredModel:
        return ScoredModel(id=model_id, module=torch.nn.Identity(), size=(224, 224), interpolation="bilinear",
                           mean=(0.5,) * 3, std=(0.5,) * 3, weights="w", device=torch.device("cpu"),
                           dtype=torch.float32, channels_last=False, signature={"precision": "fp32"})

    model = model_named("follows_bg")
    rand = score_row(root, model, "mixed_rand", "cpu")
    assert float(rand["bg_class_rate"]) == 100.0 and float(rand["in9_bg_class_rate"]) == 100.0
    assert float(rand["top1"]) == 0.0
    original = score_row(root, model, "original", "cpu")
    assert original["bg_class_rate"] == original["in9_bg_class_rate"] == ""
    fg = score_row(root, model_named("follows_fg"), "mixed_next", "cpu")
    assert float(fg["bg_class_rate"]) == 0.0 and float(fg["in9_bg_class_rate"]) == 0.0
