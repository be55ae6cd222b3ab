"""Foreground masks in frame coordinates: from boxes, segmentations, or GrabCut.

Also the Noise-or-Signal selection filters, which need the framed boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.decode import apply_orientation, orient_point_map
from pipeline.frame import Frame, box_area, clip_box, frame_box, frame_mask, rasterize_boxes
from pipeline.records import Box, RejectedInput, Segmentation

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
        if union.mean() > filters.max_box_fraction:
            reasons.append("box_too_large")
    return reasons


def segmentation_mask(seg: Segmentation, stored_size: tuple[int, int], png_bytes: bytes | None = None) -> np.ndarray:
    """Decode a segmentation to a boolean mask of the stored image size (h, w)."""
    w, h = stored_size
    if seg.kind == "png":
        if png_bytes is None:
            with open(seg.data, "rb") as fh:
                png_bytes = fh.read()
        import io

        try:
            m = Image.open(io.BytesIO(png_bytes))
            m.load()
        except Image.UnidentifiedImageError:  # PIL's message holds a memory address: keep details stable
            raise RejectedInput("bad_segmentation", "mask PNG: not a known image format") from None
        except Exception as exc:
            raise RejectedInput("bad_segmentation", f"mask PNG: {exc}") from None
        if m.size != (w, h):
            raise RejectedInput("mask_size_mismatch", f"mask {m.size[0]}x{m.size[1]} vs image {w}x{h}")
        arr = np.asarray(m)
        if arr.ndim == 3:
            arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
        return arr > 0
    from pycocotools import mask as mask_utils

    try:
        if seg.kind == "polygons":
            rles = mask_utils.frPyObjects([list(map(float, p)) for p in seg.data], h, w)
            rle = mask_utils.merge(rles)
        elif seg.kind == "rle":
            data = seg.data if isinstance(seg.data, list) else [seg.data]
            rles = []
            for r in data:
                rh, rw = r["size"]
                if (rw, rh) != (w, h):
                    raise RejectedInput("mask_size_mismatch", f"RLE {rw}x{rh} vs image {w}x{h}")
                rles.append(mask_utils.frPyObjects(r, rh, rw) if isinstance(r["counts"], list) else r)
            rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
        else:
            raise RejectedInput("bad_segmentation", f"unknown kind {seg.kind}")
        mask = mask_utils.decode(rle)
    except RejectedInput:
        raise
    except Exception as exc:
        raise RejectedInput("bad_segmentation", f"{type(exc).__name__}: {exc}") from None
    if mask.shape[:2] != (h, w):
        raise RejectedInput("mask_size_mismatch", f"mask {mask.shape[1]}x{mask.shape[0]} vs image {w}x{h}")
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
