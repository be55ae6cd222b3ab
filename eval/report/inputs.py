"""What the report reads: per-sample predictions, the model zoo rows and the evaluator's scores.csv.

Everything here is about trusting inputs: files that cannot be read, keys that
some variants lack, IN-9 predictions that were never made. Each of those
becomes a note the reader sees, never a silent drop or a crash.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.metrics import in9_background_labels
from eval.predictions import Predictions, read_predictions
from eval.scores_csv import SCORES_NAME
from pipeline.classes import IN1K_CLASSES, IN9_CLASSES, imagenet_classes, in9_names
from pipeline.variants import VARIANTS

LABEL_SPACES = ("in1k", "in9")
NUM_CLASSES = {"in1k": IN1K_CLASSES, "in9": IN9_CLASSES}
MAX_EXAMPLE_KEYS = 5


class ReportError(ValueError):
    """Input the report cannot work from (no results folder, no predictions)."""


@dataclass
class Notes:
    """Human-readable caveats collected while computing; shown in report.md, report.html and metrics.json."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)


@dataclass(frozen=True)
class Outcomes:
    """Per-sample results of one model on one variant in one label space (rows aligned)."""

    keys: np.ndarray  # str
    correct: np.ndarray  # bool
    labels: np.ndarray  # int64 class index in the label space
    pred: np.ndarray  # int64 top-1 in the label space (in9: -1 = outside the 370 classes)
    bg_label: np.ndarray  # int64 class of the background's image in the label space, -1 = none (or outside IN-9)

    def column(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, correct), the form eval.metrics.join_by_key takes."""
        return self.keys, self.correct


def class_names(label_space: str) -> tuple[str, ...]:
    """Human class names by index: ImageNet-1k lemmas or the nine IN-9 superclasses."""
    return imagenet_classes().names if label_space == "in1k" else in9_names()


def models_json_path() -> Path:
    """The zoo's own registry file (the report reads its params and training-set sizes)."""
    from eval.zoo.registry import REGISTRY_FILE

    return Path(REGISTRY_FILE)


def load_model_metadata(path: Path, notes: Notes) -> dict[str, dict]:
    """``{model_id: row}`` from the model zoo file; a missing or unreadable file gives {} and a note."""
    if not path.is_file():
        notes.add(f"model metadata file {path.name} not found: trends against parameters and training images left out")
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("models", [])
        return {str(r["id"]): r for r in rows if isinstance(r, dict) and "id" in r}
    except (ValueError, AttributeError, TypeError) as exc:
        notes.add(f"model metadata file {path.name} unreadable ({exc}): trends against parameters and training images left out")
        return {}


def load_scores(results_dir: Path) -> dict[str, dict[str, str]]:
    """Optional run metadata from the evaluator's scores.csv: {model: first row seen}."""
    path = results_dir / SCORES_NAME
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            out: dict[str, dict[str, str]] = {}
            for row in csv.DictReader(fh):
                if row.get("model"):
                    out.setdefault(row["model"], row)
            return out
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}


def model_metadata(models: Iterable[str], zoo_rows: dict[str, dict], scores: dict[str, dict[str, str]],
                   notes: Notes) -> dict[str, dict]:
    """The models table: zoo facts per model, and the weights and precision the run actually used."""
    models = sorted(models)
    metadata: dict[str, dict] = {}
    for model in models:
        row, score = zoo_rows.get(model, {}), scores.get(model, {})
        metadata[model] = {
            "params": row.get("params"),
            "train_images": row.get("train_images"),
            "train_data": row.get("train_data"),
            "top1": row.get("top1"),
            "weights": score.get("weights") or row.get("weights"),
            "precision": score.get("precision"),
        }
    lacking = [m for m in models if m not in zoo_rows]
    if zoo_rows and lacking:
        notes.add(f"no metadata row in models.json for {len(lacking)} model(s) ({examples(lacking)}): "
                  "they are left out of trends against parameters and training images")
    return metadata


def examples(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_EXAMPLE_KEYS])
    return shown + (", ..." if len(keys) > MAX_EXAMPLE_KEYS else "")


def read_model_predictions(model: str, files: dict[str, Path], notes: Notes) -> dict[str, Predictions]:
    """The readable, duplicate-free predictions of one model by variant; the rest become notes."""
    preds: dict[str, Predictions] = {}
    for variant, path in files.items():
        if variant not in VARIANTS:
            notes.add(f"{model}: unknown variant file {path.name} ignored")
            continue
        try:
            p = read_predictions(path)
        except (ValueError, KeyError, OSError) as exc:
            notes.add(f"{model}: unreadable predictions {path.name} skipped ({exc})")
            continue
        if np.unique(p.keys.astype(str)).size != len(p):
            notes.add(f"{model}: {variant} has duplicate keys, skipped")
            continue
        preds[variant] = p
    check_keys(model, preds, notes)
    return preds


def check_keys(model: str, preds: dict[str, Predictions], notes: Notes) -> None:
    """Note keys that some variants of a model have and others lack (count + examples)."""
    key_sets = {v: set(p.keys.tolist()) for v, p in preds.items()}
    if len(key_sets) < 2:
        return
    union = set().union(*key_sets.values())
    for variant, keys in key_sets.items():
        missing = union - keys
        if missing:
            notes.add(
                f"{model}: {variant} lacks {len(missing)} key(s) present in other variants "
                f"(e.g. {examples(missing)}); paired metrics use shared keys only"
            )


def outcomes(preds: Predictions, label_space: str, model: str, variant: str, notes: Notes) -> Outcomes | None:
    """Per-sample results in one label space; None (with a note) when it was not computed.

    In in9 a prediction outside the 370 classes is a wrong answer and stays in
    (a variant scored 0% reads 0%); only samples whose IN-9 prediction was
    never made are left out.
    """
    if label_space == "in1k":
        return Outcomes(preds.keys.astype(str), preds.correct, preds.label, preds.pred, preds.bg_label)
    eligible = preds.in9_label >= 0
    if not eligible.any():
        notes.add(f"{model}: no sample of the 370 IN-9 classes in {variant}, left out of in9 metrics")
        return None
    scored = eligible & preds.in9_computed
    if not scored.any():
        notes.add(f"{model}: no in9 predictions for {variant} (not computed), left out of in9 metrics")
        return None
    if (unscored := int((eligible & ~scored).sum())) > 0:
        notes.add(f"{model}: {variant} has {unscored} IN-9 sample(s) without an in9 prediction, "
                  "left out of in9 metrics")
    return Outcomes(preds.keys[scored].astype(str), preds.in9_correct[scored], preds.in9_label[scored],
                    preds.in9_pred[scored], in9_background_labels(preds.bg_label)[scored])
