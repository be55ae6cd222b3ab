"""``python -m eval.challenge``: the Backgrounds Challenge over our shards, resumable, split over GPUs.

Backgrounds (``only_bg_t``) are read, verified and decoded once and kept on
the device as uint8; foreground shards (a variant built ``--with-masks``,
normally ``original``) are read one at a time and, once verified, searched by
every model (``eval.challenge.search``). Each (model, foreground shard) is
committed when searched; a rerun skips what is committed, and under
``torchrun`` rank r searches every world-th foreground shard still to do
while rank 0 merges.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from webdataset.shardlists import split_by_node

from eval.challenge import results
from eval.challenge.search import NOT_FOOLED, Predict, SearchResult, search
from eval.device import PRECISIONS, In9Mapper, ModelFailed, ScoredModel, build_models, score_batch
from eval.distributed import failed_anywhere, init_distributed, run_command, same_models, together
from eval.errors import EvalError
from eval.predictions import IN9_NOT_COMPUTED
from eval.stream import ReadOptions, Sample, ShardEnd, StreamError, iter_shard
from pipeline.cli import OneLineParser, show_progress
from pipeline.locks import exclusive
from pipeline.shard_format import ShardRef, resolve_shards, unverified
from pipeline.shard_format.transport import TransferPolicy

DEFAULT_FOREGROUNDS = f"shards/{results.FOREGROUND_VARIANT}"
DEFAULT_BACKGROUNDS = f"shards/{results.BACKGROUND_VARIANT}"
BUILD_HINT = ("build the foreground variant with masks: python -m builders.make_shards --recipe imagenet9 "
              "--variant original --variant only_bg_t --with-masks ...")

# Called with the shard id after each foreground shard is committed for every model; tests simulate a kill.
after_shard_hook: Any = None


@dataclass
class ChallengeStats:
    """What one process did: foregrounds searched, composites scored, seconds, summary rows (rank 0), failures."""

    foregrounds: int
    composites: int
    seconds: float
    rows: list[dict[str, str]]
    failed: list[str] = field(default_factory=list)


@dataclass
class Images:
    """Decoded samples of one or several shards, stacked: uint8 (N, 3, H, W) and what each one is."""

    pixels: torch.Tensor
    keys: list[str]
    labels: np.ndarray
    in9_labels: np.ndarray
    masks: torch.Tensor | None = None  # bool (N, 1, H, W), foregrounds only
    shard_sha256: str = ""
    outside_label_space: int = 0  # foregrounds read but not searched: no class in the label space


def _read_shard(ref: ShardRef, policy: TransferPolicy, masks: bool) -> tuple[list[Sample], ShardEnd]:
    """Every sample of a shard, returned only once the shard is read to its end and verified."""
    samples: list[Sample] = []
    for item in iter_shard(ref, ReadOptions(decode_masks=masks, policy=policy)):
        if isinstance(item, ShardEnd):
            return samples, item
        samples.append(item)
    raise StreamError(f"shard {ref.name}: not read to its end")


def _stack(samples: list[Sample], what: str, size: tuple[int, int] | None) -> torch.Tensor:
    for s in samples:
        assert s.image is not None  # decoded on the CPU: ReadOptions(defer_jpeg=False)
        if size is not None and tuple(s.image.shape[-2:]) != size:
            h, w = s.image.shape[-2:]
            raise EvalError(f"{what} {s.key} is {w}x{h} but the backgrounds are {size[1]}x{size[0]}: build "
                            "foregrounds and backgrounds with the same --size")
    return torch.stack([s.image for s in samples])  # type: ignore[misc]


def load_backgrounds(refs: Sequence[ShardRef], policy: TransferPolicy,
                     device: torch.device) -> tuple[Images, results.BackgroundIndex]:
    """Every background, verified and decoded once, on the device; and their index in search order."""
    chunks: list[torch.Tensor] = []
    keys: list[str] = []
    labels: list[int] = []
    in9: list[int] = []
    shard_of: list[int] = []
    shards: list[dict[str, Any]] = []
    size: tuple[int, int] | None = None
    for s, ref in enumerate(refs):
        samples, end = _read_shard(ref, policy, masks=False)
        if samples:
            chunk = _stack(samples, "background", size)
            size = size or (int(chunk.shape[-2]), int(chunk.shape[-1]))
            chunks.append(chunk.to(device))
        keys += [x.key for x in samples]
        labels += [x.label for x in samples]
        in9 += [x.in9_label for x in samples]
        shard_of += [s] * len(samples)
        shards.append({"name": ref.name, "url": ref.url, "sha256": end.sha256})
    if not keys:
        raise EvalError("the background shards hold no samples")
    if len(set(keys)) != len(keys):
        raise EvalError("a background key appears twice: give each background shard once")
    pixels = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    index = results.BackgroundIndex(tuple(keys), tuple(labels), tuple(in9), tuple(shard_of), tuple(shards))
    return Images(pixels, keys, np.asarray(labels), np.asarray(in9)), index


def load_foregrounds(ref: ShardRef, policy: TransferPolicy, size: tuple[int, int], label_space: str,
                     device: torch.device) -> Images:
    """One foreground shard with its masks, verified, on the device.

    With ``label_space="in9"`` foregrounds outside the 370 ImageNet-9 classes
    are left out and counted (``outside_label_space``): the challenge has no
    right answer for them there.
    """
    samples, end = _read_shard(ref, policy, masks=True)
    for s in samples:
        if s.mask is None:
            raise EvalError(f"foreground shard {ref.name} has no masks ({s.key}.mask.png): {BUILD_HINT}")
    n_read = len(samples)
    if label_space == "in9":  # the challenge's label space: foregrounds of other classes have no IN-9 answer
        samples = [s for s in samples if s.in9_label >= 0]
    if not samples:
        return Images(torch.empty((0, 3, *size), dtype=torch.uint8, device=device), [], np.zeros(0, np.int64),
                      np.zeros(0, np.int64), torch.empty((0, 1, *size), dtype=torch.bool, device=device), end.sha256,
                      n_read)
    pixels = _stack(samples, "foreground", size)
    masks = torch.stack([s.mask for s in samples]).unsqueeze(1)  # type: ignore[misc]
    if tuple(masks.shape[-2:]) != tuple(pixels.shape[-2:]):
        raise EvalError(f"foreground shard {ref.name}: masks and images differ in size")
    return Images(pixels.to(device), [s.key for s in samples], np.asarray([s.label for s in samples]),
                  np.asarray([s.in9_label for s in samples]), (masks > results.MASK_THRESHOLD).to(device), end.sha256,
                  n_read - len(samples))


def make_predict(model: ScoredModel, fg_labels: torch.Tensor, label_space: str, in9: In9Mapper, rule: str) -> Predict:
    """The model's class per composite in the label space (``score_batch``: preprocessing, out-of-memory back-off)."""

    def predict(composites: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        out = score_batch(model, composites, fg_labels[fg], in9, rule)
        if label_space == "in1k":
            return out["top"][:, 0]
        pred = out["in9_pred"]
        if bool((pred == IN9_NOT_COMPUTED).any()):
            raise ModelFailed(f"{model.id}: its head is neither 1000- nor 9-way, so it makes no ImageNet-9 "
                              "prediction: use --label-space in1k")
        return pred

    return predict


def foreground_rows(fgs: Images, found: SearchResult, bgs: results.BackgroundIndex) -> list[list[Any]]:
    rows = []
    for i, key in enumerate(fgs.keys):
        j = int(found.fooled_by[i])
        fooled = j != NOT_FOOLED
        rows.append([key, int(fgs.labels[i]), int(fgs.in9_labels[i]), int(fooled), int(found.tried[i]),
                     bgs.keys[j] if fooled else "", bgs.labels[j] if fooled else -1,
                     bgs.in9_labels[j] if fooled else -1, int(found.pred[i])])
    return rows


def background_counts(found: SearchResult, fg_classes: np.ndarray, bg_classes: np.ndarray) -> dict[str, list[int]]:
    """Per background, over this shard's foregrounds (exhaustive matrix): attack hits, trials, misclassifications.

    A *trial* is a foreground of another class than the background's (in the
    label space); a *hit* is a trial predicted as the background's class.
    """
    matrix = found.matrix
    assert matrix is not None
    other = (fg_classes[:, None] != bg_classes[None, :]) & (bg_classes[None, :] >= 0)
    return {"hits": ((matrix == bg_classes[None, :]) & other).sum(axis=0).tolist(),
            "trials": other.sum(axis=0).tolist(),
            "fooled": (matrix != fg_classes[:, None]).sum(axis=0).tolist()}


def challenge_signature(model: ScoredModel, label_space: str, digest: str, exhaustive: bool) -> dict[str, Any]:
    base = {k: v for k, v in model.signature.items() if k != "limit"}
    return {**base, "label_space": label_space, "backgrounds": digest, "exhaustive": exhaustive}


# ---------------------------------------------------------------- the run


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m eval.challenge",
        description="The Backgrounds Challenge (Noise or Signal): each foreground pasted on every background; "
        "a foreground is vulnerable once one composite is misclassified. Writes challenge.csv and per-foreground "
        "results.",
    )
    p.add_argument("--foregrounds", action="append", metavar="SPEC",
                   help="foreground shards built --with-masks (normally original; repeatable; any eval.score "
                   f"--shards spec; default: {DEFAULT_FOREGROUNDS})")
    p.add_argument("--backgrounds", action="append", metavar="SPEC",
                   help=f"background shards (normally only_bg_t; repeatable; default: {DEFAULT_BACKGROUNDS})")
    p.add_argument("--models", action="append", default=None, metavar="IDS",
                   help="paper32 | ID,ID,... | FILE of ids (repeatable; default: the zoo's default model)")
    p.add_argument("--registry", default=None, metavar="PATH",
                   help="model registry JSON that --models ids resolve in (default: data_manifests/models.json)")
    p.add_argument("--out", default="results",
                   help="results folder: challenge.csv and challenge/ go there (default: results/, beside "
                   "eval.score's results, so eval.report shows both)")
    p.add_argument("--label-space", choices=("in9", "in1k"), default="in9",
                   help="what counts as misclassified: the ImageNet-9 class (as the challenge; a 1000-way "
                   "prediction outside the 370 IN-9 classes is wrong) or the ImageNet-1k class")
    p.add_argument("--in9-rule", choices=("map-argmax", "restrict"), default="map-argmax",
                   help="IN-9 prediction: superclass of the 1000-way argmax, or argmax over the 370 IN-9 classes")
    p.add_argument("--exhaustive", action="store_true",
                   help="score every foreground x background pair (no early stop) and write each background's "
                   "attack success rate and the strongest backgrounds per class (small sets)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="composites per forward pass (default: 256 on cuda; 32 on cpu, where larger batches "
                   "measured slower)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--weights-dir", default=None, help="folder with local checkpoints")
    p.add_argument("--skip-unavailable", action="store_true", help="skip models whose weights cannot be had")
    p.add_argument("--random-weights", action="store_true", help="random (seeded) weights: throughput tests only")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="follow HTTP redirects to this other host (repeatable; default: same host only)")
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise EvalError("--batch-size must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda requested but CUDA is not available")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out} is a file, not a folder")


