"""From a record and its image bytes to a framed image with its masks.

This is the one place where decoding, orientation, the frame and the
masks meet; the builder calls it once per source image and derives every
variant from the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.decode import MIN_SIDE, apply_orientation, decode_rgb
from pipeline.frame import Frame, box_area, clip_box, frame_for, frame_image, rasterize_boxes
from pipeline.masks import (
    SelectionFilters,
    check_selection,
    framed_boxes,
    grabcut_mask,
    oriented_boxes,
    segm_frame_mask,
)
from pipeline.records import RejectedInput, SourceRecord
from pipeline.rng import rng_for
from pipeline.variants import box_rectangle


@dataclass
class PreparedSample:
    """A source image in the canonical frame, ready for any variant."""

    record: SourceRecord
    image: np.ndarray  # (size, size, 3) uint8
    fg_mask: np.ndarray  # (size, size) bool
    box_mask: np.ndarray  # (size, size) bool: union of the class's boxes
    bbox: list[float]  # union rectangle of the framed, clipped boxes [x0, y0, x1, y1]
    frame: Frame
    mask_source: str
    selection_failures: list[str]  # reason codes from the NoS filters (empty = passes)


def check_boxes_in_image(record: SourceRecord, stored_size: tuple[int, int]) -> None:
    """Annotations must fit the decoded image; the annotation's stated size must match it."""
    w, h = stored_size
    if record.size is not None and tuple(record.size) != (w, h):
        raise RejectedInput("mask_size_mismatch", f"annotation says {record.size[0]}x{record.size[1]}, image is {w}x{h}")
    for b in record.boxes:
        if b.x0 < -1 or b.y0 < -1 or b.x1 > w + 1 or b.y1 > h + 1:
            raise RejectedInput("box_outside_image", f"box {b.as_list()} vs image {w}x{h}")


@dataclass(frozen=True)
class Geometry:
    """Where the annotations land in the frame, and which selection filters fail."""

    frame: Frame
    oriented_boxes: list
    framed: list[tuple[float, float, float, float]]
    failures: list[str]


def sample_geometry(
    record: SourceRecord,
    stored_size: tuple[int, int],
    orientation: int,
    *,
    size: int,
    resize: int,
    filters: SelectionFilters,
) -> Geometry:
    """Frame and box geometry from the image header alone: used to plan without decoding."""
    if min(stored_size) < MIN_SIDE:
        raise RejectedInput("image_too_small", f"{stored_size[0]}x{stored_size[1]} < {MIN_SIDE} px")
    check_boxes_in_image(record, stored_size)
    if not record.boxes:
        raise RejectedInput("no_box", "record has no box of its class")
    boxes = oriented_boxes(record.boxes, orientation, stored_size)
    w, h = stored_size
    oriented_size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    frame = frame_for(*oriented_size, resize=resize, size=size)
    framed = framed_boxes(boxes, frame)
    if not any(box_area(clip_box(b, size)) > 0 for b in framed):
        raise RejectedInput("box_cropped", "every box lies outside the centre crop")
    return Geometry(frame, boxes, framed, check_selection(framed, frame, filters))


def prepare_sample(
    record: SourceRecord,
    image_bytes: bytes,
    *,
    size: int = 224,
    resize: int = 256,
    mask_source: str = "box",
    filters: SelectionFilters | None = None,
    seed: int = 0,
    interpolation: str = "bilinear",
    mask_bytes: bytes | None = None,
) -> PreparedSample:
    """Decode, orient, frame, and build masks; raise RejectedInput with a reason on failure."""
    filters = filters or SelectionFilters()
    stored, orientation, stored_size, _ = decode_rgb(image_bytes, draft_min_side=resize)
    geo = sample_geometry(record, stored_size, orientation, size=size, resize=resize, filters=filters)
    frame = geo.frame
    image = frame_image(apply_orientation(stored, orientation), frame, interpolation)
    box_mask = rasterize_boxes([clip_box(b, size) for b in geo.framed], size)
    rect = box_rectangle(box_mask)
    if rect is None:
        raise RejectedInput("box_cropped", "every box lies outside the centre crop")
    bbox = [float(v) for v in rect]
    if mask_source == "box":
        fg = box_mask
    elif mask_source == "segm":
        if record.segmentation is None:
            raise RejectedInput("bad_segmentation", "no segmentation for this image (--mask segm)")
        fg = segm_frame_mask(record.segmentation, stored_size, orientation, frame, mask_bytes)
    elif mask_source == "grabcut":
        fg = grabcut_mask(image, box_mask, rng_for(seed, record.key, "grabcut"))
    else:
        raise ValueError(f"unknown mask source {mask_source!r}")
    if not fg.any():
        raise RejectedInput("empty_mask", "foreground mask is empty inside the frame")
    return PreparedSample(record, image, fg, box_mask, bbox, frame, mask_source, geo.failures)
