"""Decoding, orientation, the canonical frame, masks and selection filters, on tiny generated images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import decode
from pipeline.decode import apply_orientation, decode_rgb, orient_point_map
from pipeline.frame import frame_for, frame_image, frame_mask, rasterize_boxes
from pipeline.masks import SelectionFilters, segmentation_mask
from pipeline.prepare import prepare_sample, sample_geometry
from pipeline.records import Box, RejectedInput, Segmentation, SourceRecord

BG = (20, 160, 60)
FG = (230, 40, 90)


# ---------------------------------------------------------------- helpers


def encode(arr: np.ndarray | Image.Image, fmt: str = "PNG", orientation: int | None = None, **kw) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    if fmt == "JPEG":
        kw.setdefault("quality", 95)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def record(
    boxes: list[tuple[float, float, float, float]], key: str = "img", segmentation=None
) -> SourceRecord:
    return SourceRecord(
        key=key,
        image=f"{key}.png",
        label=1,
        wnid="n01443537",
        boxes=tuple(Box(*b, wnid="n01443537") for b in boxes),
        segmentation=segmentation,
    )


def scene(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A solid rectangle of colour FG at ``box`` (x0, y0, x1, y1) on a BG image."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = BG
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = FG
    return arr


def rect_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def shrink(rect: tuple[int, int, int, int], by: int, size: int) -> np.ndarray:
    x0, y0, x1, y1 = rect
    return rasterize_boxes([(x0 + by, y0 + by, x1 - by, y1 - by)], size)


def centroid(gray: np.ndarray) -> tuple[float, float]:
    """Brightness-weighted pixel centroid (x, y) in pixel-index coordinates."""
    ys, xs = np.mgrid[0 : gray.shape[0], 0 : gray.shape[1]]
    w = gray.astype(np.float64)
    return float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum())


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": [mask.shape[0], mask.shape[1]]}


# ---------------------------------------------------------------- decode


def test_cmyk_jpeg_decodes_to_rgb_like_pil():
    cmyk = Image.new("RGB", (24, 16), (200, 60, 30)).convert("CMYK")
    data = encode(cmyk, "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    arr, orientation, stored, scale = decode_rgb(data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert arr.shape == (16, 24, 3) and arr.dtype == np.uint8
    assert (orientation, stored, scale) == (1, (24, 16), 1.0)
    assert np.abs(arr.astype(int) - reference.astype(int)).max() <= 2
    assert np.abs(arr[8, 12].astype(int) - (200, 60, 30)).max() <= 12


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(0, 200, dtype=np.uint8).reshape(10, 20)
    arr, *_ = decode_rgb(encode(gray))
    assert arr.shape == (10, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], gray)


def test_palette_with_transparency_is_composited_on_white():
    idx = np.zeros((6, 8), np.uint8)
    idx[:, 4:] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    arr, *_ = decode_rgb(encode(pal, transparency=0))
    np.testing.assert_array_equal(arr[:, :4], np.full((6, 4, 3), 255, np.uint8))
    np.testing.assert_array_equal(arr[:, 4:], np.broadcast_to(np.array([255, 0, 0], np.uint8), (6, 4, 3)))
    opaque, *_ = decode_rgb(encode(pal))  # no transparency: plain palette lookup
    np.testing.assert_array_equal(opaque[0, 0], [0, 0, 255])


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[:, :2, 3] = 0
    rgba[:, 2:4, 3] = 255
    rgba[:, 4:, 3] = 128
    arr, *_ = decode_rgb(encode(rgba))
    np.testing.assert_array_equal(arr[:, :2], np.full((4, 2, 3), 255, np.uint8))
    np.testing.assert_array_equal(arr[0, 2], [10, 100, 200])
    expected = (np.array([10, 100, 200]) * 128 + 255 * 127) / 255
    assert np.abs(arr[0, 5].astype(float) - expected).max() <= 1.5


def test_16_bit_png_is_scaled_by_its_range():
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr, *_ = decode_rgb(data)
    np.testing.assert_array_equal(arr[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_png_named_jpeg_is_read_by_content(tmp_path: Path):
    arr = scene(30, 20, (5, 5, 15, 15))
    path = tmp_path / "n01440764_1234.JPEG"
    path.write_bytes(encode(arr, "PNG"))
    out, *_ = decode_rgb(path.read_bytes())
    np.testing.assert_array_equal(out, arr)  # lossless: it really was decoded as PNG


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_matches_pil_and_point_map(orientation: int):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[10:14, 30:34] = 255  # a marked 4x4 block at stored box (30, 10, 34, 14)
    data = encode(arr, "JPEG", orientation=orientation)
    stored, code, stored_size, _ = decode_rgb(data)
    assert code == orientation and stored_size == (60, 40)
    mine = apply_orientation(stored, code)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(mine, reference)
    to = orient_point_map(code, *stored_size)
    (xa, ya), (xb, yb) = to(30, 10), to(34, 14)
    mapped = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
    assert mapped == rect_of(mine[..., 0] > 128)


def test_empty_file_is_rejected():
    with pytest.raises(RejectedInput) as err:
        decode_rgb(b"")
    assert err.value.reason == "empty_file"


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_jpeg_is_rejected(keep: float):
    noisy = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    data = encode(noisy, "JPEG")
    try:
        decode_rgb(data[: int(len(data) * keep)])
    except RejectedInput as exc:
        assert exc.reason in ("truncated_image", "undecodable_image")
    else:
        pytest.fail("truncated JPEG decoded without a rejection")


def test_random_bytes_are_undecodable():
    junk = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(RejectedInput) as err:
        decode_rgb(junk)
    assert err.value.reason == "undecodable_image"


@pytest.mark.parametrize("limit_ours, limit_pil", [(100, None), (None, 100), (100, 100)])
def test_decompression_bomb(monkeypatch, limit_ours, limit_pil):
    data = encode(np.zeros((20, 20, 3), np.uint8))
    decode_rgb(data)  # fine under the default limits
    if limit_ours is not None:
        monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", limit_ours)
    if limit_pil is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit_pil)
    with pytest.raises(RejectedInput) as err:
        decode_rgb(data)
    assert err.value.reason == "decompression_bomb"


def test_one_pixel_limit_refuses_by_the_header_below_pils_own():
    from tests.bad_inputs import png_header_only

    assert 8193 * 8192 < Image.MAX_IMAGE_PIXELS  # PIL alone would open it
    with pytest.raises(RejectedInput) as err:
        decode_rgb(png_header_only(8193, 8192))  # a few bytes claiming 67 Mpx
    assert err.value.reason == "decompression_bomb" and "8193x8192" in err.value.detail


def test_gif_named_jpg_is_refused_with_a_stable_one_line_detail():
    data = encode(np.zeros((16, 16, 3), np.uint8), "GIF")
    details = set()
    for _ in range(2):
        with pytest.raises(RejectedInput) as err:
            decode_rgb(data)
        assert err.value.reason == "undecodable_image"
        details.add(err.value.detail)
    (detail,) = details  # no memory address: the same on every run
    assert detail == "GIF data, not JPEG or PNG"


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n")


def test_postscript_named_jpg_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    seen = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: seen.append("gs") or None)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: seen.append("eps") or None)
    for formats in (decode.SOURCE_FORMATS, decode.TEXTURE_FORMATS, decode.SHARD_FORMATS, decode.MASK_FORMATS):
        with pytest.raises(RejectedInput) as err:
            decode.open_image(EPS, formats=formats)
        assert err.value.reason == "undecodable_image" and "PostScript" in err.value.detail
    with pytest.raises(RejectedInput):
        decode_rgb(EPS)
    assert seen == []  # PIL's EPS plugin never even looked at the bytes


def test_rejection_detail_never_quotes_the_file():
    secret = b"token=hunter2\n"
    with pytest.raises(RejectedInput) as err:
        decode_rgb(secret)
    assert err.value.detail == "not a JPEG or PNG image"
    assert secret.hex()[:8] not in err.value.detail and "hunter" not in err.value.detail


def test_each_context_decodes_only_its_formats():
    webp = encode(np.full((16, 16, 3), 90, np.uint8), "WEBP")
    arr, *_ = decode_rgb(webp, formats=decode.TEXTURE_FORMATS)
    assert arr.shape == (16, 16, 3)
    with pytest.raises(RejectedInput) as err:
        decode_rgb(webp)  # not a source format: ImageNet inputs are JPEG or PNG
    assert err.value.detail == "WEBP data, not JPEG or PNG"
    with pytest.raises(RejectedInput):
        decode.open_image(encode(np.zeros((8, 8, 3), np.uint8), "JPEG"), formats=decode.MASK_FORMATS)


def test_jpeg_draft_decode_is_smaller_and_frames_the_same():
    box = (300, 160, 500, 420)
    arr = scene(800, 600, box)
    data = encode(arr, "JPEG")
    small, _, stored_size, scale = decode_rgb(data, draft_min_side=256)
    full, *_ = decode_rgb(data)
    assert stored_size == (800, 600)
    assert small.shape[0] < 600 and min(small.shape[:2]) >= 256
    assert scale == pytest.approx(small.shape[1] / 800)
    frame = frame_for(800, 600)
    a = frame_image(small, frame).astype(int)
    b = frame_image(full, frame).astype(int)
    assert a.shape == b.shape == (224, 224, 3)
    fg_a = np.abs(a - FG).sum(axis=2) < 60
    fg_b = np.abs(b - FG).sum(axis=2) < 60
    assert (fg_a != fg_b).mean() < 0.01  # only edge pixels may differ
    assert np.abs(np.array(rect_of(fg_a)) - rect_of(fg_b)).max() <= 1


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "width, height, box, fmt, orientation",
    [
        (400, 300, (150, 60, 300, 240), "PNG", None),  # landscape
        (300, 500, (40, 120, 220, 300), "PNG", None),  # portrait
        (320, 320, (10, 200, 100, 310), "PNG", None),  # square
        (1100, 600, (500, 100, 700, 450), "JPEG", 6),  # stored rotated, JPEG draft path
    ],
)
def test_box_mask_lands_on_the_rectangle(width, height, box, fmt, orientation):
    """The displayed image shows FG at ``box``; the file stores it so that EXIF orientation restores it."""
    shown = scene(width, height, box)
    stored = (
        shown if orientation is None else np.ascontiguousarray(np.rot90(shown, k=1))
    )  # 6 = rotate CW to show
    assert orientation is None or np.array_equal(apply_orientation(stored, orientation), shown)
    stored_box = rect_of((stored == FG).all(axis=2))
    sample = prepare_sample(
        record([stored_box]), encode(stored, fmt, orientation=orientation), mask_source="box"
    )
    assert sample.image.shape == (224, 224, 3) and sample.box_mask.shape == (224, 224)
    assert np.array_equal(sample.fg_mask, sample.box_mask)
    tol = 15 if fmt == "JPEG" else 1
    inside = shrink(rect_of(sample.box_mask), 2, 224)
    outside = ~shrink(rect_of(sample.box_mask), -2, 224)
    assert inside.sum() > 100 and outside.sum() > 100
    diff_in = np.abs(sample.image[inside].astype(int) - FG).max()
    diff_out = np.abs(sample.image[outside].astype(int) - BG).max()
    assert diff_in <= tol and diff_out <= tol
    # and the frame itself is where torchvision would put it
    frame = frame_for(width, height)
    assert sample.frame == frame
    assert sample.bbox == [float(v) for v in rect_of(sample.box_mask)]


@pytest.mark.parametrize(
    "width, height", [(500, 375), (375, 500), (300, 300), (1000, 257), (257, 1000), (333, 290)]
)
def test_frame_matches_torchvision_resize_and_center_crop(width, height):
    tf = pytest.importorskip("torchvision.transforms.functional")
    frame = frame_for(width, height)
    mx, my = int(width * 0.55), int(height * 0.45)
    arr = np.zeros((height, width, 3), np.uint8)
    arr[my : my + 6, mx : mx + 6] = 255
    resized = tf.resize(Image.fromarray(arr), 256)
    assert resized.size == frame.resized
    theirs = np.asarray(tf.center_crop(resized, 224))[..., 0]
    ours = frame_image(arr, frame)[..., 0]
    assert theirs.shape == ours.shape == (224, 224)
    sx, sy = frame.scale
    expected = ((mx + 3) * sx - frame.offset[0] - 0.5, (my + 3) * sy - frame.offset[1] - 0.5)
    for got in (centroid(theirs), centroid(ours)):
        assert abs(got[0] - expected[0]) <= 1 and abs(got[1] - expected[1]) <= 1
    assert np.abs(np.array(centroid(theirs)) - centroid(ours)).max() <= 1


def test_frame_for_crop_offsets_follow_torchvision_rounding():
    frame = frame_for(500, 375)
    assert frame.resized == (341, 256)
    assert frame.offset == (int(round((341 - 224) / 2)), 16)
    with pytest.raises(ValueError):
        frame_for(100, 100, resize=200, size=224)


@pytest.mark.parametrize("kind", ["polygons", "rle_compressed", "rle_uncompressed"])
@pytest.mark.parametrize("orientation", [None, 6])
def test_segmentation_mask_frames_like_the_box(kind: str, orientation):
    from pycocotools import mask as mask_utils

    width, height = 420, 300
    x0, y0, x1, y1 = 120, 50, 330, 260
    stored = scene(width, height, (x0, y0, x1, y1))
    src_mask = (stored == FG).all(axis=2)
    if kind == "polygons":
        seg = Segmentation("polygons", [[x0, y0, x1, y0, x1, y1, x0, y1]])
    elif kind == "rle_compressed":
        seg = Segmentation("rle", mask_utils.encode(np.asfortranarray(src_mask.astype(np.uint8))))
    else:
        seg = Segmentation("rle", rle_uncompressed(src_mask))
    decoded = segmentation_mask(seg, (width, height))
    assert decoded.shape == (height, width)
    assert (decoded != src_mask).sum() <= 2 * (x1 - x0 + y1 - y0) + 4  # at most a 1-px rim differs
    sample = prepare_sample(
        record([(x0, y0, x1, y1)], segmentation=seg),
        encode(stored, orientation=orientation),
        mask_source="segm",
    )
    fg, box = sample.fg_mask, sample.box_mask
    assert fg.any()
    iou = (fg & box).sum() / (fg | box).sum()
    assert iou > 0.97
    rim = shrink(rect_of(box), -1, 224) & ~shrink(rect_of(box), 1, 224)
    assert not ((fg != box) & ~rim).any()  # differences only on the box edge


class NativeCalls:
    """Stands in for pycocotools' C entry points: records each call and refuses it, so no test can hang in C."""

    def __init__(self, monkeypatch):
        from pycocotools import mask as mask_utils

        self.calls: list[str] = []
        for name in ("frPyObjects", "decode", "merge"):
            monkeypatch.setattr(mask_utils, name, self._refuse(name))

    def _refuse(self, name):
        def refuse(*args, **kwargs):
            self.calls.append(name)
            raise RuntimeError(f"pycocotools.mask.{name} called")

        return refuse


