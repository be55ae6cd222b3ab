"""Per-sample predictions: the file the evaluator writes and the report reads.

One CSV per (model, variant) at ``<results>/predictions/<model_id>/<variant>.csv``,
sorted by key, written atomically (temporary name, then rename) with the csv
module's quoting, so a file that exists is complete and parses. Columns:

| column | meaning |
|---|---|
| key | sample key (joins variants) |
| label | ImageNet-1k true class |
| pred | top-1 ImageNet-1k prediction |
| top5 | five ImageNet-1k indices, best first, space separated |
| p_true | softmax probability of the true class |
| in9_label | ImageNet-9 superclass of ``label`` (-1 when not one of the 370 classes) |
| in9_pred | ImageNet-9 prediction under the run's ``--in9-rule``: -1 = the prediction falls outside the 370 classes (wrong); empty = not computed |
| bg_label | ImageNet-1k class of the image whose background a mixed sample carries (-1 for other variants) |
| shard | the shard the sample was scored from (a resumed run merges results by it) |

Two different things used to share ``in9_pred = -1``: a 1000-way prediction outside
the 370 IN-9 classes (a wrong answer, counted as 0% by the report) and "no IN-9
prediction was made" (left out of the in9 metrics). The second is an empty cell
on disk and :data:`IN9_NOT_COMPUTED` in memory. Columns are read by name; the
last two may be absent (files of older versions) and extra columns are ignored.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import atomic_write_text

COLUMNS = ("key", "label", "pred", "top5", "p_true", "in9_label", "in9_pred", "bg_label", "shard")
REQUIRED_COLUMNS = COLUMNS[:7]
IN9_OUTSIDE = -1  # predicted a class outside the 370 IN-9 classes: a wrong answer
IN9_NOT_COMPUTED = -2  # no IN-9 prediction was made (written as an empty cell)
_FIELDS = ("keys", "label", "pred", "top5", "p_true", "in9_label", "in9_pred", "bg_label", "shard")


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
    bg_label: np.ndarray | None = None  # int64, -1 where the sample carries no other image's background
    shard: np.ndarray | None = None  # str objects

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.bg_label is None:
            self.bg_label = np.full(n, -1, dtype=np.int64)
        if self.shard is None:
            self.shard = np.full(n, "", dtype=object)

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

    @property
    def in9_computed(self) -> np.ndarray:
        """Rows that carry an IN-9 prediction (possibly outside IN-9, i.e. wrong)."""
        return self.in9_pred != IN9_NOT_COMPUTED

    def sorted(self) -> Predictions:
        order = np.argsort(self.keys, kind="stable")
        return Predictions(*(getattr(self, c)[order] for c in _FIELDS))

    def subset(self, keys: np.ndarray) -> Predictions:
        """Rows for ``keys`` (all must be present), in that order."""
        index = {k: i for i, k in enumerate(self.keys)}
        rows = np.array([index[k] for k in keys], dtype=np.int64)
        return Predictions(*(getattr(self, c)[rows] for c in _FIELDS))

    def where(self, mask: np.ndarray) -> Predictions:
        return Predictions(*(getattr(self, c)[mask] for c in _FIELDS))

    # ------------------------------------------------------------------ rows (the evaluator's part files)

    def to_rows(self) -> list[list[Any]]:
        """One list per sample in :data:`COLUMNS` order (``top5`` as a list of ints)."""
        return [
            [str(self.keys[i]), int(self.label[i]), int(self.pred[i]), [int(t) for t in self.top5[i]],
             float(self.p_true[i]), int(self.in9_label[i]), int(self.in9_pred[i]), int(self.bg_label[i]),  # type: ignore[index]
             str(self.shard[i])]  # type: ignore[index]
            for i in range(len(self))
        ]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]]) -> Predictions:
        n = len(rows)
        column = list(zip(*rows, strict=True)) if rows else [()] * len(COLUMNS)
        return cls(
            keys=np.array(column[0], dtype=object),
            label=np.array(column[1], dtype=np.int64),
            pred=np.array(column[2], dtype=np.int64),
            top5=np.array(column[3], dtype=np.int64).reshape(n, 5) if n else np.zeros((0, 5), dtype=np.int64),
            p_true=np.array(column[4], dtype=np.float64),
            in9_label=np.array(column[5], dtype=np.int64),
            in9_pred=np.array(column[6], dtype=np.int64),
            bg_label=np.array(column[7], dtype=np.int64),
            shard=np.array(column[8], dtype=object),
        )

    @classmethod
    def concat(cls, parts: Iterable[Predictions]) -> Predictions:
        parts = list(parts)
        if not parts:
            return cls.from_rows([])
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in _FIELDS))


def model_dir(results: str | Path, model_id: str) -> Path:
    """Where one model's predictions, ledgers and parts live under a results folder."""
    return Path(results) / "predictions" / model_id


def predictions_path(results: str | Path, model_id: str, variant: str) -> Path:
    return model_dir(results, model_id) / f"{variant}.csv"


def _in9_cell(value: int) -> str:
    return "" if value == IN9_NOT_COMPUTED else str(value)


def _in9_value(cell: str | None) -> int:
    if cell is None:  # csv gives None for a row cut short; that is damage, not "not computed"
        raise ValueError("row has fewer cells than the header")
    return IN9_NOT_COMPUTED if cell.strip() == "" else int(cell)


def write_predictions(path: str | Path, preds: Predictions) -> None:
    preds = preds.sorted()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in preds.to_rows():
        key, label, pred, top5, p_true, in9_label, in9_pred, bg_label, shard = row
        writer.writerow([key, label, pred, " ".join(map(str, top5)), repr(p_true), in9_label, _in9_cell(in9_pred),
                         bg_label, shard])
    atomic_write_text(path, buf.getvalue())


def read_predictions(path: str | Path) -> Predictions:
    """Read a predictions file by column name; extra columns (added by newer writers) are ignored."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {','.join(missing)} (expected {','.join(COLUMNS)})")
        rows = list(reader)
    n = len(rows)
    return Predictions(
        keys=np.array([r["key"] for r in rows], dtype=object),
        label=np.array([int(r["label"]) for r in rows], dtype=np.int64),
        pred=np.array([int(r["pred"]) for r in rows], dtype=np.int64),
        top5=np.array([[int(t) for t in r["top5"].split()] for r in rows], dtype=np.int64).reshape(n, 5),
        p_true=np.array([float(r["p_true"]) for r in rows], dtype=np.float64),
        in9_label=np.array([int(r["in9_label"]) for r in rows], dtype=np.int64),
        in9_pred=np.array([_in9_value(r["in9_pred"]) for r in rows], dtype=np.int64),
        bg_label=np.array([int(r.get("bg_label") or -1) for r in rows], dtype=np.int64),
        shard=np.array([r.get("shard") or "" for r in rows], dtype=object),
    )


def list_predictions(results: str | Path) -> dict[str, dict[str, Path]]:
    """``{model_id: {variant: path}}`` for every complete predictions file under ``results``."""
    found: dict[str, dict[str, Path]] = {}
    root = Path(results) / "predictions"
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.csv")):
            found.setdefault(folder.name, {})[f.stem] = f
    return found
