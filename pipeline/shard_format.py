"""The shard format: the contract between the builder and the evaluator.

```
<out>/<variant>/<variant>-000000.tar, -000001.tar, ...
<out>/<variant>/manifest.json
<out>/<variant>/rejected.jsonl
```

One sample = consecutive tar members sharing a key (``<key>.jpg``, ``<key>.cls``,
``<key>.json``, optional ``<key>.mask.png``). Keys never contain a dot and are
the same in every variant.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMAT_VERSION = 1

VARIANTS: tuple[str, ...] = (
    "original",
    "only_fg",
    "only_bg_b",
    "only_bg_t",
    "no_fg",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
    "texture",
)
MIXED_VARIANTS = ("mixed_same", "mixed_rand", "mixed_next")
BACKGROUND_ONLY_VARIANTS = ("only_bg_b", "only_bg_t", "no_fg")
FILLS = ("black", "white", "gray", "mean", "noise")

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
LABEL_EXTENSION = "cls"
META_EXTENSION = "json"
MASK_EXTENSION = "mask.png"
# Members a reader decodes; anything else in a tar is ignored, never decoded.
READABLE_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, LABEL_EXTENSION, META_EXTENSION, MASK_EXTENSION))

# Provenance fields every <key>.json carries (more may follow, e.g. in9_label).
META_FIELDS = (
    "key",
    "variant",
    "label",
    "wnid",
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


def shard_name(variant: str, index: int) -> str:
    return f"{variant}-{index:06d}.tar"


# ---------------------------------------------------------------------------
# Reading helpers: where a reader finds shards, shared by the evaluator and the
# shard verifier so both accept exactly the same specs.
# ---------------------------------------------------------------------------

HTTP_TIMEOUT_S = 60.0
# Members are small images and JSON; a larger one is not ours and is never read into memory.
MAX_MEMBER_BYTES = 64 << 20


class ShardSpecError(ValueError):
    """A shard spec or manifest that cannot be resolved; the message is one line for the user."""


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: where it is and, when a manifest said so, what it must contain."""

    url: str
    name: str
    sha256: str | None = None
    count: int | None = None
    variant: str | None = None
    size_bytes: int | None = None


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def plain_name_problem(name: Any) -> str | None:
    """Why a manifest's shard name is refused, or None when it is a plain file name.

    The builder writes shards beside their manifest, so that is all a manifest
    may name: never a ``pipe:`` command, a path elsewhere or another URL. One
    rule for every reader (the evaluator and the verifier).
    """
    if not isinstance(name, str) or not name:
        return f"shard entry without a name: {name!r}"
    if "/" in name or "\\" in name or ".." in name or ":" in name or not _PLAIN_NAME.match(name):
        return f"refusing shard name {name!r}: not a plain file name next to the manifest"
    return None


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def load_manifest(location: str | Path) -> dict[str, Any]:
    """Read and sanity-check a manifest.json from a path or http(s) URL."""
    location = str(location)
    try:
        if is_remote(location):
            with urllib.request.urlopen(location, timeout=HTTP_TIMEOUT_S) as resp:
                raw = resp.read()
        else:
            raw = Path(location).read_bytes()
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardSpecError(f"cannot read manifest {location}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardSpecError(f"manifest {location}: no 'shards' list")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardSpecError(f"manifest {location}: format_version {version!r}, this reader knows {FORMAT_VERSION}")
    return manifest


def _manifest_base(location: str) -> str:
    """The folder (path or URL, with trailing slash for URLs) that manifest entries are relative to."""
    if is_remote(location):
        return location.rsplit("/", 1)[0] + "/"
    return str(Path(location).resolve().parent)


def manifest_shards(manifest: dict[str, Any], location: str) -> list[ShardRef]:
    """Shards listed by a manifest, resolved against the manifest's own folder.

    Entries must be plain file names in that folder (:func:`plain_name_problem`):
    a manifest is data, so it may never name a ``pipe:`` command, a path, or a URL.
    """
    base = _manifest_base(location)
    refs: list[ShardRef] = []
    for entry in manifest["shards"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        problem = plain_name_problem(name)
        if problem:
            raise ShardSpecError(f"manifest {location}: {problem}")
        url = base + urllib.parse.quote(name) if is_remote(base) else str(Path(base) / name)
        sha = entry.get("sha256")
        refs.append(
            ShardRef(
                url=url,
                name=name,
                sha256=str(sha).lower() if sha else None,
                count=int(entry["count"]) if entry.get("count") is not None else None,
                variant=entry.get("variant") or manifest.get("variant"),
                size_bytes=int(entry["bytes"]) if entry.get("bytes") is not None else None,
            )
        )
    totals = manifest.get("totals") or {}
    if totals.get("samples") is not None and all(r.count is not None for r in refs):
        listed = sum(r.count or 0 for r in refs)
        if listed != int(totals["samples"]):
            raise ShardSpecError(f"manifest {location}: shards hold {listed} samples, totals say {totals['samples']}")
    return refs


def _expand_braces(spec: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(spec))


def _resolve_one(spec: str) -> list[ShardRef]:
    if is_pipe(spec):
        return [ShardRef(url=spec, name=spec)]
    if is_remote(spec):
        path = urllib.parse.urlparse(spec).path
        if spec.endswith("/"):
            return manifest_shards(load_manifest(spec + MANIFEST_NAME), spec + MANIFEST_NAME)
        if path.endswith(".json"):
            return manifest_shards(load_manifest(spec), spec)
        return [ShardRef(url=spec, name=posixpath.basename(path))]
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(spec))
        if not matches:
            raise ShardSpecError(f"no shards match {spec}")
        return [ref for m in matches for ref in _resolve_one(m)]
    path = Path(spec)
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        if manifest_path.is_file():
            return manifest_shards(load_manifest(manifest_path), str(manifest_path))
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise ShardSpecError(f"{spec}: folder holds neither {MANIFEST_NAME} nor *.tar shards")
        return [ShardRef(url=str(t.resolve()), name=t.name) for t in tars]
    if path.is_file():
        if path.suffix == ".json":
            return manifest_shards(load_manifest(path), str(path))
        return [ShardRef(url=str(path.resolve()), name=path.name)]
    raise ShardSpecError(f"no such shard, folder or manifest: {spec}")


def resolve_shards(spec: str | list[str] | tuple[str, ...]) -> list[ShardRef]:
    """Shards named by a user spec, in order.

    A spec is a local path, a brace pattern (``shards-{000000..000009}.tar``),
    a glob, an ``http(s)://`` URL, a ``pipe:`` command, a variant folder (its
    manifest.json if present, else its ``*.tar`` sorted), or a manifest.json
    path/URL. Several specs may be given as a list. A shard named twice is an
    error: it would be scored twice.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    refs: list[ShardRef] = []
    for one in specs:
        one = one.strip()
        if not one:
            raise ShardSpecError("empty shard spec")
        expanded = [one] if is_pipe(one) else _expand_braces(one)
        for item in expanded:
            refs.extend(_resolve_one(item))
    seen: set[str] = set()
    for ref in refs:
        if ref.url in seen:
            raise ShardSpecError(f"shard listed twice: {ref.url}")
        seen.add(ref.url)
    return refs


def open_shard(url: str) -> IO[bytes]:
    """A binary stream over one shard: local file, http(s) response, or a ``pipe:`` command's stdout.

    For ``pipe:`` the returned object's ``close()`` raises OSError when the
    command failed, so a broken pipe is not mistaken for a short shard.
    """
    if is_pipe(url):
        return _PipeStream(url[len("pipe:"):])
    if is_remote(url):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    if url.startswith("file://"):
        url = urllib.parse.urlparse(url).path
    return open(url, "rb")


class _PipeStream:
    """stdout of a shell command, with its exit status checked on close."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if not data and n != 0:
            self._eof = True
        return data

    def close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._eof:
            self.proc.kill()
        status = self.proc.wait()
        if self._eof and status != 0:
            raise OSError(f"command exited with status {status}: {self.command}")

    def __enter__(self) -> _PipeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HashingReader:
    """Wrap a byte stream, hashing and counting exactly what is read: a shard is checked as it streams."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (tar padding after the last member counts towards the hash)."""
        while self.read(1 << 20):
            pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary name in the same folder, then rename: readers never see half a file.

    The temporary name (``.<name>.<pid>.tmp``) is one a rerun of the builder
    cleans up; ordinary permissions, so a published manifest stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
