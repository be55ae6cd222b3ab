"""What every source reader shares: finding files, pairing them by stem, and checking annotations.

Every reader accounts for every input: each image file, and each annotation
that has no image, becomes exactly one :class:`SourceRecord` or one
:class:`Rejection` with a reason code from ``pipeline.records.REASONS``. Bad
*inputs* never raise; only an unusable *source as a whole* (a missing folder,
a CSV without its header, an unreadable JSON or archive) raises
:class:`SourceError`, because there is no single input to blame.

Pairing: both sides are indexed by the file name without its final extension
(the *stem*), which is the sample key. A stem outside the key alphabet
(``pipeline.records.key_problem``: ``a.b``, ``a,b``, a newline, non-UTF-8
bytes, more than 91 characters) is a ``bad_key`` rejection rather than
rewritten, because rewriting could silently merge two images. Files whose
names start with a dot (e.g. macOS ``._`` forks) are not inputs.

Outputs never hold where the data lives on this machine: details and
``SourceRecord.annotation`` name files relative to the image root or the
annotation file/folder, so the same tree read from two folders gives the same
output apart from ``SourceRecord.image`` (which the builder opens).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline import decode
from pipeline.files import NotRegularFile, read_regular_text, stat_regular
from pipeline.masks import TOLERANCE_PX, whole_number
from pipeline.records import Box, RejectedInput, Rejection, SourceRecord, key_problem

SOURCE_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
WNID_RE = re.compile(r"^n\d{8}$")
WNID_PREFIX_RE = re.compile(r"^(n\d{8})_")

Output = SourceRecord | Rejection
Annotation = TypeVar("Annotation")


class SourceError(ValueError):
    """The source as a whole cannot be read (not one bad input among many)."""


@dataclass(frozen=True, slots=True)
class Found:
    """A file found under a root: ``path`` to open it, ``name`` (relative, '/'-separated) to report it."""

    path: str
    name: str


def printable(value: object, limit: int = 80) -> str:
    """``value`` as one line of ASCII (control and non-UTF-8 characters escaped), at most ``limit`` characters."""
    text = ascii(value if isinstance(value, str) else str(value))[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stem(name: str) -> str:
    """File name without directory and final extension (keeps inner dots, see module doc)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def most_common(wnids: Iterable[str]) -> str:
    """Most frequent label; ties go to the first seen, so the choice is deterministic."""
    values = wnids if isinstance(wnids, list) else list(wnids)
    first = values[0]
    for value in values:  # nearly always one label, which needs no counting
        if value != first:
            return Counter(values).most_common(1)[0][0]
    return first


# --------------------------------------------------------------------------- files


def scan(root: Path, extensions: Iterable[str], depth: int) -> dict[str, list[Found]]:
    """stem -> files with these extensions, at most ``depth`` folders below ``root``, sorted by name."""
    exts = {e.lower() for e in extensions}
    found: dict[str, list[Found]] = defaultdict(list)

    def walk(folder: str | Path, prefix: str, level: int) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir():
                    if level < depth:
                        walk(entry.path, f"{prefix}{name}/", level + 1)
                    continue
                dot = name.rfind(".")  # the name does not start with a dot: this is splitext's extension
                if dot > 0 and name[dot:].lower() in exts:
                    key = name[:dot] if "\\" not in name else stem(name)
                    found[key].append(Found(entry.path, prefix + name))

    walk(root, "", 0)
    return {s: files if len(files) == 1 else sorted(files, key=lambda f: f.name) for s, files in found.items()}


