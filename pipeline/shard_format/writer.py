"""Writing one shard: ``webdataset.TarWriter`` with fixed metadata, to a temporary name renamed when complete.

Fixed ``mtime`` (0), user and group (empty names, ids 0) and ``mode`` (0644)
and members in the sorted order TarWriter writes them make a shard's bytes a
function of its samples alone, so the same plan gives byte-identical shards on
any worker, machine (same library versions) or Dask node. The bytes are hashed
as they are written, and a killed or failing write leaves no file under the
final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO, Any

import webdataset

from pipeline.files import temporary_path

TAR_MTIME = 0
TAR_MODE = 0o644


class _HashingFile:
    """A file object that hashes and counts what is written through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self.discard = False  # after an abort: tarfile may still flush its buffer when it is collected

    def write(self, data: bytes) -> int:
        if self.discard:
            return len(data)
        self.sha256.update(data)
        self.nbytes += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


class ShardFile:
    """One shard file: ``write(sample)`` per sample, then ``close()`` -> (sha256, bytes), or ``abort()``."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.tmp = temporary_path(self.final)
        self._fh = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._fh)
        self._tar = webdataset.TarWriter(
            self._hashing, user="", group="", mode=TAR_MODE, mtime=TAR_MTIME, encoder=False, compress=False
        )

    def write(self, sample: dict[str, Any]) -> None:
        """One sample as :func:`pipeline.shard_format.spec.sample_members` lays it out."""
        try:
            self._tar.write(sample)
        except OSError as exc:
            raise self._naming(exc) from None

    def close(self) -> tuple[str, int]:
        try:
            self._tar.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise self._naming(exc) from None
        return self._hashing.sha256.hexdigest(), self._hashing.nbytes

    def abort(self) -> None:
        """Drop the partial file; closing may fail again (a full disk) and must not hide the first error."""
        self._hashing.discard = True
        try:
            self._fh.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def _naming(self, exc: OSError) -> OSError:
        """A write error (ENOSPC has no file name) that says which shard could not be written."""
        if exc.errno is None:
            return exc
        return OSError(exc.errno, exc.strerror or str(exc), str(self.final))
