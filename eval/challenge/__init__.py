"""The Backgrounds Challenge (Noise or Signal, Xiao et al. 2020): the worst case over backgrounds.

Every foreground (``original`` with its mask) is pasted onto every background
(``only_bg_t``) as ``bg * (1 - mask) + mask * fg``; it is *vulnerable* as soon
as one composite is misclassified, and challenge accuracy is the share of
foregrounds that no background fools. ``search`` does the worst-case search
on the device, ``results`` holds what is written and read back (it imports no
torch, so the report can read results cheaply), ``cli`` is
``python -m eval.challenge``.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"ChallengeStats": "cli", "build_parser": "cli", "main": "cli", "run": "cli",
            "SearchResult": "search", "composite": "search"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The CLI and the search load torch: import them on first use, not with the package."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval.challenge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"eval.challenge.{_EXPORTS[name]}"), name)