def _resolve(specs: list[str] | None, default: str, option: str, policy: TransferPolicy) -> list[ShardRef]:
    if not specs and not Path(default).exists():
        raise EvalError(f"no {default}/ here: build the shards (python -m eval.demo builds them) or pass {option}")
    return resolve_shards(specs or [default], policy)


def _search_shard(args: argparse.Namespace, models: Sequence[ScoredModel], needs: list[int], fgs: Images,
                  bgs: Images, index: results.BackgroundIndex, in9: In9Mapper, device: torch.device,
                  ref: ShardRef, bar: Any) -> int:
    """Every model that needs this foreground shard searches it; one part each. Returns composites scored."""
    fg_labels = torch.from_numpy(fgs.labels).to(device)
    classes = fgs.in9_labels if args.label_space == "in9" else fgs.labels
    bg_classes = index.classes(args.label_space)
    composites = 0
    for m in needs:
        model = models[m]
        if model.error is not None:
            continue
        started = time.perf_counter()
        try:
            found = search(fgs.pixels, fgs.masks, classes, bgs.pixels,  # type: ignore[arg-type]
                           make_predict(model, fg_labels, args.label_space, in9, args.in9_rule), args.batch_size,
                           exhaustive=args.exhaustive)
        except ModelFailed as exc:
            model.error = str(exc)
            print(f"warning: {exc} -- its results are not committed; the others go on", file=sys.stderr)
            continue
        counts = background_counts(found, classes, bg_classes) if args.exhaustive else None
        moved = results.write_part(Path(args.out), model, ref, foreground_rows(fgs, found, index),
                                   observed_sha256=fgs.shard_sha256, outside=fgs.outside_label_space,
                                   device=device.type,
                                   seconds=time.perf_counter() - started, composites=found.composites, counts=counts)
        if moved is not None:
            print(f"warning: {model.id}: challenge results made with other settings (weights, precision, "
                  f"preprocessing, label space or backgrounds) were replaced; the old ones are kept in {moved}",
                  file=sys.stderr)
        composites += found.composites
        bar.update(len(fgs.keys) + fgs.outside_label_space)
    return composites


