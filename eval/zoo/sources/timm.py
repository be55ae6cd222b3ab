"""timm rows: ``id`` is a timm pretrained name (``arch.tag``), ``hf_hub_id`` the Hugging Face repo of its weights.

Weights: ``<weights_dir>/<id>.safetensors|.pth|.bin`` (a timm-format state dict), then the
Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), then a download from the hub
into that cache. timm loads the file itself, so its checkpoint filters apply to every route.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.zoo.errors import WeightsUnavailable
from eval.zoo.sources.base import ModelSource, preprocess_fields

if TYPE_CHECKING:
    from eval.zoo.registry import ModelSpec

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")
# What timm itself looks for in a hub repo, in its order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_cache_dir() -> Path:
    # Read the environment now: huggingface_hub freezes its constants at import time.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home) / "hub"


def _hub_repo(spec: ModelSpec) -> str:
    if spec.hf_hub_id:
        return spec.hf_hub_id
    import timm

    return timm.models.get_pretrained_cfg(spec.id).hf_hub_id


class TimmSource(ModelSource):
    downloads = True

    def construct(self, spec: ModelSpec, device: Any) -> Any:
        import timm
        import torch

        with torch.device(device):
            return timm.create_model(spec.id, pretrained=False, num_classes=1000)

    def find_weights(self, spec: ModelSpec, weights_dir: Path | None) -> Path | None:
        if weights_dir is not None:
            for suffix in WEIGHT_SUFFIXES:
                if (weights_dir / (spec.id + suffix)).is_file():
                    return weights_dir / (spec.id + suffix)
        from huggingface_hub import try_to_load_from_cache

        for filename in HF_WEIGHT_FILES:
            hit = try_to_load_from_cache(_hub_repo(spec), filename, cache_dir=str(hf_cache_dir()))
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        return None

    def download(self, spec: ModelSpec) -> Path:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        repo = _hub_repo(spec)
        for filename in HF_WEIGHT_FILES:
            try:
                return Path(huggingface_hub.hf_hub_download(repo, filename, cache_dir=str(hf_cache_dir())))
            except EntryNotFoundError as exc:
                if isinstance(exc, LocalEntryNotFoundError):  # no connection: not a missing file
                    raise
        raise WeightsUnavailable(f"HF hub repo {repo} has none of {', '.join(HF_WEIGHT_FILES)}")

    def load_pretrained(self, spec: ModelSpec, path: Path) -> Any:
        import timm

        return timm.create_model(spec.id, pretrained=True, pretrained_cfg_overlay={"file": str(path)})

    def reference_fields(self, spec: ModelSpec) -> dict[str, Any]:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.id)
        return {
            "weights_file": None,
            "weights_url": None,
            "hf_hub_id": cfg.hf_hub_id,
            **preprocess_fields(cfg.input_size[-1], cfg.interpolation, cfg.crop_pct, cfg.mean, cfg.std),
        }

    def missing_hint(self, spec: ModelSpec) -> str:
        return (
            f"put {spec.id}.safetensors (from HF hub repo {_hub_repo(spec)}) in --weights-dir "
            f"or fill the HF cache {hf_cache_dir()}"
        )
