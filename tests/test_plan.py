"""The planner against a straightforward planner written here: same probes, draws, plan and hashes.

The planner draws partners by bisecting sorted pools and decides box_too_large
by counting raster pixels (builders/plan.py); the reference below is the plain
version (a filtered list per draw, one hash update per row, a mean over the
box raster), so any change to what a plan contains shows up as a difference.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.imagenet_tree import make_val_tree, write_sample, write_voc_xml
from bench.make_tree import tree_classes
from builders.config import BuildConfig
from builders.plan import (
    annotation_hash,
    draw_partner,
    filters_of,
    list_textures,
    make_plan,
    pick_texture,
    probe_batch,
    selected_classes,
)
from pipeline.classes import to_in9
from pipeline.decode import SOURCE_FORMATS, exif_transpose_code, open_image
from pipeline.prepare import sample_geometry
from pipeline.records import Box, Rejection, Segmentation, SourceRecord, gc_paused
from pipeline.rng import draw_index, draw_unit
from pipeline.sources import read_source
from pipeline.variants import VARIANT_SPECS, VARIANTS

# --------------------------------------------------------------------------- the reference planner


def reference_hash(items) -> str:
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, SourceRecord):
            row = [item.key, item.label, item.wnid, [[b.x0, b.y0, b.x1, b.y1] for b in item.boxes],
                   item.segmentation.kind if item.segmentation else None, list(item.size) if item.size else None]
        else:
            row = ["rejected", item.key, item.reason]
        h.update(json.dumps(row, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()


def reference_probe(record: SourceRecord, config: BuildConfig):
    """(bg_ok, failures, stamp) from the header, with the selection filters exactly as the builder applies them."""
    with open(record.image, "rb") as fh:
        img = open_image(fh, formats=SOURCE_FORMATS)
        size, orientation = img.size, exif_transpose_code(img)
        st = os.fstat(fh.fileno())
    geo = sample_geometry(record, size, orientation, size=config.size, resize=config.resize,
                          filters=filters_of(config))
    s = config.size
    has_strip = (min(max(b[0], 0) for b in geo.framed) >= 1 or min(max(b[1], 0) for b in geo.framed) >= 1
                 or max(min(b[2], s) for b in geo.framed) <= s - 1 or max(min(b[3], s) for b in geo.framed) <= s - 1)
    return "box_too_large" not in geo.failures and has_strip, list(geo.failures), f"{st.st_size}:{st.st_mtime_ns}"


def reference_plan(items, config: BuildConfig, probes: dict) -> dict:
    """The plan, one record and one Generator at a time."""
    chosen = selected_classes(config.classes)
    rejections, records = [], []
    for item in items:
        if isinstance(item, Rejection):
            rejections.append(item)
        elif chosen is not None and item.label not in chosen:
            rejections.append(Rejection(item.key, "class_not_selected", f"label {item.label}", item.source))
        elif isinstance(probes[item.key], Rejection):
            rejections.append(probes[item.key])
        elif "multiple_boxes" in probes[item.key].failures:
            rejections.append(Rejection(item.key, "multiple_boxes", ", ".join(probes[item.key].failures), item.source))
        elif "box_cropped" in probes[item.key].failures:
            rejections.append(Rejection(item.key, "box_cropped", ", ".join(probes[item.key].failures), item.source))
        else:
            records.append(item)
    if config.per_class:
        keep = set()
        for label in {r.label for r in records}:
            members = [r for r in records if r.label == label]
            members.sort(key=lambda r: draw_unit(config.seed, r.key, "per_class"))
            keep |= {r.key for r in members[: config.per_class]}
        rejections += [Rejection(r.key, "over_per_class_limit", f"class {r.label}", r.source)
                       for r in records if r.key not in keep]
        records = [r for r in records if r.key in keep]
    records.sort(key=lambda r: r.key)
    label_of = {r.key: r.label for r in records}

    def group(label: int) -> int:
        return to_in9(label) if config.partner_level == "in9" else label

    groups = sorted({group(r.label) for r in records})
    usable = [r for r in records if probes[r.key].bg_ok]

    def pool(kind: str, label: int) -> list[str]:
        if kind == "any":
            return [r.key for r in usable]
        if kind == "same":
            return [r.key for r in usable if group(r.label) == group(label)]
        if len(groups) < 2:
            return []
        following = groups[(groups.index(group(label)) + 1) % len(groups)]
        return [r.key for r in usable if group(r.label) == following]

    textures = list_textures(config)
    assignments: dict[str, dict] = {}
    dropped: dict[str, list[tuple[str, str]]] = {}
    partners: dict[str, str] = {}
    for variant in config.variants:
        spec = VARIANT_SPECS[variant]
        assignments[variant], dropped[variant] = {}, []
        for r in records:
            if spec.own_background and not probes[r.key].bg_ok:
                reason = "box_too_large" if "box_too_large" in probes[r.key].failures else "no_background"
                dropped[variant].append((r.key, reason))
            elif spec.partner is not None:
                others = [k for k in pool(spec.partner, r.label) if k != r.key]
                if not others:
                    dropped[variant].append((r.key, "no_partner"))
                    continue
                partner = others[draw_index(config.seed, r.key, variant, len(others))]
                assignments[variant][r.key] = (partner, label_of[partner], None)
                partners.setdefault(partner, partner)
            elif spec.texture:
                texture = textures[draw_index(config.seed, r.key, "texture", len(textures))]
                assignments[variant][r.key] = (None, None, texture)
    return {
        "inputs": [r.key for r in records],
        "rejections": sorted((r.key, r.reason, r.detail) for r in rejections),
        "assignments": {v: list(a.items()) for v, a in assignments.items()},
        "dropped": dropped,
        "partners": list(partners),
        "source_hash": reference_hash(items),
        "chunk_hashes": [reference_hash(records[i : i + config.shard_size])
                         for i in range(0, len(records), config.shard_size)],
        "stamps": {r.key: probes[r.key].stamp for r in records},
    }


def plan_as_reference(plan) -> dict:
    return {
        "inputs": [r.key for r in plan.inputs],
        "rejections": sorted((r.key, r.reason, r.detail) for r in plan.rejections),
        "assignments": {v: [(k, (a.bg_key, a.bg_label, a.texture)) for k, a in per.items()]
                        for v, per in plan.assignments.items()},
        "dropped": {v: [(r.key, r.reason) for r in rs] for v, rs in plan.variant_rejections.items()},
        "partners": list(plan.partners),
        "source_hash": plan.source_hash,
        "chunk_hashes": [annotation_hash(chunk) for chunk in plan.chunks()],
        "stamps": plan.stamps,
    }


# --------------------------------------------------------------------------- a small tree with every case


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """40 two-box and 16 one-box images over 6 classes (3 IN-9 groups), one rotated by EXIF, one not an image."""
    root = tmp_path_factory.mktemp("plan-tree")
    sizes = ((500, 375), (375, 500), (300, 300))
    classes = tree_classes(6)
    images, boxes = make_val_tree(root, 40, classes=classes, seed=4, photo_like=False, boxes_per_image=2,
                                  size_choices=sizes)
    for i in range(42, 58):
        key = f"ILSVRC2012_val_{i:08d}"
        write_sample(images / f"{key}.JPEG", boxes / "val" / f"{key}.xml", key, classes[i % 6],
                     np.random.default_rng([4, i]), sizes, False, 1)
    rotated = images / "ILSVRC2012_val_00000003.JPEG"
    with Image.open(rotated) as im:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(rotated, format="JPEG", exif=exif.tobytes())
    bad = "ILSVRC2012_val_00000041"
    (images / f"{bad}.JPEG").write_bytes(b"not a jpeg at all" * 20)
    write_voc_xml(boxes / "val" / f"{bad}.xml", bad, (500, 375), [(classes[0], (10, 10, 200, 200))])
    return images, boxes


CONFIGS = {
    "default": {},
    "filters": {"per_class": 3, "partner_level": "in9", "max_box_fraction": 0.5, "seed": 5, "shard_size": 4},
    "one_box_class_sets": {"exactly_one_box": True, "classes": "FOUR_OF_SIX", "seed": 2**33 + 3},
    "no_box_filters": {"max_box_fraction": None, "max_box_cropped": None, "seed": -7, "shard_size": 16},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_matches_the_reference_planner(tree, tmp_path, name):
    images, boxes = tree
    options = dict(CONFIGS[name])
    if options.get("classes") == "FOUR_OF_SIX":
        (tmp_path / "classes.txt").write_text("\n".join(tree_classes(6)[:4]) + "\n")
        options["classes"] = str(tmp_path / "classes.txt")
    config = replace(BuildConfig(variants=tuple(VARIANTS), source="imagenet-val", images=str(images),
                                 annotations=str(boxes), out=str(tmp_path / "out"), shard_size=8),
                     **options).validate()
    items = list(read_source("imagenet-val", images, boxes))
    records = [r for r in items if isinstance(r, SourceRecord)]
    probes = {r.key: p for r, p in zip(records, probe_batch(records, config), strict=True)}
    for r in records:
        if isinstance(probes[r.key], Rejection):
            assert r.key == "ILSVRC2012_val_00000041" and probes[r.key].reason == "undecodable_image"
        else:
            p = probes[r.key]
            assert (p.bg_ok, list(p.failures), p.stamp) == reference_probe(r, config), r.key
    plan = make_plan(items, config, probes)
    ours, reference = plan_as_reference(plan), reference_plan(items, config, probes)
    for part in reference:
        assert ours[part] == reference[part], part
    assert plan.n_inputs == len(items)
    # the cases the tree is there to exercise
    drawn = [a for v in ("mixed_same", "mixed_rand", "mixed_next") for a in plan.assignments[v].values()]
    assert drawn and all(a.bg_key in plan.partners for a in drawn)
    if name == "filters":
        reasons = {r.reason for rs in plan.variant_rejections.values() for r in rs} | {r.reason for r in plan.rejections}
        assert {"box_too_large", "over_per_class_limit"} <= reasons
    if name == "one_box_class_sets":
        assert {r.reason for r in plan.rejections} >= {"multiple_boxes", "class_not_selected"}


def test_draws_are_uniform_and_depend_on_seed_key_and_purpose_alone():
    keys = [f"n{i:08d}" for i in range(20_000)]
    counts = np.bincount([draw_index(0, k, "mixed_rand", 10) for k in keys], minlength=10)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 27.9, counts  # 9 degrees of freedom: p = 0.001
    units = np.array([draw_unit(0, k, "per_class") for k in keys])
    assert units.min() >= 0 and units.max() < 1 and abs(units.mean() - 0.5) < 0.01
    assert draw_index(0, "k", "p", 1) == 0 and draw_index(5, "k", "p", 2**40) < 2**40
    values = {draw_index(seed, key, purpose, 2**60) for seed in (0, 1) for key in ("a", "b") for purpose in ("x", "y")}
    assert len(values) == 8  # each of seed, key and purpose changes the draw
    assert draw_index(0, "a", "x", 2**60) == draw_index(2**32, "a", "x", 2**60)  # the seed is taken mod 2**32
    with pytest.raises(ValueError):
        draw_index(0, "a", "x", 0)


def test_a_partner_is_uniform_over_the_pool_without_the_key_itself():
    pool = sorted(f"k{i}" for i in range(5))
    seen = Counter(draw_partner(pool, "k2", seed, "mixed_same") for seed in range(5000))
    assert set(seen) == {"k0", "k1", "k3", "k4"} and min(seen.values()) > 1100, seen
    assert Counter(draw_partner(pool, "x", seed, "mixed_same") for seed in range(5000)).keys() == set(pool)
    assert draw_partner(["only"], "only", 0, "mixed_rand") is None
    assert draw_partner([], "k", 0, "mixed_rand") is None
    textures = [f"t{i}" for i in range(13)]
    assert {pick_texture(textures, 4, f"k{i}") for i in range(500)} == set(textures)


def test_annotation_hash_is_json_dumps_of_each_row():
    records = [
        SourceRecord("k1", "x", 3, "n01440764", (Box(0.5, 1.0, 30.25, 40.0, "n01440764"),), None, (500, 375)),
        SourceRecord("k2", "x", 3, "n01440764", (Box(0.0, 0.0, 1e308, 1e308),), Segmentation("png", "m.png"), None),
        SourceRecord("k3", "x", 3, "n0\u00e9", (Box(np.float64(1.5), 2, float("inf"), float("nan")),), None, ()),
        SourceRecord("k4", "x", 3, "w", (Box(1.0, 2.0, 3.0, 4.0), Box(-0.0, 5e-324, 7.0, 9.0)),
                     Segmentation("polygons", [[1, 2, 3, 4]]), (5, 6)),
        SourceRecord("k5", "x", True, "w", (), None, (1, 2, 3)),
        Rejection("bad\nkey \u00e9\"\\", "bad_key", "x"),
        Rejection("k6", "no_box"),
    ]
    assert annotation_hash(records) == reference_hash(records)
    assert annotation_hash(records[:3]) == reference_hash(records[:3]) != reference_hash(records[1:4])
    assert annotation_hash([]) == hashlib.sha256(b"").hexdigest()
    odd = SourceRecord("k7", "x", 3, "w", (Box(1.0, 2.0, 3.0, 4.0),), None, (np.int64(5), 6))
    for hash_of in (annotation_hash, reference_hash):  # what json cannot write fails the same way
        with pytest.raises(TypeError):
            hash_of([odd])


def test_gc_paused_restores_collection():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # an inner block does not resume it early
    assert gc.isenabled()
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("x")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as it was
    finally:
        gc.enable()


# --------------------------------------------------------------------------- the header probe


def _pil_header(path: Path) -> tuple[tuple[int, int], int] | str:
    """What PIL reports (the reference), or the rejection reason open_image raises."""
    from pipeline.records import RejectedInput

    try:
        with open(path, "rb") as fh:
            img = open_image(fh, formats=SOURCE_FORMATS)
            return img.size, exif_transpose_code(img)
    except RejectedInput as exc:
        return exc.reason


def _probe(path: Path) -> tuple[tuple[int, int], int] | str:
    from pipeline.decode import image_header
    from pipeline.records import RejectedInput

    try:
        with open(path, "rb") as fh:
            return image_header(fh, SOURCE_FORMATS)
    except RejectedInput as exc:
        return exc.reason


def _odd_jpegs(folder: Path) -> list[Path]:
    """JPEGs whose headers take the unusual paths: EXIF in both byte orders, XMP, two Exif segments, progressive."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = []

    def save(name: str, data: bytes) -> None:
        out.append(folder / name)
        out[-1].write_bytes(data)

    for orientation in (1, 3, 6, 8, 0):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", exif=exif.tobytes())
        save(f"exif{orientation}.jpg", buf.getvalue())
    little = out[2].read_bytes()  # Pillow writes little-endian EXIF; big-endian by hand: MM, IFD at 8, one entry
    tiff = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + bytes.fromhex("0112 0003 00000001 0006 0000")
    segment = b"Exif\x00\x00" + tiff + b"\x00\x00\x00\x00"
    app1 = b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment
    plain = io.BytesIO()
    Image.fromarray(pixels).save(plain, format="JPEG")
    save("exif_big_endian.jpg", plain.getvalue()[:2] + app1 + plain.getvalue()[2:])
    save("two_exif.jpg", little[:2] + app1 + little[2:])
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><tiff:Orientation>6</tiff:Orientation></x:xmpmeta>"
    save("xmp.jpg", plain.getvalue()[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + plain.getvalue()[2:])
    progressive = io.BytesIO()
    Image.fromarray(pixels).save(progressive, format="JPEG", progressive=True)
    save("progressive.jpg", progressive.getvalue())
    save("header_cut.jpg", plain.getvalue()[:120])
    return out


def test_the_header_probe_reports_what_pil_reports(tmp_path):
    from bench.imagenet_tree import make_val_tree as make_tree
    from tests.bad_inputs import make_bad_val_tree

    corpus = make_bad_val_tree(tmp_path / "bad")
    images, _ = make_tree(tmp_path / "tree", 40, photo_like=True)
    paths = [*sorted(corpus.images.iterdir()), *sorted(images.iterdir()), *_odd_jpegs(tmp_path)]
    paths = [p for p in paths if p.is_file() and not p.is_symlink()]
    assert len(paths) > 60
    mismatches = [(p.name, _probe(p), _pil_header(p)) for p in paths if _probe(p) != _pil_header(p)]
    assert not mismatches
    from pipeline.decode import jpeg_header

    fast = [p.name for p in paths if jpeg_header(p.read_bytes()[:65536]) is not None]
    assert len(fast) >= 40 and "exif6.jpg" in fast and "exif_big_endian.jpg" in fast  # the fast path is taken
    assert not {"xmp.jpg", "two_exif.jpg", "header_cut.jpg"} & set(fast)  # and left to PIL where it is unsure
    assert _probe(tmp_path / "exif_big_endian.jpg") == ((40, 30), 6) and _probe(tmp_path / "xmp.jpg")[1] == 6
