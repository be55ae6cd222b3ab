"""Source readers: every input becomes exactly one record or one precise rejection."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bench.imagenet_tree import make_box_archive, make_train_tree, make_val_tree, write_voc_xml
from pipeline.classes import wnid_to_index
from pipeline.masks import rle_counts_from_string
from pipeline.records import Box, RejectedInput, Rejection, SourceRecord
from pipeline.sources import READERS, SourceError, read_source
from pipeline.sources._common import check_boxes, most_common, scan, stem
from pipeline.sources.coco import read_coco
from pipeline.sources.loc_csv import read_loc_csv
from pipeline.sources.mask_dir import read_mask_dir
from pipeline.sources.voc import parse_voc_xml, read_imagenet_train, read_imagenet_val, voc_box

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


def partition(outputs) -> tuple[list[SourceRecord], list[Rejection]]:
    """A reader's stream split into records and rejections, order kept."""
    outputs = list(outputs)
    return [o for o in outputs if isinstance(o, SourceRecord)], [o for o in outputs if isinstance(o, Rejection)]


def assert_sorted_and_typed(outputs: list) -> None:
    assert all(isinstance(o, (SourceRecord, Rejection)) for o in outputs)
    keys = [o.key for o in outputs]
    assert keys == sorted(keys)


# --------------------------------------------------------------------------- check_boxes


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
def test_check_boxes(box, size, reason, clean):
    boxes, got, detail = check_boxes([box], size)
    assert got == reason
    if clean is None:
        assert boxes == () and detail
    else:
        assert [b.as_list() for b in boxes] == [list(map(float, clean))] and detail == ""


def test_check_boxes_one_bad_box_rejects_all_and_empty_is_no_box():
    assert check_boxes([Box(0, 0, 10, 10), Box(5, 5, 1, 9)], (64, 48))[:2] == ((), "inverted_box")
    assert check_boxes([], (64, 48))[:2] == ((), "no_box")
    kept, reason, _ = check_boxes([Box(0, 0, 10, 10, TENCH), Box(20, 20, 30, 30, TENCH)], (64, 48))
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
        with pytest.raises(RejectedInput) as err:
            parse_voc_xml(bad)
        assert err.value.reason == "malformed_annotation"


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
    assert records[0].boxes[0].as_list() == [4.0, 3.0, 6.0, 9.0]


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
        "demo": (None, None, {"cache_dir": tmp_path / "demo-cache"}),
    }
    assert set(calls) == set(READERS)
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
    with pytest.raises(SourceError):
        read_source("coco", None, coco_json)


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


# --------------------------------------------------------------------------- hostile inputs


def _val_case(images: Path, boxes: Path, name: str, size=(64, 48), objects=((TENCH, (11, 21, 30, 40)),)) -> None:
    write_jpeg(images / f"{name}.JPEG", size)
    write_voc_xml(boxes / f"{name}.xml", name, size, list(objects))


def test_file_names_outside_the_key_alphabet_are_bad_key_with_the_reason(tmp_path):
    images, boxes = tmp_path / "val", tmp_path / "boxes"
    for name in ("a,b", "a\nb", "a b", "x" * 120, "ok_1"):
        _val_case(images, boxes, name)
    raw = os.fsencode(images) + b"/caf\xe9.JPEG"  # not UTF-8: a Latin-1 file name
    Path(os.fsdecode(raw)).write_bytes((images / "ok_1.JPEG").read_bytes())
    outputs = list(read_imagenet_val(images, boxes))
    assert_sorted_and_typed(outputs)
    by_reason = Counter(getattr(o, "reason", "ok") for o in outputs)
    assert by_reason == {"ok": 1, "bad_key": 5}, outputs
    for o in outputs:
        if isinstance(o, Rejection):
            # the key is safe to print and to write to JSON/CSV; the detail says what is wrong with it
            assert o.key.isascii() and o.key.isprintable() and "\n" not in o.detail, o
            assert "at most 91" in o.detail if o.key.startswith("xxx") else "only letters, digits" in o.detail, o
            assert str(tmp_path) not in o.detail


