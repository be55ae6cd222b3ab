"""A generated corpus of the inputs real ImageNet-scale trees contain and a builder must survive.

Every case is written into a temporary folder by code (nothing is
downloaded or copied): odd-but-readable images that must be built and
converted correctly (CMYK, a PNG named ``.JPEG``, grayscale, palette, RGBA,
16-bit, EXIF-rotated), unreadable ones that must be rejected with a precise
reason, and broken annotations. Each builder returns the expected outcome
per key (``None`` = built, else the reason code), so a test can check that
accepted + rejected = inputs and that every reason is the right one.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench.imagenet_tree import make_val_tree, write_voc_xml

WNID = "n01440764"  # tench
OTHER_WNIDS = ("n01443537", "n02099601")  # goldfish, golden retriever
SIDE = 48  # special images are SIDE x SIDE unless said otherwise
BOX = (12, 12, 36, 36)  # half-open box of the special images: the centre half
INSIDE = (255, 40, 40)  # colour inside BOX where a case uses flat colours
OUTSIDE = (30, 90, 200)
# What a text file that an image name links to holds: no rejection may quote it.
SECRET = b"api_token=hunter2-DO-NOT-SHARE\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 48\n0 0 moveto 48 48 lineto stroke\nshowpage\n%%EOF\n"


@dataclass
class Corpus:
    """Where the corpus is and what must become of each key."""

    images: Path
    annotations: Path
    expected: dict[str, str | None]  # key -> None (built) or rejection reason
    readable: dict[str, Path] = field(default_factory=dict)  # odd-but-readable special images, by case name

    @property
    def built(self) -> set[str]:
        return {k for k, reason in self.expected.items() if reason is None}


def flat_box_image(inside=INSIDE, outside=OUTSIDE, size=(SIDE, SIDE), box=BOX) -> np.ndarray:
    """(h, w, 3) uint8: one colour outside ``box``, another inside."""
    w, h = size
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = outside
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = inside
    return arr


def voc_corners(box=BOX) -> tuple[int, int, int, int]:
    """Half-open box -> VOC's 1-based inclusive corners."""
    x0, y0, x1, y1 = box
    return (x0 + 1, y0 + 1, x1, y1)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose data is a few bytes.

    A decompression bomb for any reader that trusts the header; tiny on disk.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """JPEG of ``pixels`` as stored, with an EXIF orientation tag viewers apply."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def make_bad_val_tree(root: str | Path, n_good: int = 8) -> Corpus:
    """ImageNet-val layout with ``n_good`` ordinary images plus one input of every known bad kind."""
    images, boxes_dir = make_val_tree(
        Path(root), n_good, classes=(WNID, *OTHER_WNIDS), size_choices=((64, 48), (48, 64)), photo_like=True
    )
    xml_dir = boxes_dir / "val"
    expected: dict[str, str | None] = {f"ILSVRC2012_val_{i + 1:08d}": None for i in range(n_good)}
    readable: dict[str, Path] = {}

    def add(key: str, data: bytes | None, reason: str | None, *, size=(SIDE, SIDE), objects=None, xml=True) -> Path:
        path = images / f"{key}.JPEG"
        if data is not None:
            path.write_bytes(data)
        if xml:
            write_voc_xml(xml_dir / f"{key}.xml", key, size, objects if objects is not None else [(WNID, voc_corners())])
        expected[key] = reason
        return path

    def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    good = Image.fromarray(flat_box_image())
    good_jpeg = encoded(good, "JPEG", quality=95)

    # ---- readable odd files: built, converted to 8-bit RGB
    readable["cmyk"] = add("cmyk", encoded(good.convert("CMYK"), "JPEG", quality=95), None)
    readable["png_named_jpeg"] = add("png_named_jpeg", encoded(good, "PNG"), None)
    readable["grayscale"] = add("grayscale", encoded(good.convert("L"), "JPEG", quality=95), None)
    palette = Image.new("P", (SIDE, SIDE), 0)
    palette.putpalette([*OUTSIDE, *INSIDE] + [0] * (256 - 2) * 3)
    palette.paste(1, BOX)
    readable["palette"] = add("palette", encoded(palette, "PNG"), None)
    rgba = np.zeros((SIDE, SIDE, 4), np.uint8)
    rgba[..., :3] = flat_box_image()
    rgba[..., 3] = 255
    rgba[:, : SIDE // 4, 3] = 0  # a transparent left strip: shown on white
    readable["rgba"] = add("rgba", encoded(Image.fromarray(rgba), "PNG"), None)
    sixteen = np.full((SIDE, SIDE), 16000, np.uint16)
    sixteen[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 60000
    readable["sixteen_bit"] = add("sixteen_bit", encoded(Image.fromarray(sixteen), "PNG"), None)
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): stored top half INSIDE,
    # bottom half OUTSIDE, so the viewed image has them side by side.
    stored = np.empty((48, 64, 3), np.uint8)
    stored[:24], stored[24:] = INSIDE, OUTSIDE
    readable["exif_rotated"] = add(
        "exif_rotated", exif_rotated_jpeg(stored, 6), None, size=(64, 48), objects=[(WNID, (17, 13, 48, 36))]
    )

    # ---- unreadable files: rejected
    add("zero_bytes", b"", "empty_file")
    add("truncated", good_jpeg[: len(good_jpeg) // 2], "truncated_image")
    add("random_bytes", np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "undecodable_image")
    add("one_pixel", encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "JPEG"), "image_too_small",
        size=(1, 1), objects=[(WNID, (1, 1, 1, 1))])
    add("bomb", png_header_only(30000, 30000), "decompression_bomb",
        size=(30000, 30000), objects=[(WNID, (10000, 10000, 20000, 20000))])
    add("gif_named_jpeg", encoded(good, "GIF"), "undecodable_image")
    add("postscript", EPS, "undecodable_image")  # must never reach Ghostscript
    (Path(root) / "notes.txt").write_bytes(SECRET)
    add("text_symlink", None, "undecodable_image").symlink_to(Path(root) / "notes.txt")
    add("dangling_symlink", None, "missing_image").symlink_to(Path(root) / "moved-away.JPEG")
    add("inf_width", good_jpeg, "malformed_annotation", xml=False)
    write_voc_xml(xml_dir / "inf_width.xml", "inf_width", ("inf", SIDE), [(WNID, voc_corners())])

    # ---- broken annotations on good images
    add("box_outside", good_jpeg, "box_outside_image", objects=[(WNID, (10, 10, SIDE + 30, 30))])
    add("box_inverted", good_jpeg, "inverted_box", objects=[(WNID, (30, 10, 10, 30))])
    add("box_zero_area", good_jpeg, "zero_area_box", objects=[(WNID, (10, 10, 9, 30))])
    add("unknown_wnid", good_jpeg, "unknown_wnid", objects=[("n99999999", voc_corners())])
    add("malformed_xml", good_jpeg, "malformed_annotation", xml=False)
    (xml_dir / "malformed_xml.xml").write_text("<annotation><object><name>n01440764</name>")
    add("no_xml", good_jpeg, "missing_annotation", xml=False)
    add("xml_only", None, "missing_image")
    return Corpus(images, boxes_dir, expected, readable)


def _polygon(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_bad_coco(root: str | Path, n_good: int = 3) -> Corpus:
    """COCO-format segmentations: good polygon entries, a broken RLE and an RLE of the wrong size."""
    root = Path(root)
    images = root / "coco_images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(11)
    entries, anns, expected = [], [], {}
    cases = [(f"n01440764_{i + 1}", "good") for i in range(n_good)] + [
        ("n01440764_901", "broken_rle"),
        ("n01440764_902", "wrong_size_rle"),
        ("n01440764_903", "infinite_width"),
        ("n01440764_904", "polygon_outside"),
    ]
    for i, (key, case) in enumerate(cases):
        pixels = flat_box_image(inside=tuple(int(v) for v in rng.integers(0, 256, 3)))
        Image.fromarray(pixels).save(images / f"{key}.JPEG", quality=95)
        entries.append({"id": i + 1, "file_name": f"{key}.JPEG", "width": SIDE, "height": SIDE})
        x0, y0, x1, y1 = BOX
        ann = {"id": 100 + i, "image_id": i + 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
        if case == "good":
            ann["segmentation"] = [_polygon(BOX)]
            expected[key] = None
        elif case == "broken_rle":
            ann["segmentation"] = {"size": [SIDE, SIDE], "counts": "\x7f\x7f not an RLE \x01"}
            ann["iscrowd"] = 1
            expected[key] = "bad_segmentation"
        elif case == "wrong_size_rle":
            ann["segmentation"] = {"size": [SIDE + 5, SIDE], "counts": [0, SIDE * (SIDE + 5)]}
            ann["iscrowd"] = 1
            expected[key] = "mask_size_mismatch"
        elif case == "infinite_width":  # json writes Infinity, as JavaScript tools do
            entries[-1]["width"] = float("inf")
            ann["segmentation"] = [_polygon(BOX)]
            expected[key] = "malformed_annotation"
        else:  # far outside the image: checked before pycocotools rasterises it
            ann["segmentation"] = [[x0, y0, 10 * SIDE, y0, x1, y1]]
            expected[key] = "bad_segmentation"
        anns.append(ann)
    coco = {"images": entries, "annotations": anns, "categories": [{"id": 1, "name": WNID}]}
    path = root / "coco.json"
    path.write_text(json.dumps(coco))
    return Corpus(images, path, expected)


def make_bad_mask_dir(root: str | Path, n_good: int = 3) -> Corpus:
    """PNG masks: good single-channel masks, an ImageNet-S class-id mask, and broken ones.

    Broken: a mask whose size differs from its image, a binary mask saved as
    RGB (white is class id 65535: no ImageNet-S mask), and a FIFO named like
    a mask (must be refused, never waited on).
    """
    root = Path(root)
    images, masks = root / "mask_images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    for i in range(n_good + 1):
        key = f"n01443537_{i + 1}"
        Image.fromarray(flat_box_image()).save(images / f"{key}.JPEG", quality=95)
        wrong = i == n_good
        side = SIDE - 18 if wrong else SIDE
        mask = np.zeros((side, side), np.uint8)
        mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        Image.fromarray(mask).save(masks / f"{key}.png")
        expected[key] = "mask_size_mismatch" if wrong else None
    x0, y0, x1, y1 = BOX
    ids = np.full((SIDE, SIDE), 1000, np.uint16)  # ImageNet-S "ignored" everywhere but the object ...
    ids[y0:y1, x0:x1] = 5  # ... whose class id is 5 (R + 256 G): read as all foreground, it is a wrong mask
    colour = np.zeros((SIDE, SIDE, 3), np.uint8)
    colour[..., 0], colour[..., 1] = ids % 256, ids // 256
    white = np.repeat(np.where(ids == 5, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    for key, pixels, reason in (("n01443537_901", colour, None), ("n01443537_902", white, "bad_segmentation")):
        Image.fromarray(flat_box_image()).save(images / f"{key}.JPEG", quality=95)
        Image.fromarray(pixels, "RGB").save(masks / f"{key}.png")
        expected[key] = reason
    Image.fromarray(flat_box_image()).save(images / "n01443537_903.JPEG", quality=95)
    os.mkfifo(masks / "n01443537_903.png")
    expected["n01443537_903"] = "bad_segmentation"
    return Corpus(images, masks, expected)