@pytest.mark.parametrize(
    ("seg", "reason"),
    [
        (Segmentation("polygons", [[5.0, 5.0, 2e9, 5.0, 15.0, 15.0]]), "bad_segmentation"),
        (Segmentation("polygons", [[5.0, 5.0, float("nan"), 5.0, 15.0, 15.0]]), "bad_segmentation"),
        (Segmentation("polygons", [[5.0, 5.0, 42.0, 5.0, 15.0, 15.0]]), "bad_segmentation"),
        (Segmentation("polygons", "not polygons"), "bad_segmentation"),
        (Segmentation("rle", {"size": [40000, 40000], "counts": [40000 * 40000]}), "mask_size_mismatch"),
        (Segmentation("rle", {"size": [30, 40], "counts": [1000]}), "bad_segmentation"),
        (Segmentation("rle", {"size": [30, 40], "counts": "\x7f!"}), "bad_segmentation"),
        (Segmentation("rle", [{"size": [30, 40], "counts": [1200]}, {"size": [30, 41], "counts": [1230]}]),
         "mask_size_mismatch"),
    ],
)
def test_segmentation_mask_checks_geometry_before_pycocotools(monkeypatch, seg, reason):
    """A record may come from a hand-written reader: the builder checks again before any native call."""
    native = NativeCalls(monkeypatch)
    with pytest.raises(RejectedInput) as err:
        segmentation_mask(seg, (40, 30))
    assert err.value.reason == reason
    assert native.calls == []


