"""Source readers: annotated ImageNet-style inputs -> ``SourceRecord | Rejection``.

Every reader accounts for every input: each image file, and each annotation
that has no image, becomes exactly one :class:`SourceRecord` or one
:class:`Rejection` with a reason code from :data:`REASONS`. Bad *inputs* never
raise; only an unusable *source as a whole* (a missing folder, a CSV without
its header, an unreadable JSON or archive) raises :class:`SourceError`, because
there is no single input to blame.

Readers do not decode images (``pipeline.decode`` does that later); they
check that files exist and that annotations are sane. Output is sorted by key
so that a build plan is the same on every machine.

Pairing images with annotations: both sides are indexed by the file name
without its final extension (the *stem*). The stem is the sample key; a stem
that is not a valid key (``a.b.JPEG`` -> ``a.b``) is rejected as ``bad_key``
rather than truncated, because truncating at the first dot could silently
merge two different images. Files whose names start with a dot (e.g. macOS
``._`` resource forks) are not inputs and are skipped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classes import wnid_to_index
from pipeline.records import Box, Rejection, Segmentation, SourceRecord, is_valid_key

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png"})
SOURCE_KINDS = ("imagenet-val", "imagenet-train", "loc-csv", "coco", "mask-dir")
# Boxes may overshoot the image by up to this many pixels (rounding in the
# original annotation tools); they are clipped, anything further is rejected.
BOX_TOLERANCE = 1.0

WNID_RE = re.compile(r"^n\d{8}$")
WNID_PREFIX_RE = re.compile(r"^(n\d{8})_")

Output = SourceRecord | Rejection


class SourceError(ValueError):
    """The source as a whole cannot be read (not one bad input among many)."""


# --------------------------------------------------------------------------- boxes


def _check_boxes(
    boxes: Sequence[Box], size: tuple[int, int] | None, tolerance: float = BOX_TOLERANCE
) -> tuple[tuple[Box, ...], str | None, str]:
    """validate_boxes plus a human-readable detail for the rejection."""
    if not boxes:
        return (), "no_box", "no box of the labelled class"
    clean: list[Box] = []
    for i, b in enumerate(boxes):
        coords = (b.x0, b.y0, b.x1, b.y1)
        if not all(math.isfinite(c) for c in coords):
            return (), "malformed_annotation", f"box {i} has a non-finite coordinate {coords}"
        if b.x1 < b.x0 or b.y1 < b.y0:
            return (), "inverted_box", f"box {i} {coords} has max < min"
        if b.x1 == b.x0 or b.y1 == b.y0:
            return (), "zero_area_box", f"box {i} {coords} has zero width or height"
        w, h = size if size is not None else (math.inf, math.inf)
        if b.x0 < -tolerance or b.y0 < -tolerance or b.x1 > w + tolerance or b.y1 > h + tolerance:
            return (), "box_outside_image", f"box {i} {coords} outside image {w}x{h}"
        x0, y0 = max(b.x0, 0.0), max(b.y0, 0.0)
        x1, y1 = min(b.x1, w), min(b.y1, h)
        if x1 <= x0 or y1 <= y0:  # only the overshoot was inside the tolerance
            return (), "box_outside_image", f"box {i} {coords} has no area inside image {w}x{h}"
        clean.append(Box(float(x0), float(y0), float(x1), float(y1), b.wnid))
    return tuple(clean), None, ""


def validate_boxes(boxes: Sequence[Box], size: tuple[int, int] | None) -> tuple[tuple[Box, ...], str | None]:
    """Check half-open boxes against an image (width, height); clip 1-px overshoot.

    Returns ``(clean_boxes, None)`` or ``((), reason)``. One bad box rejects the
    whole image: a box that is inverted or far outside the image means the
    annotation cannot be trusted. Checks, in order: no boxes -> ``no_box``;
    non-finite -> ``malformed_annotation``; ``x1 < x0`` -> ``inverted_box``;
    ``x1 == x0`` -> ``zero_area_box``; beyond the image by more than
    :data:`BOX_TOLERANCE` -> ``box_outside_image``. With ``size=None`` only the
    lower edges can be checked. Geometry is half-open, so a VOC box with
    ``xmin == xmax`` is one pixel wide (valid) and ``xmax == xmin - 1`` is empty.
    """
    clean, reason, _ = _check_boxes(boxes, size)
    return clean, reason


def voc_box(wnid: str, xmin: float, ymin: float, xmax: float, ymax: float) -> Box:
    """VOC's 1-based inclusive corners -> half-open source pixels."""
    return Box(float(xmin) - 1.0, float(ymin) - 1.0, float(xmax), float(ymax), wnid)


