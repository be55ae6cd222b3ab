"""torchvision rows: ``arch`` is a builder name, ``weights`` a Weights-enum tag (``IMAGENET1K_V1``).

Weights: ``<weights_dir>/<weights_file>``, then the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<weights_file>``), then a download of ``weights_url``
(the enum's URL when the row has none) into that cache, with torchvision's hash check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.zoo.sources.base import ModelSource, load_checkpoint, preprocess_fields

if TYPE_CHECKING:
    from eval.zoo.registry import ModelSpec

# torchvision builders change the architecture when given weights; reproduce that without the enum
# so the checkpoint can come from anywhere (weights dir, cache) rather than only torchvision's URL.
_PRETRAINED_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
# Old DenseNet checkpoints name layers 'norm.1' etc.; '.' is no longer allowed in module names.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _weights_enum(spec: ModelSpec) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(spec.arch)[spec.weights]


def _url(spec: ModelSpec) -> str:
    return spec.weights_url or _weights_enum(spec).url


def _file_name(spec: ModelSpec) -> str:
    return spec.weights_file or _url(spec).rsplit("/", 1)[-1]


def torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_architecture(spec: ModelSpec) -> Any:
    """The architecture the pretrained checkpoint expects (aux heads kept until the weights are in)."""
    import torchvision

    builder = torchvision.models.get_model_builder(spec.arch)
    return builder(weights=None, num_classes=1000, **_PRETRAINED_KWARGS.get(spec.arch, {}))


def _finish(spec: ModelSpec, model: Any) -> Any:
    # torchvision keeps googlenet's aux heads only to load the checkpoint; inception_v3 keeps them.
    if spec.arch == "googlenet":
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None
    return model


def fix_state_dict(arch: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Key renames torchvision applies to its own old checkpoints (DenseNet)."""
    out = dict(state_dict)
    if arch.startswith("densenet"):
        for key in list(out):
            match = _DENSENET_OLD_KEY.match(key)
            if match:
                out[match.group(1) + match.group(2)] = out.pop(key)
    return out


class TorchvisionSource(ModelSource):
    downloads = True

    def construct(self, spec: ModelSpec, device: Any) -> Any:
        import torch

        with torch.device(device):
            return _finish(spec, checkpoint_architecture(spec))

    def find_weights(self, spec: ModelSpec, weights_dir: Path | None) -> Path | None:
        name = _file_name(spec)
        for folder in ([weights_dir] if weights_dir is not None else []) + [torch_hub_checkpoints()]:
            if (folder / name).is_file():
                return folder / name
        return None

    def download(self, spec: ModelSpec) -> Path:
        import torch.hub

        target = torch_hub_checkpoints() / _file_name(spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        # torchvision file names end in the sha256 prefix that load_state_dict_from_url checks.
        match = torch.hub.HASH_REGEX.search(target.name)
        torch.hub.download_url_to_file(_url(spec), str(target), match.group(1) if match else None, progress=True)
        return target

    def load_pretrained(self, spec: ModelSpec, path: Path) -> Any:
        model = checkpoint_architecture(spec)
        model.load_state_dict(fix_state_dict(spec.arch, load_checkpoint(path)))
        return _finish(spec, model)

    def reference_fields(self, spec: ModelSpec) -> dict[str, Any]:
        weights = _weights_enum(spec)
        transform = weights.transforms()
        crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
        top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        return {
            "weights_file": weights.url.rsplit("/", 1)[-1],
            "weights_url": weights.url,
            "hf_hub_id": None,
            **preprocess_fields(crop, transform.interpolation.value, crop / resize, transform.mean, transform.std),
            "top1": None if top1 is None else float(top1),
        }

    def missing_hint(self, spec: ModelSpec) -> str:
        return f"put {_file_name(spec)} in --weights-dir or {torch_hub_checkpoints()}"
