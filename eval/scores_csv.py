"""``scores.csv``: one row per (model, variant) with the exact weights and preprocessing used.

Accuracies are percentages, and so are ``bg_class_rate`` / ``in9_bg_class_rate``
(``eval.metrics.background_class_rate`` in ImageNet-1k / ImageNet-9, empty for a
variant whose samples carry no background class). A model that failed (out of device memory even
one image at a time, or any error of its own) gets rows with ``error`` set and
no numbers, and the sweep goes on: timm's ``validate.py`` habit.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from eval.metrics import Estimate, background_class_rate, in9_background_labels
from eval.predictions import Predictions, predictions_path, read_predictions
from eval.resume import read_ledger
from pipeline.files import atomic_write_text

SCORES_NAME = "scores.csv"
SCORE_COLUMNS = (
    "model",
    "variant",
    "n",
    "top1",
    "top5",
    "in9_top1",
    "bg_class_rate",
    "in9_bg_class_rate",
    "images_per_s",
    "device",
    "precision",
    "weights",
    "input_size",
    "interpolation",
    "mean",
    "std",
    "batch_size",
    "skipped",
    "error",
)


def _pct(values: np.ndarray) -> str:
    return f"{100.0 * values.mean():.3f}" if values.size else ""


def _pct_of(estimate: Estimate) -> str:
    return f"{100.0 * estimate.value:.3f}" if estimate.n else ""


def score_row(out: Path, model: Any, variant: str, device: str) -> dict[str, str]:
    """The row of one merged (model, variant), from its predictions and ledger."""
    entries = read_ledger(out, model.id, variant)["shards"].values()
    path = predictions_path(out, model.id, variant)
    preds = read_predictions(path) if path.is_file() else Predictions.from_rows([])
    seconds = sum(float(e["seconds"]) for e in entries)
    n = len(preds)
    in9_rows = (preds.in9_label >= 0) & preds.in9_computed
    return {
        **dict.fromkeys(SCORE_COLUMNS, ""),
        **model.columns(device),
        "variant": variant,
        "n": str(n),
        "top1": _pct(preds.correct),
        "top5": _pct(preds.correct_top5),
        "in9_top1": _pct(preds.in9_correct[in9_rows]),
        # eval.metrics.background_class_rate, over the same rows as top1 and in9_top1 (the report's definition).
        "bg_class_rate": _pct_of(background_class_rate(preds.pred, preds.bg_label)),
        "in9_bg_class_rate": _pct_of(background_class_rate(preds.in9_pred[in9_rows],
                                                           in9_background_labels(preds.bg_label)[in9_rows])),
        "images_per_s": f"{n / seconds:.1f}" if seconds > 0 else "",
        "skipped": str(sum(int(e["skipped"]) for e in entries)),
    }


def error_row(model: Any, variant: str, device: str) -> dict[str, str]:
    """The row of a model that stopped: no numbers, the reason."""
    return {**dict.fromkeys(SCORE_COLUMNS, ""), **model.columns(device), "variant": variant,
            "error": model.error or "failed"}


def read_scores(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    path = out / SCORES_NAME
    rows: dict[tuple[str, str], dict[str, str]] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rows[(row["model"], row["variant"])] = {c: row.get(c) or "" for c in SCORE_COLUMNS}
    return rows


def write_scores(out: Path, rows: list[dict[str, str]]) -> None:
    """Merge rows into ``scores.csv`` by (model, variant), keeping rows of other runs."""
    existing = read_scores(out)
    for row in rows:
        existing[(row["model"], row["variant"])] = row
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(existing):
        writer.writerow(existing[key])
    atomic_write_text(out / SCORES_NAME, buf.getvalue())


def print_summary(rows: list[dict[str, str]], label_space: str, seconds: float, n_images: int) -> None:
    headline = "in9_top1" if label_space == "in9" else "top1"
    header = ("model", "variant", "n", headline, "top5", "img/s", "skipped", "error")
    table = [header] + [tuple(r[c] for c in ("model", "variant", "n", headline, "top5", "images_per_s", "skipped",
                                              "error")) for r in rows]
    if not any(r["error"] for r in rows):
        table = [row[:-1] for row in table]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if n_images:
        print(f"read {n_images} images in {seconds:.1f} s ({n_images / max(seconds, 1e-9):.1f} images/s end to end)")


__all__ = ["SCORES_NAME", "SCORE_COLUMNS", "error_row", "print_summary", "read_scores",
           "score_row", "write_scores"]
