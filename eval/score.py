"""Score models on shards: ``python -m eval.score --shards SPEC --models paper32 --out results/``.

Decode once, score many: every batch is decoded once (uint8) and fed to each
model, which resizes and normalises it on the device with its own
preprocessing (timm prefetch-loader style). Results are per-sample
predictions per (model, variant) (``eval/predictions.py``) plus one
``scores.csv`` row per (model, variant) with the exact weights and
preprocessing used; accuracies there are percentages.

Resume: each (model, shard) is committed as a part file when the shard has
been read and verified completely; a rerun skips committed shards, and once
every shard of a variant is in, the parts are merged into the final
predictions file (exactly once per key, counts checked against the manifest)
and deleted. Under ``torchrun`` each rank scores the shards ``i % world ==
rank`` and rank 0 merges.
"""

from __future__ import annotations

import argparse
import csv
import functools
import glob
import hashlib
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eval.predictions import (
    Predictions,
    atomic_write_text,
    predictions_path,
    read_predictions,
    write_predictions,
)
from eval.stream import ReadOptions, StreamError, images_to_device, make_loader, split_by_node
from pipeline.classes import in9_mapping
from pipeline.shard_format import ShardRef, ShardSpecError, resolve_shards

SCORES_NAME = "scores.csv"
SCORE_COLUMNS = (
    "model",
    "variant",
    "n",
    "top1",
    "top5",
    "in9_top1",
    "images_per_s",
    "device",
    "precision",
    "weights",
    "input_size",
    "interpolation",
    "mean",
    "std",
    "skipped",
)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHARDS_GLOB = "shards/*/"
PARTS_DIR = ".parts"
DONE_DIR = ".done"

# Called with the shard id after each (shard, all models) commit; tests use it to simulate a kill.
after_shard_hook: Callable[[str], None] | None = None


@dataclass
class RunStats:
    """What one process did: images read, end-to-end seconds, score rows (rank 0)."""

    n_images: int
    seconds: float
    rows: list[dict[str, str]]


class EvalError(Exception):
    """A run that cannot proceed; the message is one line for the user."""


# ---------------------------------------------------------------------------
# Models on the device
# ---------------------------------------------------------------------------


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
    seconds: float = 0.0

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


