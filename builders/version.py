"""The builder's version: it enters every completion hash and manifest (the TFDS habit).

Bump it whenever the bytes a build writes change for the same inputs and
config (rendered pixels, provenance fields, the tar layout) and say why in
:data:`RELEASE_NOTES`: a rerun into an existing ``--out`` then rebuilds every
shard instead of keeping shards written by older code.
"""

from __future__ import annotations

BUILDER_VERSION = "2.0.0"

RELEASE_NOTES: dict[str, str] = {
    "1.0.0": "First release: nine variants, tar members written in plan order by a hand-rolled tarfile writer.",
    "2.0.0": (
        "Shards are written by webdataset.TarWriter (members sorted by extension, mode 0644, empty user and "
        "group names); manifest format 2: the rejected inputs move to rejected.jsonl (referenced by sha256), the "
        "builder version is recorded, and _info.json describes each variant for timm's WebDataset reader."
    ),
}