def run_search(args: argparse.Namespace, fg_refs: Sequence[ShardRef], bg_refs: Sequence[ShardRef],
               models: Sequence[ScoredModel], needs: dict[int, list[int]], digest: str, device: torch.device,
               rank: int) -> tuple[int, int]:
    """This rank's share of the pending foreground shards. Returns (foregrounds searched, composites scored)."""
    out = Path(args.out)
    mine = list(split_by_node(iter(sorted(needs))))  # webdataset's: shard i goes to rank i % world
    index = results.read_background_index(out, digest)
    if not mine and (rank != 0 or index is not None):
        return 0, 0
    bgs, index = load_backgrounds(bg_refs, args.policy, device if mine else torch.device("cpu"))
    if rank == 0:
        results.write_background_index(out, index, digest)
    if not mine:
        return 0, 0
    size = (int(bgs.pixels.shape[-2]), int(bgs.pixels.shape[-1]))
    in9 = In9Mapper(device)
    from tqdm import tqdm

    total = sum((fg_refs[s].count or 0) * len(needs[s]) for s in mine) or None
    bar = tqdm(total=total, unit="fg", desc="challenge", disable=not show_progress(), smoothing=0.1)
    n_fg = composites = 0
    try:
        for s in mine:
            fgs = load_foregrounds(fg_refs[s], args.policy, size, args.label_space, device)
            composites += _search_shard(args, models, needs[s], fgs, bgs, index, in9, device, fg_refs[s], bar)
            n_fg += len(fgs.keys)
            if after_shard_hook is not None:
                after_shard_hook(fg_refs[s])
    finally:
        bar.close()
    return n_fg, composites


