"""Folders of mask PNGs keyed like the images (ImageNet-S), read by the builder's own mask rule.

ImageNet-S PNGs encode a class id per pixel as R + 256 * G (0 = other,
1000 = ignored); single-channel masks are read as non-zero = foreground. Both
the box derived here and the builder's mask come from
``pipeline.masks.mask_foreground``, so they cannot disagree.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.classes import wnid_to_index
from pipeline.files import read_regular
from pipeline.masks import PngMask, decode_mask_png
from pipeline.records import Box, RejectedInput, Rejection, Segmentation, SourceRecord
from pipeline.sources._common import (
    SOURCE_IMAGE_SUFFIXES,
    WNID_RE,
    Found,
    Output,
    SourceError,
    check_boxes,
    join_by_stem,
    load_category_map,
    printable,
    read_source_text,
    require_dir,
    scan,
    stem,
    wnid_for,
)
from pipeline.variants import box_rectangle

SOURCE = "mask-dir"


def load_labels(labels: str | Path | Mapping[str, str] | None) -> dict[str, str] | None:
    """key -> wnid from a dict or a CSV of ``image_id,label`` (label may be a LOC PredictionString)."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return {str(k): str(v) for k, v in labels.items()}
    path, text = read_source_text(labels, "label CSV")
    table: dict[str, str] = {}
    try:
        for row in csv.reader(io.StringIO(text, newline="")):
            if len(row) < 2 or not row[1].split():
                continue
            first = row[1].split()[0]
            if WNID_RE.match(first):  # a header row, or a blank label, has no wnid
                table.setdefault(stem(row[0].strip()), first)
    except csv.Error as exc:
        raise SourceError(f"cannot read label CSV {path}: {exc}") from None
    return table


def class_ids_by_wnid(category_map: str | Path | Mapping | None) -> dict[str, tuple[int, ...]] | None:
    """wnid -> its ImageNet-S class ids, from a map of class id -> wnid (None: no map given)."""
    table = load_category_map(category_map)
    if table is None:
        return None
    ids: dict[str, list[int]] = {}
    for key, wnid in table.items():
        digits = key.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise SourceError(f"mask-dir category map: key {printable(key, 24)!r} is not an ImageNet-S class id")
        ids.setdefault(wnid, []).append(int(digits))
    return {wnid: tuple(sorted(v)) for wnid, v in ids.items()}


def mask_record(
    key: str,
    image: Found,
    mask: Found,
    labels: Mapping[str, str] | None,
    ids_by_wnid: Mapping[str, tuple[int, ...]] | None,
) -> Output:
    """One image + its mask PNG -> record with the mask's size and the box around its foreground."""
    wnid = wnid_for(image, key, labels)
    if wnid is None:
        parent = Path(mask.path).parent.name
        wnid = parent if WNID_RE.match(parent) else None
    if wnid is None:
        return Rejection(key, "missing_annotation", f"{printable(image.name)}: no class label", SOURCE)
    if wnid not in wnid_to_index():
        return Rejection(key, "unknown_wnid", f"{printable(image.name)}: {printable(wnid, 24)} is not an ImageNet-1k class",
                         SOURCE)
    foreground_ids = None
    if ids_by_wnid is not None:
        foreground_ids = ids_by_wnid.get(wnid)
        if not foreground_ids:
            return Rejection(key, "unknown_category", f"the category map has no ImageNet-S class for {wnid}", SOURCE)
    where = printable(mask.name)
    try:
        foreground = decode_mask_png(read_regular(mask.path), foreground_ids)
    except OSError as exc:  # gone, or a FIFO/device named .png: never waited on
        return Rejection(key, "bad_segmentation", f"{where}: {exc.strerror or 'not a regular file'}", SOURCE)
    except RejectedInput as exc:
        return Rejection(key, exc.reason, f"{where}: {exc.detail}", SOURCE)
    bbox = box_rectangle(foreground)
    if bbox is None:
        return Rejection(key, "empty_mask", f"{where}: no foreground pixel", SOURCE)
    size = (int(foreground.shape[1]), int(foreground.shape[0]))
    clean, reason, detail = check_boxes([Box(*map(float, bbox), wnid)], size)
    if reason is not None:
        return Rejection(key, reason, f"{where}: {detail}", SOURCE)
    segmentation = Segmentation("png", PngMask(mask.path, foreground_ids))
    return SourceRecord(key, image.path, wnid_to_index()[wnid], wnid, clean, segmentation, size, SOURCE, where)


def read_mask_dir(
    images: str | Path,
    annotations: str | Path,
    labels: str | Path | Mapping[str, str] | None = None,
    category_map: str | Path | Mapping | None = None,
) -> Iterator[Output]:
    """ImageNet-S style PNG masks: ``<annotations>/<wnid>/<key>.png`` or flat ``<annotations>/<key>.png``.

    Images are ``<images>/<wnid>/<key>.JPEG`` or flat. Label, first found:
    ``labels`` (a dict or CSV ``image_id,wnid``; a LOC solution CSV works too),
    the image's class folder, the mask's class folder, the key's wnid prefix.
    ``category_map`` (ImageNet-S class id -> wnid, a dict or JSON file) makes
    the foreground the pixels of the image's own class; without it, every
    class but other (0) and ignored (1000). The mask is decoded (it is small)
    to record its (width, height) as ``size`` and the box around its
    foreground, so box-based variants work too; the JPEG is not opened, and
    ``pipeline.masks`` compares the two sizes at decode time
    (``mask_size_mismatch``).
    """
    image_root = require_dir(images, "image folder")
    mask_root = require_dir(annotations, "mask folder")
    table = load_labels(labels)
    ids_by_wnid = class_ids_by_wnid(category_map)
    found = scan(image_root, SOURCE_IMAGE_SUFFIXES, depth=1)
    masks = scan(mask_root, {".png"}, depth=1)

    def build(key: str, image: Found, mask: Found) -> Output:
        return mask_record(key, image, mask, table, ids_by_wnid)

    return iter(join_by_stem(found, masks, build, SOURCE, describe=lambda m: printable(m.name)))
