"""Generators for small ImageNet-shaped trees (val, train, VOC XML, bbox archive), for benchmarks and tests.

Images are synthetic but photo-like (smooth gradients, low-frequency colour
noise, grain, and a textured foreground object inside each box), so JPEG
sizes, decode times and foreground/background statistics resemble real
photos rather than flat colours. Everything is vectorised numpy and seeded
per image, so image ``i`` is the same whatever ``n_images`` is.
"""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.classes import imagenet_classes

# tench, goldfish, golden retriever, tabby cat, sports car: real classes from different IN-9 groups.
DEFAULT_WNIDS = ("n01440764", "n01443537", "n02099601", "n02123045", "n04285008")
DEFAULT_SIZES = ((500, 375), (375, 500), (640, 480))

VocObject = tuple[str, Sequence[float | int | str]]


def write_voc_xml(
    path: str | Path, filename: str, size: tuple[int, int], objects: Sequence[VocObject]
) -> Path:
    """Write an ImageNet-style VOC annotation.

    ``objects``: ``(wnid, (xmin, ymin, xmax, ymax))`` in VOC's 1-based inclusive
    numbers, written verbatim (strings too, so tests can write broken values).
    """
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "val"
    ET.SubElement(root, "filename").text = filename
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "ILSVRC_2012"
    size_node = ET.SubElement(root, "size")
    ET.SubElement(size_node, "width").text = str(size[0])
    ET.SubElement(size_node, "height").text = str(size[1])
    ET.SubElement(size_node, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for wnid, corners in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = wnid
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
            ET.SubElement(bb, tag).text = str(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8")
    return path


def random_boxes(rng: np.random.Generator, size: tuple[int, int], n: int) -> list[tuple[int, int, int, int]]:
    """``n`` half-open integer boxes covering 30-70% of each side, inside the image."""
    w, h = size
    boxes = []
    for _ in range(n):
        bw = int(rng.integers(int(0.3 * w), int(0.7 * w) + 1))
        bh = int(rng.integers(int(0.3 * h), int(0.7 * h) + 1))
        x0 = int(rng.integers(0, w - bw + 1))
        y0 = int(rng.integers(0, h - bh + 1))
        boxes.append((x0, y0, x0 + bw, y0 + bh))
    return boxes


def _smooth_noise(
    rng: np.random.Generator, size: tuple[int, int], cells: int, amplitude: float
) -> np.ndarray:
    """Low-frequency colour noise: a coarse random grid upsampled bicubically."""
    w, h = size
    grid = np.clip(128 + rng.normal(0, amplitude, (cells, cells, 3)), 0, 255).astype(np.uint8)
    big = Image.fromarray(grid, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) - 128.0


def photo_like_image(
    rng: np.random.Generator, size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]]
) -> np.ndarray:
    """(h, w, 3) uint8: gradient + smooth noise + grain background, striped ellipse object per box."""
    w, h = size
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    angle = rng.uniform(0, 2 * np.pi)
    t = (xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))) / np.float32(max(w, h))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(30, 220, 3).astype(np.float32), rng.uniform(30, 220, 3).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    img += _smooth_noise(rng, size, 6, 30.0)
    for x0, y0, x1, y1 in boxes:
        # Work on the box crop only: the object never leaves its box.
        bx = xs[:, x0:x1] - np.float32((x0 + x1) / 2)
        by = ys[y0:y1] - np.float32((y0 + y1) / 2)
        rx, ry = max((x1 - x0) / 2 * 0.95, 1.0), max((y1 - y0) / 2 * 0.95, 1.0)
        inside = (bx / rx) ** 2 + (by / ry) ** 2 <= 1.0
        theta = rng.uniform(0, np.pi)
        period = np.float32(rng.uniform(6, 18))
        stripes = np.sin(
            2 * np.pi * (bx * np.float32(np.cos(theta)) + by * np.float32(np.sin(theta))) / period
        )
        checker = np.sign(np.sin(bx / period * 1.7) * np.sin(by / period * 1.7))
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        weights = rng.uniform(0.5, 1.0, 3).astype(np.float32)
        texture = colour + 45 * stripes[..., None] * weights + 20 * checker[..., None]
        crop = img[y0:y1, x0:x1]
        crop[inside] = texture[inside]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 5
    return np.clip(img, 0, 255).astype(np.uint8)


