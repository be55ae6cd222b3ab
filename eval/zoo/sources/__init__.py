"""Model sources by the name a registry row gives in ``source``: the one place that knows the kinds.

Adding a kind is one module implementing :class:`ModelSource` plus its entry below (or, from
outside the project, :func:`register_source`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eval.zoo.sources.base import ModelSource
from eval.zoo.sources.package import PackageSource
from eval.zoo.sources.timm import TimmSource
from eval.zoo.sources.torchscript import TorchScriptSource
from eval.zoo.sources.torchvision import TorchvisionSource

if TYPE_CHECKING:
    from eval.zoo.registry import ModelSpec

SOURCES: dict[str, ModelSource] = {
    "torchvision": TorchvisionSource(),
    "timm": TimmSource(),
    "package": PackageSource(),
    "torchscript": TorchScriptSource(),
}
_BUILT_IN = frozenset(SOURCES)


def register_source(name: str, source: ModelSource) -> None:
    """Make rows with ``"source": name`` loadable; names are never replaced, so a typo cannot shadow a kind."""
    if name in SOURCES:
        raise ValueError(f"model source {name!r} is already registered")
    SOURCES[name] = source


def unregister_source(name: str) -> None:
    """Remove a source added with :func:`register_source` (tests); the built-in kinds stay."""
    if name in _BUILT_IN:
        raise ValueError(f"model source {name!r} is built in")
    SOURCES.pop(name, None)


def source_for(spec: ModelSpec) -> ModelSource:
    try:
        return SOURCES[spec.source]
    except KeyError:
        raise ValueError(f"model {spec.id!r}: unknown source {spec.source!r} (known: {', '.join(SOURCES)})") from None


__all__ = ["SOURCES", "ModelSource", "register_source", "source_for", "unregister_source"]