def _imagenet_s_png(ids: np.ndarray) -> bytes:
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    return encode(rgb, "PNG")


def test_png_segmentation_reads_imagenet_s_class_ids():
    from pipeline.masks import PngMask

    ids = np.zeros((30, 40), np.int64)
    ids[5:10, 5:15] = 5
    ids[20:25, 30:38] = 7
    ids[:, :2] = 1000  # ignored
    data = _imagenet_s_png(ids)
    anything = segmentation_mask(Segmentation("png", "mask.png"), (40, 30), data)
    np.testing.assert_array_equal(anything, (ids == 5) | (ids == 7))  # ignored pixels are no foreground
    own = segmentation_mask(Segmentation("png", PngMask("mask.png", (5,))), (40, 30), data)
    np.testing.assert_array_equal(own, ids == 5)
    gray = np.zeros((30, 40), np.uint8)
    gray[3:9, 4:6] = 1  # single-channel masks: non-zero is foreground
    np.testing.assert_array_equal(segmentation_mask(Segmentation("png", "m.png"), (40, 30), encode(gray)), gray > 0)
    white = np.zeros((30, 40, 3), np.uint8)
    white[3:9, 4:6] = 255
    with pytest.raises(RejectedInput) as err:
        segmentation_mask(Segmentation("png", "m.png"), (40, 30), encode(white))
    assert err.value.reason == "bad_segmentation" and "single-channel" in err.value.detail
    with pytest.raises(RejectedInput) as err:
        segmentation_mask(Segmentation("png", "m.png"), (40, 30), encode(white, "JPEG"))
    assert err.value.reason == "bad_segmentation"  # a mask is a PNG


