"""The variant functions, fills, textures and seeded randomness, on small hand-made arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.records import RejectedInput
from pipeline.rng import rng_for
from pipeline.textures import N_PROCEDURAL, procedural_texture, texture_frame
from pipeline.variants import (
    FILLS,
    VARIANTS,
    box_rectangle,
    composite,
    fg_area,
    make_fill,
    no_fg,
    only_bg_b,
    only_bg_t,
    only_fg,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.fixture
def partner() -> np.ndarray:
    return np.random.default_rng(12).integers(0, 256, (24, 32, 3), dtype=np.uint8)


@pytest.fixture
def fg_mask() -> np.ndarray:
    """An irregular blob: a disk plus a stray pixel, not a rectangle."""
    yy, xx = np.mgrid[0:24, 0:32]
    mask = (xx - 14) ** 2 + (yy - 11) ** 2 < 36
    mask[20, 3] = True
    return mask


@pytest.fixture
def box_mask() -> np.ndarray:
    mask = np.zeros((24, 32), bool)
    mask[4:18, 7:22] = True
    return mask


def test_every_variant_row_renders_what_it_declares(image, fg_mask, box_mask, partner):
    """The table is the one source of truth: each row's needs are what its renderer uses, and nothing more."""
    from pipeline.variants import PARTNER_POOLS, VARIANT_GROUPS, VARIANT_SPECS, render_variant

    assert VARIANTS == tuple(VARIANT_SPECS) and VARIANTS[0] == "original"
    assert all(spec.id == key for key, spec in VARIANT_SPECS.items())
    for spec in VARIANT_SPECS.values():
        assert spec.group in VARIANT_GROUPS and spec.summary and spec.paper
        assert spec.partner is None or spec.partner in PARTNER_POOLS
        background = partner if spec.needs_background else None
        out = render_variant(spec.id, image, fg_mask, box_mask, fill="white", seed=0, key="k", background=background)
        assert out.shape == image.shape and out.dtype == np.uint8
        changed = out != image
        if spec.fill:  # filled pixels come from the fill, white here
            assert (out[changed.any(axis=2)] == 255).all()
        if spec.needs_background:  # without its background a variant cannot render
            with pytest.raises(ValueError, match="needs"):
                render_variant(spec.id, image, fg_mask, box_mask, fill="white", seed=0, key="k")
        if spec.group == "original":
            assert not changed.any()
    assert set(FILLS) == {"black", "white", "gray", "mean", "noise"}


@pytest.mark.parametrize("fill", ["black", "white", "gray", "mean", "noise"])
def test_only_fg_keeps_the_mask_and_fills_the_rest(image, fg_mask, fill):
    filled = make_fill(fill, image, rng_for(0, "k", "fill"))
    out = only_fg(image, fg_mask, filled)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[fg_mask], image[fg_mask])
    np.testing.assert_array_equal(out[~fg_mask], filled[~fg_mask])


def test_no_fg_fills_the_mask_and_keeps_the_rest(image, fg_mask):
    filled = make_fill("white", image)
    out = no_fg(image, fg_mask, filled)
    np.testing.assert_array_equal(out[fg_mask], filled[fg_mask])
    np.testing.assert_array_equal(out[~fg_mask], image[~fg_mask])


def test_only_bg_b_fills_the_box_and_keeps_the_rest(image, box_mask):
    filled = make_fill("gray", image)
    out = only_bg_b(image, box_mask, filled)
    np.testing.assert_array_equal(out[box_mask], filled[box_mask])
    np.testing.assert_array_equal(out[~box_mask], image[~box_mask])
    assert not np.array_equal(out, image)


def test_composite_puts_the_foreground_on_the_partner(image, partner, fg_mask):
    out = composite(image, fg_mask, partner)
    np.testing.assert_array_equal(out[fg_mask], image[fg_mask])
    np.testing.assert_array_equal(out[~fg_mask], partner[~fg_mask])


