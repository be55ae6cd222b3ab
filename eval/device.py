"""Models on the device: the registry row's preprocessing done on the device, one batch scored, timed.

Batches arrive as uint8 (B, 3, H, W) (``eval.stream``); each model resizes them
to its input size with its interpolation and normalises them with its
mean/std on the device, so pixels cross the bus once, as uint8, however many
models score them. A batch that does not fit in device memory is scored in
smaller pieces (timm's ``validate.py`` back-off); a model that fails even so is
reported, and the sweep goes on with the others.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eval.predictions import IN9_NOT_COMPUTED
from pipeline.classes import IN9_CLASSES, in9_mapping

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _seed_for(model_id: str) -> int:
    return zlib.crc32(model_id.encode("utf-8"))


@dataclass
class ScoredModel:
    """A model plus the on-device preprocessing its registry row asks for."""

    id: str
    module: torch.nn.Module
    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    signature: dict[str, Any] = field(default_factory=dict)
    batch_limit: int | None = None  # the largest batch that fit in device memory, once one did not
    error: str | None = None  # why the model stopped scoring (its results are not committed)

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255.0
        # Every uint8 level normalised by the same float32 ops as the tensor path: (1, 256, 3).
        levels = torch.arange(256, dtype=torch.float32, device=self.device).view(1, 1, 256, 1)
        self._levels = ((levels - self._mean) / self._std)[0, :, :, 0].T.reshape(1, 256, 3).contiguous()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on device -> normalised float at the model's input size."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        lookup = _cpu_table_lookup()
        if (
            lookup is not None
            and self.channels_last
            and images.device.type == "cpu"
            and tuple(images.shape[-2:]) == self.size
            and images.shape[1] == 3
            and images.numel()
            and images.permute(0, 2, 3, 1).is_contiguous()
        ):
            # One pass from uint8 to normalised float (the tensor path takes three over the batch);
            # the table holds exactly the values that path computes.
            b, c, h, w = images.shape
            hwc = lookup(images.permute(0, 2, 3, 1).reshape(b * h, w, c).numpy(), self._levels.numpy())
            return torch.from_numpy(hwc).view(b, h, w, c).permute(0, 3, 1, 2)
        if tuple(images.shape[-2:]) != self.size:
            x = images.float()
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest", "area") else "bicubic"
            smooth = mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.size, mode=mode, antialias=smooth, align_corners=False if smooth else None)
            x = x.clamp_(0.0, 255.0).contiguous(memory_format=layout)  # bicubic overshoots; PIL clamps too
        else:
            # Cast and lay out in one pass (stream batches arrive channels-last); a fresh tensor either way.
            x = images.to(torch.float32, memory_format=layout, copy=True)
        if self.channels_last and x.is_contiguous(memory_format=torch.channels_last) and x.numel():
            # Channels-last memory is (B*H, W*3) rows: normalise with per-row patterns of W*3
            # values, which vectorises, instead of broadcasting over an innermost dimension of 3.
            b, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).view(b * h, w * c)
            rows.sub_(self._mean.view(1, c).repeat(1, w)).div_(self._std.view(1, c).repeat(1, w))
            return x
        return x.sub_(self._mean).div_(self._std)  # in place: no extra full-batch temporaries

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.module(x)
        if isinstance(out, (tuple, list)):  # inception-style aux outputs
            out = out[0]
        return out.float()

    def columns(self, device: str) -> dict[str, str]:
        """The weights and preprocessing a result was made with, as results tables write them."""
        h, w = self.size
        return {
            "model": self.id,
            "device": device,
            "precision": self.signature["precision"],
            "weights": self.weights,
            "input_size": str(h) if h == w else f"{h}x{w}",
            "interpolation": self.interpolation,
            "mean": " ".join(f"{v:g}" for v in self.mean),
            "std": " ".join(f"{v:g}" for v in self.std),
            "batch_size": str(self.batch_limit or ""),
        }


@functools.cache
def _cpu_table_lookup() -> Callable[[Any, Any], Any] | None:
    """OpenCV's multithreaded table lookup if the optional extra is installed, else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2.LUT


