"""Where a reader finds shards: a user's spec -> :class:`ShardRef` list, and the one manifest loader.

A spec is a local path, a brace pattern (``x-{000000..000009}.tar``, also
inside a ``pipe:`` command), a glob, an ``http(s)://`` URL, a ``pipe:``
command, a variant folder (its manifest if
present, else its ``*.tar`` sorted) or a manifest path/URL. A manifest is
data: the shards it lists are plain file names beside it, opened without
following symlinks and never as commands.
"""

from __future__ import annotations

import glob
import posixpath
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from pipeline.shard_format.errors import ShardSpecError, StreamError
from pipeline.shard_format.manifest import Manifest
from pipeline.shard_format.spec import MANIFEST_NAME, MAX_MANIFEST_BYTES
from pipeline.shard_format.transport import DEFAULT_POLICY, TransferPolicy, is_pipe, is_remote, read_all


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: where it is and, when a manifest said so, what it must contain."""

    url: str
    name: str
    sha256: str | None = None
    count: int | None = None
    variant: str | None = None
    nbytes: int | None = None
    listed: bool = False  # named by a manifest: never a symlink, never a command

    @property
    def verifiable(self) -> bool:
        return self.sha256 is not None and self.nbytes is not None


def _manifest_bytes(location: str, policy: TransferPolicy) -> bytes:
    try:
        return read_all(location, MAX_MANIFEST_BYTES, policy=policy)
    except StreamError as exc:
        raise ShardSpecError(f"cannot read manifest {location}: {exc.message}") from None


def load_manifest(location: str | Path, policy: TransferPolicy = DEFAULT_POLICY) -> Manifest:
    """Read and type-check a manifest from a path or http(s) URL."""
    return Manifest.from_bytes(_manifest_bytes(str(location), policy), str(location))


def load_manifest_lenient(location: str | Path, policy: TransferPolicy = DEFAULT_POLICY) -> tuple[Manifest, list[str]]:
    """As :func:`load_manifest`, with refused shard entries described instead of fatal (the verifier's)."""
    return Manifest.read_lenient(_manifest_bytes(str(location), policy), str(location))


def shard_refs(manifest: Manifest, location: str) -> list[ShardRef]:
    """One reference per shard a manifest lists, beside the manifest, never followed as a symlink."""
    return [
        ShardRef(sibling(location, s.name), s.name, s.sha256, s.count, manifest.variant, s.nbytes, listed=True)
        for s in manifest.shards
    ]


def sibling(location: str, name: str) -> str:
    """A file beside a manifest (``name`` already checked to be a plain file name)."""
    if is_remote(location):
        return location.rsplit("/", 1)[0] + "/" + urllib.parse.quote(name)
    return str(Path(location).resolve().parent / name)


def manifest_shards(manifest: Manifest, location: str) -> list[ShardRef]:
    """The shards a manifest lists; a manifest whose sample counts do not add up is refused.

    (The verifier checks the rest of the manifest's arithmetic; each shard's
    bytes are checked against its own entry while it streams.)
    """
    problem = manifest.count_problem()
    if problem:
        raise ShardSpecError(f"manifest {location}: {problem}")
    return shard_refs(manifest, location)


def _resolve_one(spec: str, policy: TransferPolicy) -> list[ShardRef]:
    if is_pipe(spec):
        return [ShardRef(url=spec, name=spec)]
    if is_remote(spec):
        path = urllib.parse.urlparse(spec).path
        if spec.endswith("/"):
            spec += MANIFEST_NAME
        if spec.endswith(".json") or path.endswith(".json"):
            return manifest_shards(load_manifest(spec, policy), spec)
        return [ShardRef(url=spec, name=posixpath.basename(path))]
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(spec))
        if not matches:
            raise ShardSpecError(f"no shards match {spec}")
        return [ref for m in matches for ref in _resolve_one(m, policy)]
    path = Path(spec)
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        if manifest_path.is_file():
            return manifest_shards(load_manifest(manifest_path, policy), str(manifest_path))
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise ShardSpecError(f"{spec}: folder holds neither {MANIFEST_NAME} nor *.tar shards")
        return [ShardRef(url=str(t.resolve()), name=t.name) for t in tars]
    if path.is_file():
        if path.suffix == ".json":
            return manifest_shards(load_manifest(path, policy), str(path))
        return [ShardRef(url=str(path.resolve()), name=path.name)]
    raise ShardSpecError(f"no such shard, folder or manifest: {spec}")


def resolve_shards(spec: str | list[str] | tuple[str, ...], policy: TransferPolicy = DEFAULT_POLICY) -> list[ShardRef]:
    """Shards named by one or several user specs, in order; a shard named twice is an error."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    refs: list[ShardRef] = []
    for one in specs:
        one = one.strip()
        if not one:
            raise ShardSpecError("empty shard spec")
        # as webdataset does, a pipe: command is brace-expanded too: one command per shard
        expanded = list(braceexpand.braceexpand(one))
        for item in expanded:
            refs.extend(_resolve_one(item, policy))
    seen: set[str] = set()
    for ref in refs:
        if ref.url in seen:
            raise ShardSpecError(f"shard listed twice: {ref.url}")
        seen.add(ref.url)
    if not refs:
        raise ShardSpecError("no shards")
    return refs


def unverified(refs: list[ShardRef]) -> list[ShardRef]:
    """Shards a manifest lists without their sha256 and size (a weak manifest): read only with a warning.

    (Shards named without any manifest are unverified by the user's choice and not listed here.)
    """
    return [r for r in refs if r.listed and not r.verifiable]
