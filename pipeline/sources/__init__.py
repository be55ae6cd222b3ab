"""Source readers: annotated ImageNet-style inputs -> ``SourceRecord | Rejection``, one table of them.

:data:`READERS` is the one list of source kinds: ``read_source``, the build
config's checks (``builders.config``) and the builder's ``--source`` choices
and help (``builders.make_shards``) all read it. Adding a format is one module
here with its reader plus its row below (and its test and README row).

A reader is called as ``read(images, annotations, **options)`` and accounts
for every input (see ``pipeline.sources._common``): bad inputs become typed
rejections, an unusable source as a whole raises :class:`SourceError`.
Readers do not decode images (``pipeline.decode`` does that later); output is
sorted by key, so a build plan is the same on every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.records import gc_paused
from pipeline.sources._common import Output, SourceError
from pipeline.sources.coco import read_coco
from pipeline.sources.demo import read_demo
from pipeline.sources.loc_csv import read_loc_csv
from pipeline.sources.mask_dir import read_mask_dir
from pipeline.sources.voc import read_imagenet_train, read_imagenet_val


@dataclass(frozen=True)
class ReaderSpec:
    """One source kind: its reader, the options it takes, which paths it needs, and how docs describe it."""

    read: Callable[..., Iterator[Output]]  # read(images, annotations, **options)
    options: frozenset[str]  # keyword options; those that are BuildConfig fields come from the config
    needs_images: bool
    needs_annotations: bool
    description: str  # one line for --help and README


READERS: dict[str, ReaderSpec] = {
    "demo": ReaderSpec(
        read_demo, frozenset({"cache_dir"}), needs_images=False, needs_annotations=False,
        description="14 real photos from installed packages, with our own boxes and polygons",
    ),
    "imagenet-val": ReaderSpec(
        read_imagenet_val, frozenset(), needs_images=True, needs_annotations=True,
        description="flat val images + ILSVRC2012_bbox_val_v3 VOC XML folder or the .tgz itself",
    ),
    "imagenet-train": ReaderSpec(
        read_imagenet_train, frozenset(), needs_images=True, needs_annotations=False,
        description="<wnid>/<wnid>_<n>.JPEG + VOC XMLs under --annotations (default: next to the images)",
    ),
    "loc-csv": ReaderSpec(
        read_loc_csv, frozenset({"box_convention"}), needs_images=True, needs_annotations=True,
        description="Kaggle LOC_val_solution.csv / LOC_train_solution.csv",
    ),
    "coco": ReaderSpec(
        read_coco, frozenset({"category_map", "label_from"}), needs_images=True, needs_annotations=True,
        description="COCO JSON with polygons or RLE (e.g. PartImageNet)",
    ),
    "mask-dir": ReaderSpec(
        read_mask_dir, frozenset({"labels", "category_map"}), needs_images=True, needs_annotations=True,
        description="PNG masks keyed like the images (ImageNet-S: class id R + 256*G)",
    ),
}


def read_source(
    kind: str, images: str | Path | None, annotations: str | Path | None = None, **options: Any
) -> Iterator[Output]:
    """One entry point for every reader; ``kind`` is a key of :data:`READERS`.

    ``annotations`` is the val box folder/archive, the train box root (None:
    next to the images), the LOC CSV, the COCO JSON, or the mask folder.
    """
    spec = READERS.get(kind)
    if spec is None:
        raise SourceError(f"unknown source kind {kind!r}; choose from {', '.join(READERS)}")
    unknown = set(options) - spec.options
    if unknown:
        raise SourceError(f"source kind {kind!r} takes no option(s) {', '.join(sorted(unknown))}")
    if spec.needs_images and images is None:
        raise SourceError(f"source kind {kind!r} needs an image folder")
    if spec.needs_annotations and annotations is None:
        raise SourceError(f"source kind {kind!r} needs an annotation path")
    with gc_paused():  # most readers make every record here, before they return
        return spec.read(images, annotations, **options)


__all__ = ["READERS", "Output", "ReaderSpec", "SourceError", "read_source"]
