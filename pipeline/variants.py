"""The nine variants as pure functions: arrays in, arrays out, randomness passed in.

All images are RGB uint8 (H, W, 3) in the canonical frame; masks are boolean
(H, W). Nothing here reads files or touches a global RNG, so the module is
importable and testable without any CLI.
"""

from __future__ import annotations

import numpy as np

from pipeline.records import RejectedInput
from pipeline.shard_format import FILLS, VARIANTS

__all__ = [
    "VARIANTS",
    "FILLS",
    "make_fill",
    "only_fg",
    "only_bg_b",
    "no_fg",
    "only_bg_t",
    "box_rectangle",
    "composite",
    "fg_area",
]

_CONSTANT_FILLS = {"black": 0, "white": 255, "gray": 128}


def make_fill(fill: str, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A fill image shaped like ``image``.

    black (Noise or Signal), white (Background Check), gray (128), mean (the
    image's own mean colour) or noise (uniform per-pixel RGB from ``rng``).
    """
    if fill in _CONSTANT_FILLS:
        return np.full(image.shape, _CONSTANT_FILLS[fill], dtype=np.uint8)
    if fill == "mean":
        colour = np.rint(image.reshape(-1, image.shape[-1]).mean(axis=0)).astype(np.uint8)
        return np.broadcast_to(colour, image.shape).copy()
    if fill == "noise":
        if rng is None:
            raise ValueError("fill 'noise' needs an rng")
        return rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")


def _select(mask: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """``inside`` where ``mask``, else ``outside``: uint8 throughout, no float round trip."""
    if inside.shape == outside.shape and inside.dtype == outside.dtype and inside.ndim == 3:
        rect = box_rectangle(mask)
        if rect is not None:
            x0, y0, x1, y1 = rect
            if int(np.count_nonzero(mask)) == (x1 - x0) * (y1 - y0):
                # A rectangular mask (every box mask): two block copies, about 10x faster than a select.
                out = np.array(outside, copy=True, order="C")
                out[y0:y1, x0:x1] = inside[y0:y1, x0:x1]
                return out
    return np.where(mask[:, :, None], inside, outside)


def only_fg(image: np.ndarray, fg_mask: np.ndarray, fill_image: np.ndarray) -> np.ndarray:
    """Foreground kept, everything outside the mask replaced by the fill."""
    return _select(fg_mask, image, fill_image)


def no_fg(image: np.ndarray, fg_mask: np.ndarray, fill_image: np.ndarray) -> np.ndarray:
    """Mask region filled (the silhouette stays visible), background kept (NoS ``No-FG``)."""
    return _select(fg_mask, fill_image, image)


def only_bg_b(image: np.ndarray, box_mask: np.ndarray, fill_image: np.ndarray) -> np.ndarray:
    """Box region filled, background kept (NoS ``Only-BG-B``; Background Check's background-only)."""
    return _select(box_mask, fill_image, image)


def box_rectangle(box_mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding rectangle (x0, y0, x1, y1), half-open, of a mask; None if empty."""
    rows = np.flatnonzero(box_mask.any(axis=1))
    cols = np.flatnonzero(box_mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def only_bg_t(image: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
    """NoS ``Only-BG-T``: the box is covered by tiling the largest background strip outside it.

    The four candidate strips run the full frame: left and right of the box
    (full height) and above and below it (full width). The largest by area is
    repeated across the box, starting at the box edge, so the tiles continue
    the strip the way it sits next to the box. Ties go left, right, top, bottom.
    """
    rect = box_rectangle(box_mask)
    h, w = box_mask.shape
    if rect is None:
        return image.copy()
    x0, y0, x1, y1 = rect
    strips = [("left", x0 * h), ("right", (w - x1) * h), ("top", y0 * w), ("bottom", (h - y1) * w)]
    side, area = max(strips, key=lambda s: s[1])  # max keeps the first of equals
    if area == 0:
        raise RejectedInput("no_background", "box covers the whole frame")
    out = image.copy()
    if side in ("left", "right"):
        strip = image[:, :x0] if side == "left" else image[:, x1:]
        sw = strip.shape[1]
        cols = np.arange(x0, x1)
        # left strip: continue it rightwards; right strip: continue it leftwards
        src = (cols - x0) % sw if side == "left" else (sw - 1) - ((x1 - 1 - cols) % sw)
        out[y0:y1, x0:x1] = strip[y0:y1][:, src]
    else:
        strip = image[:y0] if side == "top" else image[y1:]
        sh = strip.shape[0]
        rows = np.arange(y0, y1)
        src = (rows - y0) % sh if side == "top" else (sh - 1) - ((y1 - 1 - rows) % sh)
        out[y0:y1, x0:x1] = strip[src][:, x0:x1]
    return out


def composite(fg_image: np.ndarray, fg_mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Foreground pixels over another background (mixed_* and texture variants)."""
    return _select(fg_mask, fg_image, background)


def fg_area(fg_mask: np.ndarray) -> float:
    """Fraction of the frame covered by the foreground mask."""
    return float(fg_mask.mean())
