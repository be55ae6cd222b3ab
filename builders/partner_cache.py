"""The partner cache: every source framed once per build, read back by the mixed variants.

A mixed sample needs its partner's ``only_bg_t``, and a partner usually sits
in another chunk (another shard, worker or Dask node). Instead of decoding and
framing it again there, the first pass of a build writes each chunk's framed
images and masks to one file under ``<out>/.partner-cache/``; the mixed
variants then read their own foregrounds and their partners' pixels from
those files. The rows hold exactly the arrays ``prepare_sample`` returned, so
the shards are byte-identical with and without the cache.

On disk, per chunk ``i`` of the plan::

    chunk-<i>.bin    one fixed-size row per chunk record, in plan order:
                     framed RGB (size*size*3 bytes) | foreground mask bits | box mask bits |
                     frame (source size, resized size, offset) and box rectangle: 10 x int32
                     (rows of records rejected while preparing are left as holes)
    chunk-<i>.json   the validity marker, written last: the chunk's cache hash, the layout, and the
                     rejections met while preparing (reason, detail), so a reader raises the same error

The data file is written under a temporary name, flushed and renamed, then
the marker is written atomically; a marker is removed before its chunk is
rewritten. So a marker exists only beside the complete file it describes,
and a killed build leaves nothing a rerun trusts: the rerun keeps every file
whose marker carries the hash it expects (same records, files, frame, masks
and builder version) and redoes the rest. Rows are read with ``os.preadv``
into a fresh buffer, one row at a time: the page cache is shared by every
worker, and no process maps (and so holds in its RSS) more than the row it is
working on, however large the build. The folder goes away when the build
succeeds.

:func:`plan_cache` decides, before the build, whether a build uses the cache
(and says how much disk it takes): only when some partner lives in another
chunk, within ``--partner-cache-limit`` and the output disk's free space.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import builders.version
from builders.config import BuildConfig
from pipeline.files import atomic_write_text, remove_temporaries, temporary_path
from pipeline.frame import Frame
from pipeline.prepare import PreparedSample
from pipeline.records import RejectedInput, SourceRecord
from pipeline.variants import VARIANT_SPECS

if TYPE_CHECKING:
    from builders.plan import Plan

CACHE_DIR = ".partner-cache"
LAYOUT = 1  # the row layout below; a marker of another layout is never trusted
_TRAILER_INTS = 10  # frame: source_size (w, h), resized (w, h), offset (left, top); bbox (x0, y0, x1, y1)
_OPEN_FILES = 64  # data files a reader keeps open at once


def cache_folder(out: str | Path) -> Path:
    return Path(out) / CACHE_DIR


def data_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.bin"


def marker_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.json"


@dataclass(frozen=True)
class RowLayout:
    """Byte offsets of one cached source (a row) for a frame of ``size``."""

    size: int

    @property
    def image_bytes(self) -> int:
        return self.size * self.size * 3

    @property
    def mask_bytes(self) -> int:
        return (self.size * self.size + 7) // 8

    @property
    def nbytes(self) -> int:
        return self.image_bytes + 2 * self.mask_bytes + 4 * _TRAILER_INTS

    def pack(self, sample: PreparedSample) -> np.ndarray:
        row = np.empty(self.nbytes, dtype=np.uint8)
        i, m = self.image_bytes, self.mask_bytes
        row[:i] = sample.image.reshape(-1)
        row[i : i + m] = np.packbits(sample.fg_mask.reshape(-1))
        row[i + m : i + 2 * m] = np.packbits(sample.box_mask.reshape(-1))
        f = sample.frame
        trailer = [*f.source_size, *f.resized, *f.offset, *(int(v) for v in sample.bbox)]
        row[i + 2 * m :] = np.array(trailer, dtype="<i4").view(np.uint8)
        return row

    def unpack(self, row: np.ndarray, record: SourceRecord, config: BuildConfig,
               failures: list[str]) -> PreparedSample:
        """The PreparedSample ``prepare_sample`` returned for ``record``, from its row."""
        size, i, m = self.size, self.image_bytes, self.mask_bytes
        image = row[:i].reshape(size, size, 3)
        fg = np.unpackbits(row[i : i + m], count=size * size).view(bool).reshape(size, size)
        box = np.unpackbits(row[i + m : i + 2 * m], count=size * size).view(bool).reshape(size, size)
        sw, sh, rw, rh, left, top, *bbox = (int(v) for v in row[i + 2 * m :].view("<i4"))
        frame = Frame((sw, sh), (rw, rh), (left, top), config.size, config.resize)
        # prepare_sample's bbox is the box mask's rectangle in whole pixels: exact as int32
        return PreparedSample(record, image, fg, box, [float(v) for v in bbox], frame, config.mask, failures)


def chunk_cache_hash(config: BuildConfig, records: Iterable[SourceRecord], stamps: dict[str, str]) -> str:
    """What a chunk's cached rows are computed from: its records, their files, the frame and mask options.

    ``output_config`` covers the frame, the mask source, the filters, the
    seed (GrabCut) and the builder version; the image paths and file stamps
    tell a changed or moved input; the layout tells an older cache format.
    """
    rows = []
    for r in records:
        seg = r.segmentation
        rows.append([
            r.key, r.image, r.label, r.wnid, [b.as_list() for b in r.boxes], list(r.size) if r.size else None,
            [seg.kind, hashlib.sha256(json.dumps(seg.data, sort_keys=True, default=str).encode()).hexdigest()]
            if seg is not None else None,
            stamps.get(r.key),
        ])
    payload = json.dumps([LAYOUT, builders.version.BUILDER_VERSION, config.output_config(), rows],
                         sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_marker(folder: Path, index: int, cache_hash: str, n_rows: int, size: int) -> dict | None:
    """The chunk's marker if it vouches for a complete file built from ``cache_hash``; else None."""
    try:
        marker = json.loads(marker_path(folder, index).read_text())
        ok = (marker.get("hash") == cache_hash and marker.get("layout") == LAYOUT and marker.get("size") == size
              and marker.get("rows") == n_rows)
        if not ok or data_path(folder, index).stat().st_size != n_rows * RowLayout(size).nbytes:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return marker


