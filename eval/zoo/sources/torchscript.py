"""Your own models: ``weights_file`` is a TorchScript archive (``torch.jit.save``), the row its preprocessing.

A relative ``weights_file`` is taken from the registry file's folder, so a registry and the
models it lists can be moved together. Archives load with ``torch.jit.load``: TorchScript
carries code and weights, so nothing is unpickled. Nothing downloads.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.zoo.errors import WeightsUnavailable
from eval.zoo.sources.base import ModelSource

if TYPE_CHECKING:
    from eval.zoo.registry import ModelSpec


def load_archive(path: Path, device: Any) -> Any:
    import torch

    with warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export, but it is still the format
        # that loads a whole model without executing pickled code.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def _randomize_(module: Any) -> Any:
    """Fresh weights for an archive: the graph has no initialiser, so draw them here."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module


class TorchScriptSource(ModelSource):
    def validate(self, spec: ModelSpec, registry_folder: Path | None) -> ModelSpec:
        if not spec.weights_file:
            raise ValueError(f"registry row {spec.id!r}: torchscript rows need weights_file (the archive)")
        if registry_folder is None or Path(spec.weights_file).is_absolute():
            return spec
        return replace(spec, weights_file=str(registry_folder / spec.weights_file))

    def construct(self, spec: ModelSpec, device: Any) -> Any:
        path = self.find_weights(spec, None)
        if path is None:  # the archive is the architecture: without it there is nothing to build
            raise WeightsUnavailable(f"weights for {spec.id} not found: {self.missing_hint(spec)}")
        if str(device) == "meta":
            return load_archive(path, "meta")
        return _randomize_(load_archive(path, "cpu")).to(device)

    def find_weights(self, spec: ModelSpec, weights_dir: Path | None) -> Path | None:
        path = Path(str(spec.weights_file))
        return path if path.is_file() else None

    def load_pretrained(self, spec: ModelSpec, path: Path) -> Any:
        return load_archive(path, "cpu")

    def reference_fields(self, spec: ModelSpec) -> dict[str, Any]:
        return {}  # no library config: the row is its own reference

    def missing_hint(self, spec: ModelSpec) -> str:
        return f"put the TorchScript archive (torch.jit.save) at {spec.weights_file}"
