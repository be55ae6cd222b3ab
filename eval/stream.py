"""Stream shards as uint8 batches, safely.

Why a hand-rolled tar reader instead of webdataset's decoders: a shard may come
from anyone, so only the members the format defines are ever decoded (images
via PIL, ASCII labels, JSON provenance); anything else in the tar (``.pyd``,
``.pth``, ...) is skipped unread and never unpickled. The same pass hashes the
bytes as they stream, so a shard is verified against its manifest without a
second read.

Pixels stay uint8 until the device: batches are ``(B, 3, H, W)`` uint8
tensors, decoded once however many models score them. Batches never span two
shards, so a consumer can commit results shard by shard (resume).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.classes import to_in9
from pipeline.shard_format import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSION,
    MASK_EXTENSION,
    MAX_MEMBER_BYTES,
    META_EXTENSION,
    READABLE_EXTENSIONS,
    HashingReader,
    ShardRef,
    open_shard,
)

# Refuse images above this many pixels (decompression bombs); frames are ~224x224.
MAX_IMAGE_PIXELS = 8192 * 8192
# Encoded formats PIL may use, whatever the member's extension says.
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
ON_ERROR = ("raise", "skip")


class StreamError(Exception):
    """Bad shard content; the message names the shard and, where known, the key."""


def split_by_node(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items ``i`` with ``i % world_size == rank``: every item to exactly one rank."""
    return [item for i, item in enumerate(items) if i % world_size == rank]


def split_by_worker(items: Sequence[Any]) -> list[Any]:
    """This DataLoader worker's share of ``items`` (all of them outside a worker)."""
    info = get_worker_info()
    if info is None:
        return list(items)
    return split_by_node(items, info.id, info.num_workers)


# ---------------------------------------------------------------------------
# Decoding: the only functions that turn member bytes into values.
# ---------------------------------------------------------------------------


def open_image_checked(data: bytes) -> Image.Image:
    """PIL image (header only) after the size check, so a bomb is refused before decoding."""
    image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit")
    return image


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): C0-CF but DHT, JPG, DAC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame header; None if not a readable JPEG.

    Walks the marker segments only (a few microseconds): the size check before
    decoding without PIL parsing the whole header in Python.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height, data[i + 9]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _decode_jpeg_libjpeg(data: bytes) -> torch.Tensor | None:
    """torchvision's libjpeg-turbo decode (CHW view of HWC pixels), or None if it refuses the data.

    For RGB and greyscale JPEGs its pixels are PIL's exactly, in about half the
    time: decoding is most of the evaluator's CPU cost per image.
    """
    import warnings

    with warnings.catch_warnings():  # torchvision flags its decoders as moving to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return None  # PIL decodes it again and raises its usual one-line error


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP -> uint8 (3, H, W) RGB.

    The result is a channels-last view (HWC pixels, CHW shape): batching copies
    it once anyway, so a per-image transpose would only cost time.
    """
    frame = jpeg_frame_size(data)
    # Greyscale and 3-component JPEGs within the pixel limit only: CMYK/YCCK (4 components) stay
    # with PIL, whose Adobe-inverted CMYK conversion is the reference; anything odd falls through
    # to PIL, which checks the size again and raises its usual error.
    if frame is not None and frame[2] in (1, 3) and 0 < frame[0] * frame[1] <= MAX_IMAGE_PIXELS:
        fast = _decode_jpeg_libjpeg(data)
        if fast is not None and tuple(fast.shape[1:]) == (frame[1], frame[0]):
            return fast
    with open_image_checked(data) as image:
        rgb = np.array(image.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode_mask(data: bytes) -> torch.Tensor:
    """Encoded mask PNG -> uint8 (H, W)."""
    with open_image_checked(data) as image:
        return torch.from_numpy(np.asarray(image.convert("L")).copy())


def decode_label(data: bytes) -> int:
    text = data.decode("ascii").strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"label {text[:20]!r} is not an integer")
    return int(text)


def decode_meta(data: bytes) -> dict[str, Any]:
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("provenance json is not an object")
    return meta


class JpegDecodeError(ValueError):
    """A JPEG that neither the device nor the CPU decoder accepts; ``index`` is its place in the batch."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index} of the batch cannot be decoded ({reason})")
        self.index = index
        self.reason = reason