def test_variants_do_not_modify_their_inputs(image, fg_mask, box_mask, partner):
    before = image.copy(), partner.copy(), fg_mask.copy(), box_mask.copy()
    filled = make_fill("black", image)
    only_fg(image, fg_mask, filled)
    no_fg(image, fg_mask, filled)
    only_bg_b(image, box_mask, filled)
    only_bg_t(image, box_mask)
    composite(image, fg_mask, partner)
    for a, b in zip(before, (image, partner, fg_mask, box_mask), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- only_bg_t


def columns_image() -> np.ndarray:
    """10x10, every pixel's value = 10 * row + column, so each pixel says where it came from."""
    values = (10 * np.arange(10)[:, None] + np.arange(10)[None, :]).astype(np.uint8)
    return np.repeat(values[:, :, None], 3, axis=2)


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((10, 10), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_only_bg_t_left_strip_tiles_rightwards():
    # strips: left 3 cols (30 px) > top 2 rows = bottom 2 rows (20) > right 1 col (10)
    image = columns_image()
    out = only_bg_t(image, box(3, 2, 9, 8))
    expected_cols = [0, 1, 2, 0, 1, 2, 0, 1, 2, 9]
    for r in range(10):
        row = out[r, :, 0].tolist()
        if 2 <= r < 8:
            assert row == [10 * r + c for c in expected_cols]
        else:
            assert row == image[r, :, 0].tolist()
    assert np.array_equal(out[..., 0], out[..., 2])


def test_only_bg_t_right_strip_tiles_leftwards():
    # strips: right 3 cols (30) > top 2 rows = bottom 2 rows (20) > left 1 col (10)
    image = columns_image()
    out = only_bg_t(image, box(1, 2, 7, 8))
    expected_cols = [0, 7, 8, 9, 7, 8, 9, 7, 8, 9]  # periodic continuation of cols 7..9
    for r in range(2, 8):
        assert out[r, :, 0].tolist() == [10 * r + c for c in expected_cols]
    np.testing.assert_array_equal(out[:2], image[:2])
    np.testing.assert_array_equal(out[8:], image[8:])


def test_only_bg_t_top_strip_tiles_downwards():
    # strips: top 4 rows (40) > left = right = bottom (10)
    image = columns_image()
    out = only_bg_t(image, box(1, 4, 9, 9))
    expected_rows = [0, 1, 2, 3, 0, 1, 2, 3, 0, 9]
    for c in range(10):
        col = out[:, c, 0].tolist()
        if 1 <= c < 9:
            assert col == [10 * r + c for r in expected_rows]
        else:
            assert col == image[:, c, 0].tolist()


def test_only_bg_t_bottom_strip_tiles_upwards():
    image = columns_image()
    out = only_bg_t(image, box(1, 1, 9, 6))  # bottom 4 rows (40) is the largest strip
    expected_rows = [0, 9, 6, 7, 8, 9, 6, 7, 8, 9]  # periodic continuation of rows 6..9
    assert out[:, 4, 0].tolist() == [10 * r + 4 for r in expected_rows]


def test_only_bg_t_ties_go_left():
    image = columns_image()
    out = only_bg_t(image, box(3, 3, 7, 7))  # all four strips are 30 px
    assert out[5, :, 0].tolist() == [50 + c for c in [0, 1, 2, 0, 1, 2, 0, 7, 8, 9]]


def test_only_bg_t_outside_unchanged_inside_from_strip(image, box_mask):
    out = only_bg_t(image, box_mask)
    np.testing.assert_array_equal(out[~box_mask], image[~box_mask])
    x0, y0, x1, y1 = box_rectangle(box_mask)
    assert (x0, y0, x1, y1) == (7, 4, 22, 18)
    # right strip (10 cols x 24 rows) is the largest; every box pixel is a copy of a pixel
    # of that strip in the same row
    for r in range(y0, y1):
        strip_row = {tuple(p) for p in image[r, x1:]}
        assert all(tuple(p) in strip_row for p in out[r, x0:x1])


def test_only_bg_t_needs_background():
    image = columns_image()
    with pytest.raises(RejectedInput) as err:
        only_bg_t(image, np.ones((10, 10), bool))
    assert err.value.reason == "no_background"
    np.testing.assert_array_equal(only_bg_t(image, np.zeros((10, 10), bool)), image)


def test_box_rectangle():
    assert box_rectangle(box(2, 3, 5, 9)) == (2, 3, 5, 9)
    assert box_rectangle(np.zeros((4, 4), bool)) is None


# ---------------------------------------------------------------- fills


def test_constant_and_mean_fills(image):
    assert (make_fill("black", image) == 0).all()
    assert (make_fill("white", image) == 255).all()
    assert (make_fill("gray", image) == 128).all()
    two_tone = np.zeros((2, 2, 3), np.uint8)
    two_tone[0] = (10, 20, 30)
    two_tone[1] = (21, 40, 91)
    mean = make_fill("mean", two_tone)
    np.testing.assert_array_equal(mean, np.broadcast_to(np.array([16, 30, 60], np.uint8), (2, 2, 3)))
    for fill in FILLS:
        out = make_fill(fill, image, rng_for(0, "k", "fill"))
        assert out.shape == image.shape and out.dtype == np.uint8
        out[0, 0] = 1  # writable, not a broadcast view


def test_noise_fill_is_seeded(image):
    a = make_fill("noise", image, rng_for(5, "key", "fill"))
    b = make_fill("noise", image, rng_for(5, "key", "fill"))
    c = make_fill("noise", image, rng_for(6, "key", "fill"))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.9
    assert a.min() < 20 and a.max() > 235  # spans the range
    with pytest.raises(ValueError):
        make_fill("noise", image)
    with pytest.raises(ValueError):
        make_fill("purple", image)


def test_fg_area(fg_mask):
    assert fg_area(fg_mask) == pytest.approx(fg_mask.sum() / fg_mask.size)
    assert fg_area(np.zeros((3, 3), bool)) == 0.0
    assert fg_area(np.ones((3, 3), bool)) == 1.0


# ---------------------------------------------------------------- rng


def test_rng_for_is_reproducible_and_separated():
    def draw(seed, key, purpose):
        return rng_for(seed, key, purpose).integers(0, 2**62, size=4).tolist()

    base = draw(0, "ILSVRC2012_val_00000001", "partner")
    assert base == draw(0, "ILSVRC2012_val_00000001", "partner")
    others = [
        draw(1, "ILSVRC2012_val_00000001", "partner"),
        draw(0, "ILSVRC2012_val_00000002", "partner"),
        draw(0, "ILSVRC2012_val_00000001", "texture"),
        draw(0, "partner", "ILSVRC2012_val_00000001"),  # key and purpose are not interchangeable
    ]
    assert all(o != base for o in others)
    assert len({tuple(o) for o in others}) == len(others)


def test_rng_for_does_not_touch_the_global_rng():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    rng_for(0, "k", "p").random(10)
    make_fill("noise", np.zeros((4, 4, 3), np.uint8), rng_for(0, "k", "fill"))
    assert np.random.random() == expected


# ---------------------------------------------------------------- textures


def test_procedural_textures_are_deterministic_and_distinct():
    textures = [procedural_texture(i, 48) for i in range(N_PROCEDURAL)]
    for i, t in enumerate(textures):
        assert t.shape == (48, 48, 3) and t.dtype == np.uint8
        assert t.std() > 5  # not flat
        np.testing.assert_array_equal(t, procedural_texture(i, 48))
    for i in range(N_PROCEDURAL):
        for j in range(i + 1, N_PROCEDURAL):
            assert np.abs(textures[i].astype(int) - textures[j].astype(int)).mean() > 5


@pytest.mark.parametrize("shape", [(60, 90), (90, 60), (40, 40), (20, 30)])
def test_texture_frame_shape_and_seeding(shape):
    texture = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    a = texture_frame(texture, 32, rng_for(0, "k", "texture"))
    b = texture_frame(texture, 32, rng_for(0, "k", "texture"))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_texture_frame_crop_comes_from_the_texture():
    texture = np.random.default_rng(4).integers(0, 256, (32, 80, 3), dtype=np.uint8)
    crops = {texture_frame(texture, 32, rng_for(s, "k", "texture")).tobytes() for s in range(8)}
    assert len(crops) > 1  # the crop position is random
    for s in range(3):
        crop = texture_frame(texture, 32, rng_for(s, "k", "texture"))
        offsets = [x for x in range(80 - 32 + 1) if np.array_equal(texture[:, x : x + 32], crop)]
        assert len(offsets) == 1


# ---------------------------------------------------------------- import hygiene


def test_variants_import_without_builders_or_eval():
    code = (
        "import sys, pipeline.variants, pipeline.textures, pipeline.rng\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('builders', 'eval', 'torch'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