@pytest.mark.timeout(60)
def test_png_segmentation_file_must_be_a_regular_file(tmp_path):
    import os

    os.mkfifo(tmp_path / "mask.png")
    with pytest.raises(RejectedInput) as err:
        segmentation_mask(Segmentation("png", str(tmp_path / "mask.png")), (40, 30))
    assert (err.value.reason, err.value.detail) == ("bad_segmentation", "mask PNG: not a regular file")


def test_framed_png_mask_nearest_stays_binary():
    mask = np.zeros((300, 400), bool)
    mask[100:200, 150:250] = True
    out = frame_mask(mask, frame_for(400, 300))
    assert out.dtype == bool and out.shape == (224, 224)
    assert 0 < out.mean() < 1


# ---------------------------------------------------------------- selection filters


def geometry(boxes, width=512, height=256, **filters):
    return sample_geometry(
        record(boxes), (width, height), 1, size=224, resize=256, filters=SelectionFilters(**filters)
    )


def test_selection_passes_a_plain_box():
    assert geometry([(200, 60, 320, 200)], exactly_one_box=True).failures == []


def test_exactly_one_box():
    boxes = [(200, 60, 260, 200), (300, 60, 350, 200)]
    assert "multiple_boxes" in geometry(boxes, exactly_one_box=True).failures
    assert "multiple_boxes" not in geometry(boxes, exactly_one_box=False).failures


