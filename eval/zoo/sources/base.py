"""The interface every model source implements, and the checkpoint reader the sources share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from eval.zoo.registry import ModelSpec


class ModelSource(Protocol):
    """How one kind of registry row (``spec.source``) becomes a model.

    The zoo calls these and never looks at ``spec.source`` itself, so a new kind of source is
    one class plus its entry in :data:`eval.zoo.sources.SOURCES`. Subclass this for the
    defaults of the optional hooks (no paths to anchor, no download).
    """

    #: whether :meth:`download` can fetch weights that :meth:`find_weights` did not find
    downloads: ClassVar[bool] = False

    def validate(self, spec: ModelSpec, registry_folder: Path | None) -> ModelSpec:
        """The row ready to use: source-specific checks (raise ValueError), paths anchored to the registry file."""
        return spec

    def construct(self, spec: ModelSpec, device: Any) -> Any:
        """The architecture with random weights on ``device`` (``"meta"`` allocates and downloads nothing)."""
        ...

    def find_weights(self, spec: ModelSpec, weights_dir: Path | None) -> Path | None:
        """The local checkpoint :meth:`load_pretrained` would read, without downloading; None if absent."""
        ...

    def download(self, spec: ModelSpec) -> Path:
        """Fetch the checkpoint into the library's cache; network errors propagate (the zoo words them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot download weights")

    def load_pretrained(self, spec: ModelSpec, path: Path) -> Any:
        """The model carrying the checkpoint at ``path`` (on the CPU)."""
        ...

    def reference_fields(self, spec: ModelSpec) -> dict[str, Any]:
        """Row fields as the library that owns the weights states them: ``check`` compares, ``generate`` writes."""
        ...

    def missing_hint(self, spec: ModelSpec) -> str:
        """One line telling the user which file to put where, or what to install."""
        ...


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def preprocess_fields(input_size: int, interpolation: str, crop_pct: float, mean: Any, std: Any) -> dict[str, Any]:
    """The preprocessing part of a row in the registry's own types (libraries hand out tensors, enums, lists)."""
    return {
        "input_size": int(input_size),
        "interpolation": str(interpolation),
        "crop_pct": float(crop_pct),
        "mean": tuple(float(v) for v in mean),
        "std": tuple(float(v) for v in std),
    }
