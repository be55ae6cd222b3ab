"""Build one chunk of the plan into one shard per variant: the unit of parallel work.

Each source image is decoded once however many variants are built; every
variant's pixels come from ``pipeline.variants.render_variant`` and every
sample is written through ``pipeline.shard_format`` (webdataset.TarWriter with
fixed metadata, to a temporary name renamed when complete), so the same plan
gives byte-identical shards on any worker and a killed build leaves no
partial file under a final name. With the partner cache
(:mod:`builders.partner_cache`) a chunk is built in two passes: the first
prepares its sources, writes them to the cache and builds the variants that
need no partner; the second builds the mixed variants from the cache alone.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from builders.config import BuildConfig
from builders.partner_cache import CacheLoader, ChunkCacheWriter, cache_folder
from builders.plan import Assignment, filters_of, read_input, texture_path
from pipeline import variants as V
from pipeline.classes import to_in9
from pipeline.decode import TEXTURE_FORMATS, decode_rgb
from pipeline.files import atomic_write_text
from pipeline.prepare import PreparedSample, prepare_sample
from pipeline.records import RejectedInput, Rejection, SourceRecord
from pipeline.rng import rng_for
from pipeline.shard_format.spec import IMAGE_CODECS, sample_members, shard_name
from pipeline.shard_format.writer import ShardFile
from pipeline.textures import procedural_texture, texture_frame

BUILD_DIR = ".build"  # per-shard completion records, used to resume


@dataclass
class ShardResult:
    """What the manifest needs to know about one finished shard."""

    variant: str
    name: str
    sha256: str
    nbytes: int
    count: int
    labels: dict[str, int]
    rejections: list[dict] = field(default_factory=list)
    plan_hash: str = ""


def encode_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode once with fixed codec settings (JPEG: 4:2:0, baseline, no optimisation passes)."""
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    codec = IMAGE_CODECS[fmt]
    if codec == "JPEG":
        pil.save(buf, format=codec, quality=quality, subsampling=2, optimize=False, progressive=False)
    elif codec == "PNG":
        pil.save(buf, format=codec, compress_level=6)
    else:
        pil.save(buf, format=codec, quality=quality, method=4)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def source_meta(sample: PreparedSample, config: BuildConfig) -> dict:
    """The provenance fields a source's samples share in every variant (rounded floats: the bytes are stable)."""
    rec = sample.record
    return {
        "key": rec.key,
        "label": rec.label,
        "wnid": rec.wnid,
        "in9_label": to_in9(rec.label),
        "source": f"{rec.source}:{Path(rec.image).name}",
        "mask_source": sample.mask_source,
        "fg_area": round(V.fg_area(sample.fg_mask), 6),
        "bbox": [round(v, 3) for v in sample.bbox],
        "frame": sample.frame.to_json(),
        "seed": config.seed,
    }


def sample_meta(sample: PreparedSample, variant: str, config: BuildConfig, assignment: Assignment | None,
                shared: dict | None = None) -> dict:
    """The provenance record of one sample; ``shared`` is the source's :func:`source_meta`, computed once."""
    return {
        **(shared if shared is not None else source_meta(sample, config)),
        "variant": variant,
        "bg_key": assignment.bg_key if assignment else None,
        "bg_label": assignment.bg_label if assignment else None,
        "texture": assignment.texture if assignment else None,
        "fill": config.fill if V.VARIANT_SPECS[variant].fill else None,
    }


@functools.lru_cache(maxsize=64)
def shared_procedural_texture(index: int, size: int) -> np.ndarray:
    """A procedural texture generated once per worker process (read-only: every sample of every chunk shares it).

    Generating one costs about as much as decoding a photo; per chunk, the
    sixteen of them were most of what ``texture`` cost over ``original``.
    """
    texture = procedural_texture(index, size)
    texture.flags.writeable = False
    return texture


class ChunkSources:
    """Every source of a chunk decoded once, whether it is needed as a sample, a partner, or both.

    Mixed variants need the partner's ``only_bg_t`` background. A partner
    inside the chunk is the same decode as its own sample: if it comes later
    in plan order it is prepared ahead and kept for its turn (``early``);
    once prepared, its background is kept while ``uses`` says a later sample
    of this chunk still needs it, then dropped. Partners outside the chunk
    are decoded once per chunk however many samples use them, unless
    ``prepare`` reads them from the partner cache, where every source of the
    build was written once. Memory is bounded by the chunk, not the build,
    and the pixels are the same as decoding on demand, so the shards do not
    change.
    """

    def __init__(self, config: BuildConfig, prepare, records: list[SourceRecord] = (), uses=None) -> None:
        self.config = config
        self.prepare = prepare
        self.textures: dict[str, np.ndarray] = {}
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

    def texture(self, name: str, key: str) -> np.ndarray:
        """The texture ``name`` framed for sample ``key`` (its crop drawn from ``(seed, key)``)."""
        size = self.config.size
        if name not in self.textures:
            # a handful of images: decode each once per chunk (generate once per process), not once per sample
            if name.startswith("procedural:"):
                self.textures[name] = shared_procedural_texture(int(name.split(":")[1]), size)
            else:
                data = read_input(texture_path(self.config, name), self.config)
                arr, _, _, _ = decode_rgb(data, draft_min_side=size, formats=TEXTURE_FORMATS)
                self.textures[name] = arr
        return texture_frame(self.textures[name], size, rng_for(self.config.seed, key, "texture_crop"))

    def background(self, variant: str, assignment: Assignment | None, partners: dict[str, SourceRecord],
                   key: str) -> np.ndarray | None:
        """The background a variant composites onto: a partner's only_bg_t, a texture, or none."""
        spec = V.VARIANT_SPECS[variant]
        if spec.partner is not None:
            return self.partner(partners[assignment.bg_key])  # type: ignore[union-attr,index]
        if spec.texture:
            return self.texture(assignment.texture, key)  # type: ignore[union-attr,arg-type]
        return None


