"""Per-sample predictions: the file the evaluator writes and the report reads.

One CSV per (model, variant) at ``<results>/predictions/<model_id>/<variant>.csv``,
sorted by key, written atomically (temporary name, then rename), so a file
that exists is complete. Columns:

| column | meaning |
|---|---|
| key | sample key (joins variants) |
| label | ImageNet-1k true class |
| pred | top-1 ImageNet-1k prediction |
| top5 | five ImageNet-1k indices, best first, space separated |
| p_true | softmax probability of the true class |
| in9_label | ImageNet-9 superclass of ``label`` (-1 when not one of the 370 classes) |
| in9_pred | ImageNet-9 prediction under the run's ``--in9-rule`` (-1 when not computed) |
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.shard_format import atomic_write_text

COLUMNS = ("key", "label", "pred", "top5", "p_true", "in9_label", "in9_pred")


@dataclass
class Predictions:
    """Column arrays for one (model, variant); rows sorted by key."""

    keys: np.ndarray  # str objects
    label: np.ndarray  # int64
    pred: np.ndarray  # int64
    top5: np.ndarray  # int64 (n, 5)
    p_true: np.ndarray  # float64
    in9_label: np.ndarray  # int64
    in9_pred: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    @property
    def correct_top5(self) -> np.ndarray:
        return (self.top5 == self.label[:, None]).any(axis=1)

    @property
    def in9_correct(self) -> np.ndarray:
        return (self.in9_pred == self.in9_label) & (self.in9_label >= 0)

    def sorted(self) -> Predictions:
        order = np.argsort(self.keys, kind="stable")
        return Predictions(*(getattr(self, c)[order] for c in _FIELDS))

    def subset(self, keys: np.ndarray) -> Predictions:
        """Rows for ``keys`` (all must be present), in that order."""
        index = {k: i for i, k in enumerate(self.keys)}
        rows = np.array([index[k] for k in keys], dtype=np.int64)
        return Predictions(*(getattr(self, c)[rows] for c in _FIELDS))


_FIELDS = ("keys", "label", "pred", "top5", "p_true", "in9_label", "in9_pred")


def predictions_path(results: str | Path, model_id: str, variant: str) -> Path:
    return Path(results) / "predictions" / model_id / f"{variant}.csv"


def write_predictions(path: str | Path, preds: Predictions) -> None:
    preds = preds.sorted()
    lines = [",".join(COLUMNS)]
    for i in range(len(preds)):
        lines.append(
            ",".join(
                (
                    str(preds.keys[i]),
                    str(int(preds.label[i])),
                    str(int(preds.pred[i])),
                    " ".join(str(int(t)) for t in preds.top5[i]),
                    repr(float(preds.p_true[i])),
                    str(int(preds.in9_label[i])),
                    str(int(preds.in9_pred[i])),
                )
            )
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_predictions(path: str | Path) -> Predictions:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: expected columns {','.join(COLUMNS)}")
        rows = list(reader)
    n = len(rows)
    return Predictions(
        keys=np.array([r["key"] for r in rows], dtype=object),
        label=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        pred=np.array([int(r["pred"]) for r in rows], dtype=np.int64),
        top5=np.array([[int(t) for t in r["top5"].split()] for r in rows], dtype=np.int64).reshape(n, 5),
        p_true=np.array([float(r["p_true"]) for r in rows], dtype=np.float64),
        in9_label=np.array([int(r["in9_label"]) for r in rows], dtype=np.int64),
        in9_pred=np.array([int(r["in9_pred"]) for r in rows], dtype=np.int64),
    )


def list_predictions(results: str | Path) -> dict[str, dict[str, Path]]:
    """``{model_id: {variant: path}}`` for every complete predictions file under ``results``."""
    found: dict[str, dict[str, Path]] = {}
    root = Path(results) / "predictions"
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(model_dir.glob("*.csv")):
            found.setdefault(model_dir.name, {})[f.stem] = f
    return found