def total_bytes(n_rows: int, size: int) -> int:
    """Disk one build's cache takes for ``n_rows`` sources (markers are a few hundred bytes each)."""
    return n_rows * RowLayout(size).nbytes


class ChunkCacheWriter:
    """Write one chunk's rows as the first pass prepares them; ``close`` publishes them with their marker."""

    def __init__(self, folder: Path, index: int, n_rows: int, size: int, cache_hash: str) -> None:
        self.folder, self.index, self.hash = folder, index, cache_hash
        self.layout = RowLayout(size)
        self.n_rows = n_rows
        self.rejected: dict[str, list[str]] = {}
        self.failures: dict[str, list[str]] = {}
        self.final = data_path(folder, index)
        self.tmp = temporary_path(self.final)
        self._fd = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker_path(folder, index).unlink(missing_ok=True)  # an old marker must not vouch for the new file
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise self._naming(exc) from None

    def add(self, row: int, sample: PreparedSample) -> None:
        data = self.layout.pack(sample)
        try:
            written = os.pwrite(self._fd, data, row * self.layout.nbytes)
        except OSError as exc:
            raise self._naming(exc) from None
        if written != data.nbytes:
            raise self._naming(OSError(errno.ENOSPC, "short write"))
        if sample.selection_failures:
            self.failures[sample.record.key] = list(sample.selection_failures)

    def reject(self, key: str, exc: RejectedInput) -> None:
        self.rejected[key] = [exc.reason, exc.detail]

    def close(self) -> None:
        """Flush, rename into place, then write the marker: only a complete file ever has one."""
        try:
            os.ftruncate(self._fd, self.n_rows * self.layout.nbytes)  # rejected rows at the end stay holes
            os.fsync(self._fd)  # a crash must not leave a marker beside pages that never reached the disk
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise self._naming(exc) from None
        marker = {"hash": self.hash, "layout": LAYOUT, "size": self.layout.size, "rows": self.n_rows,
                  "rejected": self.rejected, "failures": self.failures}
        atomic_write_text(marker_path(self.folder, self.index), json.dumps(marker, sort_keys=True))

    def abort(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        self.tmp.unlink(missing_ok=True)

    def _naming(self, exc: OSError) -> OSError:
        """A write error (ENOSPC has no file name) that says which cache file could not be written."""
        return OSError(exc.errno, exc.strerror or str(exc), str(self.final)) if exc.errno is not None else exc


class CacheLoader:
    """``load(record)``: a source's PreparedSample (or its RejectedInput) read back from the cache.

    ``where`` maps each key the chunk needs (its own records and its
    partners) to (chunk index, row); ``hashes`` gives each such chunk's cache
    hash. Markers are small and read once per chunk; data files are kept open
    a few dozen at a time.
    """

    def __init__(self, out: str | Path, config: BuildConfig, where: dict[str, tuple[int, int]],
                 hashes: dict[int, tuple[str, int]]) -> None:
        self.folder = cache_folder(out)
        self.config = config
        self.layout = RowLayout(config.size)
        self.where = where
        self.hashes = hashes  # chunk -> (cache hash, rows)
        self.markers: dict[int, dict] = {}
        self.files: OrderedDict[int, int] = OrderedDict()

    def _marker(self, index: int) -> dict:
        if index not in self.markers:
            cache_hash, n_rows = self.hashes[index]
            marker = read_marker(self.folder, index, cache_hash, n_rows, self.config.size)
            if marker is None:
                raise RuntimeError(f"partner cache of chunk {index} is missing or stale under {self.folder} "
                                   "(changed during the build?); rerun the same command")
            self.markers[index] = marker
        return self.markers[index]

    def _fd(self, index: int) -> int:
        if index in self.files:
            self.files.move_to_end(index)
            return self.files[index]
        if len(self.files) >= _OPEN_FILES:
            os.close(self.files.popitem(last=False)[1])
        fd = os.open(data_path(self.folder, index), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.files[index] = fd
        return fd

    def load(self, record: SourceRecord) -> PreparedSample:
        index, row = self.where[record.key]
        marker = self._marker(index)
        if record.key in marker["rejected"]:
            raise RejectedInput(*marker["rejected"][record.key])
        buf = np.empty(self.layout.nbytes, dtype=np.uint8)
        if os.preadv(self._fd(index), [buf], row * self.layout.nbytes) != buf.nbytes:
            raise RuntimeError(f"partner cache of chunk {index} is truncated; rerun the same command")
        return self.layout.unpack(buf, record, self.config, marker["failures"].get(record.key, []))

    def close(self) -> None:
        while self.files:
            os.close(self.files.popitem()[1])


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


@dataclass
class CachePlan:
    """Which chunks go through the partner cache, and what each pass of the build does with them."""

    out: Path
    hashes: dict[int, str]  # cached chunk -> its cache hash
    valid: set[int]  # cached chunks whose files an earlier (killed) run left complete
    rows: dict[int, int]  # cached chunk -> its number of records (rows)
    position: dict[str, tuple[int, int]]  # key -> (chunk, row) of every source in a cached chunk
    mixed: set[str]

    def loader(self, config: BuildConfig, keys: list[str]) -> CacheLoader:
        """What a mixed pass over one chunk reads: its own records and its partners."""
        where = {k: self.position[k] for k in keys}
        chunks = {i for i, _ in where.values()}
        return CacheLoader(self.out, config, where, {i: (self.hashes[i], self.rows[i]) for i in chunks})

    def first_pass(self, todo: list[tuple[int, list[str]]], call: Callable[..., Any]) -> list:
        """Every chunk that has non-mixed shards to build or cache rows to write: one decode per source."""
        missing = dict(todo)
        jobs = []
        for index in sorted(set(missing) | (set(self.hashes) - self.valid)):
            variants = [v for v in missing.get(index, []) if v not in self.mixed]
            write = self.hashes[index] if index in self.hashes and index not in self.valid else None
            if variants or write:
                jobs.append((index, variants, call(index, variants, cache_hash=write)))
        return jobs

    def second_pass(self, todo: list[tuple[int, list[str]]], call: Callable[..., Any]) -> list:
        """The mixed shards, from the cache alone."""
        jobs = []
        for index, missing in todo:
            variants = [v for v in missing if v in self.mixed]
            if variants:
                jobs.append((index, variants, call(index, variants, read_from=self)))
        return jobs


def plan_cache(config: BuildConfig, plan: Plan, chunks: list[list[SourceRecord]], todo: list[tuple[int, list[str]]],
               out: Path, note: Callable[[str], None]) -> CachePlan | None:
    """Whether the mixed shards to build read their sources from a partner cache; None = decode as before.

    Worth it only when some partner lives in another chunk (within a chunk,
    each source is decoded once anyway); off with ``--partner-cache-limit
    0``, and, with a one-line note, when the cache would exceed the limit
    or the free space of the output's disk.
    """
    mixed = {v for v in config.variants if VARIANT_SPECS[v].partner is not None}
    chunk_of = {r.key: i for i, chunk in enumerate(chunks) for r in chunk}
    reads: dict[int, set[int]] = {}
    for index, missing in todo:
        wanted = [v for v in missing if v in mixed]
        if wanted:
            reads[index] = {index} | {
                chunk_of[a.bg_key] for v in wanted for r in chunks[index]
                if (a := plan.assignments[v].get(r.key)) is not None and a.bg_key
            }
    if not config.partner_cache_limit or all(r == {i} for i, r in reads.items()):
        return None
    cached = sorted(set().union(*reads.values()))
    rows = {i: len(chunks[i]) for i in cached}
    nbytes = total_bytes(sum(rows.values()), config.size)
    folder = cache_folder(out)
    limit = config.partner_cache_limit * 1e9
    if nbytes > limit:
        note(f"partner cache off: {sum(rows.values())} sources need {_size(nbytes)} > --partner-cache-limit "
             f"{config.partner_cache_limit:g} GB; partners are decoded again in each shard that uses them (slower)")
        return None
    hashes = {i: chunk_cache_hash(config, chunks[i], plan.stamps) for i in cached}
    valid = {i for i in cached if read_marker(folder, i, hashes[i], rows[i], config.size) is not None}
    to_write = total_bytes(sum(rows[i] for i in cached if i not in valid), config.size)
    free = shutil.disk_usage(out).free
    if to_write * 1.1 > free:
        note(f"partner cache off: it needs {_size(to_write)} under {folder}, the disk has {_size(free)} free; "
             "partners are decoded again in each shard that uses them (slower)")
        return None
    reused = f", {len(valid)} chunk(s) reused from an earlier run" if valid else ""
    note(f"partner cache: {sum(rows.values())} sources x {RowLayout(config.size).nbytes / 1e3:.1f} kB "
         f"= {_size(nbytes)} under {folder} (limit {config.partner_cache_limit:g} GB{reused}; removed at the end)")
    position = {r.key: (i, row) for i in cached for row, r in enumerate(chunks[i])}
    return CachePlan(out, hashes, valid, rows, position, mixed)


def clear_temporary(out: str | Path) -> None:
    """Drop the partial files of killed runs (the caller holds the build lock)."""
    remove_temporaries(cache_folder(out))


def remove(out: str | Path) -> None:
    shutil.rmtree(cache_folder(out), ignore_errors=True)
