"""What a shard holds: names, member extensions, the provenance fields, the sample layout.

```
<out>/<variant>/<variant>-000000.tar, -000001.tar, ...
<out>/<variant>/manifest.json     (pipeline/shard_format/manifest.py)
<out>/<variant>/rejected.jsonl    (every rejected input, one JSON object a line)
<out>/<variant>/_info.json        (the split description timm's WebDataset reader expects)
```

One sample = the tar members sharing a key: ``<key>.jpg`` (or ``.png``/``.webp``),
``<key>.cls``, ``<key>.json`` and, with masks, ``<key>.mask.png``. The key is
webdataset's (everything before the first dot of the member name) and obeys the
one key alphabet of :mod:`pipeline.records`. This module is pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.classes import IN1K_CLASSES

# 2: members written by webdataset.TarWriter (sorted by extension), rejected inputs moved from the
# manifest to rejected.jsonl (referenced by hash), the builder version in every manifest.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (2,)

# Image member extension -> the one codec it may hold (PIL format name).
IMAGE_CODECS: dict[str, str] = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_EXTENSIONS = tuple(IMAGE_CODECS)
LABEL_EXTENSION = "cls"
META_EXTENSION = "json"
MASK_EXTENSION = "mask.png"
# The allow-list: members with any other extension are never read, let alone decoded or unpickled.
MEMBER_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, LABEL_EXTENSION, META_EXTENSION, MASK_EXTENSION))

# Provenance fields every <key>.json carries.
META_FIELDS = (
    "key",
    "variant",
    "label",
    "wnid",
    "in9_label",
    "source",
    "bg_key",
    "bg_label",
    "texture",
    "mask_source",
    "fg_area",
    "bbox",
    "frame",
    "fill",
    "seed",
)

MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
TIMM_INFO_NAME = "_info.json"

# Bounds on what a reader accepts (a shard may come from anyone): members are small images and JSON.
MAX_MEMBER_BYTES = 64 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_JSON_BYTES = 1 << 20
NUM_CLASSES = IN1K_CLASSES  # .cls is 0..NUM_CLASSES-1; in9_label is -1..IN9_CLASSES-1


def parse_json_object(data: bytes, what: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from bytes a collaborator sent: bounded in size, no nesting bomb; ValueError otherwise."""
    if len(data) > limit:
        raise ValueError(f"{what} is larger than {limit} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is not a JSON object")
    return doc


def shard_name(variant: str, index: int) -> str:
    return f"{variant}-{index:06d}.tar"


def encode_meta(meta: dict[str, Any]) -> bytes:
    """A sample's provenance as stable bytes (sorted keys, no spaces)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sample_members(
    key: str,
    image: bytes,
    image_extension: str,
    label: int,
    meta: dict[str, Any],
    mask_png: bytes | None = None,
) -> dict[str, Any]:
    """One sample as the dict ``webdataset.TarWriter.write`` takes: the layout, in one place."""
    if image_extension not in IMAGE_CODECS:
        raise ValueError(f"image extension {image_extension!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
    sample: dict[str, Any] = {
        "__key__": key,
        image_extension: image,
        LABEL_EXTENSION: str(int(label)).encode("ascii"),
        META_EXTENSION: encode_meta(meta),
    }
    if mask_png is not None:
        sample[MASK_EXTENSION] = mask_png
    return sample
