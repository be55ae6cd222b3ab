"""The two ways reading shards fails, each a one-line message for the user."""

from __future__ import annotations


class ShardSpecError(ValueError):
    """A shard spec or manifest that cannot be used at all (missing, malformed, refused)."""


class StreamError(Exception):
    """Bad shard content or a failed transfer; the message names the shard and, where known, the key.

    ``str()`` is the message alone: webdataset appends the stream to an
    exception's ``args`` on its way up, which must not leak into what the user reads.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Missing(StreamError):
    """The shard or file is not there (no such file, HTTP 404/410)."""
