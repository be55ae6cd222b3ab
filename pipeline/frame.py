"""The canonical frame: resize the shorter side to ``resize``, centre-crop ``size``.

Compositing needs one pixel grid, so image, boxes and mask go through the
same transform. The arithmetic copies torchvision's ``Resize(int)`` +
``CenterCrop`` so that, for models evaluated at resize-256/crop-224, the frame
is exactly their standard protocol.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipeline.records import Box

# The resampling a build may use for the frame (nearest is for masks only).
FRAME_INTERPOLATIONS = ("bilinear", "bicubic", "lanczos")
_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Frame:
    """Where a source of (width, height) lands in the size x size frame."""

    source_size: tuple[int, int]  # oriented (w, h)
    resized: tuple[int, int]  # (w, h) after the shorter-side resize
    offset: tuple[int, int]  # (left, top) of the crop in resized pixels
    size: int
    resize: int

    @property
    def scale(self) -> tuple[float, float]:
        return self.resized[0] / self.source_size[0], self.resized[1] / self.source_size[1]

    def to_json(self) -> dict:
        row = asdict(self)
        row["scale"] = [round(s, 8) for s in self.scale]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}


def frame_for(width: int, height: int, resize: int = 256, size: int = 224) -> Frame:
    """torchvision Resize(resize) then CenterCrop(size) for a (width, height) source."""
    if size > resize:
        raise ValueError(f"crop size {size} larger than resize {resize}")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return Frame((width, height), (new_w, new_h), (left, top), size, resize)


def frame_image(image: np.ndarray, frame: Frame, interpolation: str = "bilinear") -> np.ndarray:
    """Resize (antialiased, PIL) and centre-crop an RGB uint8 array into the frame.

    ``image`` may be a reduced-size decode of the source (JPEG draft); it is
    resized straight to the frame's resized size, so geometry is unaffected.
    """
    pil = Image.fromarray(image)
    left, top = frame.offset
    box = (left, top, left + frame.size, top + frame.size)
    if pil.size == frame.resized:
        out = pil.crop(box)
    else:
        # Resize only the region that survives the crop: same pixels, less work.
        sx = pil.size[0] / frame.resized[0]
        sy = pil.size[1] / frame.resized[1]
        src_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out = pil.resize((frame.size, frame.size), _PIL_FILTERS[interpolation], box=src_box)
    return np.asarray(out, dtype=np.uint8)


def frame_mask(mask: np.ndarray, frame: Frame) -> np.ndarray:
    """Resize a boolean source mask into the frame (nearest, so it stays binary)."""
    pil = Image.fromarray(mask.astype(np.uint8) * 255)
    left, top = frame.offset
    sx = pil.size[0] / frame.resized[0]
    sy = pil.size[1] / frame.resized[1]
    src_box = (left * sx, top * sy, (left + frame.size) * sx, (top + frame.size) * sy)
    out = pil.resize((frame.size, frame.size), Image.Resampling.NEAREST, box=src_box)
    return np.asarray(out) >= 128


def frame_box(box: Box, frame: Frame) -> tuple[float, float, float, float]:
    """A source box in frame coordinates, unclipped (may extend past the frame)."""
    sx, sy = frame.scale
    left, top = frame.offset
    return (box.x0 * sx - left, box.y0 * sy - top, box.x1 * sx - left, box.y1 * sy - top)


def clip_box(box: tuple[float, float, float, float], size: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), size), min(max(y0, 0.0), size), min(max(x1, 0.0), size), min(max(y1, 0.0), size))


def box_area(box: tuple[float, float, float, float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def rasterize_boxes(boxes: list[tuple[float, float, float, float]], size: int) -> np.ndarray:
    """Union of boxes as a boolean (size, size) mask; a pixel is in when its centre is."""
    mask = np.zeros((size, size), dtype=bool)

    def edge(v: float) -> int:
        # plain-float arithmetic: numpy scalar calls here cost more than the whole fill
        return min(max(math.ceil(float(v) - 0.5), 0), size)

    for x0, y0, x1, y1 in boxes:
        mask[edge(y0) : edge(y1), edge(x0) : edge(x1)] = True
    return mask