@functools.cache
def _cpu_table_lookup() -> Callable[[Any, Any], Any] | None:
    """OpenCV's multithreaded table lookup if the optional extra is installed, else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2.LUT


def build_models(args: argparse.Namespace, device: torch.device) -> list[ScoredModel]:
    """Registry rows -> models on ``device``; unavailable weights fail or are skipped per ``--skip-unavailable``."""
    from eval import zoo

    if args.registry is None:
        specs = zoo.resolve_models(args.models)
    else:
        try:
            registry = zoo.load_registry(args.registry)
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalError(f"--registry {args.registry}: {str(exc).splitlines()[0]}") from exc
        specs = zoo.resolve_models(args.models, registry)
    dtype = PRECISIONS[args.precision]
    built: list[ScoredModel] = []
    for spec in specs:
        try:
            if args.random_weights:
                # Seeded per model id so every rank (and every rerun) gets the same random network.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_for(spec.id))
                    module = zoo.build_model(spec, weights_dir=args.weights_dir, pretrained=False, device="cpu")
                module = module.to(device)
            else:
                module = zoo.build_model(spec, weights_dir=args.weights_dir, pretrained=True, device=device)
        except zoo.WeightsUnavailable as exc:
            if not args.skip_unavailable:
                raise
            print(f"skipping {spec.id}: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        module.eval()
        if args.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if args.compile:
            module = torch.compile(module)
        cfg = zoo.preprocess_config(spec)
        size = cfg["input_size"]
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        weights = "random" if args.random_weights else str(spec.weights)
        mean = tuple(float(v) for v in cfg["mean"])
        std = tuple(float(v) for v in cfg["std"])
        signature = {
            "weights": weights,
            "precision": args.precision,
            "input_size": list(hw),
            "interpolation": cfg["interpolation"],
            "mean": list(mean),
            "std": list(std),
            "in9_rule": args.in9_rule,
            "limit": args.limit,
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
                channels_last=args.channels_last,
                signature=signature,
            )
        )
    if not built:
        raise EvalError("no model left to score (all weights unavailable)")
    return built


class In9Heads:
    """ImageNet-9 predictions from 1000-way logits under the two rules."""

    def __init__(self, device: torch.device) -> None:
        mapping = torch.tensor(in9_mapping(), dtype=torch.int64)
        self.mapping = mapping.to(device)
        self.members = torch.nonzero(mapping >= 0).flatten().to(device)

    def predict(self, logits: torch.Tensor, top1: torch.Tensor, rule: str) -> torch.Tensor:
        if logits.shape[1] != self.mapping.numel():
            return torch.full_like(top1, -1)
        if rule == "restrict":
            return self.mapping[self.members[logits[:, self.members].argmax(dim=1)]]
        return self.mapping[top1]


def score_batch(
    model: ScoredModel, images: torch.Tensor, labels: torch.Tensor, heads: In9Heads, in9_rule: str
) -> dict[str, torch.Tensor]:
    """Per-sample outputs of one model on one batch, still on the device."""
    logits = model.logits(images)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    probs = logits.softmax(dim=1)
    p_true = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    return {"top": top, "p_true": p_true, "in9_pred": heads.predict(logits, top[:, 0], in9_rule)}


# ---------------------------------------------------------------------------
# Bookkeeping on disk: parts (per model and shard) and done ledgers (per model and variant)
# ---------------------------------------------------------------------------


def shard_id(ref: ShardRef) -> str:
    """Stable id of a shard across runs: its name plus a hash of where it lives."""
    digest = hashlib.sha1(ref.url.encode("utf-8")).hexdigest()[:12]
    return f"{ref.name.replace('/', '_')}-{digest}"


def part_path(out: Path, model_id: str, sid: str) -> Path:
    return out / "predictions" / model_id / PARTS_DIR / f"{sid}.json"


def done_path(out: Path, model_id: str, variant: str) -> Path:
    return out / "predictions" / model_id / DONE_DIR / f"{variant}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_done(out: Path, model: ScoredModel, refs_by_sid: dict[str, ShardRef]) -> dict[str, dict[str, Any]]:
    """Valid done ledgers of ``model``: ``{variant: ledger}``.

    A ledger made with other settings, or listing a shard whose manifest hash
    has since changed, is ignored (and its variant rescored).
    """
    folder = out / "predictions" / model.id / DONE_DIR
    ledgers: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return ledgers
    for path in sorted(folder.glob("*.json")):
        ledger = _read_json(path)
        if not ledger or ledger.get("signature") != model.signature:
            continue
        if not predictions_path(out, model.id, path.stem).is_file():
            continue
        stale = any(
            sid in refs_by_sid and refs_by_sid[sid].sha256 and entry.get("sha256") not in (None, refs_by_sid[sid].sha256)
            for sid, entry in ledger["shards"].items()
        )
        if not stale:
            ledgers[path.stem] = ledger
    return ledgers


def load_part(out: Path, model: ScoredModel, ref: ShardRef) -> dict[str, Any] | None:
    part = _read_json(part_path(out, model.id, shard_id(ref)))
    if not part or part.get("signature") != model.signature or part.get("sha256") != ref.sha256:
        return None
    return part


@dataclass
class Plan:
    """Which models still need which shards (indices into the run's shard list)."""

    needs: dict[int, list[int]]  # shard index -> model indices

    @property
    def shard_indices(self) -> list[int]:
        return sorted(self.needs)


def make_plan(out: Path, models: Sequence[ScoredModel], refs: Sequence[ShardRef]) -> Plan:
    refs_by_sid = {shard_id(r): r for r in refs}
    needs: dict[int, list[int]] = {}
    for m, model in enumerate(models):
        done_sids = {sid for ledger in load_done(out, model, refs_by_sid).values() for sid in ledger["shards"]}
        for s, ref in enumerate(refs):
            sid = shard_id(ref)
            if sid in done_sids or load_part(out, model, ref) is not None:
                continue
            needs.setdefault(s, []).append(m)
    return Plan(needs)


# ---------------------------------------------------------------------------
# Scoring loop
# ---------------------------------------------------------------------------


@dataclass
class ShardResults:
    """Rows of one (model, shard) accumulating until the shard ends."""

    rows: dict[str, list[list[Any]]] = field(default_factory=dict)  # variant -> rows
    seconds: float = 0.0


def _timer(device: torch.device) -> Callable[[], Callable[[], Callable[[], float]]]:
    """start() -> finish() -> elapsed() in seconds.

    ``finish`` marks the end of a model's work right after it is queued;
    ``elapsed`` may be read later. On CUDA these are events, so timing each
    model does not serialise the stream.
    """
    if device.type == "cuda":

        def start_cuda() -> Callable[[], Callable[[], float]]:
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()

            def finish() -> Callable[[], float]:
                end.record()

                def elapsed() -> float:
                    end.synchronize()
                    return begin.elapsed_time(end) / 1000.0

                return elapsed

            return finish

        return start_cuda

    def start_cpu() -> Callable[[], Callable[[], float]]:
        t0 = time.perf_counter()

        def finish() -> Callable[[], float]:
            seconds = time.perf_counter() - t0
            return lambda: seconds

        return finish

    return start_cpu


def run_scoring(
    args: argparse.Namespace,
    refs: Sequence[ShardRef],
    models: Sequence[ScoredModel],
    plan: Plan,
    device: torch.device,
    rank: int,
    world: int,
) -> int:
    """Score this rank's share of the plan; commit one part per (model, shard). Returns images read."""
    out = Path(args.out)
    mine = split_by_node(plan.shard_indices, rank, world)
    if not mine:
        return 0
    options = ReadOptions(
        verify=not args.no_verify,
        on_error=args.on_error,
        limit=args.limit,
        defer_jpeg=args.gpu_decode == "on" or (args.gpu_decode == "auto" and device.type == "cuda"),
    )
    loader = make_loader(
        [refs[i] for i in mine], mine, args.batch_size, options, args.workers, pin_memory=device.type == "cuda",
        yield_cpu=device.type == "cpu",
    )
    heads = In9Heads(device)
    timer = _timer(device)
    results: dict[tuple[int, int], ShardResults] = {}
    counts = [refs[i].count for i in mine]
    total = None if args.limit is not None or any(c is None for c in counts) else sum(c or 0 for c in counts)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc=f"rank {rank}" if world > 1 else "scoring", disable=None, smoothing=0.1)
    n_images = 0
    try:
        for batch in loader:
            if batch.get("error"):
                raise StreamError(batch["error"])
            s = int(batch["shard_index"])
            model_ids = plan.needs[s]
            if batch["keys"]:
                images = images_to_device(batch, device)
                labels = batch["labels"].to(device, non_blocking=True)
                outputs = []
                for m in model_ids:
                    finish = timer()
                    on_device = score_batch(models[m], images, labels, heads, args.in9_rule)
                    outputs.append((m, on_device, finish()))
                for m, on_device, elapsed in outputs:
                    cpu = {k: v.cpu() for k, v in on_device.items()}
                    acc = results.setdefault((m, s), ShardResults())
                    acc.seconds += elapsed()
                    _append_rows(acc, batch, cpu)
                n_images += len(batch["keys"])
                bar.update(len(batch["keys"]))
            if batch["end"] is not None:
                _commit_shard(out, refs[s], [models[m] for m in model_ids], model_ids, results, batch["end"], s)
                if after_shard_hook is not None:
                    after_shard_hook(shard_id(refs[s]))
    finally:
        bar.close()
    return n_images