# --------------------------------------------------------------------------- VOC XML


@dataclass(frozen=True)
class VocAnnotation:
    """The parts of an ImageNet VOC XML the readers use; boxes in raw VOC numbers."""

    filename: str
    size: tuple[int, int] | None
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...]


def _number(node: ET.Element | None, what: str) -> float:
    if node is None or node.text is None:
        raise ValueError(f"missing <{what}>")
    try:
        return float(node.text.strip())
    except ValueError:
        raise ValueError(f"<{what}> is not a number: {node.text.strip()!r}") from None


def parse_voc_xml(data: bytes) -> VocAnnotation:
    """Parse one ImageNet/VOC annotation; ValueError says what is wrong."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"XML: {exc}") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, not <annotation>")
    size: tuple[int, int] | None = None
    size_node = root.find("size")
    if size_node is not None:
        w = _number(size_node.find("width"), "width")
        h = _number(size_node.find("height"), "height")
        if not (w > 0 and h > 0 and w == int(w) and h == int(h)):
            raise ValueError(f"bad <size> {w}x{h}")
        size = (int(w), int(h))
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError("<object> without <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"<object> {name} without <bndbox>")
        corners = tuple(_number(bb.find(t), t) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name, corners))
    return VocAnnotation((root.findtext("filename") or "").strip(), size, tuple(objects))


def _most_common(wnids: Iterable[str]) -> str:
    """Most frequent label; ties go to the first seen, so the choice is deterministic."""
    return Counter(wnids).most_common(1)[0][0]


def _voc_record(
    key: str, image: str, data: bytes, where: str, source: str, label_wnid: str | None = None
) -> Output:
    """One VOC annotation + its image -> record, keeping only boxes of the label class.

    Pairing uses the XML's file name, never its ``<filename>``: some ImageNet
    train XMLs literally say ``%s`` there.
    """
    try:
        voc = parse_voc_xml(data)
    except ValueError as exc:
        return Rejection(key, "malformed_annotation", f"{where}: {exc}", source)
    if label_wnid is None:
        if not voc.objects:
            return Rejection(key, "no_box", f"{where}: no <object>", source)
        label_wnid = _most_common(name for name, _ in voc.objects)
    if label_wnid not in wnid_to_index():
        return Rejection(key, "unknown_wnid", f"{label_wnid!r} ({where})", source)
    boxes = [voc_box(name, *c) for name, c in voc.objects if name == label_wnid]
    clean, reason, detail = _check_boxes(boxes, voc.size)
    if reason is not None:
        return Rejection(key, reason, f"{where}: {detail}", source)
    return SourceRecord(
        key=key,
        image=image,
        label=wnid_to_index()[label_wnid],
        wnid=label_wnid,
        boxes=clean,
        size=voc.size,
        source=source,
        annotation=where,
    )


# --------------------------------------------------------------------------- files and joining


def _stem(name: str) -> str:
    """File name without directory and final extension (keeps inner dots, see module doc)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _scan(root: Path, extensions: Iterable[str], depth: int) -> dict[str, list[str]]:
    """stem -> sorted paths of files with these extensions, at most ``depth`` folders below root."""
    exts = {e.lower() for e in extensions}
    found: dict[str, list[str]] = defaultdict(list)

    def walk(folder: Path, level: int) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if level < depth:
                        walk(Path(entry.path), level + 1)
                elif os.path.splitext(entry.name)[1].lower() in exts:
                    found[_stem(entry.name)].append(entry.path)

    walk(root, 0)
    return {stem: sorted(paths) for stem, paths in found.items()}


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise SourceError(f"{what} {str(p)!r} is not a folder")
    return p


