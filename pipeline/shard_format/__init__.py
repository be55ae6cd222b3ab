"""The shard format: the contract between the builder and the evaluator.

- :mod:`~pipeline.shard_format.spec`: names, member extensions, provenance fields, the sample layout;
- :mod:`~pipeline.shard_format.manifest`: ``manifest.json`` (one type, written by the builder, read by all);
- :mod:`~pipeline.shard_format.writer`: a shard written with ``webdataset.TarWriter``, deterministically;
- :mod:`~pipeline.shard_format.transport`: bytes from files, ``http(s)://`` and ``pipe:``, under bounds;
- :mod:`~pipeline.shard_format.locate`: user specs to shard references, the one manifest loader;
- :mod:`~pipeline.shard_format.reader`: webdataset's tar stages plus the format's policy.
"""

from pipeline.shard_format.errors import ShardSpecError, StreamError
from pipeline.shard_format.locate import ShardRef, load_manifest, resolve_shards, unverified
from pipeline.shard_format.manifest import Manifest
from pipeline.shard_format.spec import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    META_FIELDS,
    REJECTED_NAME,
    TIMM_INFO_NAME,
    shard_name,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "META_FIELDS",
    "REJECTED_NAME",
    "TIMM_INFO_NAME",
    "Manifest",
    "ShardRef",
    "ShardSpecError",
    "StreamError",
    "load_manifest",
    "resolve_shards",
    "shard_name",
    "unverified",
]
