"""Stream shards as decoded samples and uint8 batches, on the shared shard-format stages.

Every shard is read by ``pipeline.shard_format.reader`` (webdataset's tar
stages plus the format's policy: the member allow-list, the bounds, one key
rule, verification against the manifest while the bytes stream); this module
adds what the evaluator needs on top: decoding each image once, batching,
splitting shards over DataLoader workers, and the error policy (a bad sample
stops the run or is skipped and counted; a shard that cannot be verified
never is).

Two entry points:

- :func:`samples` for researchers' own loops: decoded samples with their
  provenance, each shard's yielded only once its bytes are verified;
- :func:`make_loader` for the evaluator: ``(B, 3, H, W)`` uint8 batches that
  never span two shards, so results can be committed shard by shard.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import split_by_worker

from eval import decode
from pipeline.classes import to_in9
from pipeline.records import RejectedInput
from pipeline.shard_format.errors import StreamError
from pipeline.shard_format.locate import ShardRef, resolve_shards
from pipeline.shard_format.reader import ReadStopped, ShardSample, ShardTally, read_shard
from pipeline.shard_format.spec import MASK_EXTENSION, NUM_CLASSES
from pipeline.shard_format.transport import DEFAULT_POLICY, TransferPolicy

__all__ = ["Sample", "ShardEnd", "ReadOptions", "Batch", "StreamError", "samples", "iter_shard", "make_loader",
           "images_to_device"]


@dataclass
class Sample:
    """One decoded sample. ``image`` is uint8 (3, H, W), or None when ``encoded`` holds JPEG bytes for the device."""

    key: str
    shard: str
    label: int
    in9_label: int
    variant: str
    meta: dict[str, Any]
    image: torch.Tensor | None = None
    encoded: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def bg_label(self) -> int:
        """The class of the image whose background a mixed sample carries (-1 for other variants)."""
        value = self.meta.get("bg_label")
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < NUM_CLASSES else -1


@dataclass
class ShardEnd:
    """Emitted after a shard's last sample once it has been read and verified completely."""

    shard: str
    n_read: int
    sha256: str = ""  # of the bytes read (verified against the manifest when it had one)
    skipped: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # members outside the format, never read (a few names)
    ignored_count: int = 0


@dataclass(frozen=True)
class ReadOptions:
    verify: bool = True
    on_error: str = "raise"  # a bad sample: "raise" or "skip" (a bad shard always raises)
    limit: int | None = None  # decode at most this many samples per shard (the shard is still read and verified)
    defer_jpeg: bool = False  # keep JPEG bytes for decoding on the device
    decode_masks: bool = False
    policy: TransferPolicy = DEFAULT_POLICY


class _EvalSink:
    """The evaluator's problem policy for one shard."""

    def __init__(self, ref: ShardRef, skip: bool) -> None:
        self.ref, self.skip = ref, skip
        self.skipped: Counter[str | None] = Counter()

    def sample(self, key: str, message: str, variant: str | None) -> None:
        if not self.skip:
            raise ReadStopped(f"shard {self.ref.name}, key {key}: {message}")
        self.skipped[variant] += 1

    def shard(self, message: str) -> None:
        raise ReadStopped(f"shard {self.ref.name}: {message}")

    def by_variant(self, seen: set[str]) -> dict[str, int]:
        """Skips per variant; a skip whose variant is unknown counts for the shard's (single) variant."""
        fallback = self.ref.variant or (next(iter(seen)) if len(seen) == 1 else "unknown")
        out: Counter[str] = Counter()
        for variant, n in self.skipped.items():
            out[variant or fallback] += n
        return dict(out)


def _decoded(raw: ShardSample, ref: ShardRef, options: ReadOptions) -> Sample:
    in9 = raw.meta.get("in9_label")
    sample = Sample(raw.key, ref.name, raw.label, in9 if isinstance(in9, int) else to_in9(raw.label),
                    raw.variant, raw.meta)
    data = raw.image
    if options.defer_jpeg and raw.image_extension == "jpg" and decode.check_jpeg_header(data):
        sample.encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        sample.image = decode.decode_image(data)
    if options.decode_masks and MASK_EXTENSION in raw.members:
        sample.mask = decode.decode_mask(raw.members[MASK_EXTENSION])
    return sample


def _verified(ref: ShardRef, options: ReadOptions, sink: _EvalSink, tally: ShardTally) -> Iterator[ShardSample]:
    """The shard's good samples as bytes; the end checks have passed once this is exhausted."""
    yield from read_shard(ref, sink, verify=options.verify, policy=options.policy, tally=tally)
    if not tally.complete:  # every path that leaves a shard unverified raises through the sink
        raise ReadStopped(f"shard {ref.name}: not read to its end")


