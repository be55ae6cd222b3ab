"""The nine variants: pure functions (arrays in, arrays out, randomness passed in) and one table of them.

All images are RGB uint8 (H, W, 3) in the canonical frame; masks are boolean
(H, W). :data:`VARIANT_SPECS` is the one place that says how each variant
renders, what it needs (a fill, a background partner and from which pool, a
texture, a usable background of its own) and which group of measurements it
serves; the planner, the builder, the metrics, the docs and the CLIs all read
it, so adding a variant is its function plus one row. Nothing here reads
files or touches a global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.records import RejectedInput
from pipeline.rng import rng_for

FILLS = ("black", "white", "gray", "mean", "noise")
# What each group of variants measures (the metrics read a variant's group, never a list of ids).
VARIANT_GROUPS = {
    "original": "the framed source, the clean reference",
    "novel_background": "the foreground on a background it was not photographed with (Background Check invariance)",
    "background_only": "no foreground left (Background Check influence; Noise or Signal Only-BG)",
    "class_background": "the foreground on another image's background chosen by class (Noise or Signal)",
}
# Background partner pools of the mixed variants.
PARTNER_POOLS = {
    "same": "an image of the same class",
    "any": "an image of any class (never itself)",
    "next": "an image of the next class among those present ((y + 1) mod C)",
}

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


def _tile(dst: np.ndarray, strip: np.ndarray, from_end: bool) -> None:
    """Fill ``dst`` along axis 1 with ``strip`` repeated, anchored at its first (or last) column.

    Doubling block copies (log2 of the repeats) instead of a gather of every
    column: the same pixels, about five times faster on a frame.
    """
    if from_end:
        dst, strip = dst[:, ::-1], strip[:, ::-1]
    n = dst.shape[1]
    filled = min(strip.shape[1], n)
    dst[:, :filled] = strip[:, :filled]
    while filled < n:  # filled stays a multiple of the strip's width: each copy continues the period
        step = min(filled, n - filled)
        dst[:, filled : filled + step] = dst[:, :step]
        filled += step


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
    box = out[y0:y1, x0:x1]
    # left strip: continue it rightwards from the box's left edge; right strip: leftwards from its right edge
    if side == "left":
        _tile(box, image[y0:y1, :x0], from_end=False)
    elif side == "right":
        _tile(box, image[y0:y1, x1:], from_end=True)
    elif side == "top":
        _tile(box.swapaxes(0, 1), image[:y0, x0:x1].swapaxes(0, 1), from_end=False)
    else:
        _tile(box.swapaxes(0, 1), image[y1:, x0:x1].swapaxes(0, 1), from_end=True)
    return out


def composite(fg_image: np.ndarray, fg_mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Foreground pixels over another background (mixed_* and texture variants)."""
    return _select(fg_mask, fg_image, background)


def fg_area(fg_mask: np.ndarray) -> float:
    """Fraction of the frame covered by the foreground mask."""
    return float(fg_mask.mean())


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class VariantInputs:
    """What a variant may draw on: the framed image, its masks, and what the planner gave it."""

    image: np.ndarray
    fg_mask: np.ndarray
    box_mask: np.ndarray
    fill: np.ndarray | None = None  # the fill image (variants with ``fill``)
    background: np.ndarray | None = None  # a partner's only_bg_t, or a framed texture


@dataclass(frozen=True)
class VariantSpec:
    """One variant: how it renders, what it needs, what it measures."""

    id: str
    render: Callable[[VariantInputs], np.ndarray]
    group: str
    summary: str
    paper: str
    fill: bool = False  # uses --fill
    partner: str | None = None  # draws a background partner from this pool (PARTNER_POOLS)
    texture: bool = False  # draws a texture
    own_background: bool = False  # needs a usable background of its own (box not too large, a strip to tile)

    @property
    def needs_background(self) -> bool:
        return self.partner is not None or self.texture


def _need(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"this variant needs {what}")
    return value


VARIANT_SPECS: dict[str, VariantSpec] = {
    spec.id: spec
    for spec in (
        VariantSpec("original", lambda x: x.image, "original", "the framed source, unmodified", "both"),
        VariantSpec("only_fg", lambda x: only_fg(x.image, x.fg_mask, _need(x.fill, "a fill")), "novel_background",
                    "the foreground mask kept, everything else the fill (black = NoS, white = Background Check)",
                    "both", fill=True),
        VariantSpec("only_bg_b", lambda x: only_bg_b(x.image, x.box_mask, _need(x.fill, "a fill")),
                    "background_only", "the box filled, the background kept", "both", fill=True, own_background=True),
        VariantSpec("only_bg_t", lambda x: only_bg_t(x.image, x.box_mask), "background_only",
                    "the box covered by tiling the largest background strip outside it", "Noise or Signal",
                    own_background=True),
        VariantSpec("no_fg", lambda x: no_fg(x.image, x.fg_mask, _need(x.fill, "a fill")), "background_only",
                    "the foreground mask filled (the silhouette stays), the background kept", "Noise or Signal",
                    fill=True, own_background=True),
        VariantSpec("mixed_same", lambda x: composite(x.image, x.fg_mask, _need(x.background, "a partner")),
                    "class_background", "the foreground over the only_bg_t background of another image of the same class",
                    "Noise or Signal", partner="same"),
        VariantSpec("mixed_rand", lambda x: composite(x.image, x.fg_mask, _need(x.background, "a partner")),
                    "novel_background", "the foreground over the only_bg_t background of a random image of any class",
                    "both", partner="any"),
        VariantSpec("mixed_next", lambda x: composite(x.image, x.fg_mask, _need(x.background, "a partner")),
                    "class_background", "the foreground over the only_bg_t background of an image of the next class",
                    "Noise or Signal", partner="next"),
        VariantSpec("texture", lambda x: composite(x.image, x.fg_mask, _need(x.background, "a texture")),
                    "novel_background", "the foreground over a randomly chosen texture", "Background Check",
                    texture=True),
    )
}
VARIANTS: tuple[str, ...] = tuple(VARIANT_SPECS)


def variants_in_group(group: str) -> tuple[str, ...]:
    if group not in VARIANT_GROUPS:
        raise ValueError(f"unknown variant group {group!r}")
    return tuple(v for v, spec in VARIANT_SPECS.items() if spec.group == group)


def render_variant(
    variant: str,
    image: np.ndarray,
    fg_mask: np.ndarray,
    box_mask: np.ndarray,
    *,
    fill: str,
    seed: int,
    key: str,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """One variant's pixels: the fill is drawn from ``(seed, key, "fill:<variant>")``, as every builder does."""
    spec = VARIANT_SPECS[variant]
    # only the noise fill draws: seeding a generator for a constant fill would cost as much as the fill itself
    rng = rng_for(seed, key, f"fill:{variant}") if spec.fill and fill == "noise" else None
    fill_image = make_fill(fill, image, rng) if spec.fill else None
    return spec.render(VariantInputs(image, fg_mask, box_mask, fill_image, background))
