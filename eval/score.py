"""Score models on shards: ``python -m eval.score --shards SPEC --models paper32 --out results/``.

Decode once, score many: every batch is decoded once (uint8) and fed to each
model, which resizes and normalises it on the device with its own
preprocessing (``eval.device``). Results are per-sample predictions per
(model, variant) (``eval.predictions``) and one ``scores.csv`` row per (model,
variant) with the exact weights and preprocessing used (``eval.scores_csv``).

Resume (``eval.resume``): each (model, shard) is committed when the shard has
been read and verified completely; a rerun skips committed shards and merges
exactly once. Under ``torchrun`` rank r scores every world-th shard still to
do (from the r-th), every rank learns when one fails, and rank 0 merges.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from webdataset.shardlists import split_by_node

from eval.device import (
    PRECISIONS,
    DeviceTimer,
    In9Mapper,
    ModelFailed,
    ScoredModel,
    build_models,
    score_batch,
)
from eval.distributed import failed_anywhere, init_distributed, run_command, same_models, together
from eval.errors import EvalError
from eval.resume import PendingWork, merge_model, pending_work, shard_id, write_part
from eval.scores_csv import SCORES_NAME, error_row, print_summary, score_row, write_scores
from eval.stream import Batch, ReadOptions, StreamError, images_to_device, make_loader
from pipeline.cli import OneLineParser, show_progress
from pipeline.locks import exclusive
from pipeline.shard_format import MANIFEST_NAME, ShardRef, resolve_shards, unverified
from pipeline.shard_format.transport import TransferPolicy

DEFAULT_SHARDS_GLOB = "shards/*/"
__all__ = ["SCORES_NAME", "RunStats", "EvalError", "build_parser", "run", "main"]

# Called with the shard id after each (shard, all models) commit; tests use it to simulate a kill.
after_shard_hook: Callable[[str], None] | None = None


@dataclass
class RunStats:
    """What one process did: images read, end-to-end seconds, score rows (rank 0), models that failed."""

    n_images: int
    seconds: float
    rows: list[dict[str, str]]
    failed: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Scoring loop
# ---------------------------------------------------------------------------


@dataclass
class ShardResults:
    """Rows of one (model, shard) accumulating until the shard ends."""

    rows: dict[str, list[list[Any]]] = field(default_factory=dict)  # variant -> rows
    seconds: float = 0.0


def _append_rows(acc: ShardResults, batch: Batch, cpu: dict[str, torch.Tensor], sid: str) -> None:
    top = cpu["top"].tolist()
    p_true = cpu["p_true"].tolist()
    in9_pred = cpu["in9_pred"].tolist()
    labels, in9_labels, bg_labels = batch.labels.tolist(), batch.in9_labels.tolist(), batch.bg_labels.tolist()
    for i, key in enumerate(batch.keys):
        row = [key, labels[i], top[i][0], top[i], p_true[i], in9_labels[i], in9_pred[i], bg_labels[i], sid]
        acc.rows.setdefault(batch.variants[i], []).append(row)


def run_scoring(args: argparse.Namespace, refs: Sequence[ShardRef], models: Sequence[ScoredModel],
                work: PendingWork, device: torch.device, world: int) -> int:
    """Score this rank's share of the pending work; commit one part per (model, shard). Returns images read."""
    out = Path(args.out)
    mine = list(split_by_node(iter(work.shard_indices)))  # webdataset's: shard i goes to rank i % world
    if not mine:
        return 0
    options = ReadOptions(
        verify=not args.no_verify,
        on_error=args.on_error,
        limit=args.limit,
        defer_jpeg=args.gpu_decode == "on" or (args.gpu_decode == "auto" and device.type == "cuda"),
        policy=args.policy,
    )
    loader = make_loader([refs[i] for i in mine], mine, args.batch_size, options, args.workers,
                         pin_memory=device.type == "cuda", yield_cpu=device.type == "cpu")
    in9, timer = In9Mapper(device), DeviceTimer(device)
    results: dict[tuple[int, int], ShardResults] = {}
    counts = [refs[i].count for i in mine]
    total = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="scoring" if world == 1 else f"rank {os.environ.get('RANK')}",
               disable=not show_progress(), smoothing=0.1)
    n_images = 0
    try:
        for batch in loader:
            if batch.error:
                raise StreamError(batch.error)
            s = batch.shard_index
            active = [m for m in work.needs[s] if models[m].error is None]
            if batch.keys:
                images = images_to_device(batch, device)
                labels = batch.labels.to(device, non_blocking=True)
                scored = []
                for m in active:  # queue every model's work before waiting for any result
                    span = timer.start()
                    try:
                        scored.append((m, score_batch(models[m], images, labels, in9, args.in9_rule), span.stop()))
                    except ModelFailed as exc:
                        models[m].error = str(exc)
                        print(f"warning: {exc} -- its results are not committed; the others go on", file=sys.stderr)
                for m, on_device, span in scored:
                    acc = results.setdefault((m, s), ShardResults())
                    acc.seconds += span.seconds
                    _append_rows(acc, batch, {k: v.cpu() for k, v in on_device.items()}, shard_id(refs[s]))
                n_images += len(batch.keys)
                bar.update(len(batch.keys))
            if batch.end is not None:
                if batch.end.ignored_count:  # e.g. a key with a dot (a.b.jpg): not a sample of the format
                    print(f"warning: shard {batch.end.shard}: {batch.end.ignored_count} member(s) outside the "
                          f"shard format ignored (e.g. {batch.end.ignored[0]})", file=sys.stderr)
                skipped = {str(v): int(n) for v, n in batch.end.skipped.items()}
                for m in active:
                    if models[m].error is None:
                        acc = results.pop((m, s), ShardResults())
                        write_part(out, models[m], refs[s], acc.rows, skipped, acc.seconds, batch.end.sha256,
                                   device.type)
                if after_shard_hook is not None:
                    after_shard_hook(shard_id(refs[s]))
    finally:
        bar.close()
    return n_images


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def default_shard_specs() -> list[str]:
    """The demo shards (``shards/<variant>/``, holding a manifest or tars) under the working folder."""
    return sorted(
        folder
        for folder in glob.glob(DEFAULT_SHARDS_GLOB)
        if Path(folder, MANIFEST_NAME).is_file() or any(Path(folder).glob("*.tar"))
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m eval.score",
        description="Score classifiers on background-variant shards; writes per-sample predictions and scores.csv.",
    )
    p.add_argument("--shards", action="append", metavar="SPEC",
                   help="shards: path, brace pattern, http(s) URL, pipe:CMD, variant folder or manifest.json "
                   "(repeatable; default: the demo shards shards/*/)")
    p.add_argument("--models", action="append", default=None, metavar="IDS",
                   help="paper32 | ID,ID,... | FILE of ids (repeatable; default: the zoo's default model)")
    p.add_argument("--registry", default=None, metavar="PATH",
                   help="model registry JSON that --models ids resolve in, e.g. with local TorchScript rows "
                   "(default: data_manifests/models.json)")
    p.add_argument("--out", default="results", help="results folder (default: results/)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None,
                   help="decode worker processes (default: min(8, cores) on cuda; 0 on cpu, where decoding in the "
                   "scoring process measured fastest because workers compete with the model for the cores)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--label-space", choices=("in1k", "in9"), default="in1k", help="headline accuracy in the summary")
    p.add_argument("--in9-rule", choices=("map-argmax", "restrict"), default="map-argmax",
                   help="IN-9 prediction: superclass of the 1000-way argmax, or argmax over the 370 IN-9 classes")
    p.add_argument("--limit", type=int, default=None,
                   help="decode and score at most N samples per shard (smoke runs; shards are still verified)")
    p.add_argument("--weights-dir", default=None, help="folder with local checkpoints")
    p.add_argument("--skip-unavailable", action="store_true", help="skip models whose weights cannot be had")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad sample: stop, or count and skip it (a shard that cannot be verified always stops)")
    p.add_argument("--no-verify", action="store_true", help="do not check shard sha256 against the manifest")
    p.add_argument("--random-weights", action="store_true", help="random (seeded) weights: throughput tests only")
    p.add_argument("--gpu-decode", choices=("auto", "on", "off"), default="auto",
                   help="decode JPEGs on the GPU (nvJPEG) with per-image CPU fallback; auto = on for cuda")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="follow HTTP redirects to this other host (repeatable; default: same host only)")
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
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out} is a file, not a folder")


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
    args.policy = TransferPolicy(allow_hosts=frozenset(h.lower() for h in args.allow_host))
    specs = args.shards or default_shard_specs()
    if not specs:
        raise EvalError("no shards given and none under shards/: build them (python -m builders.make_shards) or pass --shards")
    rank, world, local_rank = init_distributed(device_name)
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size per model: autotune once
    out = Path(args.out)
    with contextlib.ExitStack() as stack:

        def prepare() -> list[ShardRef]:
            if rank == 0:  # one evaluation per --out at a time; the ranks of this one share it
                stack.enter_context(exclusive(out, "evaluation"))
            return resolve_shards(specs, args.policy)

        refs = together(world, device, prepare)
        if rank == 0:
            weak = unverified(refs)
            if args.no_verify:
                print("WARNING: --no-verify: shard sha256 NOT checked against the manifest; results may not be "
                      "reproducible", file=sys.stderr)
            elif weak:
                print(f"WARNING: the manifest lists {len(weak)} shard(s) (e.g. {weak[0].name}) without sha256 and "
                      "size: their bytes are read unverified", file=sys.stderr)
        models = together(world, device, lambda: build_models(
            ",".join(args.models) if args.models else None, device, registry=args.registry,
            weights_dir=args.weights_dir, precision=args.precision, random_weights=args.random_weights,
            skip_unavailable=args.skip_unavailable, channels_last=args.channels_last, compile_model=args.compile,
            in9_rule=args.in9_rule, limit=args.limit,
        ))
        same_models(world, [m.id for m in models])
        work = together(world, device, lambda: pending_work(out, models, refs))  # planned before any part is written
        started = time.perf_counter()
        n_images = together(world, device, lambda: run_scoring(args, refs, models, work, device, world))
        seconds = time.perf_counter() - started
        if world > 1:
            mine = list(split_by_node(iter(work.shard_indices)))
            print(f"rank {rank}/{world}: read {n_images} images from {len(mine)} shards", file=sys.stderr)
        failed = sorted({m.id for m in models if m.error} | set(failed_anywhere(world, device, models)))
        if rank != 0:
            return RunStats(n_images, seconds, [], failed)
        rows = []
        run_variants = sorted({r.variant for r in refs if r.variant}) or [""]
        for model in models:
            if model.id in failed:
                rows += [error_row(model, v, device.type) for v in run_variants]
                continue
            merged = merge_model(out, model, refs, args.limit)
            for kept in merged.set_aside:
                print(f"warning: {model.id}: results made with other settings (weights, precision, preprocessing, "
                      f"--in9-rule or --limit) were replaced; the old ones are kept in {kept}", file=sys.stderr)
            rows += [score_row(out, model, v, device.type) for v in merged.variants]
        if args.label_space == "in9" and rows and not any(r["in9_top1"] for r in rows):
            raise EvalError("--label-space in9: no sample carries an ImageNet-9 label")
        write_scores(out, rows)
        print_summary(rows, args.label_space, seconds, n_images)
        return RunStats(n_images, seconds, rows, failed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args, Path(args.out) / SCORES_NAME)


if __name__ == "__main__":
    sys.exit(main())