def flat_image(
    rng: np.random.Generator, size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]]
) -> np.ndarray:
    """(h, w, 3) uint8: one background colour, each box filled with another (exact checks)."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def write_sample(
    image_path: Path,
    xml_path: Path | None,
    key: str,
    wnid: str,
    rng: np.random.Generator,
    size_choices: Sequence[tuple[int, int]],
    photo_like: bool,
    boxes_per_image: int,
) -> None:
    size = tuple(size_choices[int(rng.integers(len(size_choices)))])
    boxes = random_boxes(rng, size, boxes_per_image)
    pixels = (photo_like_image if photo_like else flat_image)(rng, size, boxes)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(image_path, format="JPEG", quality=90)
    if xml_path is not None:
        # VOC stores 1-based inclusive corners: half-open [x0, x1) -> xmin = x0 + 1, xmax = x1.
        objects = [(wnid, (x0 + 1, y0 + 1, x1, y1)) for x0, y0, x1, y1 in boxes]
        write_voc_xml(xml_path, key, size, objects)


def make_val_tree(
    root: str | Path,
    n_images: int,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    size_choices: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    photo_like: bool = True,
    boxes_per_image: int = 1,
) -> tuple[Path, Path]:
    """ILSVRC2012 val layout under ``root``; returns ``(images_dir, boxes_dir)``.

    ``images_dir/ILSVRC2012_val_%08d.JPEG`` (1-based, like the real set) and
    ``boxes_dir/val/<key>.xml`` (the layout of the extracted bbox archive).
    Image ``i`` has class ``classes[i % len(classes)]``.
    """
    wnids = tuple(classes) if classes else DEFAULT_WNIDS
    known = set(imagenet_classes().wnids)
    if not set(wnids) <= known:
        raise ValueError(f"not ImageNet-1k wnids: {sorted(set(wnids) - known)}")
    root = Path(root)
    images_dir = root / "val"
    boxes_dir = root / "ILSVRC2012_bbox_val_v3"
    images_dir.mkdir(parents=True, exist_ok=True)
    (boxes_dir / "val").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        key = f"ILSVRC2012_val_{i + 1:08d}"
        rng = np.random.default_rng([seed, i])
        write_sample(
            images_dir / f"{key}.JPEG",
            boxes_dir / "val" / f"{key}.xml",
            key,
            wnids[i % len(wnids)],
            rng,
            size_choices,
            photo_like,
            boxes_per_image,
        )
    return images_dir, boxes_dir


def make_train_tree(
    root: str | Path,
    n_per_class: int,
    wnids: Sequence[str],
    seed: int = 0,
    boxes_fraction: float = 1.0,
    size_choices: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    photo_like: bool = True,
) -> tuple[Path, Path]:
    """ILSVRC2012 train layout; returns ``(images_root, boxes_root)``.

    ``images_root/<wnid>/<wnid>_<n>.JPEG`` and ``boxes_root/<wnid>/<wnid>_<n>.xml``;
    only a ``boxes_fraction`` of images get an XML (real train: about 40%).
    """
    root = Path(root)
    images_root, boxes_root = root / "train", root / "train_boxes"
    images_root.mkdir(parents=True, exist_ok=True)
    boxes_root.mkdir(parents=True, exist_ok=True)
    for c, wnid in enumerate(wnids):
        numbers = np.sort(np.random.default_rng([seed, c, 0]).choice(20000, n_per_class, replace=False) + 1)
        for j, n in enumerate(numbers):
            key = f"{wnid}_{int(n)}"
            rng = np.random.default_rng([seed, c, j + 1])
            has_xml = rng.random() < boxes_fraction
            write_sample(
                images_root / wnid / f"{key}.JPEG",
                boxes_root / wnid / f"{key}.xml" if has_xml else None,
                key,
                wnid,
                rng,
                size_choices,
                photo_like,
                1,
            )
    return images_root, boxes_root


def make_box_archive(boxes_dir: str | Path, archive: str | Path) -> Path:
    """Pack a folder of VOC XMLs into a .tgz the way ILSVRC2012_bbox_val_v3.tgz is laid out."""
    boxes_dir, archive = Path(boxes_dir), Path(archive)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(boxes_dir.rglob("*.xml")):
            tar.add(path, arcname=path.relative_to(boxes_dir).as_posix())
    return archive
