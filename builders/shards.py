"""Build one chunk of the plan into one shard per variant: the unit of parallel work.

Each source image is decoded once however many variants are built. Tars are
written with fixed metadata (mtime 0, uid/gid 0, no user names, members in
plan order), to a temporary name that is renamed when complete, so the same
plan gives byte-identical shards on any worker and a killed build leaves no
partial file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from builders.config import BuildConfig
from builders.plan import Assignment, texture_path
from pipeline import variants as V
from pipeline.classes import to_in9
from pipeline.decode import decode_rgb
from pipeline.masks import SelectionFilters
from pipeline.prepare import PreparedSample, prepare_sample
from pipeline.records import RejectedInput, Rejection, SourceRecord
from pipeline.rng import rng_for
from pipeline.shard_format import MIXED_VARIANTS, atomic_write_text, shard_name
from pipeline.textures import procedural_texture, texture_frame

FILL_VARIANTS = ("only_fg", "only_bg_b", "no_fg")
BUILD_DIR = ".build"  # per-shard completion records, used to resume


@dataclass
class ShardResult:
    """What the manifest needs to know about one finished shard."""

    variant: str
    name: str
    sha256: str
    bytes: int
    count: int
    labels: dict[str, int]
    rejections: list[dict] = field(default_factory=list)
    config_hash: str = ""


def encode_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode once with fixed codec settings (JPEG: 4:2:0, baseline, no optimisation passes)."""
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    elif fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_json(
    sample: PreparedSample, variant: str, config: BuildConfig, assignment: Assignment | None
) -> bytes:
    """The provenance record of one sample (sorted keys, fixed float rounding: bytes are stable)."""
    rec = sample.record
    meta = {
        "key": rec.key,
        "variant": variant,
        "label": rec.label,
        "wnid": rec.wnid,
        "in9_label": to_in9(rec.label),
        "source": f"{rec.source}:{Path(rec.image).name}",
        "bg_key": assignment.bg_key if assignment else None,
        "bg_label": assignment.bg_label if assignment else None,
        "texture": assignment.texture if assignment else None,
        "mask_source": sample.mask_source,
        "fg_area": round(V.fg_area(sample.fg_mask), 6),
        "bbox": [round(v, 3) for v in sample.bbox],
        "frame": sample.frame.to_json(),
        "fill": config.fill if variant in FILL_VARIANTS else None,
        "seed": config.seed,
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


class TarWriter:
    """A tar with deterministic headers, written to ``<final>.tmp`` and renamed on close."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self.fh = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        try:
            self.tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            raise self._naming(exc) from None

    def close(self) -> tuple[str, int]:
        try:
            self.tar.close()
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            digest = file_sha256(self.tmp)
            size = self.tmp.stat().st_size
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise self._naming(exc) from None
        return digest, size

    def abort(self) -> None:
        """Drop the partial file; closing it may fail again (a full disk) and must not hide the first error."""
        try:
            self.fh.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def _naming(self, exc: OSError) -> OSError:
        """A write error (ENOSPC has no file name) that says which shard could not be written."""
        if exc.errno is None:
            return exc
        return OSError(exc.errno, exc.strerror or str(exc), str(self.final))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise RejectedInput("missing_image", path) from None
    except OSError as exc:
        raise RejectedInput("undecodable_image", f"{path}: {exc}") from None


class _Backgrounds:
    """Every source of a chunk decoded once, whether it is needed as a sample, a partner, or both.

    Mixed variants need the partner's ``only_bg_t`` background. A partner
    inside the chunk is the same decode as its own sample: if it comes later
    in plan order it is prepared ahead and kept for its turn (``early``);
    once prepared, its background is kept while ``uses`` says a later sample
    of this chunk still needs it, then dropped. Partners outside the chunk
    are decoded once per chunk however many samples use them. Memory is
    bounded by the chunk, not the build, and the pixels are the same as
    decoding on demand, so the shards do not change.
    """

    def __init__(self, config: BuildConfig, prepare, records: list[SourceRecord] = (), uses=None) -> None:
        self.config = config
        self.prepare = prepare
        self.cache: OrderedDict[str, np.ndarray | RejectedInput] = OrderedDict()
        self.procedural: dict[str, np.ndarray] = {}
        self.pending = {r.key for r in records}  # chunk records whose own turn has not come
        self.uses: Counter[str] = Counter(uses or {})  # partner key -> renders still to come
        self.early: dict[str, PreparedSample | RejectedInput] = {}
        self.backgrounds: dict[str, np.ndarray | RejectedInput] = {}

    def _prepare(self, record: SourceRecord) -> PreparedSample | RejectedInput:
        try:
            return self.prepare(record)
        except RejectedInput as exc:
            return exc

    def _keep_background(self, key: str, value: PreparedSample | RejectedInput) -> None:
        if isinstance(value, RejectedInput):
            self.backgrounds[key] = value
            return
        try:
            self.backgrounds[key] = V.only_bg_t(value.image, value.box_mask)
        except RejectedInput as exc:
            self.backgrounds[key] = exc

    def sample(self, record: SourceRecord) -> PreparedSample:
        """A chunk record's own prepared sample (raises its RejectedInput)."""
        self.pending.discard(record.key)
        value = self.early.pop(record.key, None) or self._prepare(record)
        if self.uses.get(record.key, 0) > 0 and record.key not in self.backgrounds:
            self._keep_background(record.key, value)
        if isinstance(value, RejectedInput):
            raise value
        return value

    def partner(self, record: SourceRecord) -> np.ndarray:
        key = record.key
        if key not in self.backgrounds:
            value = self._prepare(record)
            if key in self.pending:
                self.early[key] = value  # its own turn comes later in this chunk: decode once
            self._keep_background(key, value)
        value = self.backgrounds[key]
        self.uses[key] -= 1
        if self.uses[key] <= 0:
            del self.backgrounds[key]
        if isinstance(value, RejectedInput):
            raise RejectedInput("no_partner", f"background {record.key} unusable: {value}")
        return value

    def texture(self, name: str, rng: np.random.Generator) -> np.ndarray:
        size = self.config.size
        if name.startswith("procedural:"):
            # a handful of fixed images: generate each once per chunk, not once per sample
            key = "proc:" + name
            if key not in self.procedural:
                self.procedural[key] = procedural_texture(int(name.split(":")[1]), size)
            return self.procedural[key]
        key = "tex:" + name
        if key not in self.cache:
            arr, _, _, _ = decode_rgb(read_bytes(texture_path(self.config, name)), draft_min_side=size)
            self.cache[key] = arr
            self._trim()
        return texture_frame(self.cache[key], size, rng)

    def _trim(self, limit: int = 256) -> None:
        while len(self.cache) > limit:
            self.cache.popitem(last=False)


def render_variant(
    variant: str,
    sample: PreparedSample,
    config: BuildConfig,
    assignment: Assignment | None,
    partners: dict[str, SourceRecord],
    backgrounds: _Backgrounds,
) -> np.ndarray:
    """One variant's pixels for a prepared sample."""
    image, key = sample.image, sample.record.key
    if variant == "original":
        return image
    if variant in FILL_VARIANTS:
        fill = V.make_fill(config.fill, image, rng_for(config.seed, key, f"fill:{variant}"))
        if variant == "only_fg":
            return V.only_fg(image, sample.fg_mask, fill)
        if variant == "only_bg_b":
            return V.only_bg_b(image, sample.box_mask, fill)
        return V.no_fg(image, sample.fg_mask, fill)
    if variant == "only_bg_t":
        return V.only_bg_t(image, sample.box_mask)
    if variant in MIXED_VARIANTS:
        background = backgrounds.partner(partners[assignment.bg_key])
        return V.composite(image, sample.fg_mask, background)
    if variant == "texture":
        tex = backgrounds.texture(assignment.texture, rng_for(config.seed, key, "texture_crop"))
        return V.composite(image, sample.fg_mask, tex)
    raise ValueError(variant)


def build_chunk(
    index: int,
    records: list[SourceRecord],
    variants: list[str],
    config: BuildConfig,
    assignments: dict[str, dict[str, Assignment]],
    dropped: dict[str, set[str]],
    partners: dict[str, SourceRecord],
    completion_hashes: dict[str, str] | None = None,
) -> list[ShardResult]:
    """Build shard ``index`` of every requested variant from the chunk's records.

    ``completion_hashes`` (variant -> hash of this chunk's plan) is what the
    completion record stores, so a resumed build can tell whether the shard
    was made from the same plan; without it the variant's config hash is used.
    """
    out = Path(config.out)
    filters = SelectionFilters(config.exactly_one_box, config.max_box_fraction, config.max_box_cropped)

    def prepare(record: SourceRecord) -> PreparedSample:
        mask_bytes = None
        if config.mask == "segm" and record.segmentation is not None and record.segmentation.kind == "png":
            mask_bytes = read_bytes(record.segmentation.data)
        return prepare_sample(
            record,
            read_bytes(record.image),
            size=config.size,
            resize=config.resize,
            mask_source=config.mask,
            filters=filters,
            seed=config.seed,
            interpolation=config.interpolation,
            mask_bytes=mask_bytes,
        )

    uses: Counter[str] = Counter(
        a.bg_key
        for v in variants
        for r in records
        if r.key not in dropped.get(v, ()) and (a := assignments.get(v, {}).get(r.key)) is not None and a.bg_key
    )
    backgrounds = _Backgrounds(config, prepare, records, uses)
    writers = {}
    results = {
        v: ShardResult(v, shard_name(v, index), "", 0, 0, {}, [], (completion_hashes or {}).get(v) or config.variant_hash(v))
        for v in variants
    }
    try:
        for v in variants:
            (out / v).mkdir(parents=True, exist_ok=True)
            writers[v] = TarWriter(out / v / shard_name(v, index))
        for record in records:
            wanted = [v for v in variants if record.key not in dropped.get(v, ())]
            if not wanted:
                continue
            try:
                sample = backgrounds.sample(record)
            except RejectedInput as exc:
                for v in wanted:
                    results[v].rejections.append(Rejection(record.key, exc.reason, exc.detail, record.source).to_json())
                continue
            mask_png = encode_mask(sample.fg_mask) if config.with_masks else None
            for v in wanted:
                assignment = assignments.get(v, {}).get(record.key)
                try:
                    pixels = render_variant(v, sample, config, assignment, partners, backgrounds)
                except RejectedInput as exc:
                    results[v].rejections.append(
                        Rejection(record.key, exc.reason, exc.detail, record.source, v).to_json()
                    )
                    continue
                writer = writers[v]
                writer.add(f"{record.key}.{config.format}", encode_image(pixels, config.format, config.quality))
                writer.add(f"{record.key}.cls", str(record.label).encode())
                writer.add(f"{record.key}.json", sample_json(sample, v, config, assignment))
                if mask_png is not None:
                    writer.add(f"{record.key}.mask.png", mask_png)
                res = results[v]
                res.count += 1
                res.labels[str(record.label)] = res.labels.get(str(record.label), 0) + 1
        for v in variants:
            results[v].sha256, results[v].bytes = writers.pop(v).close()
            write_completion(out / v, results[v])
    finally:
        for w in writers.values():
            w.abort()
    return [results[v] for v in variants]


def completion_path(variant_dir: Path, name: str) -> Path:
    return variant_dir / BUILD_DIR / f"{name}.json"


def write_completion(variant_dir: Path, result: ShardResult) -> None:
    """Record a finished shard (atomically) so that a rerun can skip it."""
    atomic_write_text(completion_path(variant_dir, result.name), json.dumps(result.__dict__, sort_keys=True))


def read_completion(variant_dir: Path, name: str, config_hash: str) -> ShardResult | None:
    """A finished shard from an earlier run, if its record, hash and bytes all still agree."""
    path = completion_path(variant_dir, name)
    shard = variant_dir / name
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if row.get("config_hash") != config_hash or not shard.exists():
        return None
    if shard.stat().st_size != row["bytes"] or file_sha256(shard) != row["sha256"]:
        return None
    return ShardResult(**row)