def print_summary(rows: list[dict[str, str]], seconds: float, composites: int) -> None:
    header = ("model", "label_space", "foregrounds", "vulnerable", "challenge_accuracy", "ci_low", "ci_high", "error")
    table = [header] + [tuple(r[c] for c in header) for r in rows]
    if not any(r["error"] for r in rows):
        table = [row[:-1] for row in table]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    outside = max((int(r["outside_label_space"] or 0) for r in rows), default=0)
    if outside:
        print(f"note: {outside} foreground(s) outside the 370 ImageNet-9 classes were left out (no right answer in "
              "--label-space in9; --label-space in1k searches them)", file=sys.stderr)
    if composites:
        print(f"scored {composites} composites in {seconds:.1f} s ({composites / max(seconds, 1e-9):.1f} per s "
              "end to end)")


def run(args: argparse.Namespace) -> ChallengeStats:
    """The whole challenge for parsed arguments (see :func:`build_parser`)."""
    _validate(args)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if device_name == "cuda" else "fp32")
    args.batch_size = args.batch_size or (256 if device_name == "cuda" else 32)
    args.policy = TransferPolicy(allow_hosts=frozenset(h.lower() for h in args.allow_host))
    rank, world, local_rank = init_distributed(device_name)
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    with contextlib.ExitStack() as stack:

        def prepare() -> tuple[list[ShardRef], list[ShardRef]]:
            if rank == 0:
                stack.enter_context(exclusive(out, "challenge or evaluation"))
            return (_resolve(args.foregrounds, DEFAULT_FOREGROUNDS, "--foregrounds", args.policy),
                    _resolve(args.backgrounds, DEFAULT_BACKGROUNDS, "--backgrounds", args.policy))

        fg_refs, bg_refs = together(world, device, prepare)
        weak = unverified([*fg_refs, *bg_refs])
        if rank == 0 and weak:
            print(f"WARNING: the manifest lists {len(weak)} shard(s) (e.g. {weak[0].name}) without sha256 and "
                  "size: their bytes are read unverified", file=sys.stderr)
        models = together(world, device, lambda: build_models(
            ",".join(args.models) if args.models else None, device, registry=args.registry,
            weights_dir=args.weights_dir, precision=args.precision, random_weights=args.random_weights,
            skip_unavailable=args.skip_unavailable, channels_last=args.channels_last, compile_model=args.compile,
            in9_rule=args.in9_rule,
        ))
        same_models(world, [m.id for m in models])
        digest = results.backgrounds_digest(bg_refs)
        for model in models:
            model.signature = challenge_signature(model, args.label_space, digest, args.exhaustive)
        needs = together(world, device, lambda: results.pending(out, models, fg_refs))
        started = time.perf_counter()
        n_fg, composites = together(world, device, lambda: run_search(args, fg_refs, bg_refs, models, needs, digest,
                                                                      device, rank))
        seconds = time.perf_counter() - started
        if world > 1:
            print(f"rank {rank}/{world}: searched {n_fg} foregrounds ({composites} composites)", file=sys.stderr)
        failed = sorted({m.id for m in models if m.error} | set(failed_anywhere(world, device, models)))
        if rank != 0:
            return ChallengeStats(n_fg, composites, seconds, [], failed)
        index = results.read_background_index(out, digest)
        if index is None:
            raise EvalError(f"{results.challenge_dir(out) / results.BACKGROUNDS_INDEX} is missing: rerun")
        rows = []
        for model in models:
            merged = None if model.id in failed else results.merge_parts(out, model, fg_refs)
            if merged is not None:
                results.write_model_tables(out, model.id, merged, index, args.label_space)
            rows.append(results.summary_row(model, merged, label_space=args.label_space,
                                            n_backgrounds=len(index.keys), exhaustive=args.exhaustive,
                                            device=device.type))
        results.write_summary(out, rows)
        print_summary(rows, seconds, composites)
        return ChallengeStats(n_fg, composites, seconds, rows, failed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args, Path(args.out) / results.SUMMARY_NAME)


__all__ = ["ChallengeStats", "build_parser", "load_backgrounds", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
