"""Source readers: every input becomes exactly one record or one precise rejection."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.classes import wnid_to_index
from pipeline.records import Box, Rejection, SourceRecord
from pipeline.sources import (
    SOURCE_KINDS,
    SourceError,
    mask_bounding_box,
    parse_voc_xml,
    partition,
    read_coco,
    read_imagenet_train,
    read_imagenet_val,
    read_loc_csv,
    read_mask_dir,
    read_source,
    rle_counts_from_string,
    validate_boxes,
    voc_box,
)
from tests.fixtures_imagenet import make_box_archive, make_train_tree, make_val_tree, write_voc_xml

TENCH, GOLDFISH, RETRIEVER = "n01440764", "n01443537", "n02099601"
UNKNOWN = "n99999999"


def write_jpeg(path: Path, size: tuple[int, int] = (64, 48), colour: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 80, 40)).save(path, "JPEG", quality=90)
    return path


def outcome(outputs: list) -> dict[str, str]:
    """key -> 'ok' or reason; requires one output per key."""
    keys = [o.key for o in outputs]
    assert len(keys) == len(set(keys)), Counter(keys).most_common(3)
    return {o.key: "ok" if isinstance(o, SourceRecord) else o.reason for o in outputs}


def assert_sorted_and_typed(outputs: list) -> None:
    assert all(isinstance(o, (SourceRecord, Rejection)) for o in outputs)
    keys = [o.key for o in outputs]
    assert keys == sorted(keys)


# --------------------------------------------------------------------------- validate_boxes


@pytest.mark.parametrize(
    ("box", "size", "reason", "clean"),
    [
        (Box(10, 20, 30, 40), (64, 48), None, (10, 20, 30, 40)),
        (Box(-1, -0.5, 65, 49), (64, 48), None, (0, 0, 64, 48)),  # 1-px overshoot is clipped
        (Box(-1.5, 0, 30, 40), (64, 48), "box_outside_image", None),
        (Box(10, 20, 30, 50), (64, 48), "box_outside_image", None),
        (Box(64, 0, 65, 10), (64, 48), "box_outside_image", None),  # only inside the tolerance band
        (Box(30, 20, 10, 40), (64, 48), "inverted_box", None),
        (Box(10, 40, 30, 20), (64, 48), "inverted_box", None),
        (Box(10, 20, 10, 40), (64, 48), "zero_area_box", None),
        (Box(10, 20, 30, 20), (64, 48), "zero_area_box", None),
        (Box(10, 20, float("nan"), 40), (64, 48), "malformed_annotation", None),
        (Box(10, 20, 5000, 4000), None, None, (10, 20, 5000, 4000)),  # no size: upper edges unknown
        (Box(-3, 20, 30, 40), None, "box_outside_image", None),
    ],
)
def test_validate_boxes(box, size, reason, clean):
    boxes, got = validate_boxes([box], size)
    assert got == reason
    if clean is None:
        assert boxes == ()
    else:
        assert [b.as_list() for b in boxes] == [list(map(float, clean))]


def test_validate_boxes_one_bad_box_rejects_all_and_empty_is_no_box():
    assert validate_boxes([Box(0, 0, 10, 10), Box(5, 5, 1, 9)], (64, 48)) == ((), "inverted_box")
    assert validate_boxes([], (64, 48)) == ((), "no_box")
    kept, reason = validate_boxes([Box(0, 0, 10, 10, TENCH), Box(20, 20, 30, 30, TENCH)], (64, 48))
    assert reason is None and len(kept) == 2 and kept[1].wnid == TENCH


def test_voc_box_is_half_open():
    # VOC xmin=1..xmax=10 covers pixels 0..9 inclusive: 10 pixels wide.
    b = voc_box(TENCH, 1, 1, 10, 20)
    assert (b.x0, b.y0, b.x1, b.y1) == (0.0, 0.0, 10.0, 20.0)
    assert b.x1 - b.x0 == 10


def test_parse_voc_xml_reads_size_and_objects(tmp_path):
    path = write_voc_xml(
        tmp_path / "a.xml", "a", (500, 375), [(TENCH, (1, 2, 3, 4)), (GOLDFISH, (5, 6, 7, 8))]
    )
    voc = parse_voc_xml(path.read_bytes())
    assert voc.size == (500, 375) and voc.filename == "a"
    assert voc.objects == ((TENCH, (1.0, 2.0, 3.0, 4.0)), (GOLDFISH, (5.0, 6.0, 7.0, 8.0)))
    for bad in (
        b"<annotation><size>",
        b"<other/>",
        b"<annotation><object><name>x</name></object></annotation>",
    ):
        with pytest.raises(ValueError):
            parse_voc_xml(bad)


# --------------------------------------------------------------------------- ImageNet val


def test_val_generated_tree_folder_and_archive_agree(tmp_path):
    images, boxes = make_val_tree(tmp_path, 6, classes=[TENCH, RETRIEVER], seed=3)
    from_folder = list(read_imagenet_val(images, boxes))
    archive = make_box_archive(boxes, tmp_path / "ILSVRC2012_bbox_val_v3.tgz")
    from_archive = list(read_imagenet_val(images, archive))
    assert_sorted_and_typed(from_folder)
    records, rejections = partition(from_folder)
    assert rejections == [] and len(records) == 6
    for i, rec in enumerate(records):
        wnid = (TENCH, RETRIEVER)[i % 2]
        assert rec.key == f"ILSVRC2012_val_{i + 1:08d}"
        assert (rec.wnid, rec.label, rec.source) == (wnid, wnid_to_index()[wnid], "imagenet-val")
        with Image.open(rec.image) as im:
            assert im.size == rec.size  # XML size is the real JPEG size
        (box,) = rec.boxes
        assert 0 <= box.x0 < box.x1 <= rec.size[0] and 0 <= box.y0 < box.y1 <= rec.size[1]
    strip = [(r.key, r.image, r.label, r.boxes, r.size) for r in records]
    assert strip == [(r.key, r.image, r.label, r.boxes, r.size) for r in partition(from_archive)[0]]
    assert all("::val/" in r.annotation for r in partition(from_archive)[0])


def _bad_val_tree(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """A val tree with one input per failure mode; returns (images, boxes, expected outcome)."""
    images, boxes = root / "val", root / "boxes" / "val"
    size = (64, 48)
    expected: dict[str, str] = {}

    def case(n: int, objects, reason: str, image: bool = True, xml: bool = True, name: str | None = None):
        key = name or f"ILSVRC2012_val_{n:08d}"
        if image:
            write_jpeg(images / f"{key}.JPEG", size)
        if xml:
            write_voc_xml(boxes / f"{key}.xml", key, size, objects)
        expected[key] = reason

    case(1, [(TENCH, (11, 21, 30, 40))], "ok")
    case(2, [(TENCH, (0, 0, 65, 49))], "ok")  # 1-px overshoot on every side: clipped
    case(3, [(TENCH, (10, 10, 70, 40))], "box_outside_image")
    case(4, [(TENCH, (40, 10, 20, 30))], "inverted_box")
    case(5, [(TENCH, (20, 10, 19, 30))], "zero_area_box")
    case(6, [(TENCH, (11, 21, 30, 40))], "missing_image", image=False)
    case(7, [], "missing_annotation", xml=False)
    case(8, [(UNKNOWN, (11, 21, 30, 40))], "unknown_wnid")
    case(9, [(TENCH, (11, 21, 30, 40))], "bad_key", name="ILSVRC2012_val_00000009.v2")
    case(10, [(TENCH, ("ten", 21, 30, 40))], "malformed_annotation")
    case(11, [], "no_box")
    case(12, [(TENCH, (1, 1, 10, 10)), (GOLDFISH, (5, 5, 60, 40)), (TENCH, (20, 20, 40, 40))], "ok")
    # Truncated XML.
    write_jpeg(images / "ILSVRC2012_val_00000013.JPEG", size)
    (boxes / "ILSVRC2012_val_00000013.xml").write_text("<annotation><size><width>64</wi")
    expected["ILSVRC2012_val_00000013"] = "malformed_annotation"
    # Zero-byte image.
    (images / "ILSVRC2012_val_00000014.JPEG").write_bytes(b"")
    write_voc_xml(boxes / "ILSVRC2012_val_00000014.xml", "x", size, [(TENCH, (1, 1, 9, 9))])
    expected["ILSVRC2012_val_00000014"] = "empty_file"
    return images, root / "boxes", expected


def test_val_bad_inputs_have_precise_reasons(tmp_path):
    images, boxes, expected = _bad_val_tree(tmp_path)
    outputs = list(read_imagenet_val(images, boxes))
    assert_sorted_and_typed(outputs)
    assert outcome(outputs) == expected
    by_key = {o.key: o for o in outputs}
    clipped = by_key["ILSVRC2012_val_00000002"]
    assert clipped.boxes[0].as_list() == [0.0, 0.0, 64.0, 48.0]
    mixed = by_key["ILSVRC2012_val_00000012"]
    assert mixed.wnid == TENCH and [b.as_list() for b in mixed.boxes] == [[0, 0, 10, 10], [19, 19, 40, 40]]
    # The same tree read from the archive gives the same verdicts.
    archive = make_box_archive(boxes, tmp_path / "boxes.tar.gz")
    assert outcome(list(read_imagenet_val(images, archive))) == expected


def test_val_duplicates_are_reported_not_dropped(tmp_path):
    images, boxes = tmp_path / "val", tmp_path / "boxes"
    key = "ILSVRC2012_val_00000001"
    write_jpeg(images / f"{key}.JPEG")
    write_jpeg(images / "n01440764" / f"{key}.JPEG")  # a class-sorted copy next to the flat one
    write_voc_xml(boxes / f"{key}.xml", key, (64, 48), [(TENCH, (1, 1, 9, 9))])
    write_voc_xml(boxes / "val" / f"{key}.xml", key, (64, 48), [(TENCH, (1, 1, 9, 9))])
    outputs = list(read_imagenet_val(images, boxes))
    assert Counter(o.key for o in outputs) == {key: 3}  # 2 images + 2 XMLs -> 1 sample + 2 duplicates
    assert sorted(getattr(o, "reason", "ok") for o in outputs) == ["duplicate_key", "duplicate_key", "ok"]


def test_val_unusable_sources_raise(tmp_path):
    images, boxes = make_val_tree(tmp_path, 1, photo_like=False)
    with pytest.raises(SourceError):
        read_imagenet_val(tmp_path / "nope", boxes)
    with pytest.raises(SourceError):
        read_imagenet_val(images, tmp_path / "nope.tgz")
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    with pytest.raises(SourceError):
        read_imagenet_val(images, broken)


# --------------------------------------------------------------------------- ImageNet train


def test_train_tree_labels_from_folders_and_missing_boxes(tmp_path):
    wnids = [TENCH, RETRIEVER]
    images, boxes = make_train_tree(tmp_path, 4, wnids, seed=1, boxes_fraction=0.5, photo_like=False)
    n_images = sum(1 for _ in images.rglob("*.JPEG"))
    n_xml = sum(1 for _ in boxes.rglob("*.xml"))
    assert n_images == 8 and 0 < n_xml < 8
    outputs = list(read_imagenet_train(images, boxes))
    assert_sorted_and_typed(outputs)
    assert len(outputs) == n_images
    records, rejections = partition(outputs)
    assert len(records) == n_xml
    assert {r.reason for r in rejections} == {"missing_annotation"}
    for rec in records:
        assert Path(rec.image).parent.name == rec.wnid and rec.key.startswith(rec.wnid + "_")
        assert rec.label == wnid_to_index()[rec.wnid] and len(rec.boxes) == 1


def test_train_bad_inputs(tmp_path):
    root = tmp_path / "train"
    size = (64, 48)
    expected = {}

    def case(wnid: str, n: int, objects, reason: str, image: bool = True, xml: bool = True):
        key = f"{wnid}_{n}"
        if image:
            write_jpeg(root / wnid / f"{key}.JPEG", size)
        if xml:
            write_voc_xml(root / wnid / f"{key}.xml", key, size, objects)  # boxes next to images
        expected[key] = reason

    case(TENCH, 1, [(TENCH, (1, 1, 30, 30)), (GOLDFISH, (2, 2, 9, 9))], "ok")
    case(TENCH, 2, [(GOLDFISH, (1, 1, 30, 30))], "no_box")  # no box of the folder's class
    case(TENCH, 3, [(TENCH, (1, 1, 80, 30))], "box_outside_image")
    case(TENCH, 4, [(TENCH, (1, 1, 30, 30))], "missing_image", image=False)
    case(UNKNOWN, 5, [(UNKNOWN, (1, 1, 30, 30))], "unknown_wnid")
    case(GOLDFISH, 6, [], "missing_annotation", xml=False)
    outputs = list(read_imagenet_train(root))
    assert outcome(outputs) == expected
    ok = next(o for o in outputs if isinstance(o, SourceRecord))
    assert ok.wnid == TENCH and len(ok.boxes) == 1


# --------------------------------------------------------------------------- Kaggle LOC CSV


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    return path


def test_loc_csv_matches_xml_reader_and_reports_bad_rows(tmp_path):
    images = tmp_path / "val"
    keys = [f"ILSVRC2012_val_{i:08d}" for i in range(1, 9)]
    for key in keys[:6] + keys[7:]:
        write_jpeg(images / f"{key}.JPEG")
    rows = [
        (keys[0], f"{TENCH} 11 21 30 40 {TENCH} 1 1 5 5 "),  # Kaggle rows end with a space
        (keys[1], f"{TENCH} 11 21 30"),
        (keys[2], f"{TENCH} a 21 30 40"),
        (keys[3], f"{UNKNOWN} 11 21 30 40"),
        (keys[4], f"{TENCH} 40 21 30 40"),
        (keys[6], f"{TENCH} 11 21 30 40"),  # no image
        (keys[0], f"{TENCH} 1 1 5 5"),  # second row for the same image
    ]
    csv_path = _write_csv(tmp_path / "LOC_val_solution.csv", rows)
    outputs = list(read_loc_csv(images, csv_path))
    assert_sorted_and_typed(outputs)
    reasons = Counter((o.key, getattr(o, "reason", "ok")) for o in outputs)
    assert reasons == Counter(
        {
            (keys[0], "ok"): 1,
            (keys[0], "duplicate_key"): 1,
            (keys[1], "malformed_annotation"): 1,
            (keys[2], "malformed_annotation"): 1,
            (keys[3], "unknown_wnid"): 1,
            (keys[4], "inverted_box"): 1,
            (keys[5], "missing_annotation"): 1,
            (keys[6], "missing_image"): 1,
            (keys[7], "missing_annotation"): 1,
        }
    )
    rec = next(o for o in outputs if isinstance(o, SourceRecord))
    assert rec.size is None and rec.wnid == TENCH
    # Same numbers in a VOC XML give the same boxes (the CSV is the XML re-serialised).
    write_voc_xml(
        tmp_path / "xml" / f"{keys[0]}.xml",
        keys[0],
        (64, 48),
        [(TENCH, (11, 21, 30, 40)), (TENCH, (1, 1, 5, 5))],
    )
    from_xml = next(o for o in read_imagenet_val(images, tmp_path / "xml") if isinstance(o, SourceRecord))
    assert from_xml.boxes == rec.boxes
    half_open = next(
        o for o in read_loc_csv(images, csv_path, box_convention="half_open") if o.key == keys[0]
    )
    assert half_open.boxes[0].as_list() == [11.0, 21.0, 30.0, 40.0]


def test_loc_csv_train_layout_and_bad_header(tmp_path):
    images = tmp_path / "train"
    write_jpeg(images / TENCH / f"{TENCH}_7.JPEG")
    write_jpeg(images / GOLDFISH / f"{GOLDFISH}_9.JPEG")
    csv_path = _write_csv(
        tmp_path / "LOC_train_solution.csv",
        [(f"{TENCH}_7", f"{TENCH} 1 2 30 40"), (f"{GOLDFISH}_9", f"{GOLDFISH} 1 2 30 40")],
    )
    records, rejections = partition(read_loc_csv(images, csv_path))
    assert rejections == [] and [r.wnid for r in records] == [TENCH, GOLDFISH]
    assert Path(records[0].image).parent.name == TENCH
    bad = tmp_path / "bad.csv"
    bad.write_text("id,boxes\nx,y\n")
    with pytest.raises(SourceError):
        read_loc_csv(images, bad)
    with pytest.raises(SourceError):
        read_loc_csv(images, csv_path, box_convention="xywh")


# --------------------------------------------------------------------------- COCO


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": [mask.shape[0], mask.shape[1]], "counts": runs}


def _coco_fixture(tmp_path: Path) -> tuple[Path, Path, dict[str, str], dict]:
    """Images + COCO JSON with one image per case; returns (images, json, expected, masks)."""
    images = tmp_path / "images"
    w, h = 40, 30
    cats = [
        {"id": 1, "name": TENCH},
        {"id": 2, "name": GOLDFISH},
        {"id": 3, "name": "Quadruped Head"},
        {"id": 4, "name": "Quadruped Body"},
    ]
    coco: dict = {"images": [], "annotations": [], "categories": cats}
    expected: dict[str, str] = {}
    masks: dict[str, np.ndarray] = {}
    disc_a, disc_b = _disc(h, w, 12, 12, 6), _disc(h, w, 28, 18, 5)

    def add(key: str, anns: list[dict], reason: str, image: bool = True, folder: str = ""):
        image_id = len(coco["images"]) + 1
        file_name = f"{key}.JPEG"
        if image:
            write_jpeg(images / folder / file_name, (w, h))
        coco["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for a in anns:
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": image_id, "iscrowd": 0, **a}
            )
        expected[key] = reason

    square = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]
    add("poly", [{"category_id": 1, "segmentation": square, "bbox": [5, 5, 10, 10]}], "ok")
    add("rle_compressed", [{"category_id": 1, "segmentation": _rle(disc_a), "bbox": [6, 6, 13, 13]}], "ok")
    add(
        "rle_union",
        [
            {"category_id": 1, "segmentation": _rle(disc_a, compressed=False), "bbox": [6, 6, 13, 13]},
            {"category_id": 1, "segmentation": _rle(disc_b), "bbox": [23, 13, 11, 11]},
            {"category_id": 2, "segmentation": square, "bbox": [5, 5, 10, 10]},  # minority class: dropped
        ],
        "ok",
    )
    truncated = _rle(disc_a)
    truncated["counts"] = truncated["counts"][:-2]
    add(
        "rle_truncated",
        [{"category_id": 1, "segmentation": truncated, "bbox": [6, 6, 13, 13]}],
        "bad_segmentation",
    )
    short = _rle(disc_a, compressed=False)
    short["counts"] = short["counts"][:-1]
    add("rle_short", [{"category_id": 1, "segmentation": short, "bbox": [6, 6, 13, 13]}], "bad_segmentation")
    garbage = {"size": [h, w], "counts": "\x7f\x7f!!"}
    add(
        "rle_garbage",
        [{"category_id": 1, "segmentation": garbage, "bbox": [6, 6, 13, 13]}],
        "bad_segmentation",
    )
    junk_size = {"size": ["a", w], "counts": _rle(disc_a)["counts"]}
    add(
        "rle_junk_size",
        [{"category_id": 1, "segmentation": junk_size, "bbox": [6, 6, 13, 13]}],
        "bad_segmentation",
    )
    wrong_size = _rle(_disc(h + 2, w, 10, 10, 4))
    add(
        "rle_wrong_size",
        [{"category_id": 1, "segmentation": wrong_size, "bbox": [6, 6, 8, 8]}],
        "mask_size_mismatch",
    )
    add(
        "poly_odd",
        [{"category_id": 1, "segmentation": [[1, 2, 3, 4, 5]], "bbox": [1, 2, 4, 2]}],
        "bad_segmentation",
    )
    flat_poly = [[5.0, 5.0, 15.0, 5.0, 25.0, 5.0]]
    add("poly_empty", [{"category_id": 1, "segmentation": flat_poly, "bbox": [5, 5, 20, 1]}], "empty_mask")
    add(
        "bbox_outside",
        [{"category_id": 1, "segmentation": square, "bbox": [5, 5, 60, 10]}],
        "box_outside_image",
    )
    add("no_annotations", [], "missing_annotation")
    add(
        "gone",
        [{"category_id": 1, "segmentation": square, "bbox": [5, 5, 10, 10]}],
        "missing_image",
        image=False,
    )
    add("with.dot", [{"category_id": 1, "segmentation": square, "bbox": [5, 5, 10, 10]}], "bad_key")
    # Part-level categories: no category is a wnid, so the label comes from the file name.
    add(
        f"{RETRIEVER}_5",
        [
            {"category_id": 3, "segmentation": _rle(disc_a), "bbox": [6, 6, 13, 13]},
            {"category_id": 4, "segmentation": _rle(disc_b), "bbox": [23, 13, 11, 11]},
        ],
        "ok",
        folder=RETRIEVER,
    )
    add(
        "parts_no_wnid",
        [{"category_id": 3, "segmentation": square, "bbox": [5, 5, 10, 10]}],
        "unknown_category",
    )
    coco["annotations"].append(
        {"id": 999, "image_id": 12345, "category_id": 1, "segmentation": square, "bbox": [5, 5, 10, 10]}
    )
    expected["coco_annotation_999"] = "missing_image"
    write_jpeg(images / "not_in_json.JPEG", (w, h))
    expected["not_in_json"] = "missing_annotation"
    masks.update(disc_a=disc_a, disc_b=disc_b)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    return images, path, expected, masks


def _decode(rec: SourceRecord) -> np.ndarray:
    w, h = rec.size
    if rec.segmentation.kind == "polygons":
        rle = mask_utils.merge(mask_utils.frPyObjects(rec.segmentation.data, h, w))
    else:
        rle = dict(rec.segmentation.data)
    return mask_utils.decode(rle).astype(bool)


def test_coco_polygons_rle_and_failures(tmp_path):
    images, path, expected, masks = _coco_fixture(tmp_path)
    outputs = list(read_coco(images, path))
    assert_sorted_and_typed(outputs)
    assert outcome(outputs) == expected
    by_key = {o.key: o for o in outputs}
    poly = by_key["poly"]
    assert poly.segmentation.kind == "polygons" and poly.label == wnid_to_index()[TENCH]
    assert poly.boxes[0].as_list() == [5.0, 5.0, 15.0, 15.0] and poly.size == (40, 30)
    compressed = by_key["rle_compressed"]
    assert compressed.segmentation.kind == "rle"
    assert np.array_equal(_decode(compressed), masks["disc_a"].astype(bool))
    union = by_key["rle_union"]
    assert union.wnid == TENCH and len(union.boxes) == 2
    assert np.array_equal(_decode(union), (masks["disc_a"] | masks["disc_b"]).astype(bool))
    json.dumps(union.segmentation.data)  # stays JSON-serialisable for provenance
    parts = by_key[f"{RETRIEVER}_5"]
    assert parts.wnid == RETRIEVER and Path(parts.image).parent.name == RETRIEVER
    assert np.array_equal(_decode(parts), (masks["disc_a"] | masks["disc_b"]).astype(bool))
    (whole,) = parts.boxes  # one box around the object, not one per part
    ys, xs = np.nonzero(masks["disc_a"] | masks["disc_b"])
    assert whole.as_list() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_coco_category_map_and_label_modes(tmp_path):
    images, path, _, _ = _coco_fixture(tmp_path)
    # Map part categories of the wnid-less image to goldfish, by name and by id.
    for cmap in ({"Quadruped Head": GOLDFISH}, {"3": GOLDFISH}):
        rec = next(o for o in read_coco(images, path, cmap) if o.key == "parts_no_wnid")
        assert isinstance(rec, SourceRecord) and rec.wnid == GOLDFISH
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({"1": GOLDFISH}))
    rec = next(o for o in read_coco(images, path, map_file) if o.key == "poly")
    assert rec.wnid == GOLDFISH
    # With an explicit map, unmapped categories do not fall back to their names.
    assert (
        next(o for o in read_coco(images, path, map_file, label_from="category") if o.key == "rle_union").wnid
        == GOLDFISH
    )
    filename_only = outcome(list(read_coco(images, path, label_from="filename")))
    assert filename_only["poly"] == "unknown_category" and filename_only[f"{RETRIEVER}_5"] == "ok"
    category_only = outcome(list(read_coco(images, path, label_from="category")))
    assert category_only[f"{RETRIEVER}_5"] == "unknown_category" and category_only["poly"] == "ok"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SourceError):
        read_coco(images, bad)


def test_rle_counts_from_string_matches_pycocotools():
    rng = np.random.default_rng(0)
    mask = (rng.random((23, 31)) > 0.6).astype(np.uint8)
    encoded = mask_utils.encode(np.asfortranarray(mask))
    runs = rle_counts_from_string(encoded["counts"])
    assert sum(runs) == mask.size
    flat = mask.flatten(order="F")
    rebuilt = np.concatenate([np.full(n, i % 2, np.uint8) for i, n in enumerate(runs)])
    assert np.array_equal(rebuilt, flat)
    with pytest.raises(ValueError):
        rle_counts_from_string("\x7f")


# --------------------------------------------------------------------------- PNG mask folders


def _write_mask(path: Path, mask: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        rgb = np.zeros((*mask.shape, 3), np.uint8)
        rgb[..., 1] = mask * 3  # ImageNet-S style: class id in R + 256 G
        Image.fromarray(rgb, "RGB").save(path)
    else:
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)
    return path


def test_mask_dir_class_folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    h, w = 30, 40
    blob = np.zeros((h, w), np.uint8)
    blob[5:12, 7:20] = 1
    expected = {}

    def case(key: str, wnid: str, reason: str, mask=blob, image=True, mask_file=True, mode="L"):
        if image:
            write_jpeg(images / wnid / f"{key}.JPEG", (w, h))
        if mask_file:
            _write_mask(masks / wnid / f"{key}.png", mask, mode)
        expected[key] = reason

    case("ILSVRC2012_val_00000001", TENCH, "ok")
    case("ILSVRC2012_val_00000002", GOLDFISH, "ok", mode="RGB")
    case("ILSVRC2012_val_00000003", TENCH, "empty_mask", mask=np.zeros((h, w), np.uint8))
    case("ILSVRC2012_val_00000004", TENCH, "missing_annotation", mask_file=False)
    case("ILSVRC2012_val_00000005", TENCH, "missing_image", image=False)
    case("ILSVRC2012_val_00000006", UNKNOWN, "unknown_wnid")
    write_jpeg(images / TENCH / "ILSVRC2012_val_00000007.JPEG", (w, h))
    (masks / TENCH / "ILSVRC2012_val_00000007.png").write_bytes(b"\x89PNG not really")
    expected["ILSVRC2012_val_00000007"] = "bad_segmentation"
    outputs = list(read_mask_dir(images, masks))
    assert_sorted_and_typed(outputs)
    assert outcome(outputs) == expected
    for rec in partition(outputs)[0]:
        assert rec.segmentation.kind == "png" and Path(rec.segmentation.data).suffix == ".png"
        assert rec.size == (w, h) and rec.boxes[0].as_list() == [7.0, 5.0, 20.0, 12.0]
        assert rec.wnid == Path(rec.image).parent.name


def test_mask_dir_flat_with_label_csv(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    blob = np.zeros((20, 20), np.uint8)
    blob[3:9, 4:6] = 1
    for i in (1, 2, 3):
        write_jpeg(images / f"ILSVRC2012_val_{i:08d}.JPEG", (20, 20))
        _write_mask(masks / f"ILSVRC2012_val_{i:08d}.png", blob)
    labels = _write_csv(
        tmp_path / "LOC_val_solution.csv",
        [("ILSVRC2012_val_00000001", f"{GOLDFISH} 1 1 5 5"), ("ILSVRC2012_val_00000002", f"{TENCH} 1 1 5 5")],
    )
    assert outcome(list(read_mask_dir(images, masks, labels))) == {
        "ILSVRC2012_val_00000001": "ok",
        "ILSVRC2012_val_00000002": "ok",
        "ILSVRC2012_val_00000003": "missing_annotation",  # no label for it anywhere
    }
    rec = next(read_mask_dir(images, masks, {"ILSVRC2012_val_00000003": RETRIEVER}))
    assert rec.key == "ILSVRC2012_val_00000001" and isinstance(rec, Rejection)  # dict covers only image 3
    records, _ = partition(read_mask_dir(images, masks, {"ILSVRC2012_val_00000003": RETRIEVER}))
    assert [(r.key, r.wnid) for r in records] == [("ILSVRC2012_val_00000003", RETRIEVER)]
    assert mask_bounding_box(blob) == (4, 3, 6, 9) and mask_bounding_box(np.zeros((4, 4))) is None


# --------------------------------------------------------------------------- dispatch and determinism


def test_read_source_dispatches_every_kind(tmp_path):
    images, boxes = make_val_tree(tmp_path / "v", 2, photo_like=False)
    train_images, train_boxes = make_train_tree(tmp_path / "t", 1, [TENCH], photo_like=False)
    csv_path = _write_csv(tmp_path / "loc.csv", [("ILSVRC2012_val_00000001", f"{TENCH} 1 1 5 5")])
    coco_images, coco_json, _, _ = _coco_fixture(tmp_path / "c")
    masks = tmp_path / "masks"
    _write_mask(masks / "ILSVRC2012_val_00000001.png", np.ones((4, 4), np.uint8))
    calls = {
        "imagenet-val": (images, boxes, {}),
        "imagenet-train": (train_images, train_boxes, {}),
        "loc-csv": (images, csv_path, {"box_convention": "voc"}),
        "coco": (coco_images, coco_json, {"label_from": "auto"}),
        "mask-dir": (images, masks, {"labels": {"ILSVRC2012_val_00000001": TENCH}}),
    }
    assert set(calls) == set(SOURCE_KINDS)
    for kind, (imgs, ann, opts) in calls.items():
        outputs = list(read_source(kind, imgs, ann, **opts))
        assert outputs and all(o.source == kind for o in outputs), kind
        assert any(isinstance(o, SourceRecord) for o in outputs), kind
    with pytest.raises(SourceError):
        read_source("voc", images, boxes)
    with pytest.raises(SourceError):
        read_source("imagenet-val", images, None)
    with pytest.raises(SourceError):
        read_source("imagenet-val", images, boxes, labels={})


def test_readers_are_deterministic(tmp_path):
    images, boxes, _ = _bad_val_tree(tmp_path)
    assert list(read_imagenet_val(images, boxes)) == list(read_imagenet_val(images, boxes))


# --------------------------------------------------------------------------- fixtures


def test_val_tree_images_are_photo_like_and_reproducible(tmp_path):
    images, boxes = make_val_tree(tmp_path / "a", 3, seed=7, boxes_per_image=2)
    again, _ = make_val_tree(tmp_path / "b", 2, seed=7, boxes_per_image=2)

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    # Image i does not depend on how many images were made.
    assert [digest(p) for p in sorted(images.iterdir())[:2]] == [digest(p) for p in sorted(again.iterdir())]
    rec = next(read_imagenet_val(images, boxes))
    assert len(rec.boxes) == 2
    pixels = np.asarray(Image.open(rec.image).convert("RGB"), dtype=np.float32)
    assert pixels.shape[1::-1] == rec.size
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # not flat colours
    b = rec.boxes[0]
    fg = pixels[int(b.y0) : int(b.y1), int(b.x0) : int(b.x1)]
    cy, cx = fg.shape[0] // 2, fg.shape[1] // 2
    centre = fg[cy - 5 : cy + 5, cx - 5 : cx + 5]
    assert centre.std() > 5  # textured object
    with pytest.raises(ValueError):
        make_val_tree(tmp_path / "c", 1, classes=[UNKNOWN])