def require_dir(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise SourceError(f"{what} {str(path)!r} is not a folder")
    return Path(path)


def require_file(path: str | Path | None, what: str) -> Path:
    if path is None or not Path(path).is_file():
        raise SourceError(f"{what} {str(path)!r} is not a file")
    return Path(path)


def read_source_text(path: str | Path | None, what: str) -> tuple[Path, str]:
    """A whole-source file (JSON, CSV) as text; SourceError if it is not a readable regular UTF-8 file."""
    p = require_file(path, what)
    try:
        return p, read_regular_text(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {what} {str(p)!r}: {exc}") from None


def image_file_problem(image: Found) -> tuple[str, str] | None:
    """(reason, detail) if a listed image cannot be an input, judged without opening it; None if it can."""
    try:
        size = stat_regular(image.path).st_size
    except FileNotFoundError:
        return "missing_image", f"{printable(image.name)}: no such file (a dangling symlink?)"
    except NotRegularFile:
        return "undecodable_image", f"{printable(image.name)}: not a regular file"
    except OSError as exc:
        return "undecodable_image", f"{printable(image.name)}: {exc.strerror}"
    return ("empty_file", f"{printable(image.name)}: 0 bytes") if size == 0 else None


def join_by_stem(
    images: Mapping[str, Sequence[Found]],
    annotations: Mapping[str, Sequence[Annotation]],
    build: Callable[[str, Found, Annotation], Output],
    source: str,
    describe: Callable[[Annotation], str],
) -> list[Output]:
    """Pair images and annotations by stem; one output per image, per orphan annotation, per duplicate.

    The first image and first annotation of a stem (sorted) form the sample;
    every further file with the same stem is a ``duplicate_key`` rejection, so
    nothing is dropped without a trace. ``describe`` names an annotation in a
    detail (relative, see the module doc). Sorted by key (stable: a sample
    comes before its duplicates).
    """
    out: list[Output] = []
    for s in sorted(images.keys() | annotations.keys()):
        imgs, anns = images.get(s, ()), annotations.get(s, ())
        if len(imgs) == 1 and len(anns) == 1 and key_problem(s) is None:  # the usual stem: one of each
            rejected = image_file_problem(imgs[0])
            out.append(build(s, imgs[0], anns[0]) if rejected is None else Rejection(s, *rejected, source))
            continue
        imgs, anns = list(imgs), list(anns)
        image_names, annotation_names = [printable(f.name) for f in imgs], [describe(a) for a in anns]
        extras = image_names[1:] + annotation_names[1:]
        problem = key_problem(s)
        if problem is not None:
            key = printable(s, limit=200)
            first = (image_names or annotation_names)[0]
            out.extend(
                Rejection(key, "bad_key", f"{name}: not a usable sample key: {problem}", source)
                for name in [first, *extras]
            )
            continue
        if imgs and anns:
            rejected = image_file_problem(imgs[0])
            out.append(build(s, imgs[0], anns[0]) if rejected is None else Rejection(s, *rejected, source))
        elif imgs:
            out.append(Rejection(s, "missing_annotation", image_names[0], source))
        else:
            out.append(Rejection(s, "missing_image", f"no image for {annotation_names[0]}", source))
        out.extend(Rejection(s, "duplicate_key", f"{extra} (also {s!r})", source) for extra in extras)
    return sorted(out, key=lambda o: o.key)  # by output key: a bad key is printed, which can change its place


# --------------------------------------------------------------------------- labels and geometry


def wnid_for(image: Found, key: str, labels: Mapping[str, str] | None = None) -> str | None:
    """Label from an explicit mapping, else the image's class folder, else the key's wnid prefix."""
    if labels is not None and key in labels:
        return labels[key]
    parent = Path(image.path).parent.name
    if WNID_RE.match(parent):
        return parent
    m = WNID_PREFIX_RE.match(key)
    return m.group(1) if m else None


def checked_size(width: object, height: object) -> tuple[int, int]:
    """An annotation's stated image size: positive whole numbers within the decompression-bomb limit.

    Checked before anything is sized by it (a COCO RLE, a box check): a size of
    ``inf`` or 40000 x 40000 is a rejection, not an OverflowError or a 3 GB mask.
    """
    w, h = whole_number(width), whole_number(height)
    if w is None or h is None or w <= 0 or h <= 0:
        raise RejectedInput("malformed_annotation", f"size {printable(width, 24)}x{printable(height, 24)} "
                            "is not two positive whole numbers")
    if w * h > decode.MAX_IMAGE_PIXELS:
        raise RejectedInput("decompression_bomb", f"annotation says {printable(w, 24)}x{printable(h, 24)} = "
                            f"{printable(w * h, 24)} pixels, over the {decode.MAX_IMAGE_PIXELS}-pixel limit")
    return w, h


def check_boxes(
    boxes: Sequence[Box], size: tuple[int, int] | None, tolerance: float = TOLERANCE_PX
) -> tuple[tuple[Box, ...], str | None, str]:
    """Check half-open boxes against an image (width, height) and clip 1-px overshoot.

    Returns ``(clean_boxes, None, "")`` or ``((), reason, detail)``. One bad box
    rejects the whole image: a box that is inverted or far outside the image
    means the annotation cannot be trusted. Checks, in order: no boxes ->
    ``no_box``; non-finite -> ``malformed_annotation``; ``x1 < x0`` ->
    ``inverted_box``; ``x1 == x0`` -> ``zero_area_box``; beyond the image by
    more than ``tolerance`` -> ``box_outside_image``. With ``size=None`` only
    the lower edges can be checked. Geometry is half-open, so a VOC box with
    ``xmin == xmax`` is one pixel wide (valid) and ``xmax == xmin - 1`` is empty.
    """
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
        if type(b) is Box and (x0, y0, x1, y1) == coords and all(type(c) is float for c in coords):
            clean.append(b)  # nothing clipped and all floats already: the clean box is this one
        else:
            clean.append(Box(float(x0), float(y0), float(x1), float(y1), b.wnid))
    return tuple(clean), None, ""


def load_category_map(category_map: str | Path | Mapping | None) -> dict[str, str] | None:
    """Category id or name -> wnid, from a dict or a JSON object file (None: no map)."""
    if category_map is None:
        return None
    if isinstance(category_map, Mapping):
        raw: Any = category_map
    else:
        path, text = read_source_text(category_map, "category map")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise SourceError(f"cannot read category map {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise SourceError(f"category map {path} must be a JSON object")
    return {str(k): str(v) for k, v in raw.items()}
