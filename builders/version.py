"""The builder's version: it enters every completion hash and manifest (the TFDS habit).

Bump it whenever the bytes a build writes change for the same inputs and
config (rendered pixels, provenance fields, the tar layout) and say why in
:data:`RELEASE_NOTES`: a rerun into an existing ``--out`` then rebuilds every
shard instead of keeping shards written by older code.
"""

from __future__ import annotations

BUILDER_VERSION = "2.2.0"

RELEASE_NOTES: dict[str, str] = {
    "1.0.0": "First release: nine variants, tar members written in plan order by a hand-rolled tarfile writer.",
    "2.0.0": (
        "Shards are written by webdataset.TarWriter (members sorted by extension, mode 0644, empty user and "
        "group names); manifest format 2: the rejected inputs move to rejected.jsonl (referenced by sha256), the "
        "builder version is recorded, and _info.json describes each variant for timm's WebDataset reader."
    ),
    "2.1.0": (
        "Inputs decode only as JPEG or PNG (textures also WebP, BMP, TIFF) within 2^26 pixels; RGB mask PNGs are "
        "read as ImageNet-S class ids; texture crops are resampled from the crop's own region; with --mask segm an "
        "image without a segmentation is rejected at planning (never drawn as a partner); a rerun also rebuilds "
        "shards whose input files changed under their names."
    ),
    "2.2.0": (
        "A plan's single draws (each sample's partner and texture, the --per-class order) come from a 64-bit word "
        "of SHA-256(seed, purpose, key) instead of a numpy Generator built per draw: other (equally uniform) "
        "partners and textures than 2.1.0 chose, and planning ImageNet train takes seconds instead of minutes. "
        "Pixels of a given sample and partner are unchanged."
    ),
}
