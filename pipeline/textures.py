"""Texture backgrounds for the ``texture`` variant (Background Check).

With ``--textures DIR`` any folder of images (for example DTD) is used; without
one, a built-in set of procedural textures, generated from fixed seeds so every
machine draws the same pixels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from pipeline.frame import frame_for, frame_image

N_PROCEDURAL = 16
_KINDS = ("stripes", "checker", "blobs", "waves")


def procedural_texture(index: int, size: int) -> np.ndarray:
    """Texture ``index`` (0..N_PROCEDURAL-1) as an RGB uint8 (size, size, 3) array.

    Four families (stripes, checkerboard, smooth blobs, interference waves) in
    four colour schemes; fine detail so the texture carries no object shape.
    """
    rng = np.random.Generator(np.random.PCG64(1_000_003 + index))
    kind = _KINDS[index % len(_KINDS)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(8, 24)
        field = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    elif kind == "checker":
        n = int(rng.integers(6, 16))
        field = ((np.floor(xx * n) + np.floor(yy * n)) % 2) * 2 - 1.0
    elif kind == "blobs":
        coarse = rng.standard_normal((9, 9)).astype(np.float32)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        field = np.asarray(img)
        field = field / (np.abs(field).max() + 1e-6)
    else:
        field = np.zeros_like(xx)
        for _ in range(3):
            fx, fy = rng.uniform(3, 12, size=2)
            field += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
        field /= 3
    grain = rng.standard_normal((size, size)).astype(np.float32) * 0.15
    t = np.clip((field + grain + 1) / 2, 0, 1)[..., None]
    c0 = rng.uniform(0, 255, size=3).astype(np.float32)
    c1 = rng.uniform(0, 255, size=3).astype(np.float32)
    return np.clip(np.rint(c0 * (1 - t) + c1 * t), 0, 255).astype(np.uint8)


def texture_frame(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A texture image into the frame: shorter side to ``size``, a random crop drawn from ``rng``.

    Only the crop's region is resampled, so a texture of any shape (a 1 x 20000
    strip would be 224 x 4.5 M pixels resized whole) costs one frame of memory.
    """
    h, w = texture.shape[:2]
    frame = frame_for(w, h, resize=size, size=size)
    rw, rh = frame.resized
    left = int(rng.integers(0, rw - size + 1))
    top = int(rng.integers(0, rh - size + 1))
    if frame.resized == (w, h):
        return np.ascontiguousarray(texture[top : top + size, left : left + size])
    return frame_image(texture, replace(frame, offset=(left, top)))
