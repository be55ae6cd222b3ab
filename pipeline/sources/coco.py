"""COCO-format segmentations (e.g. PartImageNet): one record per image with the union mask.

Geometry is checked (``pipeline.masks.checked_polygons`` / ``checked_rle``,
the image size by ``checked_size``) before pycocotools sees any of it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.classes import wnid_to_index
from pipeline.masks import checked_polygons, checked_rle, compressed_rle
from pipeline.records import Box, RejectedInput, Rejection, Segmentation, SourceRecord
from pipeline.sources._common import (
    SOURCE_IMAGE_SUFFIXES,
    WNID_PREFIX_RE,
    WNID_RE,
    Found,
    Output,
    SourceError,
    check_boxes,
    checked_size,
    join_by_stem,
    load_category_map,
    most_common,
    printable,
    read_source_text,
    require_dir,
    scan,
    stem,
)

SOURCE = "coco"
LABEL_FROM = ("auto", "category", "filename")
Id = int | str  # what COCO ids may be; anything else (a list, null) identifies nothing


@dataclass(frozen=True)
class CocoIndex:
    """What the per-image functions need from the whole JSON."""

    name: str  # the JSON file's name, for details: "instances.json#image_id=3"
    annotations: Mapping[Id, list[dict]]  # image id -> its annotations
    categories: Mapping[Id, dict]
    category_map: Mapping[str, str] | None
    label_from: str

    def where(self, entry: dict) -> str:
        return f"{self.name}#image_id={printable(entry.get('id'), 40)}"


def _is_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def load_coco(path: Path, text: str) -> dict:
    try:
        coco = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise SourceError(f"{path}: not a COCO file (no 'images' list)")
    for part in ("annotations", "categories"):
        if not isinstance(coco.get(part, []), list):
            raise SourceError(f"{path}: '{part}' is not a list")
    return coco


def category_wnid(ann: dict, index: CocoIndex) -> str | None:
    """An annotation's category as a wnid: through the map (by id or name), else a name that is a wnid."""
    cat_id = ann.get("category_id")
    if not _is_id(cat_id):
        return None
    name = str(index.categories.get(cat_id, {}).get("name", ""))
    if index.category_map is not None:
        return index.category_map.get(str(cat_id)) or index.category_map.get(name)
    return name if WNID_RE.match(name) else None


def label_for(key: str, anns: list[dict], index: CocoIndex) -> tuple[str, list[dict], bool]:
    """(wnid, the annotations that are foreground, whether they are parts of one object).

    ``category``: the most common mapped category wins and only its
    annotations are kept. ``filename``: the key's wnid prefix, every
    annotation is a part. ``auto``: category when any maps, else filename.
    """
    if index.label_from in ("auto", "category"):
        mapped = [(category_wnid(a, index), a) for a in anns]
        known = [w for w, _ in mapped if w is not None]
        if known:
            wnid = most_common(known)
            return wnid, [a for w, a in mapped if w == wnid], False
    if index.label_from in ("auto", "filename"):
        m = WNID_PREFIX_RE.match(key)
        if m:
            return m.group(1), anns, True
    cats = sorted({printable(a.get("category_id"), 24) for a in anns})
    raise RejectedInput("unknown_category", f"categories {cats} map to no wnid")


def segmentation_for(anns: list[dict], width: int, height: int) -> tuple[Segmentation | None, dict | None]:
    """The union of the annotations' segmentations and its compressed RLE (None, None without any).

    Polygons stay ``polygons`` when every annotation is a polygon; otherwise
    all are merged to one compressed RLE (``counts`` str).
    """
    from pycocotools import mask as mask_utils

    polygons: list[list[float]] = []
    checked: list[dict] = []
    for a in anns:  # every annotation is checked before pycocotools sees any of them
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            checked.append(checked_rle(seg, width, height))
        elif isinstance(seg, list) and seg:
            polygons.extend(checked_polygons(seg, width, height))
        elif seg is not None and seg != []:
            raise RejectedInput("bad_segmentation", f"segmentation of type {type(seg).__name__}")
    if not polygons and not checked:
        return None, None
    rles = [compressed_rle(r) for r in checked] + (mask_utils.frPyObjects(polygons, height, width) if polygons else [])
    union = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    if float(mask_utils.area(union)) <= 0:
        raise RejectedInput("empty_mask", "segmentation covers no pixel")
    if not checked:
        return Segmentation("polygons", polygons), union
    counts = union["counts"]
    compact = counts.decode("ascii") if isinstance(counts, bytes) else counts
    return Segmentation("rle", {"size": [height, width], "counts": compact}), union


def boxes_for(anns: list[dict], wnid: str, union: dict | None, part_level: bool) -> list[Box]:
    """COCO ``[x, y, w, h]`` -> half-open boxes; parts become the one box around the object.

    With a segmentation and part-level annotations (or no bbox at all), the
    box is the segmentation's bounding box.
    """
    boxes: list[Box] = []
    for a in anns:
        bbox = a.get("bbox")
        if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError, OverflowError):
                raise RejectedInput("malformed_annotation", f"bbox {printable(bbox, 60)}") from None
            boxes.append(Box(x, y, x + w, y + h, wnid))
    if union is not None and (part_level or not boxes):
        from pycocotools import mask as mask_utils

        x, y, w, h = (float(v) for v in mask_utils.toBbox(union))
        return [Box(x, y, x + w, y + h, wnid)]
    if part_level and boxes:
        return [
            Box(
                min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes), wnid
            )
        ]
    return boxes