def test_box_too_large():
    # the frame shows x in [144, 368) of the 512x256 source; this box covers it all
    failures = geometry([(100, 0, 400, 256)]).failures
    assert "box_too_large" in failures
    assert "box_too_large" not in geometry([(100, 0, 400, 256)], max_box_fraction=None).failures
    assert "box_too_large" not in geometry([(150, 20, 360, 200)]).failures


def test_box_cropped():
    # frame left edge is at x = 144 in source pixels: 144 of this box's 200 px are cut away
    assert "box_cropped" in geometry([(0, 50, 200, 200)]).failures
    assert "box_cropped" not in geometry([(0, 50, 200, 200)], max_box_cropped=None).failures
    assert "box_cropped" not in geometry([(100, 50, 240, 200)]).failures  # 44 of 140 px cut


def test_box_entirely_outside_the_crop_is_rejected():
    with pytest.raises(RejectedInput) as err:
        geometry([(0, 50, 100, 200)])
    assert err.value.reason == "box_cropped"


def test_prepare_sample_reports_selection_failures():
    arr = scene(512, 256, (0, 50, 200, 200))
    sample = prepare_sample(record([(0, 50, 200, 200)]), encode(arr))
    assert sample.selection_failures == ["box_cropped"]


# ---------------------------------------------------------------- demo


