"""Bytes of a shard or manifest from a local file, an ``http(s)://`` URL or a ``pipe:`` command, bounded.

webdataset's own opener (``gopen``) hands URLs to ``curl -L --retry 30``: it
follows redirects to any host and never gives up on a server that drips a
byte at a time. What a collaborator sends is read under a policy instead:

- local: regular files only (a FIFO, socket or device never blocks a read), and
  a name taken from a manifest is never a symlink (it could point anywhere);
- http(s): redirects only within the same scheme, host and port unless the user
  allowed the other host; a dropped connection, a 5xx answer or
  ``stall_timeout_s`` without a byte is retried ``retries`` times with
  exponential backoff, from the start, and the bytes already read must come
  back identical (their hash is compared); a transfer whose rate (bytes over
  the time spent waiting on the network, after ``grace_s`` of it) falls below
  ``min_rate`` ends at once;
- ``pipe:`` (command line only): the command's exit status is checked, and a
  command that stops writing for ``stall_timeout_s`` is killed.

:class:`ShardStream` wraps any of them: it hashes and counts what is read,
bounds the total and each tar member, and keeps the tail to tell a complete
tar (two zero end blocks) from one cut at a member boundary.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import select
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.files import NotRegularFile, open_regular
from pipeline.shard_format.errors import Missing, StreamError
from pipeline.shard_format.spec import MAX_MEMBER_BYTES

# A shard without a manifest has no stated size; it still may not be endless.
MAX_UNLISTED_SHARD_BYTES = 64 << 30
_READ_CHUNK = 1 << 20
# tarfile reads ahead by a record and headers (pax, long names) sit between members.
_MEMBER_SLACK = 1 << 20
_END_MARKER = 2 * 512
# What may follow the end-of-archive marker: tar pads to a record of 20 blocks.
_MAX_TRAILER = 20 * 512


@dataclass(frozen=True)
class TransferPolicy:
    """How long a transfer may take and how often it is retried (the documented bounds)."""

    stall_timeout_s: float = 60.0
    grace_s: float = 60.0
    min_rate: float = 64 * 1024  # bytes/s, averaged from the start of the transfer
    retries: int = 3
    backoff_s: float = 1.0  # 1, 2, 4 s between attempts
    allow_hosts: frozenset[str] = field(default_factory=frozenset)


DEFAULT_POLICY = TransferPolicy()


class Source(Protocol):
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


# --------------------------------------------------------------------------- http(s)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same origin, or to a host the user allowed."""

    max_redirections = 5

    def __init__(self, allow_hosts: frozenset[str]) -> None:
        super().__init__()
        self.allow_hosts = allow_hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        target = urllib.parse.urljoin(req.full_url, newurl)
        scheme, host, _ = _origin(target)
        # another origin only if the user named its host, and never from https down to http
        allowed = host in self.allow_hosts and (scheme == "https" or _origin(req.full_url)[0] == scheme)
        if _origin(target) != _origin(req.full_url) and not allowed:
            raise StreamError(
                f"refusing a redirect to {scheme}://{host} (another host; "
                f"name it with --allow-host {host} to follow it)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Retry(Exception):
    """A failure worth another attempt (a dropped connection, a stall, a 5xx)."""


class HttpSource:
    """One URL's body under a :class:`TransferPolicy`, retried from the start on a dropped connection."""

    def __init__(self, url: str, policy: TransferPolicy = DEFAULT_POLICY) -> None:
        self.url, self.policy = url, policy
        self.delivered = 0
        self.prefix = hashlib.sha256()  # of the bytes handed out so far: a retry must reproduce them
        # The rate counts the network alone: time spent waiting on the socket and the bytes that came
        # through it, replays included, never the time the caller spends between two reads.
        self.waited = 0.0
        self.received = 0
        self.attempt = 0
        self.response: http.client.HTTPResponse | None = None
        self._with_retries(lambda: None, reconnect=True)

    def _with_retries(self, action, reconnect: bool = False):  # noqa: ANN001, ANN202 - a small local combinator
        """``action()``, reconnecting (and replaying what was delivered) after each retryable failure."""
        while True:
            try:
                if reconnect:
                    self._connect_and_replay()
                    reconnect = False
                return action()
            except _Retry as exc:
                if self.attempt >= self.policy.retries:
                    raise StreamError(f"{exc} (gave up after {self.attempt + 1} attempts)") from None
                time.sleep(self.policy.backoff_s * (2**self.attempt))
                self.attempt += 1
                self.close()
                reconnect = True

    def _connect(self) -> None:
        opener = urllib.request.build_opener(_RedirectGuard(self.policy.allow_hosts))
        request = urllib.request.Request(self.url, headers={"User-Agent": "bgcheck", "Accept-Encoding": "identity"})
        try:
            self.response = opener.open(request, timeout=self.policy.stall_timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise _Retry(f"HTTP {exc.code}") from None
            if exc.code in (404, 410):
                raise Missing(f"missing (HTTP {exc.code})") from None
            raise StreamError(f"refused (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            raise _Retry(f"cannot connect ({exc.reason})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry(f"cannot connect ({type(exc).__name__}: {exc})") from None

    def _connect_and_replay(self) -> None:
        """Reconnect and read the bytes already delivered again: they must hash the same."""
        self._connect()
        again = hashlib.sha256()
        left = self.delivered
        while left:
            data = self._read_raw(min(left, _READ_CHUNK))
            if not data:
                raise _Retry("connection closed while re-reading the start")
            again.update(data)
            left -= len(data)
        if again.digest() != self.prefix.digest():
            raise StreamError("the server sent different bytes on a retry")

    def _read_raw(self, n: int) -> bytes:
        assert self.response is not None
        if self.waited > self.policy.grace_s and self.received / self.waited < self.policy.min_rate:
            raise StreamError(
                f"transfer too slow ({self.received / self.waited / 1024:.1f} KiB/s over "
                f"{self.waited:.0f} s; at least {self.policy.min_rate / 1024:.0f} KiB/s expected)"
            )
        started = time.monotonic()
        try:
            data = self.response.read1(n)
        except TimeoutError:
            raise _Retry(f"no data for {self.policy.stall_timeout_s:.0f} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry(f"connection lost ({type(exc).__name__})") from None
        finally:
            self.waited += time.monotonic() - started
        self.received += len(data)
        return data

    def read(self, n: int) -> bytes:
        def once() -> bytes:
            data = self._read_raw(n)
            if not data and self.response is not None and self.response.length:  # closed before Content-Length
                raise _Retry("connection closed early")
            return data

        data = self._with_retries(once)
        self.prefix.update(data)
        self.delivered += len(data)
        return data

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None


# --------------------------------------------------------------------------- pipe:


class PipeSource:
    """stdout of a command the user typed; its exit status is checked when the output ends."""

    def __init__(self, command: str, policy: TransferPolicy = DEFAULT_POLICY) -> None:
        self.command, self.policy = command, policy
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        self.ended = False

    def read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.policy.stall_timeout_s)
        if not ready:
            self.close()
            raise StreamError(f"the command wrote nothing for {self.policy.stall_timeout_s:.0f} s")
        data = os.read(fd, n)
        if not data:
            self.ended = True
            status = self.proc.wait()
            if status != 0:
                raise StreamError(f"command exited with status {status}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc.wait()


# --------------------------------------------------------------------------- one entry point


def open_source(url: str, *, listed: bool, policy: TransferPolicy = DEFAULT_POLICY) -> Source:
    """The bytes at ``url``; ``listed``: the name came from a manifest (no symlinks, no pipes)."""
    if is_pipe(url):
        if listed:
            raise StreamError("refusing a pipe: command from a manifest")
        return PipeSource(url[len("pipe:"):], policy)
    if is_remote(url):
        return HttpSource(url, policy)
    path = urllib.parse.urlsplit(url).path if url.startswith("file://") else url
    try:
        return open_regular(path, follow_symlinks=not listed)
    except FileNotFoundError:
        raise Missing("missing") from None
    except NotRegularFile:
        if listed and os.path.islink(path):
            raise StreamError("a symlink (a name from a manifest is never followed)") from None
        raise StreamError("not a regular file") from None
    except OSError as exc:
        raise StreamError(f"cannot open ({exc.strerror or exc})") from None


def read_all(url: str, limit: int, *, listed: bool = False, policy: TransferPolicy = DEFAULT_POLICY) -> bytes:
    """A whole small file (a manifest), refusing anything longer than ``limit`` bytes."""
    source = open_source(url, listed=listed, policy=policy)
    chunks: list[bytes] = []
    total = 0
    try:
        while data := source.read(_READ_CHUNK):
            total += len(data)
            if total > limit:
                raise StreamError(f"larger than {limit} bytes")
            chunks.append(data)
    finally:
        source.close()
    return b"".join(chunks)


class ShardStream:
    """A shard's bytes as tarfile reads them: hashed, counted and bounded while they stream.

    ``start_member`` is called at every tar member header (by the member gate
    in :mod:`pipeline.shard_format.reader`): what is read until the next
    header, the member's data included, may not exceed ``MAX_MEMBER_BYTES``,
    so one huge member is refused before it fills memory.
    """

    def __init__(self, source: Source, name: str, max_bytes: int | None) -> None:
        self.source, self.name = source, name
        self.max_bytes = max_bytes if max_bytes is not None else MAX_UNLISTED_SHARD_BYTES
        self.sha256 = hashlib.sha256()
        self.nbytes = 0
        self.tail = b""
        self.head = b""  # the first block, to tell a plain tar from a compressed one
        self.member = ""
        self.member_read = 0

    def __str__(self) -> str:  # webdataset appends str(stream) to error messages
        return self.name

    def start_member(self, name: str) -> None:
        self.member, self.member_read = name, 0

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n if n is not None and n >= 0 else _READ_CHUNK)
        if not data:
            if 0 < self.nbytes < 512:  # shorter than one header: compressed, or nothing a tar can be
                raise StreamError("not a plain (ustar) tar: shards of this format are uncompressed tar")
            return data
        if self.nbytes < 512:
            self._check_start(data)
        self.nbytes += len(data)
        self.member_read += len(data)
        if self.nbytes > self.max_bytes:
            raise StreamError(f"longer than the {self.max_bytes} bytes it may have")
        if self.member_read > MAX_MEMBER_BYTES + _MEMBER_SLACK:
            raise StreamError(f"member {self.member} is larger than {MAX_MEMBER_BYTES} bytes")
        self.sha256.update(data)
        self.tail = (self.tail + data[-_END_MARKER:])[-_END_MARKER:]
        return data

    def _check_start(self, data: bytes) -> None:
        """The first block must be a ustar header (or the end marker of an empty shard).

        tarfile's stream mode would inflate gzip, bzip2, xz and even old .lzma data
        on the fly, past every bound counted here: a positive check refuses them all.
        """
        self.head = (self.head + data)[:512]
        if len(self.head) == 512 and any(self.head) and self.head[257:262] != b"ustar":
            raise StreamError("not a plain (ustar) tar: shards of this format are uncompressed tar")

    def drain(self) -> None:
        """Read to the end: the padding after the end-of-archive marker counts towards size and hash."""
        start = self.nbytes
        while self.read(_READ_CHUNK):
            self.member_read = 0
            if self.nbytes - start > _MAX_TRAILER + _READ_CHUNK:
                raise StreamError("data after the end of the archive")

    def ends_complete(self) -> bool:
        """Whether the bytes end in tar's end-of-archive marker (two zero blocks).

        tarfile reads a header cut short as a clean end of the archive, so a
        shard cut at a member boundary would otherwise pass for a shorter shard.
        """
        return self.nbytes % 512 == 0 and len(self.tail) == _END_MARKER and not any(self.tail)

    def close(self) -> None:
        self.source.close()