def build_chunk(
    index: int,
    records: list[SourceRecord],
    variants: list[str],
    config: BuildConfig,
    assignments: dict[str, dict[str, Assignment]],
    dropped: dict[str, set[str]],
    partners: dict[str, SourceRecord],
    completion_hashes: dict[str, str] | None = None,
    cache_hash: str | None = None,
    cached: CacheLoader | None = None,
) -> list[ShardResult]:
    """Build shard ``index`` of every requested variant from the chunk's records.

    ``completion_hashes`` (variant -> hash of this chunk's plan) is what the
    completion record stores, so a resumed build can tell whether the shard
    was made from the same plan; without it the variant's config hash is used.
    With ``cache_hash``, every record of the chunk is also written to the
    partner cache (``variants`` may then be empty: a pass that only fills
    the cache); with ``cached``, sources are read from the cache instead of
    decoded (the mixed variants' pass).
    """
    out = Path(config.out)
    filters = filters_of(config)

    def prepare(record: SourceRecord) -> PreparedSample:
        mask_bytes = None
        if config.mask == "segm" and record.segmentation is not None and record.segmentation.kind == "png":
            mask_bytes = read_input(record.segmentation.data, config)
        return prepare_sample(
            record,
            read_input(record.image, config),
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
    sources = ChunkSources(config, cached.load if cached is not None else prepare, records, uses)
    writers: dict[str, ShardFile] = {}
    cache: ChunkCacheWriter | None = None
    results = {
        v: ShardResult(v, shard_name(v, index), "", 0, 0, {}, [], (completion_hashes or {}).get(v) or config.variant_hash(v))
        for v in variants
    }
    try:
        for v in variants:
            (out / v).mkdir(parents=True, exist_ok=True)
            writers[v] = ShardFile(out / v / shard_name(v, index))
        if cache_hash is not None:
            cache = ChunkCacheWriter(cache_folder(out), index, len(records), config.size, cache_hash)
        for row, record in enumerate(records):
            wanted = [v for v in variants if record.key not in dropped.get(v, ())]
            if not wanted and cache is None:
                continue
            try:
                sample = sources.sample(record)
            except RejectedInput as exc:
                if cache is not None:
                    cache.reject(record.key, exc)
                for v in wanted:
                    results[v].rejections.append(Rejection(record.key, exc.reason, exc.detail, record.source).to_json())
                continue
            if cache is not None:
                cache.add(row, sample)
            if not wanted:
                continue
            mask_png = encode_mask(sample.fg_mask) if config.with_masks else None
            shared = source_meta(sample, config)
            for v in wanted:
                assignment = assignments.get(v, {}).get(record.key)
                try:
                    background = sources.background(v, assignment, partners, record.key)
                    pixels = V.render_variant(v, sample.image, sample.fg_mask, sample.box_mask, fill=config.fill,
                                              seed=config.seed, key=record.key, background=background)
                except RejectedInput as exc:
                    results[v].rejections.append(
                        Rejection(record.key, exc.reason, exc.detail, record.source, v).to_json()
                    )
                    continue
                writers[v].write(sample_members(
                    record.key, encode_image(pixels, config.format, config.quality), config.format,
                    record.label, sample_meta(sample, v, config, assignment, shared), mask_png,
                ))
                res = results[v]
                res.count += 1
                res.labels[str(record.label)] = res.labels.get(str(record.label), 0) + 1
        for v in variants:
            results[v].sha256, results[v].nbytes = writers.pop(v).close()
            write_completion(out / v, results[v])
        if cache is not None:
            publish_cache(cache)
            cache = None
    finally:
        for w in writers.values():
            w.abort()
        if cache is not None:
            cache.abort()
        if cached is not None:
            cached.close()
    return [results[v] for v in variants]


def publish_cache(cache: ChunkCacheWriter) -> None:
    """Rename a chunk's cache file into place and write its marker (a module attribute: tests kill here)."""
    cache.close()


def completion_path(variant_dir: Path, name: str) -> Path:
    return variant_dir / BUILD_DIR / f"{name}.json"


def write_completion(variant_dir: Path, result: ShardResult) -> None:
    """Record a finished shard (atomically) so that a rerun can skip it."""
    atomic_write_text(completion_path(variant_dir, result.name), json.dumps(asdict(result), sort_keys=True))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_completion(variant_dir: Path, name: str, plan_hash: str) -> ShardResult | None:
    """A finished shard from an earlier run, if its record, hash and bytes all still agree."""
    path = completion_path(variant_dir, name)
    shard = variant_dir / name
    try:
        row = json.loads(path.read_text())
        result = ShardResult(**row)
    except (OSError, ValueError, TypeError):
        return None
    if result.plan_hash != plan_hash or not shard.is_file():
        return None
    if shard.stat().st_size != result.nbytes or file_sha256(shard) != result.sha256:
        return None
    return result
