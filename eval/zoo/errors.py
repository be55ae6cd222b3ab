"""The zoo's two user-facing errors; each message is one line, because the CLIs print it as is."""

from __future__ import annotations


class UnknownModel(ValueError):
    """A requested model id is not in the registry."""


class WeightsUnavailable(RuntimeError):
    """Pretrained weights cannot be found locally or downloaded (``--skip-unavailable`` skips the model)."""