def build_models(
    model_ids: str | Sequence[str] | None,
    device: torch.device,
    *,
    registry: str | Path | None = None,
    weights_dir: str | Path | None = None,
    precision: str = "fp32",
    random_weights: bool = False,
    skip_unavailable: bool = False,
    channels_last: bool = False,
    compile_model: bool = False,
    in9_rule: str = "map-argmax",
    limit: int | None = None,
) -> list[ScoredModel]:
    """Registry rows -> models on ``device``; unavailable weights fail, or are skipped with ``skip_unavailable``.

    ``model_ids`` is a ``--models`` value; ``registry`` a registry file to resolve it in instead
    of the built-in one. ``in9_rule`` and ``limit`` only enter each model's resume signature.
    """
    from eval import zoo
    from eval.errors import EvalError

    if registry is None:
        specs = zoo.resolve_models(model_ids)
    else:
        try:
            rows = zoo.load_registry(registry)
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalError(f"--registry {registry}: {str(exc).splitlines()[0]}") from exc
        specs = zoo.resolve_models(model_ids, rows)
    dtype = PRECISIONS[precision]
    built: list[ScoredModel] = []
    for spec in specs:
        try:
            if random_weights:
                # Seeded per model id so every rank (and every rerun) gets the same random network.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_for(spec.id))
                    module = zoo.build_model(spec, weights_dir=weights_dir, pretrained=False, device="cpu")
                module = module.to(device)
            else:
                module = zoo.build_model(spec, weights_dir=weights_dir, pretrained=True, device=device)
        except zoo.WeightsUnavailable as exc:
            if not skip_unavailable:
                raise
            print(f"skipping {spec.id}: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        module.eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        if compile_model:
            module = torch.compile(module)
        cfg = zoo.preprocess_config(spec)
        size = cfg["input_size"]
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        weights = "random" if random_weights else str(spec.weights)
        mean = tuple(float(v) for v in cfg["mean"])
        std = tuple(float(v) for v in cfg["std"])
        signature = {
            "weights": weights,
            "precision": precision,
            "input_size": list(hw),
            "interpolation": cfg["interpolation"],
            "mean": list(mean),
            "std": list(std),
            "in9_rule": in9_rule,
            "limit": limit,
        }
        built.append(
            ScoredModel(
                id=spec.id,
                module=module,
                size=hw,
                interpolation=str(cfg["interpolation"]),
                mean=mean,  # type: ignore[arg-type]
                std=std,  # type: ignore[arg-type]
                weights=weights,
                device=device,
                dtype=dtype,
                channels_last=channels_last,
                signature=signature,
            )
        )
    if not built:
        raise EvalError("no model left to score (all weights unavailable)")
    return built






class In9Mapper:
    """ImageNet-9 predictions: from 1000-way logits under the two ``--in9-rule`` rules, or a 9-way head's argmax."""

    def __init__(self, device: torch.device) -> None:
        mapping = torch.tensor(in9_mapping(), dtype=torch.int64)
        self.mapping = mapping.to(device)
        self.members = torch.nonzero(mapping >= 0).flatten().to(device)

    def predict(self, logits: torch.Tensor, top1: torch.Tensor, rule: str) -> torch.Tensor:
        if logits.shape[1] == IN9_CLASSES:  # an ImageNet-9 head (IN-9L models): its argmax is the prediction
            return top1
        if logits.shape[1] != self.mapping.numel():  # neither head: no IN-9 prediction at all
            return torch.full_like(top1, IN9_NOT_COMPUTED)
        if rule == "restrict":
            return self.mapping[self.members[logits[:, self.members].argmax(dim=1)]]
        return self.mapping[top1]


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ModelFailed(RuntimeError):
    """A model that cannot score a batch even one image at a time; the sweep goes on without it."""


def _score(model: ScoredModel, images: torch.Tensor, labels: torch.Tensor, in9: In9Mapper, rule: str) -> dict:
    logits = model.logits(images)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    p_true = logits.softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return {"top": top, "p_true": p_true, "in9_pred": in9.predict(logits, top[:, 0], rule)}


def score_batch(
    model: ScoredModel, images: torch.Tensor, labels: torch.Tensor, in9: In9Mapper, in9_rule: str
) -> dict[str, torch.Tensor]:
    """Per-sample outputs of one model on one batch, still on the device.

    Out of device memory, the batch is scored in halves, then quarters, ...;
    the size that fit becomes the model's ``batch_limit`` for the rest of the
    run. Below one image, or on any other error, :class:`ModelFailed`.
    """
    n = images.shape[0]
    outputs: list[dict[str, torch.Tensor]] = []
    start = 0
    while start < n:
        size = min(model.batch_limit or n, n - start)
        try:
            outputs.append(_score(model, images[start : start + size], labels[start : start + size], in9, in9_rule))
            start += size
        except Exception as exc:  # noqa: BLE001 - any failure of one model must not end the sweep
            if not is_out_of_memory(exc) or size == 1:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelFailed(f"{model.id}: {type(exc).__name__}: {reason}"[:300]) from None
            if images.device.type == "cuda":
                torch.cuda.empty_cache()
            model.batch_limit = max(1, math.ceil(size / 2))
    if len(outputs) == 1:
        return outputs[0]
    return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}


class DeviceTimer:
    """Seconds of device work per model; on CUDA with events, so timing one model never waits for it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Span:
        return Span(self.cuda)


class Span:
    """One timed stretch: ``stop()`` right after the work is queued, ``seconds`` whenever it is needed."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()
        self._seconds: float | None = None

    def stop(self) -> Span:
        if self.cuda:
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._t0
        return self

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            self._end.synchronize()
            self._seconds = self._begin.elapsed_time(self._end) / 1000.0
        return self._seconds
