"""Kaggle's ImageNet localisation CSVs (``LOC_val_solution.csv``, ``LOC_train_solution.csv``)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pipeline.classes import canonical_wnid, wnid_to_index
from pipeline.records import Box, Rejection, SourceRecord
from pipeline.sources._common import (
    SOURCE_IMAGE_SUFFIXES,
    Found,
    Output,
    SourceError,
    check_boxes,
    join_by_stem,
    most_common,
    printable,
    read_source_text,
    require_dir,
    scan,
)

SOURCE = "loc-csv"
BOX_CONVENTIONS = ("voc", "half_open")

Row = tuple[str, str]  # (where, e.g. "LOC_val_solution.csv:17", PredictionString)


def read_rows(path: Path, text: str) -> dict[str, list[Row]]:
    """ImageId -> its rows; SourceError without the ``ImageId,PredictionString`` header."""
    rows: dict[str, list[Row]] = defaultdict(list)
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise SourceError(f"{path}: header must be 'ImageId,PredictionString', got {header}")
        name = path.name
        for line_no, row in enumerate(reader, start=2):
            if row:
                rows[row[0].strip()].append((f"{name}:{line_no}", row[1] if len(row) > 1 else ""))
    except csv.Error as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    return rows


def loc_record(key: str, image: Found, row: Row, offset: float) -> Output:
    """One CSV row + its image -> record with the boxes of the row's most common wnid."""
    where, prediction = row
    tokens = prediction.split()
    if not tokens or len(tokens) % 5:
        return Rejection(key, "malformed_annotation", f"{where}: {len(tokens)} fields, not 5 per box", SOURCE)
    groups = [tokens[i : i + 5] for i in range(0, len(tokens), 5)]
    try:
        parsed = [(g[0], [float(v) for v in g[1:]]) for g in groups]
    except ValueError as exc:
        return Rejection(key, "malformed_annotation", f"{where}: {printable(exc)}", SOURCE)
    wnid = most_common([w for w, _ in parsed])
    label = wnid_to_index().get(wnid)
    if label is None:
        return Rejection(key, "unknown_wnid", f"{where}: {printable(wnid, 24)} is not an ImageNet-1k class", SOURCE)
    shared = canonical_wnid(label)
    boxes = [Box(x0 - offset, y0 - offset, x1, y1, shared) for w, (x0, y0, x1, y1) in parsed if w == wnid]
    clean, reason, detail = check_boxes(boxes, None)
    if reason is not None:
        return Rejection(key, reason, f"{where}: {detail}", SOURCE)
    return SourceRecord(key, image.path, label, shared, clean, None, None, SOURCE, where)


def read_loc_csv(images: str | Path, annotations: str | Path, box_convention: str = "voc") -> Iterator[Output]:
    """Kaggle ``LOC_{val,train}_solution.csv``: ``ImageId,PredictionString`` of ``wnid x y x y`` groups.

    Coordinates: the Kaggle archive ships the same CLS-LOC VOC XMLs the CSVs
    were exported from, with the numbers copied unchanged, so by default
    (``box_convention="voc"``) they get the XML conversion (``x0 = xmin - 1``,
    ``x1 = xmax``) and a box read here equals the one read from the XML.
    ``box_convention="half_open"`` takes the numbers as ``x0 y0 x1 y1`` as is.
    The CSV has no image size (``size=None``), so only the lower box edges can
    be checked here; the decoder checks the rest against the real image.
    Images are found flat (val) or in ``<wnid>/`` folders (train).
    """
    if box_convention not in BOX_CONVENTIONS:
        raise SourceError(f"box_convention must be 'voc' or 'half_open', not {box_convention!r}")
    root = require_dir(images, "image folder")
    path, text = read_source_text(annotations, "LOC CSV")
    rows = read_rows(path, text)
    offset = 1.0 if box_convention == "voc" else 0.0

    def build(key: str, image: Found, row: Row) -> Output:
        return loc_record(key, image, row, offset)

    return iter(join_by_stem(scan(root, SOURCE_IMAGE_SUFFIXES, depth=1), rows, build, SOURCE, describe=lambda r: r[0]))