def _append_rows(acc: ShardResults, batch: dict[str, Any], cpu: dict[str, torch.Tensor]) -> None:
    top = cpu["top"].tolist()
    p_true = cpu["p_true"].tolist()
    in9_pred = cpu["in9_pred"].tolist()
    labels = batch["labels"].tolist()
    in9_labels = batch["in9_labels"].tolist()
    for i, key in enumerate(batch["keys"]):
        row = [key, labels[i], top[i][0], " ".join(map(str, top[i])), p_true[i], in9_labels[i], in9_pred[i]]
        acc.rows.setdefault(batch["variants"][i], []).append(row)


def _commit_shard(
    out: Path,
    ref: ShardRef,
    models: Sequence[ScoredModel],
    model_ids: Sequence[int],
    results: dict[tuple[int, int], ShardResults],
    end: dict[str, Any],
    s: int,
) -> None:
    skipped = {str(v): int(n) for v, n in end["skipped"].items()}
    for model, m in zip(models, model_ids, strict=True):
        acc = results.pop((m, s), ShardResults())
        n = sum(len(r) for r in acc.rows.values())
        variants = sorted(set(acc.rows) | set(skipped))
        part = {
            "shard_id": shard_id(ref),
            "shard": ref.name,
            "url": ref.url,
            "sha256": ref.sha256,
            "count": ref.count,
            "signature": model.signature,
            "device": str(model.device.type),
            "variants": {
                v: {
                    "rows": acc.rows.get(v, []),
                    "skipped": skipped.get(v, 0),
                    "seconds": acc.seconds * len(acc.rows.get(v, [])) / n if n else 0.0,
                }
                for v in variants
            },
        }
        atomic_write_text(part_path(out, model.id, shard_id(ref)), json.dumps(part))