def test_demo_records(tmp_path: Path, monkeypatch):
    from pipeline.sources.demo import read_demo

    monkeypatch.setenv("BGCHECK_CACHE", str(tmp_path / "cache"))
    records = list(read_demo())
    assert len(records) == 14
    assert all(isinstance(r, SourceRecord) for r in records)
    assert [r.key for r in records] == sorted(r.key for r in records)
    assert len({r.key for r in records}) == 14
    assert all(Path(r.image).is_relative_to(tmp_path / "cache") for r in records)
    per_class: dict[int, list[str]] = {}
    for r in records:
        per_class.setdefault(r.label, []).append(r.key)
        with Image.open(r.image) as im:
            assert im.size == r.size
        w, h = r.size
        assert r.boxes
        for b in r.boxes:
            assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h
            assert b.wnid == r.wnid
    assert len(per_class) >= 5
    assert all(len(keys) >= 2 for keys in per_class.values())  # every class can have a mixed_same partner
    by_key = {r.key: r for r in records}
    for key, r in by_key.items():
        if key.endswith("_mirror"):  # a mirror is its original flipped, annotations flipped with it
            base = by_key[key[: -len("_mirror")]]
            assert base.label == r.label
            np.testing.assert_array_equal(
                np.asarray(Image.open(r.image))[:, ::-1], np.asarray(Image.open(base.image))
            )
            w = r.size[0]
            assert r.boxes[0].as_list() == [
                w - base.boxes[0].x1,
                base.boxes[0].y0,
                w - base.boxes[0].x0,
                base.boxes[0].y1,
            ]


# ---------------------------------------------------------------- GrabCut


def test_grabcut_mask_is_inside_the_box_and_reproducible():
    pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    arr = rng.integers(60, 120, (256, 320, 3), dtype=np.uint8)  # textured greenish background
    arr[..., 1] = np.clip(arr[..., 1].astype(int) + 80, 0, 255)
    yy, xx = np.mgrid[0:256, 0:320]
    disk = (xx - 160) ** 2 + (yy - 128) ** 2 < 55**2
    arr[disk] = (220, 30, 40)
    box = (90, 60, 230, 200)
    data = encode(arr)
    first = prepare_sample(record([box]), data, mask_source="grabcut", seed=7)
    again = prepare_sample(record([box]), data, mask_source="grabcut", seed=7)
    np.testing.assert_array_equal(first.fg_mask, again.fg_mask)
    fg, box_mask = first.fg_mask, first.box_mask
    assert fg.any()
    assert (fg & box_mask).sum() / fg.sum() > 0.95
    assert fg.sum() < 0.9 * box_mask.sum()  # it found the disk, not just the whole box
    framed_disk = frame_mask(disk, first.frame)
    assert (fg & framed_disk).sum() / (fg | framed_disk).sum() > 0.8


def test_variants_figure_script(tmp_path: Path):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "docs" / "make_variants_figure.py"
    spec = importlib.util.spec_from_file_location("make_variants_figure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "variants.png"
    assert module.main(["--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    with Image.open(out) as im:
        assert im.size[0] >= 3 * 224 and im.size[1] >= 3 * 224
    assert out.stat().st_size < 400_000
    assert module.main(["--key", "no_such_image", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 2


# ---------------------------------------------------------------- regular files only


@pytest.mark.timeout(60)
def test_open_regular_refuses_fifos_and_devices_without_blocking(tmp_path):
    import os

    from pipeline.files import NotRegularFile, open_regular, read_regular

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")  # would read forever
    for name in ("fifo", "zero"):
        with pytest.raises(NotRegularFile) as err:
            open_regular(tmp_path / name)
        assert str(err.value) == "not a regular file"  # no local path: details are shared
    with pytest.raises(NotRegularFile):
        open_regular(tmp_path)
    (tmp_path / "real").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "real")  # symlink farms are fine
    with open_regular(tmp_path / "link") as fh:
        assert os.get_blocking(fh.fileno()) and fh.read() == b"abc"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "dangling")
