"""The baseline the papers' own scripts represent: one image at a time, floats, one file each.

Per output image: PIL opens the full-size source (no reduced-size decode),
resizes the whole image and crops the frame, converts to a float array in
[0, 1], builds the variant with float arithmetic (``x * m + b * (1 - m)``),
and saves one JPEG file. Mixed variants open and frame their partner the
same way. Output size and codec settings match the builder (224x224 frame,
JPEG quality 95, 4:2:0), and partners, fills and textures come from the same
plan, so the work is the same; only the way it is done differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from builders.config import BuildConfig
from builders.plan import Assignment
from pipeline import variants as V
from pipeline.frame import clip_box, frame_box, frame_for, rasterize_boxes
from pipeline.masks import oriented_boxes
from pipeline.records import SourceRecord
from pipeline.rng import rng_for
from pipeline.textures import procedural_texture

_FILLS = {"black": 0.0, "white": 1.0, "gray": 128 / 255}


def load_framed(record: SourceRecord, config: BuildConfig) -> tuple[np.ndarray, np.ndarray]:
    """Full decode, whole-image resize, centre crop -> (float image in [0, 1], float box mask)."""
    img = Image.open(record.image)
    orientation = int(img.getexif().get(0x0112, 1) or 1)
    stored_size = img.size
    img = ImageOps.exif_transpose(img.convert("RGB"))
    frame = frame_for(*img.size, resize=config.resize, size=config.size)
    left, top = frame.offset
    img = img.resize(frame.resized, Image.Resampling.BILINEAR).crop(
        (left, top, left + config.size, top + config.size)
    )
    x = np.asarray(img, dtype=np.float32) / 255.0
    boxes = oriented_boxes(record.boxes, orientation, stored_size)
    mask = rasterize_boxes([clip_box(frame_box(b, frame), config.size) for b in boxes], config.size)
    return x, mask.astype(np.float32)[:, :, None]


def naive_image(
    record: SourceRecord,
    variant: str,
    config: BuildConfig,
    assignment: Assignment | None,
    partner: SourceRecord | None,
) -> np.ndarray:
    """One variant as float arithmetic on full decodes; returns uint8 pixels."""
    x, m = load_framed(record, config)
    if variant == "original":
        out = x
    elif variant in ("only_fg", "only_bg_b", "no_fg"):
        if config.fill == "noise":
            fill = rng_for(config.seed, record.key, f"fill:{variant}").random(x.shape, dtype=np.float32)
        elif config.fill == "mean":
            fill = np.broadcast_to(x.reshape(-1, 3).mean(axis=0), x.shape)
        else:
            fill = np.full(x.shape, _FILLS[config.fill], dtype=np.float32)
        out = x * m + fill * (1 - m) if variant == "only_fg" else x * (1 - m) + fill * m
    elif variant == "only_bg_t":
        out = V.only_bg_t(x, m[:, :, 0] > 0.5)
    elif variant in ("mixed_same", "mixed_rand", "mixed_next"):
        px, pm = load_framed(partner, config)
        out = x * m + V.only_bg_t(px, pm[:, :, 0] > 0.5) * (1 - m)
    elif variant == "texture":
        index = int(assignment.texture.split(":")[1])
        tex = procedural_texture(index, config.size).astype(np.float32) / 255.0
        out = x * m + tex * (1 - m)
    else:
        raise ValueError(variant)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def naive_build(
    records: list[SourceRecord],
    variant: str,
    config: BuildConfig,
    assignments: dict[str, Assignment],
    partners: dict[str, SourceRecord],
    out_dir: str | Path,
) -> int:
    """Write ``<out_dir>/<key>.jpg`` per record; returns the number written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        a = assignments.get(record.key)
        partner = partners.get(a.bg_key) if a is not None and a.bg_key else None
        pixels = naive_image(record, variant, config, a, partner)
        Image.fromarray(pixels).save(out_dir / f"{record.key}.jpg", format="JPEG", quality=config.quality,
                                     subsampling=2)
    return len(records)