# ---------------------------------------------------------------------------
# Merge (rank 0): parts -> final predictions, exactly once
# ---------------------------------------------------------------------------


def _rows_to_predictions(rows: list[list[Any]]) -> Predictions:
    n = len(rows)
    return Predictions(
        keys=np.array([r[0] for r in rows], dtype=object),
        label=np.array([int(r[1]) for r in rows], dtype=np.int64),
        pred=np.array([int(r[2]) for r in rows], dtype=np.int64),
        top5=np.array([[int(t) for t in str(r[3]).split()] for r in rows], dtype=np.int64).reshape(n, -1)
        if n
        else np.zeros((0, 5), dtype=np.int64),
        p_true=np.array([float(r[4]) for r in rows], dtype=np.float64),
        in9_label=np.array([int(r[5]) for r in rows], dtype=np.int64),
        in9_pred=np.array([int(r[6]) for r in rows], dtype=np.int64),
    )


def _predictions_to_rows(preds: Predictions) -> list[list[Any]]:
    return [
        [
            str(preds.keys[i]),
            int(preds.label[i]),
            int(preds.pred[i]),
            " ".join(str(int(t)) for t in preds.top5[i]),
            float(preds.p_true[i]),
            int(preds.in9_label[i]),
            int(preds.in9_pred[i]),
        ]
        for i in range(len(preds))
    ]


def merge_model(out: Path, model: ScoredModel, refs: Sequence[ShardRef], limit: int | None) -> list[str]:
    """Fold this run's parts into final predictions per variant; returns the run's variants for ``model``."""
    refs_by_sid = {shard_id(r): r for r in refs}
    ledgers = load_done(out, model, refs_by_sid)
    parts: dict[str, dict[str, Any]] = {}
    for ref in refs:
        part = load_part(out, model, ref)
        if part is not None:
            parts[shard_id(ref)] = part
    run_variants = {v for v, ledger in ledgers.items() if set(ledger["shards"]) & set(refs_by_sid)}
    new_by_variant: dict[str, list[str]] = {}
    for sid, part in parts.items():
        for v in part["variants"]:
            new_by_variant.setdefault(v, []).append(sid)
    missing = [shard_id(r) for r in refs if shard_id(r) not in parts and not any(shard_id(r) in lg["shards"] for lg in ledgers.values())]
    if missing:
        raise EvalError(f"{model.id}: no results for shard(s) {', '.join(missing[:3])} (a rank failed?)")
    for variant, sids in sorted(new_by_variant.items()):
        ledger = ledgers.get(variant)
        if ledger is not None and set(ledger["shards"]) & set(sids):
            ledger = None  # a shard scored again (rebuilt or partial ledger): start the variant afresh
        rows: list[list[Any]] = []
        entries: dict[str, dict[str, Any]] = {}
        if ledger is not None:
            if any(int(e["n"]) for e in ledger["shards"].values()):
                rows.extend(_predictions_to_rows(read_predictions(predictions_path(out, model.id, variant))))
            entries.update(ledger["shards"])
        for sid in sids:
            block = parts[sid]["variants"][variant]
            rows.extend(block["rows"])
            entries[sid] = {
                "shard": parts[sid]["shard"],
                "sha256": parts[sid]["sha256"],
                "count": parts[sid]["count"],
                "n": len(block["rows"]),
                "skipped": block["skipped"],
                "seconds": block["seconds"],
                "device": parts[sid]["device"],
                "variants_in_shard": len(parts[sid]["variants"]),
            }
        check_exactly_once(model.id, variant, rows, entries, limit)
        write_predictions(predictions_path(out, model.id, variant), _rows_to_predictions(rows))
        atomic_write_text(
            done_path(out, model.id, variant),
            json.dumps({"signature": model.signature, "shards": entries}, indent=1, sort_keys=True),
        )
        run_variants.add(variant)
    for sid in parts:
        part_path(out, model.id, sid).unlink(missing_ok=True)
    parts_dir = out / "predictions" / model.id / PARTS_DIR
    if parts_dir.is_dir() and not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    return sorted(run_variants)