def _decode_or_skip(raw: ShardSample, ref: ShardRef, options: ReadOptions, sink: _EvalSink) -> Sample | None:
    try:
        return _decoded(raw, ref, options)
    except (ValueError, OSError, RejectedInput) as exc:
        sink.sample(raw.key, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, raw.variant)
        return None


def _end(ref: ShardRef, n_read: int, sink: _EvalSink, tally: ShardTally, seen: set[str]) -> ShardEnd:
    return ShardEnd(shard=ref.name, n_read=n_read, sha256=tally.sha256, skipped=sink.by_variant(seen),
                    ignored=tally.ignored, ignored_count=tally.ignored_count)


def iter_shard(ref: ShardRef, options: ReadOptions) -> Iterator[Sample | ShardEnd]:
    """Samples of one shard in tar order, then a :class:`ShardEnd` once the shard is verified.

    Raises :class:`StreamError` naming shard and key for a bad sample (or
    skips and counts it with ``on_error="skip"``), and always for a shard that
    is not what its manifest says or cannot be read to its end.
    """
    sink = _EvalSink(ref, options.on_error == "skip")
    tally = ShardTally(ref.name)
    n_read = 0
    seen: set[str] = set()
    for raw in _verified(ref, options, sink, tally):
        if options.limit is not None and n_read >= options.limit:
            continue  # read on without decoding: the shard is still verified and counted
        sample = _decode_or_skip(raw, ref, options, sink)
        if sample is not None:
            seen.add(sample.variant)
            n_read += 1
            yield sample
    yield _end(ref, n_read, sink, tally, seen)


def samples(
    spec: str | Sequence[str],
    *,
    verify: bool = True,
    masks: bool = False,
    on_error: str = "raise",
    policy: TransferPolicy = DEFAULT_POLICY,
) -> Iterator[Sample]:
    """Decoded samples of every shard a spec names, for your own loop.

    ``spec`` is anything ``eval.score --shards`` takes (a variant folder, a
    manifest path or URL, a brace pattern, ``pipe:CMD``). A shard's samples
    are decoded and yielded only after the whole shard has been read and, when
    a manifest lists it, verified against its sha256, size and count (the
    encoded bytes are held meanwhile: about the shard's size in memory), so a
    loop never sees bytes the manifest does not vouch for. Each
    :class:`Sample` carries ``key``, ``label``, ``in9_label``, ``variant``,
    ``bg_label``, the provenance ``meta`` and ``image`` as uint8 (3, H, W).
    """
    options = ReadOptions(verify=verify, on_error=on_error, decode_masks=masks, policy=policy)
    for ref in resolve_shards(spec if isinstance(spec, str) else list(spec), policy):
        sink = _EvalSink(ref, on_error == "skip")
        held = list(_verified(ref, options, sink, ShardTally(ref.name)))
        for raw in held:
            sample = _decode_or_skip(raw, ref, options, sink)
            if sample is not None:
                yield sample


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


