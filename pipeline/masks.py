"""Foreground masks in frame coordinates: from boxes, segmentations, or GrabCut.

Also the Noise-or-Signal selection filters, which need the framed boxes, and
the one set of checks on segmentation geometry (polygons, RLE, mask PNGs)
that the source readers apply when they read an annotation and the builder
applies again before decoding it (a record may come from a hand-written
reader). The checks come before any pycocotools call: its C code hangs or
crashes on a polygon coordinate of 2e9 and allocates whatever size an RLE
declares.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.decode import MASK_FORMATS, apply_orientation, open_image, orient_point_map, stable_message
from pipeline.files import read_regular
from pipeline.frame import Frame, box_area, clip_box, frame_box, frame_mask, rasterize_boxes
from pipeline.records import Box, RejectedInput, Segmentation

# Annotations may overshoot the image by this many pixels (rounding in the original annotation
# tools); boxes are clipped, polygons rasterise clipped, anything further is rejected.
TOLERANCE_PX = 1.0

# ImageNet-S mask PNGs store a class id per pixel as R + 256 * G: 0 is "other" (background) and
# 1000 is "ignored" (an unsure boundary: neither foreground nor background).
IMAGENET_S_OTHER = 0
IMAGENET_S_IGNORED = 1000


# Where a foreground mask comes from: the class's boxes, a segmentation, or GrabCut seeded by the boxes.
MASK_SOURCES = ("box", "segm", "grabcut")


@dataclass(frozen=True)
class SelectionFilters:
    """Noise-or-Signal selection rules; each can be switched off (None/False)."""

    exactly_one_box: bool = False
    max_box_fraction: float | None = 0.9  # applied to background-only variants only
    max_box_cropped: float | None = 0.5  # fraction of a box's area the centre crop may cut


def oriented_boxes(boxes: tuple[Box, ...], orientation: int, stored_size: tuple[int, int]) -> list[Box]:
    """Boxes from stored-pixel to EXIF-oriented coordinates."""
    if orientation == 1:
        return list(boxes)
    w, h = stored_size
    to = orient_point_map(orientation, w, h)
    out = []
    for b in boxes:
        xa, ya = to(b.x0, b.y0)
        xb, yb = to(b.x1, b.y1)
        out.append(Box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb), b.wnid))
    return out


def framed_boxes(boxes: list[Box], frame: Frame) -> list[tuple[float, float, float, float]]:
    return [frame_box(b, frame) for b in boxes]


def check_selection(
    framed: list[tuple[float, float, float, float]], frame: Frame, filters: SelectionFilters
) -> list[str]:
    """Reason codes this sample fails (empty = passes); box_too_large only matters for bg variants."""
    reasons: list[str] = []
    if filters.exactly_one_box and len(framed) != 1:
        reasons.append("multiple_boxes")
    if filters.max_box_cropped is not None:
        for b in framed:
            full = box_area(b)
            kept = box_area(clip_box(b, frame.size))
            if full > 0 and (full - kept) / full >= filters.max_box_cropped:
                reasons.append("box_cropped")
                break
    if filters.max_box_fraction is not None:
        union = rasterize_boxes([clip_box(b, frame.size) for b in framed], frame.size)
        # the covered fraction as a count over the size (what mean() gives, at a fraction of its cost:
        # planning checks every input)
        if np.count_nonzero(union) / union.size > filters.max_box_fraction:
            reasons.append("box_too_large")
    return reasons


def whole_number(value: object) -> int | None:
    """``value`` as an int if it is a whole number (an int, or a finite integral float; never a bool)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


