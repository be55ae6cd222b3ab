"""The one record type every source reader produces, and the typed rejection.

Readers never raise on bad input: they yield a :class:`Rejection` with a
reason code from :data:`REASONS`, so a build can account for every input
(accepted + rejected = inputs).
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# Reason codes are part of the output contract (rejected.jsonl, manifest).
REASONS: dict[str, str] = {
    # image file problems
    "missing_image": "annotation names an image that does not exist (or a dangling symlink)",
    "empty_file": "image file has zero bytes",
    "truncated_image": "image data ends early",
    "undecodable_image": "not a readable image of an allowed format, or not a regular file",
    "decompression_bomb": "image (or its annotation's stated size) has more pixels than the decompression-bomb limit",
    "image_too_small": "image is smaller than the minimum side length",
    # annotation problems
    "missing_annotation": "image has no annotation",
    "malformed_annotation": "annotation file cannot be parsed",
    "unknown_wnid": "label is not an ImageNet-1k class",
    "unknown_category": "segmentation category has no ImageNet class mapping",
    "no_box": "no box of the labelled class",
    "box_outside_image": "a box lies outside the image",
    "inverted_box": "a box has max < min",
    "zero_area_box": "a box has zero width or height",
    "bad_segmentation": "segmentation (polygon/RLE) cannot be decoded",
    "mask_size_mismatch": "mask size differs from the image size",
    "empty_mask": "foreground mask is empty inside the frame",
    "bad_key": "image id cannot be used as a sample key",
    "duplicate_key": "another input already has this key",
    # selection filters (Noise or Signal)
    "multiple_boxes": "more than one box (filter: exactly one box)",
    "box_too_large": "box covers more than the allowed fraction of the frame",
    "box_cropped": "the centre crop cuts away too much of the box",
    "class_not_selected": "class is outside the selected class set",
    "over_per_class_limit": "class already has --per-class samples",
    # variant planning
    "no_partner": "no image is available as a background partner",
    "no_background": "no background strip outside the box to tile",
    "grabcut_failed": "GrabCut produced an empty foreground",
}

ReasonCode = str


# Records, boxes and rejections use __slots__: a build holds one of each per input (1.28M for
# ImageNet train), and a slotted instance is a third of the size of one with a __dict__.


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in source pixel coordinates, half-open: [x0, x1) x [y0, y1).

    VOC XML stores 1-based inclusive corners; readers convert to this form
    (x0 = xmin - 1, x1 = xmax) so that a box's width is x1 - x0.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    wnid: str = ""

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True, slots=True)
class Segmentation:
    """A foreground segmentation in source pixel coordinates.

    kind:
      - ``polygons``: ``data`` is a list of flat [x, y, x, y, ...] lists (COCO);
      - ``rle``: ``data`` is a COCO RLE dict (``counts`` compressed or not, ``size`` [h, w]);
      - ``png``: ``data`` is the path of a mask PNG (non-zero = foreground).
    """

    kind: Literal["polygons", "rle", "png"]
    data: Any


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One input image with its label and annotations.

    ``image`` is a filesystem path, or ``"<archive>::<member>"`` for a file inside
    a tar archive. ``size`` is (width, height) as the annotation states it, if
    it does; boxes and segmentation refer to the stored pixel array.
    """

    key: str
    image: str
    label: int
    wnid: str
    boxes: tuple[Box, ...] = ()
    segmentation: Segmentation | None = None
    size: tuple[int, int] | None = None
    source: str = ""  # which reader produced it, e.g. "imagenet-val"
    annotation: str = ""  # where the annotation came from (path, csv row, coco id)


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input that is not built, with a reason code from :data:`REASONS`."""

    key: str
    reason: ReasonCode
    detail: str = ""
    source: str = ""
    variant: str = ""  # empty: rejected for every variant
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")

    def to_json(self) -> dict:
        row = asdict(self)
        if not row["extra"]:
            row.pop("extra")
        return row


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a reader or the planner makes a record (and more) per input.

    CPython collects after every 700 new container objects and, every so often,
    walks every object alive: with a million records alive, those walks cost
    more than making the objects. Records, boxes, probes and assignments form
    no reference cycles (reference counting frees them), and collection
    resumes, as it was, when the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class RejectedInput(Exception):
    """Raised inside pure image code; callers turn it into a :class:`Rejection`."""

    def __init__(self, reason: ReasonCode, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# The key alphabet, in one place: what webdataset (the key ends at the first dot), CSV (no comma,
# quote or newline), JSON, URLs and every filesystem accept unchanged. A USTAR member name holds
# 100 bytes and the longest member suffix is ".mask.png", so a key has at most 91 characters.
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_KEY_LENGTH = 91


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a sample key, or None when it can (one rule for sources, shards and results)."""
    if not isinstance(key, str) or not key:
        return "empty key"
    if len(key) > MAX_KEY_LENGTH:
        return f"{len(key)} characters (at most {MAX_KEY_LENGTH})"
    if not KEY_PATTERN.fullmatch(key):
        return "only letters, digits, '_' and '-' (starting with a letter or digit)"
    return None


def is_valid_key(key: object) -> bool:
    """Keys join variants across shards and results; see :func:`key_problem`."""
    return key_problem(key) is None