@dataclass
class Batch:
    """Up to ``batch_size`` samples of one shard as uint8; the shard's last batch carries ``end``."""

    shard_index: int
    shard: str | None
    keys: list[str]
    variants: list[str]
    labels: torch.Tensor
    in9_labels: torch.Tensor
    bg_labels: torch.Tensor
    images: torch.Tensor | None = None  # (B, 3, H, W) uint8 when every image was decoded on the CPU
    items: list[torch.Tensor] | None = None  # otherwise: decoded images or JPEG bytes (1-D) per sample
    end: ShardEnd | None = None
    error: str | None = None

    @classmethod
    def of(cls, samples_: list[Sample], shard_index: int) -> Batch:
        batch = cls(
            shard_index=shard_index,
            shard=samples_[0].shard if samples_ else None,
            keys=[s.key for s in samples_],
            variants=[s.variant for s in samples_],
            labels=torch.tensor([s.label for s in samples_], dtype=torch.int64),
            in9_labels=torch.tensor([s.in9_label for s in samples_], dtype=torch.int64),
            bg_labels=torch.tensor([s.bg_label for s in samples_], dtype=torch.int64),
        )
        if not samples_:
            return batch
        if all(s.image is not None for s in samples_):
            shapes = {tuple(s.image.shape) for s in samples_}  # type: ignore[union-attr]
            if len(shapes) > 1:
                odd = next(s for s in samples_ if tuple(s.image.shape) != tuple(samples_[0].image.shape))  # type: ignore[union-attr]
                raise StreamError(
                    f"shard {samples_[0].shard}, key {odd.key}: image size {tuple(odd.image.shape)[1:]} "  # type: ignore[union-attr]
                    f"differs from {tuple(samples_[0].image.shape)[1:]} (frames must share one size)"  # type: ignore[union-attr]
                )
            # One copy into a (B, H, W, 3) buffer in numpy: never multithreaded, so a few small copies
            # don't pay torch's thread start-up when the model's threads hold the cores. The result is
            # a channels-last view of shape (B, 3, H, W); the model's preprocessing picks its layout.
            hwc = np.stack([s.image.permute(1, 2, 0).numpy() for s in samples_])  # type: ignore[union-attr]
            batch.images = torch.from_numpy(hwc).permute(0, 3, 1, 2)
        else:
            batch.items = [s.image if s.image is not None else s.encoded for s in samples_]  # type: ignore[misc]
        return batch

    @classmethod
    def failed(cls, message: str, shard_index: int) -> Batch:
        empty = cls.of([], shard_index)
        empty.error = message
        return empty

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this: page-locked images copy to the GPU asynchronously."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def iter_batches(
    refs: Sequence[ShardRef], shard_indices: Sequence[int], batch_size: int, options: ReadOptions
) -> Iterator[Batch]:
    """Batches of this DataLoader worker's shards; each shard ends with a batch carrying ``end``.

    Errors are yielded as a batch with ``error`` rather than raised, so the
    consumer gets the one-line message instead of a worker traceback.
    """
    for index, ref in split_by_worker(list(zip(shard_indices, refs, strict=True))):
        pending: list[Sample] = []
        try:
            for item in iter_shard(ref, options):
                if isinstance(item, ShardEnd):
                    batch = Batch.of(pending, index)
                    batch.end = item
                    yield batch
                    break
                pending.append(item)
                if len(pending) == batch_size:
                    yield Batch.of(pending, index)
                    pending = []
        except StreamError as exc:
            yield Batch.failed(str(exc), index)
            return


class ShardBatches(IterableDataset):
    """Uint8 batches from a list of shards, split across DataLoader workers by shard."""

    def __init__(
        self, refs: Sequence[ShardRef], shard_indices: Sequence[int], batch_size: int, options: ReadOptions
    ) -> None:
        super().__init__()
        self.refs = list(refs)
        self.shard_indices = list(shard_indices)
        self.batch_size = batch_size
        self.options = options

    def __iter__(self) -> Iterator[Batch]:
        return iter_batches(self.refs, self.shard_indices, self.batch_size, self.options)


def make_loader(
    refs: Sequence[ShardRef],
    shard_indices: Sequence[int],
    batch_size: int,
    options: ReadOptions,
    workers: int,
    pin_memory: bool,
    yield_cpu: bool = False,
) -> DataLoader:
    """DataLoader over shard batches: at most one worker per shard, batches already formed.

    ``yield_cpu``: workers run only when a core would otherwise idle (for a
    model on the CPU, whose threads the decoders would otherwise preempt).
    """
    workers = max(0, min(workers, len(refs)))
    return DataLoader(
        ShardBatches(refs, shard_indices, batch_size, options),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=_yield_cpu if workers and yield_cpu else None,
    )


def _yield_cpu(worker_id: int) -> None:
    """Lowest CPU priority for a decode worker.

    A model on the CPU runs its threads in lockstep, so a decoder preempting one
    of them stalls them all; decoding needs far less CPU than the model, so the
    idle moments between its parallel regions are enough to keep the queue full.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the nearest portable thing
        try:
            os.nice(19)
        except OSError:
            pass


def images_to_device(batch: Batch, device: torch.device) -> torch.Tensor:
    """The batch's uint8 (B, 3, H, W) on ``device``, decoding deferred JPEGs there."""
    if batch.images is not None:
        return batch.images.to(device, non_blocking=True)
    items = batch.items or []
    jpeg_at = [i for i, t in enumerate(items) if t.dim() == 1]
    try:
        decoded = decode.decode_jpeg_batch([items[i] for i in jpeg_at], device) if jpeg_at else []
    except decode.JpegDecodeError as exc:
        key = batch.keys[jpeg_at[exc.index]]
        raise StreamError(f"shard {batch.shard}, key {key}: undecodable image ({exc.reason})") from None
    images: list[torch.Tensor] = [t.to(device, non_blocking=True) if t.dim() == 3 else t for t in items]
    for i, image in zip(jpeg_at, decoded, strict=True):
        images[i] = image
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise StreamError(f"key {batch.keys[0]}: images in one batch differ in size {sorted(shapes)}")
    return torch.stack(images)