def coco_record(key: str, image: Found, entry: dict, index: CocoIndex) -> Output:
    """One ``images`` entry + its file -> record, or the first thing wrong with it."""
    where = index.where(entry)
    try:
        width, height = checked_size(entry.get("width"), entry.get("height"))
        anns = index.annotations.get(entry["id"], []) if _is_id(entry.get("id")) else []
        if not anns:
            raise RejectedInput("missing_annotation", "no annotations")
        wnid, kept, part_level = label_for(key, anns, index)
        if wnid not in wnid_to_index():
            raise RejectedInput("unknown_wnid", f"{printable(wnid, 24)} is not an ImageNet-1k class")
        segmentation, union = segmentation_for(kept, width, height)
        boxes = boxes_for(kept, wnid, union, part_level)
    except RejectedInput as exc:
        return Rejection(key, exc.reason, f"{where}: {exc.detail}", SOURCE)
    clean, reason, detail = check_boxes(boxes, (width, height))
    if reason is not None:
        return Rejection(key, reason, f"{where}: {detail}", SOURCE)
    return SourceRecord(key, image.path, wnid_to_index()[wnid], wnid, clean, segmentation, (width, height), SOURCE, where)


def index_coco(
    name: str, coco: dict, category_map: Mapping[str, str] | None, label_from: str
) -> tuple[dict[str, list[dict]], CocoIndex, list[Output]]:
    """(stem -> ``images`` entries, the index, rejections of annotations whose image id is not listed)."""
    entries: dict[str, list[dict]] = defaultdict(list)
    image_ids: set[Id] = set()
    for entry in coco["images"]:
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            entries[stem(entry["file_name"])].append(entry)
            if _is_id(entry.get("id")):
                image_ids.add(entry["id"])
    by_image: dict[Id, list[dict]] = defaultdict(list)
    orphans: list[Output] = []
    for ann in coco.get("annotations", []):
        if not isinstance(ann, dict):
            continue
        if _is_id(ann.get("image_id")) and ann["image_id"] in image_ids:
            by_image[ann["image_id"]].append(ann)
        else:
            ann_id, image_id = printable(ann.get("id"), 40), printable(ann.get("image_id"), 40)
            detail = f"{name}: annotation {ann_id} refers to unknown image_id {image_id}"
            orphans.append(Rejection(f"coco_annotation_{ann_id}", "missing_image", detail, SOURCE))
    categories = {c["id"]: c for c in coco.get("categories", []) if isinstance(c, dict) and _is_id(c.get("id"))}
    return entries, CocoIndex(name, by_image, categories, category_map, label_from), orphans


def read_coco(
    images: str | Path,
    annotations: str | Path,
    category_map: str | Path | Mapping | None = None,
    label_from: str = "auto",
) -> Iterator[Output]:
    """COCO JSON ``annotations`` + the image folder (two levels deep) -> one output per image.

    Label (``label_from``):
      - ``category``: each annotation's category -> wnid through ``category_map``
        (keys: category id or name), or, without a map, category names that are
        wnids; the most common wnid wins and only its annotations are kept.
        No mapped annotation -> ``unknown_category``.
      - ``filename``: the wnid prefix of the file name (``n01440764_123.JPEG``);
        every annotation of the image is foreground. This is what part-level
        datasets need: PartImageNet's categories are parts ("Quadruped Head"),
        and the union of an object's parts is the object.
      - ``auto`` (default): ``category`` when any annotation maps, else ``filename``.

    Boxes: COCO ``[x, y, w, h]`` -> ``Box(x, y, x + w, y + h)``; with the
    file-name label the part boxes are replaced by the one box around the
    union, because parts are not objects. A width/height that is not a
    positive whole number -> ``malformed_annotation`` (over the bomb limit:
    ``decompression_bomb``); broken RLE/polygons, or polygons outside the
    image -> ``bad_segmentation``; RLE at another size ->
    ``mask_size_mismatch``; empty union -> ``empty_mask``. Image files on disk
    that the JSON does not list -> ``missing_annotation``; annotations of an
    unlisted image id -> ``missing_image`` under key ``coco_annotation_<id>``.
    """
    if label_from not in LABEL_FROM:
        raise SourceError(f"label_from must be auto, category or filename, not {label_from!r}")
    root = require_dir(images, "image folder")
    path, text = read_source_text(annotations, "COCO annotation file")
    entries, index, orphans = index_coco(path.name, load_coco(path, text), load_category_map(category_map), label_from)

    def build(key: str, image: Found, entry: dict) -> Output:
        return coco_record(key, image, entry, index)

    out = join_by_stem(scan(root, SOURCE_IMAGE_SUFFIXES, depth=2), entries, build, SOURCE, describe=index.where)
    return iter(sorted(out + orphans, key=lambda o: o.key))