def _require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} {str(p)!r} is not a file")
    return p


def _join(
    images: Mapping[str, Sequence[str]],
    annotations: Mapping[str, Sequence[Any]],
    build: Callable[[str, str, Any], Output],
    source: str,
    describe: Callable[[Any], str] = str,
) -> list[Output]:
    """Pair images and annotations by stem; one output per image, per orphan annotation, per duplicate.

    The first image and first annotation of a stem (sorted) form the sample;
    every further file with the same stem is a ``duplicate_key`` rejection, so
    nothing is dropped without a trace.
    """
    out: list[Output] = []
    for stem in sorted(set(images) | set(annotations)):
        imgs, anns = list(images.get(stem, ())), list(annotations.get(stem, ()))
        valid = is_valid_key(stem)
        if not valid:
            out.append(Rejection(stem, "bad_key", f"{stem!r} is not a usable sample key", source))
        elif imgs and anns:
            if os.path.getsize(imgs[0]) == 0:
                out.append(Rejection(stem, "empty_file", imgs[0], source))
            else:
                out.append(build(stem, imgs[0], anns[0]))
        elif imgs:
            out.append(Rejection(stem, "missing_annotation", imgs[0], source))
        else:
            out.append(Rejection(stem, "missing_image", f"no image for {describe(anns[0])}", source))
        extras = [str(p) for p in imgs[1:]] + [describe(a) for a in anns[1:]]
        for extra in extras:
            reason = "duplicate_key" if valid else "bad_key"
            out.append(Rejection(stem, reason, f"{extra} (also {stem!r})", source))
    return out


def _wnid_for(image: str, key: str, labels: Mapping[str, str] | None = None) -> str | None:
    """Label from an explicit mapping, else the image's class folder, else the key's wnid prefix."""
    if labels is not None and key in labels:
        return labels[key]
    parent = Path(image).parent.name
    if WNID_RE.match(parent):
        return parent
    m = WNID_PREFIX_RE.match(key)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- ImageNet val / train


def _read_xml_archive(archive: Path) -> dict[str, list[tuple[str, bytes]]]:
    """stem -> [(archive::member, bytes)] streamed from a .tar/.tgz without unpacking."""
    found: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if not member.isfile() or not name.lower().endswith(".xml") or base.startswith("."):
                    continue
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                found[_stem(name)].append((f"{archive}::{name}", data))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"cannot read box archive {str(archive)!r}: {exc}") from None
    return {stem: sorted(v, key=lambda t: t[0]) for stem, v in found.items()}


def _read_xml_folder(folder: Path) -> dict[str, list[tuple[str, bytes | None]]]:
    """stem -> [(path, None)]; bytes are read lazily when the pair is built."""
    return {stem: [(p, None) for p in paths] for stem, paths in _scan(folder, {".xml"}, depth=1).items()}


def _xml_bytes(ref: tuple[str, bytes | None]) -> bytes:
    where, data = ref
    if data is not None:
        return data
    with open(where, "rb") as fh:
        return fh.read()