def check_exactly_once(
    model_id: str, variant: str, rows: list[list[Any]], entries: dict[str, dict[str, Any]], limit: int | None
) -> None:
    """No key twice, and (with a manifest) scored + skipped equals the manifest's sample count."""
    seen: set[str] = set()
    for row in rows:
        if row[0] in seen:
            raise EvalError(f"{model_id}/{variant}: key {row[0]} scored twice (same key in two shards?)")
        seen.add(row[0])
    if limit is not None:
        return
    shard_entries = list(entries.values())
    counts = [e["count"] for e in shard_entries]
    # A manifest count is per shard, so it applies to a variant only when its shards hold nothing else.
    single = all(int(e.get("variants_in_shard", 1)) == 1 for e in shard_entries)
    if counts and single and all(c is not None for c in counts):
        expected = sum(counts)
        skipped = sum(int(e["skipped"]) for e in shard_entries)
        if len(rows) + skipped != expected:
            raise EvalError(
                f"{model_id}/{variant}: scored {len(rows)} + skipped {skipped} samples, manifest says {expected}"
            )


# ---------------------------------------------------------------------------
# scores.csv
# ---------------------------------------------------------------------------


def score_row(out: Path, model: ScoredModel, variant: str, device: torch.device) -> dict[str, str]:
    ledger = _read_json(done_path(out, model.id, variant)) or {"shards": {}}
    entries = ledger["shards"].values()
    if any(int(e["n"]) for e in entries):
        preds = read_predictions(predictions_path(out, model.id, variant))
    else:  # every sample of the variant was skipped
        preds = _rows_to_predictions([])
    seconds = sum(float(e["seconds"]) for e in entries)
    skipped = sum(int(e["skipped"]) for e in entries)
    n = len(preds)
    has_in9 = bool((preds.in9_label >= 0).any())
    in9_top1 = f"{100.0 * preds.in9_correct[preds.in9_label >= 0].mean():.3f}" if has_in9 else ""
    return {
        "model": model.id,
        "variant": variant,
        "n": str(n),
        "top1": f"{100.0 * preds.correct.mean():.3f}" if n else "",
        "top5": f"{100.0 * preds.correct_top5.mean():.3f}" if n else "",
        "in9_top1": in9_top1,
        "images_per_s": f"{n / seconds:.1f}" if seconds > 0 else "",
        "device": device.type,
        "precision": model.signature["precision"],
        "weights": model.weights,
        "input_size": str(model.size[0]) if model.size[0] == model.size[1] else f"{model.size[0]}x{model.size[1]}",
        "interpolation": model.interpolation,
        "mean": " ".join(f"{v:g}" for v in model.mean),
        "std": " ".join(f"{v:g}" for v in model.std),
        "skipped": str(skipped),
    }


def write_scores(out: Path, rows: list[dict[str, str]]) -> None:
    """Merge rows into ``scores.csv`` by (model, variant), keeping rows of other runs."""
    path = out / SCORES_NAME
    existing: dict[tuple[str, str], dict[str, str]] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                existing[(row["model"], row["variant"])] = {c: row.get(c, "") for c in SCORE_COLUMNS}
    for row in rows:
        existing[(row["model"], row["variant"])] = row
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(existing):
        writer.writerow(existing[key])
    atomic_write_text(path, buf.getvalue())