def test_coco_file_name_with_a_comma_is_bad_key(tmp_path):
    images = tmp_path / "images"
    write_jpeg(images / "a,b.JPEG", (40, 30))
    coco = {
        "images": [{"id": 1, "file_name": "a,b.JPEG", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
        "categories": [{"id": 1, "name": TENCH}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (rejected,) = read_coco(images, tmp_path / "instances.json")
    assert (rejected.key, rejected.reason) == ("a,b", "bad_key") and "only letters" in rejected.detail


@pytest.mark.parametrize(
    ("width", "reason"),
    [("inf", "malformed_annotation"), ("1e400", "malformed_annotation"), ("nan", "malformed_annotation"),
     ("-64", "malformed_annotation"), ("64.5", "malformed_annotation"), ("40000", "decompression_bomb")],
)
def test_voc_size_that_no_image_has_is_a_rejection_not_a_crash(tmp_path, width, reason):
    images, boxes = tmp_path / "val", tmp_path / "boxes"
    _val_case(images, boxes, "ILSVRC2012_val_00000001")
    xml = boxes / "ILSVRC2012_val_00000001.xml"
    height = "40000" if width == "40000" else "48"
    xml.write_text(xml.read_text().replace("<width>64</width>", f"<width>{width}</width>")
                   .replace("<height>48</height>", f"<height>{height}</height>"))
    (out,) = read_imagenet_val(images, boxes)
    assert isinstance(out, Rejection) and out.reason == reason, out
    assert out.detail.startswith("ILSVRC2012_val_00000001.xml: ")


class NativeCalls:
    """Stands in for pycocotools' C entry points: records each call and refuses it, so no test can hang in C."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, object]] = []
        for name in ("frPyObjects", "decode", "merge", "area", "toBbox", "encode"):
            monkeypatch.setattr(mask_utils, name, self._refuse(name))

    def _refuse(self, name):
        def refuse(*args, **kwargs):
            self.calls.append((name, args))
            raise RuntimeError(f"pycocotools.mask.{name} called")

        return refuse


def _coco_one(tmp_path: Path, entry: dict, segmentation, bbox=(5, 5, 10, 10)) -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_jpeg(images / "n01440764_1.JPEG", (40, 30))
    coco = {
        "images": [{"id": 3, "file_name": "n01440764_1.JPEG", **entry}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "segmentation": segmentation, "bbox": list(bbox)}],
        "categories": [{"id": 1, "name": TENCH}],
    }
    path = tmp_path / "instances.json"
    # json writes inf/nan as Infinity/NaN, which json.loads reads back; "1e400" is a literal number
    path.write_text(json.dumps(coco).replace('"1e400"', "1e400"))
    return images, path


SQUARE = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"width": float("inf"), "height": 30}, "malformed_annotation"),
        ({"width": float("nan"), "height": 30}, "malformed_annotation"),
        ({"width": 40, "height": "1e400"}, "malformed_annotation"),  # read as float inf
        ({"width": 40, "height": 10**400}, "decompression_bomb"),  # 400 digits: an int, but no image
        ({"width": -40, "height": 30}, "malformed_annotation"),
        ({"width": 40.5, "height": 30}, "malformed_annotation"),
        ({"width": True, "height": 30}, "malformed_annotation"),
        ({"width": "40", "height": 30}, "malformed_annotation"),
        ({"height": 30}, "malformed_annotation"),
        ({"width": 40000, "height": 40000}, "decompression_bomb"),
    ],
)
def test_coco_image_size_is_checked_before_anything_is_sized_by_it(tmp_path, monkeypatch, entry, reason):
    rle = {"size": [entry.get("height"), entry.get("width")], "counts": [40000 * 40000]}
    images, path = _coco_one(tmp_path, entry, rle)
    native = NativeCalls(monkeypatch)
    (out,) = read_coco(images, path)
    assert isinstance(out, Rejection) and out.reason == reason, out
    assert out.detail.startswith("instances.json#image_id=3: ")
    assert native.calls == []  # nothing decoded at a size nobody checked (40000 x 40000 is 1.6 GB)


@pytest.mark.parametrize(
    ("segmentation", "reason"),
    [
        ([[5.0, 5.0, 2e9, 5.0, 15.0, 15.0]], "bad_segmentation"),  # hangs or crashes pycocotools' rasteriser
        ([[5.0, 5.0, 15.0, -3e9, 15.0, 15.0]], "bad_segmentation"),
        ([[5.0, 5.0, 43.0, 5.0, 15.0, 15.0]], "bad_segmentation"),  # beyond the 1-px tolerance
        ([[5.0, 5.0, 15.0, 5.0, True, 15.0]], "bad_segmentation"),
        ({"size": [30, 40], "counts": [1200, True]}, "bad_segmentation"),
        ({"size": [30, 40], "counts": [10**30]}, "bad_segmentation"),
        ({"size": [float("inf"), 40], "counts": [1200]}, "bad_segmentation"),
        ({"size": [40000, 40000], "counts": [40000 * 40000]}, "mask_size_mismatch"),
    ],
)
def test_coco_geometry_is_checked_before_pycocotools(tmp_path, monkeypatch, segmentation, reason):
    images, path = _coco_one(tmp_path, {"width": 40, "height": 30}, segmentation)
    native = NativeCalls(monkeypatch)
    (out,) = read_coco(images, path)
    assert isinstance(out, Rejection) and out.reason == reason, out
    assert native.calls == []


def test_coco_polygon_inside_the_tolerance_still_builds(tmp_path):
    images, path = _coco_one(tmp_path, {"width": 40, "height": 30}, [[-0.5, 0.0, 40.9, 0.0, 40.9, 30.5, 0.0, 30.5]])
    (rec,) = read_coco(images, path)
    assert isinstance(rec, SourceRecord) and rec.segmentation.kind == "polygons"


def test_dangling_image_symlink_is_missing_image(tmp_path):
    images, boxes = tmp_path / "val", tmp_path / "boxes"
    _val_case(images, boxes, "ILSVRC2012_val_00000001")
    write_voc_xml(boxes / "ILSVRC2012_val_00000002.xml", "x", (64, 48), [(TENCH, (11, 21, 30, 40))])
    (images / "ILSVRC2012_val_00000002.JPEG").symlink_to(tmp_path / "gone.JPEG")
    real = write_jpeg(tmp_path / "elsewhere" / "photo.JPEG")  # ImageNet copies are often symlink farms
    write_voc_xml(boxes / "ILSVRC2012_val_00000003.xml", "x", (64, 48), [(TENCH, (11, 21, 30, 40))])
    (images / "ILSVRC2012_val_00000003.JPEG").symlink_to(real)
    outputs = list(read_imagenet_val(images, boxes))
    assert outcome(outputs) == {
        "ILSVRC2012_val_00000001": "ok",
        "ILSVRC2012_val_00000002": "missing_image",
        "ILSVRC2012_val_00000003": "ok",
    }


# --------------------------------------------------------------------------- only regular files are read


def _special_files(folder: Path, stem_of: dict[str, str], ext: str) -> dict[str, str]:
    """A FIFO, a socket and a symlink to a device under image-like names; returns key -> kind."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / f"{stem_of['fifo']}{ext}")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / f"{stem_of['socket']}{ext}"))
    sock.close()
    (folder / f"{stem_of['device']}{ext}").symlink_to("/dev/zero")
    return {v: k for k, v in stem_of.items()}


NAMES = {"fifo": "ILSVRC2012_val_00000011", "socket": "ILSVRC2012_val_00000012", "device": "ILSVRC2012_val_00000013"}


@pytest.mark.timeout(60)
def test_fifo_socket_and_device_images_are_refused_without_a_read(tmp_path):
    images, boxes = tmp_path / "val", tmp_path / "boxes"
    _val_case(images, boxes, "ILSVRC2012_val_00000001")
    for key in NAMES.values():
        write_voc_xml(boxes / f"{key}.xml", key, (64, 48), [(TENCH, (11, 21, 30, 40))])
    _special_files(images, NAMES, ".JPEG")
    outputs = {o.key: o for o in read_imagenet_val(images, boxes)}
    for key in NAMES.values():
        assert (outputs[key].reason, outputs[key].detail) == ("undecodable_image", f"{key}.JPEG: not a regular file")


@pytest.mark.timeout(60)
def test_fifo_annotations_and_masks_are_refused_without_a_read(tmp_path):
    images, boxes = tmp_path / "val", tmp_path / "boxes"
    for key in NAMES.values():
        write_jpeg(images / f"{key}.JPEG")
    _special_files(boxes, NAMES, ".xml")  # opening a FIFO for reading waits for a writer: forever
    outputs = list(read_imagenet_val(images, boxes))
    assert {(o.reason, o.detail.split(": ", 1)[1]) for o in outputs} == {("malformed_annotation", "not a regular file")}
    masks = tmp_path / "masks"
    _special_files(masks, NAMES, ".png")
    outputs = list(read_mask_dir(images, masks, {key: TENCH for key in NAMES.values()}))
    assert {(o.reason, o.detail.split(": ", 1)[1]) for o in outputs} == {("bad_segmentation", "not a regular file")}


@pytest.mark.timeout(60)
def test_whole_source_files_must_be_regular_files(tmp_path):
    images = tmp_path / "val"
    write_jpeg(images / "ILSVRC2012_val_00000001.JPEG")
    os.mkfifo(tmp_path / "instances.json")
    os.mkfifo(tmp_path / "LOC_val_solution.csv")
    with pytest.raises(SourceError):
        read_coco(images, tmp_path / "instances.json")
    with pytest.raises(SourceError):
        read_loc_csv(images, tmp_path / "LOC_val_solution.csv")
    os.mkfifo(tmp_path / "boxes.tgz")
    with pytest.raises(SourceError):
        read_imagenet_val(images, tmp_path / "boxes.tgz")


@pytest.mark.timeout(120)
def test_demo_refuses_a_fifo_in_its_cache(tmp_path):
    from pipeline.sources.demo import read_demo

    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / "chelsea.png")
    outputs = {o.key: o for o in read_demo(cache_dir=cache)}
    assert len(outputs) == 14
    assert (outputs["chelsea"].reason, outputs["chelsea"].detail) == ("undecodable_image", "chelsea.png: not a regular file")
    assert isinstance(outputs["chelsea_mirror"], SourceRecord)


# --------------------------------------------------------------------------- outputs are relative to the source root


def _portable(outputs: list) -> list:
    """Reader output with the one path that must stay usable (the image, and a mask the builder opens) relative."""
    rows = []
    for o in outputs:
        if isinstance(o, SourceRecord):
            seg = o.segmentation
            if seg is not None and seg.kind == "png":
                seg = (seg.kind, Path(seg.data).name, getattr(seg.data, "foreground_ids", None))
            o = (o.key, Path(o.image).name, o.label, o.boxes, seg, o.size, o.source, o.annotation)
        rows.append(o)
    return rows


def test_same_tree_in_two_folders_gives_the_same_output(tmp_path):
    import shutil

    first = tmp_path / "first" / "data"
    images, boxes, _ = _bad_val_tree(first)
    make_box_archive(boxes, first / "boxes.tgz")
    coco_images, coco_json, _, _ = _coco_fixture(first / "coco")
    train_images, train_boxes = make_train_tree(first / "train", 2, [TENCH, GOLDFISH], boxes_fraction=0.5,
                                                photo_like=False)
    _write_csv(first / "LOC_val_solution.csv", [("ILSVRC2012_val_00000001", f"{TENCH} 1 1 5 5"),
                                                 ("ILSVRC2012_val_00000006", f"{TENCH} 1 1 5 5"),
                                                 ("ILSVRC2012_val_00000003", f"{TENCH} 1 1 a 5")])
    masks = first / "masks"
    _write_mask(masks / "ILSVRC2012_val_00000001.png", np.ones((48, 64), np.uint8))
    (masks / "ILSVRC2012_val_00000002.png").write_bytes(b"\x89PNG not really")
    second = Path(shutil.copytree(first, tmp_path / "elsewhere" / "copy", symlinks=True))

    def read_all(root: Path) -> dict[str, list]:
        return {
            "val": list(read_imagenet_val(root / "val", root / "boxes")),
            "val-archive": list(read_imagenet_val(root / "val", root / "boxes.tgz")),
            "train": list(read_imagenet_train(root / "train" / "train", root / "train" / train_boxes.name)),
            "loc-csv": list(read_loc_csv(root / "val", root / "LOC_val_solution.csv")),
            "coco": list(read_coco(root / "coco" / coco_images.name, root / "coco" / coco_json.name)),
            "mask-dir": list(read_mask_dir(root / "val", root / "masks", {"ILSVRC2012_val_00000001": TENCH})),
        }

    a, b = read_all(first), read_all(second)
    for kind in a:
        assert _portable(a[kind]) == _portable(b[kind]), kind
        details = " ".join(o.detail for o in a[kind] if isinstance(o, Rejection))
        annotations = " ".join(o.annotation for o in a[kind] if isinstance(o, SourceRecord))
        assert str(tmp_path) not in details + annotations, kind
    assert {o.annotation for o in a["val"] if isinstance(o, SourceRecord)} >= {"val/ILSVRC2012_val_00000001.xml"}
    assert {o.annotation for o in a["val-archive"] if isinstance(o, SourceRecord)} >= {
        "boxes.tgz::val/ILSVRC2012_val_00000001.xml"
    }
    assert [o.annotation for o in a["loc-csv"] if isinstance(o, SourceRecord)] == ["LOC_val_solution.csv:2"]
    assert {o.annotation for o in a["coco"] if isinstance(o, SourceRecord)} >= {"coco.json#image_id=1"}
    assert [o.annotation for o in a["mask-dir"] if isinstance(o, SourceRecord)] == ["ILSVRC2012_val_00000001.png"]


# --------------------------------------------------------------------------- ImageNet-S class-id masks


def _imagenet_s_mask(path: Path, ids: np.ndarray) -> Path:
    """An ImageNet-S PNG: class id = R + 256 * G."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    Image.fromarray(rgb, "RGB").save(path)
    return path


def test_mask_dir_reads_imagenet_s_class_ids(tmp_path):
    from pipeline.masks import segmentation_mask
    from pipeline.variants import box_rectangle

    images, masks = tmp_path / "images", tmp_path / "masks"
    ids = np.zeros((30, 40), np.int64)
    ids[5:10, 5:15] = 5  # the image's own class (tench in the map below)
    ids[20:25, 30:38] = 7  # another class in the same image
    ids[0:30, 0:2] = 1000  # ignored: neither foreground nor background
    key = "ILSVRC2012_val_00000001"
    write_jpeg(images / TENCH / f"{key}.JPEG", (40, 30))
    _imagenet_s_mask(masks / TENCH / f"{key}.png", ids)
    cmap = tmp_path / "imagenet_s_categories.json"
    cmap.write_text(json.dumps({"5": TENCH, "7": GOLDFISH}))

    (own,) = read_mask_dir(images, masks, category_map=cmap)
    assert own.boxes[0].as_list() == [5.0, 5.0, 15.0, 10.0]  # only the own class
    (anything,) = read_mask_dir(images, masks)
    assert anything.boxes[0].as_list() == [5.0, 5.0, 38.0, 25.0]  # every class but other and ignored
    for rec in (own, anything):  # the builder reads the mask by the same rule
        mask = segmentation_mask(rec.segmentation, rec.size)
        assert not mask[:, :2].any()
        assert box_rectangle(mask) == tuple(int(v) for v in rec.boxes[0].as_list())
    (unmapped,) = read_mask_dir(images, masks, category_map={"7": GOLDFISH})
    assert unmapped.reason == "unknown_category"


def test_mask_dir_refuses_a_binary_mask_saved_in_colour(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_jpeg(images / TENCH / "ILSVRC2012_val_00000001.JPEG", (40, 30))
    white = np.zeros((30, 40, 3), np.uint8)
    white[5:10, 5:15] = 255  # id 255 + 256 * 255: no ImageNet-S class
    (masks / TENCH).mkdir(parents=True)
    Image.fromarray(white, "RGB").save(masks / TENCH / "ILSVRC2012_val_00000001.png")
    (out,) = read_mask_dir(images, masks)
    assert out.reason == "bad_segmentation" and "single-channel" in out.detail


def test_most_common_is_counters_first_most_common():
    rng = random.Random(0)
    for _ in range(2000):
        values = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        expected = Counter(values).most_common(1)[0][0]  # ties: the first seen
        assert most_common(values) == most_common(iter(values)) == expected, values
    with pytest.raises(IndexError):
        most_common([])


def test_check_boxes_keeps_clean_float_boxes_and_rebuilds_the_rest():
    inside = Box(1.0, 2.0, 30.0, 40.0, "n01440764")
    clipped = Box(-0.5, 2.0, 50.5, 40.0, "n01440764")
    whole = Box(1, 2, 30, 40, "n01440764")
    (a, b, c), reason, _ = check_boxes([inside, clipped, whole], (50, 45))
    assert reason is None and a is inside
    assert b.as_list() == [0.0, 2.0, 50.0, 40.0] and b.wnid == "n01440764"
    assert c == inside and all(type(v) is float for v in c.as_list())


def test_scan_pairs_by_stem_like_splitext(tmp_path):
    names = ["a.b.JPEG", "noext", "trailing.", "UPPER.JPG", "back\\slash.jpeg", ".hidden.jpeg", "x.png", "y.txt",
             "sub/in.jpeg", "sub/deeper/too-deep.jpeg", "sub/a.b.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    expected: dict[str, list[str]] = {}
    for folder, _, files in os.walk(tmp_path):  # the plain rule: splitext, no dot files, one folder deep
        rel = Path(folder).relative_to(tmp_path)
        if len(rel.parts) > 1 or any(p.startswith(".") for p in rel.parts):
            continue
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in {".jpeg", ".jpg", ".png"}:
                expected.setdefault(stem(f), []).append((rel / f).as_posix())
    found = scan(tmp_path, {".JPEG", ".jpg", ".png"}, depth=1)
    assert {s: [f.name for f in files] for s, files in found.items()} == {s: sorted(v) for s, v in expected.items()}
    assert set(found) == {"a.b", "UPPER", "slash", "x", "in"}
    assert [f.name for f in found["a.b"]] == ["a.b.JPEG", "sub/a.b.jpg"]