def read_imagenet_val(images_dir: str | Path, boxes: str | Path) -> Iterator[Output]:
    """ILSVRC2012 val: flat ``ILSVRC2012_val_*.JPEG`` + VOC XMLs (folder or the bbox .tgz itself).

    Images may also sit one folder deep (val sorted into class folders). The
    label is the most common ``<name>`` among an XML's objects and only boxes
    of that class are kept (val images have one class; this only matters for
    hand-edited files).
    """
    source = "imagenet-val"
    root = _require_dir(images_dir, "val image folder")
    boxes_path = Path(boxes)
    if boxes_path.is_dir():
        annotations: Mapping[str, Sequence[tuple[str, bytes | None]]] = _read_xml_folder(boxes_path)
    elif boxes_path.is_file():
        annotations = _read_xml_archive(boxes_path)
    else:
        raise SourceError(f"val boxes {str(boxes_path)!r} is neither a folder nor an archive")
    images = _scan(root, IMAGE_EXTENSIONS, depth=1)

    def build(key: str, image: str, ref: tuple[str, bytes | None]) -> Output:
        try:
            data = _xml_bytes(ref)
        except OSError as exc:
            return Rejection(key, "malformed_annotation", f"{ref[0]}: {exc}", source)
        return _voc_record(key, image, data, ref[0], source)

    return iter(_join(images, annotations, build, source, describe=lambda r: r[0]))


def read_imagenet_train(root: str | Path, boxes_root: str | Path | None = None) -> Iterator[Output]:
    """ILSVRC2012 train: ``<root>/<wnid>/<wnid>_<n>.JPEG`` + ``<boxes_root>/<wnid>/<wnid>_<n>.xml``.

    The label is the class folder (or the file name's wnid prefix for a flat
    folder), not the XML, and only boxes of that class are kept. Only about 40%
    of train images have boxes, so most become ``missing_annotation``.
    """
    source = "imagenet-train"
    images_root = _require_dir(root, "train image folder")
    xml_root = _require_dir(boxes_root, "train box folder") if boxes_root is not None else images_root
    images = _scan(images_root, IMAGE_EXTENSIONS, depth=1)
    annotations = _read_xml_folder(xml_root)

    def build(key: str, image: str, ref: tuple[str, bytes | None]) -> Output:
        wnid = _wnid_for(image, key)
        if wnid is None:
            return Rejection(key, "unknown_wnid", f"no class folder or wnid prefix for {image}", source)
        try:
            data = _xml_bytes(ref)
        except OSError as exc:
            return Rejection(key, "malformed_annotation", f"{ref[0]}: {exc}", source)
        return _voc_record(key, image, data, ref[0], source, label_wnid=wnid)

    return iter(_join(images, annotations, build, source, describe=lambda r: r[0]))


# --------------------------------------------------------------------------- Kaggle LOC CSV


def read_loc_csv(images: str | Path, csv_path: str | Path, box_convention: str = "voc") -> Iterator[Output]:
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
    source = "loc-csv"
    if box_convention not in ("voc", "half_open"):
        raise SourceError(f"box_convention must be 'voc' or 'half_open', not {box_convention!r}")
    root = _require_dir(images, "image folder")
    path = _require_file(csv_path, "LOC CSV")
    rows: dict[str, list[tuple[str, str]]] = defaultdict(list)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise SourceError(f"{path}: header must be 'ImageId,PredictionString', got {header}")
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                image_id = row[0].strip()
                prediction = row[1] if len(row) > 1 else ""
                rows[image_id].append((f"{path}:{line_no}", prediction))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    files = _scan(root, IMAGE_EXTENSIONS, depth=1)
    offset = 1.0 if box_convention == "voc" else 0.0

    def build(key: str, image: str, ref: tuple[str, str]) -> Output:
        where, prediction = ref
        tokens = prediction.split()
        if not tokens or len(tokens) % 5:
            return Rejection(
                key, "malformed_annotation", f"{where}: {len(tokens)} fields, not 5 per box", source
            )
        groups = [tokens[i : i + 5] for i in range(0, len(tokens), 5)]
        try:
            parsed = [(g[0], [float(v) for v in g[1:]]) for g in groups]
        except ValueError as exc:
            return Rejection(key, "malformed_annotation", f"{where}: {exc}", source)
        wnid = _most_common(w for w, _ in parsed)
        if wnid not in wnid_to_index():
            return Rejection(key, "unknown_wnid", f"{wnid!r} ({where})", source)
        boxes = [Box(x0 - offset, y0 - offset, x1, y1, w) for w, (x0, y0, x1, y1) in parsed if w == wnid]
        clean, reason, detail = _check_boxes(boxes, None)
        if reason is not None:
            return Rejection(key, reason, f"{where}: {detail}", source)
        return SourceRecord(key, image, wnid_to_index()[wnid], wnid, clean, None, None, source, where)

    return iter(_join(files, rows, build, source, describe=lambda r: r[0]))