def print_summary(rows: list[dict[str, str]], label_space: str, seconds: float, n_images: int) -> None:
    headline = "in9_top1" if label_space == "in9" else "top1"
    header = ("model", "variant", "n", headline, "top5", "img/s", "skipped")
    table = [header] + [
        (r["model"], r["variant"], r["n"], r[headline], r["top5"], r["images_per_s"], r["skipped"]) for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    if n_images:
        print(f"read {n_images} images in {seconds:.1f} s ({n_images / max(seconds, 1e-9):.1f} images/s end to end)")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def default_shard_specs() -> list[str]:
    """The demo shards (``shards/<variant>/``, holding a manifest or tars) under the working folder."""
    return sorted(
        folder
        for folder in glob.glob(DEFAULT_SHARDS_GLOB)
        if Path(folder, "manifest.json").is_file() or any(Path(folder).glob("*.tar"))
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.score",
        description="Score classifiers on background-variant shards; writes per-sample predictions and scores.csv.",
    )
    p.add_argument(
        "--shards",
        action="append",
        metavar="SPEC",
        help="shards: path, brace pattern, http(s) URL, pipe:CMD, variant folder or manifest.json "
        "(repeatable; default: the demo shards shards/*/)",
    )
    p.add_argument("--models", default=None, help="paper32 | ID,ID,... | FILE of ids (default: the zoo's default model)")
    p.add_argument(
        "--registry",
        default=None,
        metavar="PATH",
        help="model registry JSON that --models ids resolve in, e.g. with local TorchScript rows "
        "(default: data_manifests/models.json)",
    )
    p.add_argument("--out", default="results", help="results folder (default: results/)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode worker processes (default: min(8, cores) on cuda; 0 on cpu, where decoding in the "
        "scoring process measured fastest because workers compete with the model for the cores)",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--label-space", choices=("in1k", "in9"), default="in1k", help="headline accuracy in the summary")
    p.add_argument(
        "--in9-rule",
        choices=("map-argmax", "restrict"),
        default="map-argmax",
        help="IN-9 prediction: superclass of the 1000-way argmax, or argmax over the 370 IN-9 classes",
    )
    p.add_argument("--limit", type=int, default=None, help="score at most N samples per shard (smoke runs; no count check)")
    p.add_argument("--weights-dir", default=None, help="folder with local checkpoints")
    p.add_argument("--skip-unavailable", action="store_true", help="skip models whose weights are not available offline")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad samples: stop, or count and skip")
    p.add_argument("--no-verify", action="store_true", help="do not check shard sha256 against the manifest")
    p.add_argument("--random-weights", action="store_true", help="random (seeded) weights: throughput tests only")
    p.add_argument(
        "--gpu-decode",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode JPEGs on the GPU (nvJPEG) with per-image CPU fallback; auto = on for cuda",
    )
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise EvalError("--batch-size must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise EvalError("--workers must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise EvalError("--limit must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda requested but CUDA is not available")


def _init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; a process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_name == "cuda" else "gloo"
        if device_name == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return rank, world, local_rank


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def run(args: argparse.Namespace) -> RunStats:
    """The whole evaluation for parsed arguments (see :func:`build_parser`)."""
    _validate(args)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if device_name == "cuda" else 0
    args.precision = args.precision or ("bf16" if device_name == "cuda" else "fp32")
    args.gpu_decode = "off" if device_name != "cuda" and args.gpu_decode == "auto" else args.gpu_decode
    if args.gpu_decode == "on" and device_name != "cuda":
        raise EvalError("--gpu-decode on needs --device cuda")
    rank, world, local_rank = _init_distributed(device_name)
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size per model: autotune once
    specs = args.shards or default_shard_specs()
    if not specs:
        raise EvalError("no shards given and none under shards/: build them (python -m builders.make_shards) or pass --shards")
    refs = resolve_shards(specs)
    if args.no_verify and rank == 0:
        print("WARNING: --no-verify: shard sha256 NOT checked against the manifest; results may not be reproducible",
              file=sys.stderr)
    models = build_models(args, device)
    out = Path(args.out)
    plan = make_plan(out, models, refs)
    _barrier(world)  # every rank has planned before anyone writes a part
    started = time.perf_counter()
    n_images = run_scoring(args, refs, models, plan, device, rank, world)
    seconds = time.perf_counter() - started
    if world > 1:
        mine = split_by_node(plan.shard_indices, rank, world)
        print(f"rank {rank}/{world}: read {n_images} images from {len(mine)} shards", file=sys.stderr)
    _barrier(world)
    if rank != 0:
        return RunStats(n_images, seconds, [])
    rows = []
    for model in models:
        for variant in merge_model(out, model, refs, args.limit):
            rows.append(score_row(out, model, variant, device))
    if args.label_space == "in9" and rows and not any(r["in9_top1"] for r in rows):
        raise EvalError("--label-space in9: no sample carries an ImageNet-9 label")
    write_scores(out, rows)
    print_summary(rows, args.label_space, seconds, n_images)
    return RunStats(n_images, seconds, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eval import zoo

    try:
        run(args)
        return 0
    except (EvalError, ShardSpecError, StreamError, zoo.UnknownModel, zoo.WeightsUnavailable, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
