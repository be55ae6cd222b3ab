"""Models from registry rows: random init, the meta device, and pretrained weights resolved in one order.

Weights for :func:`build_model` (first hit wins): the row's source looks in ``weights_dir``,
then in its library's cache (torch hub, Hugging Face hub, the installed lite0 package, the
TorchScript path); only then, unless ``HF_HUB_OFFLINE`` is truthy, does it download. Every
way of not getting weights (absent offline, a source that cannot download, a failed
download) is a one-line :class:`WeightsUnavailable`, so ``--skip-unavailable`` can skip it.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import Any

from eval.zoo.errors import WeightsUnavailable
from eval.zoo.registry import ModelSpec, as_spec, factory_for
from eval.zoo.sources import ModelSource, source_for

# What a failed download raises: urllib's URLError and requests/httpx-based hub errors are OSErrors;
# a connection dropped mid-body is an HTTPException.
DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def downloads_disabled() -> bool:
    """Offline when HF_HUB_OFFLINE is set: one switch for both hubs, read at call time."""
    return (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in {"1", "true", "yes", "on"}


def construct_on_meta(spec: ModelSpec | str) -> Any:
    """The architecture without allocating or downloading anything (for checks and param counts)."""
    import torch

    s = as_spec(spec)
    factory = factory_for(s)
    if factory is not None:
        with torch.device("meta"):
            return factory(s, pretrained=False, weights_dir=None)
    return source_for(s).construct(s, "meta")


def find_local_weights(spec: ModelSpec | str, weights_dir: str | Path | None = None) -> Path | None:
    """The checkpoint that :func:`build_model` would load, without downloading; None if absent."""
    s = as_spec(spec)
    return source_for(s).find_weights(s, None if weights_dir is None else Path(weights_dir))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _download(source: ModelSource, spec: ModelSpec) -> Path:
    hint = source.missing_hint(spec)
    if not source.downloads:
        raise WeightsUnavailable(f"weights for {spec.id} not found: {hint}")
    if downloads_disabled():
        raise WeightsUnavailable(f"weights for {spec.id} not found offline: {hint} (HF_HUB_OFFLINE is set)")
    try:
        return source.download(spec)
    except WeightsUnavailable as exc:
        raise WeightsUnavailable(f"weights for {spec.id} not downloadable ({exc}): {hint}") from exc
    except DOWNLOAD_ERRORS as exc:
        raise WeightsUnavailable(f"weights for {spec.id} failed to download ({_first_line(exc)}): {hint}") from exc


def build_model(
    spec: ModelSpec | str,
    weights_dir: str | Path | None = None,
    pretrained: bool = True,
    device: Any = "cpu",
) -> Any:
    """The registry model in eval mode on ``device``; ``pretrained=False`` gives random init (tests, benchmarks)."""
    s = as_spec(spec)
    wdir = None if weights_dir is None else Path(weights_dir)
    factory = factory_for(s)
    if factory is not None:
        model = factory(s, pretrained=pretrained, weights_dir=wdir)
    elif not pretrained:
        model = source_for(s).construct(s, device)
    else:
        source = source_for(s)
        path = source.find_weights(s, wdir)
        model = source.load_pretrained(s, path if path is not None else _download(source, s))
    return model.to(device).eval()