@dataclass(frozen=True)
class PngMask:
    """A mask PNG (``open()`` and ``os.fspath`` take it as its path) and which ImageNet-S ids are foreground.

    ``foreground_ids`` are the class ids of the image's own class, known when
    a category map was given; None means any class but other and ignored.
    """

    path: str
    foreground_ids: tuple[int, ...] | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def mask_foreground(pixels: np.ndarray, foreground_ids: Collection[int] | None = None) -> np.ndarray:
    """The one reading of a mask PNG's pixels as a boolean foreground (h, w).

    Single-channel masks (modes 1, L, P, I;16, and LA's first channel):
    non-zero is foreground. Colour masks (RGB, RGBA) are ImageNet-S class ids
    ``R + 256 * G``: foreground is the ids in ``foreground_ids`` or, without
    them, every id but 0 (other); 1000 (ignored) never is. An id above 1000
    is no ImageNet-S mask (a binary mask saved as colour, 255 + 256 * 255).
    """
    if pixels.ndim == 2:
        return pixels != 0
    if pixels.shape[2] < 3:
        return pixels[..., 0] != 0
    ids = pixels[..., 0].astype(np.uint16) | (pixels[..., 1].astype(np.uint16) << 8)
    top = int(ids.max()) if ids.size else 0
    if top > IMAGENET_S_IGNORED:
        raise RejectedInput(
            "bad_segmentation",
            f"colour mask holds class id {top} (R + 256*G) above {IMAGENET_S_IGNORED}: colour masks are read as "
            "ImageNet-S class ids; save binary masks as single-channel PNGs",
        )
    if foreground_ids is None:
        return (ids != IMAGENET_S_OTHER) & (ids != IMAGENET_S_IGNORED)
    wanted = [i for i in foreground_ids if i not in (IMAGENET_S_OTHER, IMAGENET_S_IGNORED)]
    return np.isin(ids, np.asarray(wanted, dtype=np.uint16))


def decode_mask_png(data: bytes, foreground_ids: Collection[int] | None = None) -> np.ndarray:
    """Mask PNG bytes -> boolean foreground (h, w) by :func:`mask_foreground`; RejectedInput if unreadable."""
    try:
        img = open_image(data, formats=MASK_FORMATS)
        img.load()
        pixels = np.asarray(img)
    except RejectedInput as exc:
        reason = "decompression_bomb" if exc.reason == "decompression_bomb" else "bad_segmentation"
        raise RejectedInput(reason, f"mask PNG: {exc.detail}") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise RejectedInput("bad_segmentation", f"mask PNG: {stable_message(exc)}") from None
    return mask_foreground(pixels, foreground_ids)


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


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checked_polygons(polygons: Any, width: int, height: int) -> list[list[float]]:
    """COCO polygons as float lists, every point finite and inside the image (+ TOLERANCE_PX).

    Raises RejectedInput(``bad_segmentation``) otherwise, before pycocotools sees them.
    """
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise RejectedInput("bad_segmentation", "polygons must be a non-empty list")
    out: list[list[float]] = []
    for i, poly in enumerate(polygons):
        if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
            raise RejectedInput("bad_segmentation", "a polygon needs an even number (>= 6) of coordinates")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            raise RejectedInput("bad_segmentation", f"polygon {i} has a coordinate that is not a number")
        try:
            coords = [float(v) for v in poly]
        except OverflowError:
            raise RejectedInput("bad_segmentation", f"polygon {i} has a coordinate beyond any image") from None
        if not all(math.isfinite(v) for v in coords):
            raise RejectedInput("bad_segmentation", f"polygon {i} has a non-finite coordinate")
        xs, ys = coords[0::2], coords[1::2]
        tol = TOLERANCE_PX
        if min(xs) < -tol or min(ys) < -tol or max(xs) > width + tol or max(ys) > height + tol:
            raise RejectedInput(
                "bad_segmentation",
                f"polygon {i} spans x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}: "
                f"outside the {width}x{height} image",
            )
        out.append(coords)
    return out


