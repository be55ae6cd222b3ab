"""The embedded demo: real photos that pip packages install, with our own annotations.

No image ships with this project. The photos come from scikit-image's data
folder and imgaug's ``quokka.jpg``; ``data_manifests/demo/annotations.json``
holds the labels, boxes and polygons. Mirrored copies (annotations flipped
with them) give every class a second image so ``mixed_same`` can find a partner.
The images are written once, as PNG, into a cache folder (``cache_dir``,
default ``$BGCHECK_CACHE`` or ``~/.cache/bgcheck``, then ``demo/``), and read
back like any input: regular files only, JPEG/PNG only.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from data_manifests import data_file
from pipeline.classes import wnid_to_index
from pipeline.decode import SOURCE_FORMATS, open_image
from pipeline.files import read_regular
from pipeline.records import Box, RejectedInput, Rejection, Segmentation, SourceRecord

ANNOTATIONS = data_file("demo", "annotations.json")


class DemoUnavailable(RuntimeError):
    """A package that provides demo photos is not installed."""


def default_cache_dir() -> Path:
    root = os.environ.get("BGCHECK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bgcheck"
    )
    return Path(root) / "demo"


def package_photo(package: str, file: str) -> Path:
    """Path of a photo inside an installed package, found without importing it.

    imgaug 0.4 does not import under NumPy 2, but its data files are usable.
    """
    module = {"skimage": "skimage.data", "imgaug": "imgaug"}[package]
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        extra = "scikit-image" if package == "skimage" else "imgaug==0.4.0 (install with --no-deps)"
        raise DemoUnavailable(f"demo photos need the '{extra}' package: pip install {extra.split(' ')[0]}")
    base = Path(spec.origin).parent
    path = base / "data" / file if package == "skimage" else base / file
    if not path.exists():
        raise DemoUnavailable(f"demo photo {file} not found in the installed {package} package")
    return path


def _mirror_box(box: list[float], width: int) -> list[float]:
    x0, y0, x1, y1 = box
    return [width - x1, y0, width - x0, y1]


def _mirror_polygon(poly: list[float], width: int) -> list[float]:
    out = list(poly)
    out[0::2] = [width - x for x in poly[0::2]]
    return out


def _materialise(entry: dict, cache_dir: Path) -> Path:
    """Write the (possibly mirrored) photo as PNG; reuse it when already there."""
    target = cache_dir / f"{entry['key']}.png"
    if target.exists():
        return target
    src = package_photo(entry["package"], entry["file"])
    with open_image(read_regular(src), formats=SOURCE_FORMATS) as im:
        arr = np.asarray(im.convert("RGB"))
    if entry.get("mirror"):
        arr = arr[:, ::-1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    os.replace(tmp, target)
    return target


def _demo_record(entry: dict, cache: Path, index: dict[str, int]) -> SourceRecord:
    path = _materialise(entry, cache)
    with open_image(read_regular(path), formats=SOURCE_FORMATS) as im:
        width, height = im.size
    boxes = [list(map(float, b)) for b in entry["boxes"]]
    polygon = entry.get("polygon")
    if entry.get("mirror"):
        boxes = [_mirror_box(b, width) for b in boxes]
        polygon = _mirror_polygon(polygon, width) if polygon else None
    return SourceRecord(
        key=entry["key"],
        image=str(path),
        label=index[entry["wnid"]],
        wnid=entry["wnid"],
        boxes=tuple(Box(*b, wnid=entry["wnid"]) for b in boxes),
        segmentation=Segmentation("polygons", [polygon]) if polygon else None,
        size=(width, height),
        source="demo",
        annotation=f"{ANNOTATIONS.name}#{entry['key']}",
    )


def read_demo(
    images: str | Path | None = None, annotations: str | Path | None = None, cache_dir: str | Path | None = None
) -> Iterator[SourceRecord | Rejection]:
    """Demo records, sorted by key, images materialised under ``cache_dir``.

    The demo brings its own photos and annotations, so ``images`` and
    ``annotations`` are unused (they are there for the one reader signature).
    A cached photo that cannot be read (replaced by a FIFO, say) is a
    rejection; a missing photo package raises :class:`DemoUnavailable`.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entries = json.loads(ANNOTATIONS.read_text(encoding="utf-8"))["images"]
    index = wnid_to_index()
    for entry in sorted(entries, key=lambda e: e["key"]):
        try:
            yield _demo_record(entry, cache, index)
        except RejectedInput as exc:
            yield Rejection(entry["key"], exc.reason, exc.detail, "demo")
        except OSError as exc:
            yield Rejection(entry["key"], "undecodable_image", f"{entry['key']}.png: {exc.strerror or 'not a regular file'}", "demo")