# --------------------------------------------------------------------------- COCO


class _BadSegmentation(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString) into run lengths.

    pycocotools decodes a truncated string without complaint, so run lengths
    are recovered here to check that they add up to h*w.
    """
    s = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("compressed RLE ends inside a run length")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} is not valid in compressed RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _check_rle(seg: Mapping[str, Any], width: int, height: int) -> dict:
    """A COCO RLE (compressed or not) at the image's size -> compressed RLE, or _BadSegmentation."""
    from pycocotools import mask as mask_utils

    size = seg.get("size")
    counts = seg.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise _BadSegmentation("bad_segmentation", f"RLE size {size!r}")
    try:
        rle_h, rle_w = int(size[0]), int(size[1])
    except (TypeError, ValueError):
        raise _BadSegmentation("bad_segmentation", f"RLE size {size!r}") from None
    if (rle_h, rle_w) != (height, width):
        raise _BadSegmentation("mask_size_mismatch", f"RLE is {size[1]}x{size[0]}, image {width}x{height}")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise _BadSegmentation("bad_segmentation", "RLE counts must be non-negative integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = rle_counts_from_string(counts)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _BadSegmentation("bad_segmentation", f"compressed RLE: {exc}") from None
        if any(r < 0 for r in runs):
            raise _BadSegmentation("bad_segmentation", "compressed RLE has a negative run")
    else:
        raise _BadSegmentation("bad_segmentation", f"RLE counts of type {type(counts).__name__}")
    if sum(runs) != width * height:
        raise _BadSegmentation(
            "bad_segmentation", f"RLE covers {sum(runs)} pixels, image has {width * height}"
        )
    try:
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            rle = {
                "size": [height, width],
                "counts": counts if isinstance(counts, bytes) else counts.encode(),
            }
        mask_utils.decode(rle)
    except Exception as exc:  # pycocotools raises bare ValueError/TypeError for bad data
        raise _BadSegmentation("bad_segmentation", f"RLE does not decode: {exc}") from None
    return rle


def _check_polygons(seg: list, width: int, height: int) -> tuple[list[list[float]], list[dict]]:
    """COCO polygons -> (float polygons, their RLEs), or _BadSegmentation."""
    from pycocotools import mask as mask_utils

    polys: list[list[float]] = []
    for poly in seg:
        if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
            raise _BadSegmentation("bad_segmentation", "a polygon needs an even number (>= 6) of coordinates")
        try:
            coords = [float(v) for v in poly]
        except (TypeError, ValueError):
            raise _BadSegmentation("bad_segmentation", "polygon coordinate is not a number") from None
        if not all(math.isfinite(v) for v in coords):
            raise _BadSegmentation("bad_segmentation", "polygon coordinate is not finite")
        polys.append(coords)
    try:
        rles = mask_utils.frPyObjects(polys, height, width)
    except Exception as exc:
        raise _BadSegmentation("bad_segmentation", f"polygons do not rasterize: {exc}") from None
    return polys, rles


def _load_category_map(category_map: str | Path | Mapping | None) -> dict[str, str] | None:
    if category_map is None:
        return None
    if isinstance(category_map, Mapping):
        raw: Any = category_map
    else:
        path = _require_file(category_map, "category map")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read category map {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise SourceError(f"category map {path} must be a JSON object")
    return {str(k): str(v) for k, v in raw.items()}


def read_coco(
    images: str | Path,
    annotation_json: str | Path,
    category_map: str | Path | Mapping | None = None,
    label_from: str = "auto",
) -> Iterator[Output]:
    """COCO-format segmentations (e.g. PartImageNet): one record per image with the union mask.

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

    Segmentation: polygons stay ``polygons`` when every kept annotation is a
    polygon; otherwise all are merged to one compressed RLE (``counts`` str,
    pass straight to ``pycocotools.mask.decode``). Boxes: COCO ``[x, y, w, h]``
    -> ``Box(x, y, x + w, y + h)``; with the file-name label the part boxes are
    replaced by the one box around the union, because parts are not objects.
    Broken RLE/polygons -> ``bad_segmentation``; RLE at another size ->
    ``mask_size_mismatch``; empty union -> ``empty_mask``. Image files on disk
    that the JSON does not list -> ``missing_annotation``; annotations of an
    unlisted image id -> ``missing_image`` under key ``coco_annotation_<id>``.
    """
    from pycocotools import mask as mask_utils

    source = "coco"
    if label_from not in ("auto", "category", "filename"):
        raise SourceError(f"label_from must be auto, category or filename, not {label_from!r}")
    root = _require_dir(images, "image folder")
    path = _require_file(annotation_json, "COCO annotation file")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise SourceError(f"{path}: not a COCO file (no 'images' list)")
    cmap = _load_category_map(category_map)
    categories = {c.get("id"): c for c in coco.get("categories", []) if isinstance(c, dict)}
    entries: dict[str, list[dict]] = defaultdict(list)
    image_ids: set = set()
    for entry in coco["images"]:
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            entries[_stem(entry["file_name"])].append(entry)
            if isinstance(entry.get("id"), (int, str)):
                image_ids.add(entry["id"])
    by_image: dict[Any, list[dict]] = defaultdict(list)
    orphans: list[Output] = []
    for ann in coco.get("annotations", []):
        if not isinstance(ann, dict):
            continue
        if isinstance(ann.get("image_id"), (int, str)) and ann["image_id"] in image_ids:
            by_image[ann.get("image_id")].append(ann)
        else:
            orphans.append(
                Rejection(
                    f"coco_annotation_{ann.get('id')}",
                    "missing_image",
                    f"{path}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}",
                    source,
                )
            )

    def category_wnid(ann: dict) -> str | None:
        cat_id = ann.get("category_id")
        name = str(categories.get(cat_id, {}).get("name", ""))
        if cmap is not None:
            return cmap.get(str(cat_id)) or cmap.get(name)
        return name if WNID_RE.match(name) else None

    def build(key: str, image: str, entry: dict) -> Output:
        where = f"{path}#image_id={entry.get('id')}"
        try:
            width, height = int(entry["width"]), int(entry["height"])
            if width <= 0 or height <= 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            return Rejection(key, "malformed_annotation", f"{where}: bad width/height", source)
        anns = by_image.get(entry["id"], []) if isinstance(entry.get("id"), (int, str)) else []
        if not anns:
            return Rejection(key, "missing_annotation", f"{where}: no annotations", source)
        wnid: str | None = None
        kept: list[dict] = []
        part_level = False
        if label_from in ("auto", "category"):
            mapped = [(category_wnid(a), a) for a in anns]
            known = [w for w, _ in mapped if w is not None]
            if known:
                wnid = _most_common(known)
                kept = [a for w, a in mapped if w == wnid]
        if wnid is None and label_from in ("auto", "filename"):
            m = WNID_PREFIX_RE.match(key)
            if m:
                wnid, kept, part_level = m.group(1), anns, True
        if wnid is None:
            cats = sorted({str(a.get("category_id")) for a in anns})
            return Rejection(key, "unknown_category", f"{where}: categories {cats} map to no wnid", source)
        if wnid not in wnid_to_index():
            return Rejection(key, "unknown_wnid", f"{wnid!r} ({where})", source)

        polygons: list[list[float]] = []
        rles: list[dict] = []
        any_rle = False
        boxes: list[Box] = []
        try:
            for a in kept:
                seg = a.get("segmentation")
                if isinstance(seg, dict):
                    rles.append(_check_rle(seg, width, height))
                    any_rle = True
                elif isinstance(seg, list) and seg:
                    polys, poly_rles = _check_polygons(seg, width, height)
                    polygons.extend(polys)
                    rles.extend(poly_rles)
                elif seg not in (None, []):
                    raise _BadSegmentation("bad_segmentation", f"segmentation of type {type(seg).__name__}")
                bbox = a.get("bbox")
                if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
                    try:
                        x, y, w, h = (float(v) for v in bbox)
                    except (TypeError, ValueError):
                        return Rejection(key, "malformed_annotation", f"{where}: bbox {bbox!r}", source)
                    boxes.append(Box(x, y, x + w, y + h, wnid))
        except _BadSegmentation as exc:
            return Rejection(key, exc.reason, f"{where}: {exc.detail}", source)

        segmentation: Segmentation | None = None
        if rles:
            union = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
            if float(mask_utils.area(union)) <= 0:
                return Rejection(key, "empty_mask", f"{where}: segmentation covers no pixel", source)
            if any_rle:
                counts = union["counts"]
                compact = counts.decode("ascii") if isinstance(counts, bytes) else counts
                segmentation = Segmentation("rle", {"size": [height, width], "counts": compact})
            else:
                segmentation = Segmentation("polygons", polygons)
            if part_level or not boxes:
                x, y, w, h = (float(v) for v in mask_utils.toBbox(union))
                boxes = [Box(x, y, x + w, y + h, wnid)]
        elif part_level and boxes:
            boxes = [
                Box(
                    min(b.x0 for b in boxes),
                    min(b.y0 for b in boxes),
                    max(b.x1 for b in boxes),
                    max(b.y1 for b in boxes),
                    wnid,
                )
            ]
        clean, reason, detail = _check_boxes(boxes, (width, height))
        if reason is not None:
            return Rejection(key, reason, f"{where}: {detail}", source)
        return SourceRecord(
            key, image, wnid_to_index()[wnid], wnid, clean, segmentation, (width, height), source, where
        )

    files = _scan(root, IMAGE_EXTENSIONS, depth=2)
    out = _join(files, entries, build, source, describe=lambda e: f"{path}#image_id={e.get('id')}")
    return iter(sorted(out + orphans, key=lambda o: o.key))


# --------------------------------------------------------------------------- PNG mask folders


def _load_labels(labels: str | Path | Mapping[str, str] | None) -> dict[str, str] | None:
    """key -> wnid from a dict or a CSV of ``image_id,label`` (label may be a LOC PredictionString)."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return {str(k): str(v) for k, v in labels.items()}
    path = _require_file(labels, "label CSV")
    table: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if len(row) < 2 or not row[1].split():
                    continue
                first = row[1].split()[0]
                if WNID_RE.match(first):  # a header row, or a blank label, has no wnid
                    table.setdefault(_stem(row[0].strip()), first)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot read label CSV {path}: {exc}") from None
    return table


def mask_bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Half-open (x0, y0, x1, y1) around the non-zero pixels of a mask array, None if empty."""
    fg = mask.max(axis=2) > 0 if mask.ndim == 3 else mask > 0
    cols = np.flatnonzero(fg.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(fg.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def read_mask_dir(
    images: str | Path,
    masks_dir: str | Path,
    labels: str | Path | Mapping[str, str] | None = None,
) -> Iterator[Output]:
    """ImageNet-S style PNG masks: ``<masks>/<wnid>/<key>.png`` or flat ``<masks>/<key>.png``.

    Images are ``<images>/<wnid>/<key>.JPEG`` or flat. Label, first found:
    ``labels`` (a dict or CSV ``image_id,wnid``; a LOC solution CSV works too),
    the image's class folder, the mask's class folder, the key's wnid prefix.
    The mask is opened (it is small) to record its (width, height) as ``size``
    and derive the one box around its non-zero pixels, so box-based variants
    work too; the JPEG is not opened, and ``pipeline.masks`` compares the two
    sizes at decode time (``mask_size_mismatch``). Non-zero in any channel is
    foreground, as ``pipeline.masks`` reads it.
    """
    from PIL import Image

    source = "mask-dir"
    image_root = _require_dir(images, "image folder")
    mask_root = _require_dir(masks_dir, "mask folder")
    table = _load_labels(labels)
    files = _scan(image_root, IMAGE_EXTENSIONS, depth=1)
    masks = _scan(mask_root, {".png"}, depth=1)

    def build(key: str, image: str, mask_path: str) -> Output:
        wnid = _wnid_for(image, key, table)
        if wnid is None:
            parent = Path(mask_path).parent.name
            wnid = parent if WNID_RE.match(parent) else None
        if wnid is None:
            return Rejection(key, "missing_annotation", f"no class label for {image}", source)
        if wnid not in wnid_to_index():
            return Rejection(key, "unknown_wnid", f"{wnid!r} ({image})", source)
        try:
            with Image.open(mask_path) as m:
                size = m.size
                arr = np.asarray(m)
        except Exception as exc:  # PIL raises many types for broken files
            return Rejection(key, "bad_segmentation", f"{mask_path}: {type(exc).__name__}: {exc}", source)
        bbox = mask_bounding_box(arr)
        if bbox is None:
            return Rejection(key, "empty_mask", f"{mask_path}: no non-zero pixel", source)
        clean, reason, detail = _check_boxes([Box(*map(float, bbox), wnid)], size)
        if reason is not None:
            return Rejection(key, reason, f"{mask_path}: {detail}", source)
        return SourceRecord(
            key,
            image,
            wnid_to_index()[wnid],
            wnid,
            clean,
            Segmentation("png", mask_path),
            size,
            source,
            mask_path,
        )

    return iter(_join(files, masks, build, source))


# --------------------------------------------------------------------------- dispatch


_READER_OPTIONS: dict[str, frozenset[str]] = {
    "imagenet-val": frozenset(),
    "imagenet-train": frozenset(),
    "loc-csv": frozenset({"box_convention"}),
    "coco": frozenset({"category_map", "label_from"}),
    "mask-dir": frozenset({"labels"}),
}


def read_source(
    kind: str, images: str | Path, annotations: str | Path | None = None, **options: Any
) -> Iterator[Output]:
    """One entry point for every reader; ``kind`` is one of :data:`SOURCE_KINDS`.

    ``annotations`` is the val box folder/archive, the train box root (None:
    next to the images), the LOC CSV, the COCO JSON, or the mask folder.
    """
    if kind not in _READER_OPTIONS:
        raise SourceError(f"unknown source kind {kind!r}; choose from {', '.join(SOURCE_KINDS)}")
    unknown = set(options) - _READER_OPTIONS[kind]
    if unknown:
        raise SourceError(f"source kind {kind!r} takes no option(s) {', '.join(sorted(unknown))}")
    if kind == "imagenet-train":
        return read_imagenet_train(images, annotations)
    if annotations is None:
        raise SourceError(f"source kind {kind!r} needs an annotation path")
    if kind == "imagenet-val":
        return read_imagenet_val(images, annotations)
    if kind == "loc-csv":
        return read_loc_csv(images, annotations, **options)
    if kind == "coco":
        return read_coco(images, annotations, **options)
    return read_mask_dir(images, annotations, **options)


def partition(outputs: Iterable[Output]) -> tuple[list[SourceRecord], list[Rejection]]:
    """Split a reader's stream into records and rejections, keeping order."""
    records: list[SourceRecord] = []
    rejections: list[Rejection] = []
    for item in outputs:
        (records if isinstance(item, SourceRecord) else rejections).append(item)
    return records, rejections
