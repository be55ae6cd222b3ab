"""The builder's fast paths give the pixels of their plain definitions, and do the work once.

``only_bg_t`` tiles by block copies: here it is checked against the
definition (a gather of every column or row, as NoS describe it) on random
frames and boxes. Procedural textures are generated once per process, not
once per chunk, and a constant fill seeds no generator.
"""

from __future__ import annotations

import numpy as np
import pytest

import builders.shards
import pipeline.variants as V
from builders.config import BuildConfig
from builders.shards import ChunkSources, shared_procedural_texture
from pipeline.records import RejectedInput
from pipeline.textures import N_PROCEDURAL, procedural_texture


def only_bg_t_by_definition(image: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
    """The largest strip outside the box's rectangle repeated into it, pixel by pixel from the box edge."""
    rect = V.box_rectangle(box_mask)
    if rect is None:
        return image.copy()
    x0, y0, x1, y1 = rect
    h, w = box_mask.shape
    strips = [("left", x0 * h), ("right", (w - x1) * h), ("top", y0 * w), ("bottom", (h - y1) * w)]
    side, area = max(strips, key=lambda s: s[1])
    if area == 0:
        raise RejectedInput("no_background", "box covers the whole frame")
    out = image.copy()
    for y in range(y0, y1):
        for x in range(x0, x1):
            if side == "left":
                out[y, x] = image[y, (x - x0) % x0]
            elif side == "right":
                sw = w - x1
                out[y, x] = image[y, x1 + (sw - 1) - ((x1 - 1 - x) % sw)]
            elif side == "top":
                out[y, x] = image[(y - y0) % y0, x]
            else:
                sh = h - y1
                out[y, x] = image[y1 + (sh - 1) - ((y1 - 1 - y) % sh), x]
    return out


def test_only_bg_t_tiles_exactly_as_defined():
    rng = np.random.default_rng(0)
    sides = set()
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 3))):  # one box, or a union of two
            xa, xb = sorted(int(v) for v in rng.integers(0, w + 1, 2))
            ya, yb = sorted(int(v) for v in rng.integers(0, h + 1, 2))
            mask[ya:yb, xa:xb] = True
        try:
            want = only_bg_t_by_definition(image, mask)
        except RejectedInput:
            with pytest.raises(RejectedInput):
                V.only_bg_t(image, mask)
            continue
        got = V.only_bg_t(image, mask)
        assert got.dtype == want.dtype and np.array_equal(got, want), (h, w, V.box_rectangle(mask))
        rect = V.box_rectangle(mask)
        if rect is not None:
            x0, y0, x1, y1 = rect
            sides.add(max([("l", x0 * h), ("r", (w - x1) * h), ("t", y0 * w), ("b", (h - y1) * w)],
                          key=lambda s: s[1])[0])
    assert sides == {"l", "r", "t", "b"}  # every strip was exercised


def test_procedural_textures_are_generated_once_per_process(monkeypatch):
    shared_procedural_texture.cache_clear()
    calls = []
    real = builders.shards.procedural_texture
    monkeypatch.setattr(builders.shards, "procedural_texture", lambda i, size: calls.append(i) or real(i, size))
    config = BuildConfig(size=32, resize=40)
    for chunk in range(3):  # a worker builds chunk after chunk
        sources = ChunkSources(config, None)
        for k in range(8):
            sources.texture(f"procedural:{k % 4:02d}", f"key{chunk}-{k}")
    assert sorted(calls) == [0, 1, 2, 3]
    texture = shared_procedural_texture(5, 32)
    assert np.array_equal(texture, procedural_texture(5, 32)) and not texture.flags.writeable
    shared_procedural_texture.cache_clear()
    assert N_PROCEDURAL <= shared_procedural_texture.cache_info().maxsize


def test_a_constant_fill_seeds_no_generator(monkeypatch):
    seeded = []
    real = V.rng_for
    monkeypatch.setattr(V, "rng_for", lambda *a: seeded.append(a) or real(*a))
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:6] = True
    for fill in ("black", "white", "gray", "mean"):
        V.render_variant("only_fg", image, mask, mask, fill=fill, seed=0, key="k")
    assert seeded == []
    noisy = V.render_variant("no_fg", image, mask, mask, fill="noise", seed=0, key="k")
    assert seeded == [(0, "k", "fill:no_fg")]
    assert np.array_equal(noisy[mask], V.make_fill("noise", image, real(0, "k", "fill:no_fg"))[mask])
