"""Open input files only when they are regular files, and never block doing it.

An input folder is a collaborator's tree: a FIFO, a socket or a device (or a
symlink to ``/dev/zero``) named like an image would hang or never end a plain
``open()``/``read()`` (opening a FIFO for reading waits for a writer), and a
file swapped for a FIFO after the folder was scanned would hang a build
half-way. So a file is opened with ``O_NONBLOCK`` (which never waits on a
FIFO), the *opened descriptor* is checked with ``fstat`` (not the name, which
may have been replaced in between), anything but a regular file is refused,
and only then is ``O_NONBLOCK`` cleared so reads behave as usual. A cheap
``stat`` first keeps devices from being opened at all. Symlinks to regular
files are followed: ImageNet copies are often symlink farms.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

# Absent on Windows, where FIFOs in folders do not exist either.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class NotRegularFile(OSError):
    """The path exists but is a FIFO, socket, device or folder, not a file to read."""

    def __init__(self, path: str | os.PathLike) -> None:
        # the message names no path: it ends up in rejection details, which never say where data lives
        super().__init__("not a regular file")
        self.strerror = "not a regular file"
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return self.strerror


def stat_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
    """``os.stat`` that raises :class:`NotRegularFile` for anything but a file.

    A dangling symlink raises FileNotFoundError, as a missing file does; with
    ``follow_symlinks=False`` a symlink itself is not a regular file.
    """
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path)
    return st


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for binary reading if, and only if, it is a regular file; never blocks.

    ``follow_symlinks=False`` (names a collaborator's manifest lists) refuses a
    symlink, which could point anywhere on the reader's machine.
    """
    stat_regular(path, follow_symlinks=follow_symlinks)  # devices are never opened, not even without blocking
    nofollow = 0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, _OPEN_FLAGS | _NONBLOCK | nofollow)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
            raise NotRegularFile(path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """All bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as fh:
        return fh.read()


def read_regular_text(path: str | Path, encoding: str = "utf-8") -> str:
    """A regular file decoded as text; UnicodeDecodeError for bytes that are not ``encoding``."""
    return read_regular(path).decode(encoding)


def temporary_path(path: str | Path) -> Path:
    """The name a file is written under until it is complete (``.<name>.<pid>.tmp``, hidden, per process).

    Every writer of the project uses it, so a rerun of the builder recognises
    and removes what a killed run left half-written.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_temporaries(folder: str | Path) -> None:
    """Delete what killed writers left under :func:`temporary_path` names in ``folder`` (the caller holds its lock)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary name in the same folder, then rename: readers never see half a file.

    The temporary name (``.<name>.<pid>.tmp``) is one a rerun of the builder
    cleans up; ordinary permissions, so a published manifest stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