def decode_jpeg_batch(
    encoded: Sequence[torch.Tensor],
    device: str | torch.device,
    cpu_decode: Callable[[bytes], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Decode JPEG byte tensors on ``device`` (nvJPEG on CUDA) in one call.

    Falls back per image: if the batched call fails, each image is retried on
    the device alone and, failing that, on the CPU (PIL), so one odd JPEG (CMYK,
    progressive, ...) never sinks a batch. Results are uint8 (3, H, W) on ``device``.
    """
    import warnings

    cpu_decode = cpu_decode or decode_image
    with warnings.catch_warnings():  # torchvision flags its decoders as moving to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decoded = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
            return [d.to(device) for d in decoded]
        except Exception:  # noqa: BLE001 - any decoder failure is retried per image below
            pass
        out = []
        for data in encoded:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device).to(device))
            except Exception:  # noqa: BLE001
                try:
                    out.append(cpu_decode(data.numpy().tobytes()).to(device))
                except (ValueError, OSError) as exc:
                    raise JpegDecodeError(len(out), str(exc)) from None
        return out


# ---------------------------------------------------------------------------
# Tar reading
# ---------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.mask.png`` -> (``dir/key``, ``mask.png``): the key ends at the basename's first dot."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


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


@dataclass
class ShardEnd:
    """Emitted after a shard's last sample once it has been read (and verified) completely."""

    shard: str
    n_read: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class ReadOptions:
    verify: bool = True
    on_error: str = "raise"
    limit: int | None = None  # at most this many samples per shard (smoke runs)
    defer_jpeg: bool = False  # keep JPEG bytes for decoding on the device
    decode_masks: bool = False


def _build_sample(
    ref: ShardRef, key: str, members: dict[str, bytes], options: ReadOptions
) -> Sample:
    images = [ext for ext in IMAGE_EXTENSIONS if ext in members]
    if not images:
        raise ValueError("no image member (.jpg/.png/.webp)")
    if len(images) > 1:
        raise ValueError(f"more than one image member ({', '.join(images)})")
    if LABEL_EXTENSION not in members:
        raise ValueError("missing .cls label")
    label = decode_label(members[LABEL_EXTENSION])
    if not 0 <= label < 1000:
        raise ValueError(f"label {label} outside ImageNet-1k")
    meta = decode_meta(members[META_EXTENSION]) if META_EXTENSION in members else {}
    variant = meta.get("variant") or ref.variant
    if not variant:
        raise ValueError("no variant (missing .json provenance and no manifest)")
    if "label" in meta and int(meta["label"]) != label:
        raise ValueError(f".cls says {label} but .json says {meta['label']}")
    in9 = meta.get("in9_label")
    in9_label = int(in9) if isinstance(in9, int) else to_in9(label)
    data = members[images[0]]
    sample = Sample(key=key, shard=ref.name, label=label, in9_label=in9_label, variant=str(variant), meta=meta)
    if options.defer_jpeg and images[0] == "jpg":
        with open_image_checked(data) as header:  # size/format check without decoding
            if header.format != "JPEG":
                sample.image = decode_image(data)
        if sample.image is None:
            sample.encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        sample.image = decode_image(data)
    if options.decode_masks and MASK_EXTENSION in members:
        sample.mask = decode_mask(members[MASK_EXTENSION])
    return sample


def _files_then_end(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo | None]:
    """Regular-file members, then ``None`` to mark the end of the archive."""
    for info in tar:
        if info.isfile():
            yield info
    yield None


def iter_shard(ref: ShardRef, options: ReadOptions) -> Iterator[Sample | ShardEnd]:
    """Samples of one shard in tar order, then a :class:`ShardEnd`.

    Raises :class:`StreamError` naming shard and key for bad content (or skips
    and counts it with ``on_error="skip"``), and for a hash/size/count that
    disagrees with the manifest (never skipped: the shard is not what was
    published).
    """
    skip = options.on_error == "skip"
    skipped: dict[str | None, int] = {}
    seen: set[str] = set()
    variants: set[str] = set()
    n_read = 0
    last_key: str | None = None
    truncated = False

    def fail(key: str | None, message: str, variant: str | None = None) -> None:
        nonlocal skipped
        where = f"shard {ref.name}, key {key}" if key else f"shard {ref.name}"
        if not skip:
            raise StreamError(f"{where}: {message}")
        skipped[variant] = skipped.get(variant, 0) + 1

    def finish(key: str, members: dict[str, bytes]) -> Sample | None:
        try:
            sample = _build_sample(ref, key, members, options)
        except (ValueError, OSError, UnicodeDecodeError, Image.DecompressionBombError) as exc:
            variant = None
            try:
                variant = decode_meta(members[META_EXTENSION]).get("variant") if META_EXTENSION in members else None
            except ValueError:
                pass
            fail(key, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, variant)
            return None
        return sample

    try:
        raw = open_shard(ref.url)
    except OSError as exc:
        raise StreamError(f"shard {ref.name}: cannot open {ref.url}: {exc}") from None
    reader = HashingReader(raw)
    limited = False
    try:
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                key: str | None = None  # the sample being collected
                dropping: str | None = None  # a rejected sample whose remaining members are ignored
                members: dict[str, bytes] = {}
                for info in _files_then_end(tar):
                    member_key, ext = ("", "") if info is None else split_member_name(info.name)
                    if info is not None and (ext not in READABLE_EXTENSIONS or member_key == dropping):
                        continue  # unknown member: skipped unread, never decoded
                    if info is None or member_key != key:
                        if key is not None:
                            sample = finish(key, members)
                            if sample is not None:
                                variants.add(sample.variant)
                                n_read += 1
                                yield sample
                                if options.limit is not None and n_read >= options.limit:
                                    limited = True
                                    break
                        if info is None:
                            break
                        key, members, dropping = None, {}, None
                        last_key = member_key
                        if member_key in seen:
                            fail(member_key, "duplicate key (appears twice in the shard)")
                            dropping = member_key
                            continue
                        seen.add(member_key)
                        key = member_key
                    elif ext in members:
                        fail(key, f"duplicate key (member .{ext} appears twice)")
                        key, members, dropping = None, {}, member_key
                        continue
                    if info.size > MAX_MEMBER_BYTES:
                        fail(key, f"member .{ext} of {info.size} bytes exceeds {MAX_MEMBER_BYTES}")
                        key, members, dropping = None, {}, member_key
                        continue
                    fh = tar.extractfile(info)
                    assert fh is not None
                    members[ext] = fh.read()
                end_offset = tar.offset
            if not limited:
                reader.drain()
                # tarfile reads a header cut short as a normal end of archive; a complete
                # tar has its two zero end blocks after the last member, a truncated one not.
                if reader.nbytes - end_offset < 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("truncated: no end-of-archive blocks")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            message = f"unreadable tar after key {last_key} ({exc})" if last_key else f"unreadable tar ({exc})"
            if not skip:
                raise StreamError(f"shard {ref.name}: {message}") from None
            truncated = True
    finally:
        try:
            raw.close()
        except OSError as exc:
            if not truncated and not limited:
                raise StreamError(f"shard {ref.name}: {exc}") from None

    variant_of_shard = ref.variant or (next(iter(variants)) if len(variants) == 1 else "unknown")
    counted = {}
    for variant, n in skipped.items():
        counted[variant or variant_of_shard] = counted.get(variant or variant_of_shard, 0) + n
    if truncated:
        total_skipped = sum(counted.values())
        lost = (ref.count - n_read - total_skipped) if ref.count is not None else 1
        counted[variant_of_shard] = counted.get(variant_of_shard, 0) + max(lost, 1)
    if not truncated and not limited and options.verify:
        if ref.size_bytes is not None and reader.nbytes != ref.size_bytes:
            raise StreamError(
                f"shard {ref.name}: {reader.nbytes} bytes, manifest says {ref.size_bytes} (sha256 mismatch)"
            )
        if ref.sha256 is not None and reader.sha256.hexdigest() != ref.sha256:
            raise StreamError(
                f"shard {ref.name}: sha256 {reader.sha256.hexdigest()} does not match the manifest's {ref.sha256}"
            )
    if ref.count is not None and options.limit is None:
        accounted = n_read + sum(counted.values())
        if accounted != ref.count:
            raise StreamError(f"shard {ref.name}: read {accounted} samples, manifest says {ref.count}")
    yield ShardEnd(shard=ref.name, n_read=n_read, skipped=counted)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def _collate(samples: list[Sample], shard_index: int) -> dict[str, Any]:
    """A batch dict; images are stacked when all were decoded on the CPU, else left as a list."""
    batch: dict[str, Any] = {
        "shard_index": shard_index,
        "shard": samples[0].shard,
        "keys": [s.key for s in samples],
        "variants": [s.variant for s in samples],
        "labels": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "in9_labels": torch.tensor([s.in9_label for s in samples], dtype=torch.int64),
        "end": None,
        "error": None,
    }
    if all(s.image is not None for s in samples):
        shapes = {tuple(s.image.shape) for s in samples}  # type: ignore[union-attr]
        if len(shapes) > 1:
            odd = next(s for s in samples if tuple(s.image.shape) != tuple(samples[0].image.shape))  # type: ignore[union-attr]
            raise StreamError(
                f"shard {samples[0].shard}, key {odd.key}: image size {tuple(odd.image.shape)[1:]} "  # type: ignore[union-attr]
                f"differs from {tuple(samples[0].image.shape)[1:]} (frames must share one size)"  # type: ignore[union-attr]
            )
        # One copy into a (B, H, W, 3) buffer in numpy: never multithreaded, so a few small copies
        # don't pay torch's thread start-up when the model's threads hold the cores. The result is
        # a channels-last view of shape (B, 3, H, W); the model's preprocessing picks its layout.
        hwc = np.stack([s.image.permute(1, 2, 0).numpy() for s in samples])  # type: ignore[union-attr]
        batch["images"] = torch.from_numpy(hwc).permute(0, 3, 1, 2)
        batch["items"] = None
    else:
        batch["images"] = None
        batch["items"] = [s.image if s.image is not None else s.encoded for s in samples]
    return batch


def iter_batches(
    refs: Sequence[ShardRef], shard_indices: Sequence[int], batch_size: int, options: ReadOptions
) -> Iterator[dict[str, Any]]:
    """Batches of this worker's shards; each shard ends with a batch carrying ``end`` (a :class:`ShardEnd` as dict).

    Errors are yielded as ``{"error": message}`` rather than raised, so the
    consumer gets the one-line message instead of a worker traceback.
    """
    mine = split_by_worker(list(zip(shard_indices, refs, strict=True)))
    for index, ref in mine:
        pending: list[Sample] = []
        try:
            for item in iter_shard(ref, options):
                if isinstance(item, ShardEnd):
                    batch = _collate(pending, index) if pending else _empty_batch(index)
                    batch["end"] = {"shard": item.shard, "n_read": item.n_read, "skipped": item.skipped}
                    yield batch
                    break
                pending.append(item)
                if len(pending) == batch_size:
                    yield _collate(pending, index)
                    pending = []
        except StreamError as exc:
            yield {"error": str(exc), "shard_index": index}
            return


def _empty_batch(index: int) -> dict[str, Any]:
    return {
        "shard_index": index,
        "shard": None,
        "keys": [],
        "variants": [],
        "labels": torch.zeros(0, dtype=torch.int64),
        "in9_labels": torch.zeros(0, dtype=torch.int64),
        "images": None,
        "items": None,
        "end": None,
        "error": None,
    }


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

    def __iter__(self) -> Iterator[dict[str, Any]]:
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


def images_to_device(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The batch's uint8 (B, 3, H, W) on ``device``, decoding deferred JPEGs there."""
    if batch["images"] is not None:
        return batch["images"].to(device, non_blocking=True)
    items = batch["items"]
    jpeg_at = [i for i, t in enumerate(items) if t.dim() == 1]
    try:
        decoded = decode_jpeg_batch([items[i] for i in jpeg_at], device) if jpeg_at else []
    except JpegDecodeError as exc:
        key = batch["keys"][jpeg_at[exc.index]]
        raise StreamError(f"shard {batch['shard']}, key {key}: undecodable image ({exc.reason})") from None
    images: list[torch.Tensor] = [t.to(device, non_blocking=True) if t.dim() == 3 else t for t in items]
    for i, image in zip(jpeg_at, decoded, strict=True):
        images[i] = image
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise StreamError(f"key {batch['keys'][0]}: images in one batch differ in size {sorted(shapes)}")
    return torch.stack(images)