def checked_rle(rle: Any, width: int, height: int) -> dict:
    """A COCO RLE (counts compressed or a list) checked against the image: ``{"size": [h, w], "counts": ...}``.

    Its size must be the image's (``mask_size_mismatch``) and its runs must be
    non-negative and cover exactly width * height pixels (``bad_segmentation``),
    all checked in Python: pycocotools decodes whatever size an RLE claims.
    Pass the result through :func:`compressed_rle` for pycocotools.
    """
    if not isinstance(rle, dict):
        raise RejectedInput("bad_segmentation", f"RLE of type {type(rle).__name__}")
    size, counts = rle.get("size"), rle.get("counts")
    dims = [whole_number(v) for v in size] if isinstance(size, (list, tuple)) and len(size) == 2 else [None]
    if any(v is None or v <= 0 for v in dims):
        raise RejectedInput("bad_segmentation", f"RLE size {_short(size)} is not [height, width]")
    rle_h, rle_w = dims
    if (rle_h, rle_w) != (height, width):
        raise RejectedInput("mask_size_mismatch", f"RLE is {rle_w}x{rle_h}, image {width}x{height}")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise RejectedInput("bad_segmentation", "RLE counts must be non-negative integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = rle_counts_from_string(counts)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RejectedInput("bad_segmentation", f"compressed RLE: {exc}") from None
        if any(r < 0 for r in runs):
            raise RejectedInput("bad_segmentation", "compressed RLE has a negative run")
    else:
        raise RejectedInput("bad_segmentation", f"RLE counts of type {type(counts).__name__}")
    if sum(runs) != width * height:
        raise RejectedInput("bad_segmentation", f"RLE covers {sum(runs)} pixels, image has {width * height}")
    return {"size": [height, width], "counts": counts}


def compressed_rle(rle: dict) -> dict:
    """A :func:`checked_rle` result in the compressed form pycocotools' merge/area/decode take."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        from pycocotools import mask as mask_utils

        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": counts if isinstance(counts, bytes) else counts.encode("ascii")}


def segmentation_mask(seg: Segmentation, stored_size: tuple[int, int], png_bytes: bytes | None = None) -> np.ndarray:
    """Decode a segmentation to a boolean mask of the stored image size (h, w).

    Geometry is checked first (:func:`checked_polygons`, :func:`checked_rle`),
    so nothing out of range reaches pycocotools; a PNG is read by
    :func:`decode_mask_png`, the same rule the ``mask-dir`` reader used.
    """
    w, h = stored_size
    if seg.kind == "png":
        if png_bytes is None:
            try:
                png_bytes = read_regular(seg.data)
            except OSError as exc:
                raise RejectedInput("bad_segmentation", f"mask PNG: {exc.strerror or 'not a regular file'}") from None
        mask = decode_mask_png(png_bytes, getattr(seg.data, "foreground_ids", None))
        if mask.shape != (h, w):
            raise RejectedInput("mask_size_mismatch", f"mask {mask.shape[1]}x{mask.shape[0]} vs image {w}x{h}")
        return mask
    if seg.kind == "polygons":
        polygons = checked_polygons(seg.data, w, h)
        rles: Sequence[Any] = []
    elif seg.kind == "rle":
        rles = [checked_rle(r, w, h) for r in (seg.data if isinstance(seg.data, list) else [seg.data])]
    else:
        raise RejectedInput("bad_segmentation", f"unknown kind {seg.kind}")
    from pycocotools import mask as mask_utils

    try:
        if seg.kind == "polygons":
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        else:
            compressed = [compressed_rle(r) for r in rles]
            rle = mask_utils.merge(compressed) if len(compressed) > 1 else compressed[0]
        mask = mask_utils.decode(rle)
    except Exception as exc:
        raise RejectedInput("bad_segmentation", stable_message(exc)) from None
    return mask.astype(bool)


def segm_frame_mask(
    seg: Segmentation, stored_size: tuple[int, int], orientation: int, frame: Frame, png_bytes: bytes | None = None
) -> np.ndarray:
    """Segmentation -> oriented -> framed boolean mask (size, size)."""
    mask = segmentation_mask(seg, stored_size, png_bytes)
    return frame_mask(apply_orientation(mask, orientation), frame)


def grabcut_mask(image: np.ndarray, box_mask: np.ndarray, rng: np.random.Generator, iterations: int = 5) -> np.ndarray:
    """GrabCut foreground seeded by the box (inside = probable foreground, outside = background).

    OpenCV's GrabCut draws from its own RNG; it is seeded from ``rng`` so the
    result depends only on (seed, key).
    """
    try:
        import cv2
    except ImportError:
        raise RuntimeError(
            "--mask grabcut needs OpenCV: pip install 'bgcheck[grabcut]' (opencv-python-headless)"
        ) from None
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    cv2.setNumThreads(1)
    gc = np.where(box_mask, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    cv2.grabCut(bgr, gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if not fg.any():
        raise RejectedInput("grabcut_failed", "empty foreground")
    return fg
