"""Plan a build before building: who is in, who is out and why, and every sample's partner.

The plan depends only on the inputs, the config and the seed: partners and
textures are drawn from ``(seed, key)``, never from a global RNG, and the
chunking into shards does not depend on which variants are requested, so a
variant's shards are the same whether it is built alone or with others.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builders.config import BuildConfig
from pipeline.classes import imagenet_classes, to_in9
from pipeline.decode import SOURCE_FORMATS, TEXTURE_SUFFIXES, image_header
from pipeline.files import open_regular, read_regular
from pipeline.frame import clip_box
from pipeline.masks import SelectionFilters
from pipeline.prepare import sample_geometry
from pipeline.records import RejectedInput, Rejection, SourceRecord, gc_paused
from pipeline.rng import draw_index, draw_unit
from pipeline.textures import N_PROCEDURAL
from pipeline.variants import VARIANT_SPECS

# Plans hold one Assignment per sample and variant and one Probe per input (millions for ImageNet
# train): both are slotted, and a Probe's failures are a tuple (no failure: the one empty tuple).


@dataclass(frozen=True, slots=True)
class Assignment:
    """What a sample needs from elsewhere for one variant."""

    bg_key: str | None = None
    bg_label: int | None = None
    texture: str | None = None  # "procedural:07" or a file name under --textures


@dataclass(slots=True)
class Probe:
    """What the plan knows of a source from its header alone."""

    key: str
    bg_ok: bool  # may serve as a background (no box_too_large, a strip left to tile)
    failures: tuple[str, ...]  # selection-filter reason codes, in pipeline.masks.check_selection's order
    stamp: str = ""  # size and modification time of the file: a rerun rebuilds what changed under a name


@dataclass
class Plan:
    config: BuildConfig
    inputs: list[SourceRecord]  # accepted inputs in shard order (sorted by key)
    rejections: list[Rejection]  # variant == "" means rejected for every variant
    assignments: dict[str, dict[str, Assignment]]  # variant -> key -> assignment
    variant_rejections: dict[str, list[Rejection]]  # variant -> rejections for that variant only
    textures: list[str]
    source_hash: str
    n_inputs: int
    partners: dict[str, SourceRecord] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)  # input key or texture name -> file stamp

    def chunks(self) -> list[list[SourceRecord]]:
        size = self.config.shard_size
        return [self.inputs[i : i + size] for i in range(0, len(self.inputs), size)]



def filters_of(config: BuildConfig) -> SelectionFilters:
    return SelectionFilters(config.exactly_one_box, config.max_box_fraction, config.max_box_cropped)


def group_of(label: int, level: str) -> int:
    """The class relation used by mixed_same / mixed_next."""
    return to_in9(label) if level == "in9" else label


def file_stamp(st: os.stat_result) -> str:
    """What tells a rerun that a file changed under its name, without reading it again."""
    return f"{st.st_size}:{st.st_mtime_ns}"


def shown_path(path: str, config: BuildConfig) -> str:
    """A file as rejection details name it: relative to the folder it was found in, never where data lives."""
    for root in (config.images, config.textures, config.annotations):
        if not root:
            continue
        for base, target in ((Path(root), Path(path)), (Path(root).resolve(), Path(path).resolve())):
            try:
                return target.relative_to(base).as_posix()
            except ValueError:
                continue
    return Path(path).name


def input_error(path: str, config: BuildConfig, exc: OSError) -> RejectedInput:
    """An input file that cannot be read, as a typed rejection (no absolute path, no file content)."""
    where = shown_path(path, config)
    if isinstance(exc, FileNotFoundError):
        return RejectedInput("missing_image", where)
    return RejectedInput("undecodable_image", f"{where}: {exc.strerror or type(exc).__name__}")


def read_input(path: str, config: BuildConfig) -> bytes:
    """All bytes of an input image, mask or texture: regular files only (a FIFO never blocks a build)."""
    try:
        return read_regular(path)
    except OSError as exc:
        raise input_error(path, config, exc) from None


def probe_record(record: SourceRecord, config: BuildConfig) -> Probe:
    """Header-only geometry: frame, framed boxes and selection filters, no pixel decode."""
    try:
        with open_regular(record.image) as fh:
            stored_size, orientation = image_header(fh, SOURCE_FORMATS)  # no pixel decode
            stamp = file_stamp(os.fstat(fh.fileno()))
    except OSError as exc:
        raise input_error(record.image, config, exc) from None
    return probe_header(record, stored_size, orientation, stamp, config)


def probe_header(
    record: SourceRecord, stored_size: tuple[int, int], orientation: int, stamp: str, config: BuildConfig
) -> Probe:
    """What :func:`probe_record` concludes once it has read the header (the benchmark feeds it known headers)."""
    geo = sample_geometry(
        record, stored_size, orientation, size=config.size, resize=config.resize, filters=filters_of(config)
    )
    size = config.size
    failures = geo.failures
    clipped = [clip_box(b, size) for b in geo.framed]
    # a strip of background outside the boxes (clipped or not, the same answer: size >= 8)
    has_strip = (
        min(b[0] for b in clipped) >= 1 or min(b[1] for b in clipped) >= 1
        or max(b[2] for b in clipped) <= size - 1 or max(b[3] for b in clipped) <= size - 1
    )
    bg_ok = "box_too_large" not in failures and has_strip
    return Probe(record.key, bg_ok, tuple(failures), stamp)


def probe_batch(records: list[SourceRecord], config: BuildConfig) -> list[Probe | Rejection]:
    out: list[Probe | Rejection] = []
    with gc_paused():
        for record in records:
            try:
                out.append(probe_record(record, config))
            except RejectedInput as exc:
                out.append(Rejection(record.key, exc.reason, exc.detail, record.source))
    return out


def selected_classes(spec: str) -> set[int] | None:
    """None = all; 'in9' = the 370 IN-9 classes; else a file of wnids or indices, one a line."""
    if spec == "all":
        return None
    if spec == "in9":
        return {i for i in range(1000) if to_in9(i) >= 0}
    from builders.config import ConfigError

    index = imagenet_classes().index_of
    chosen: set[int] = set()
    for number, line in enumerate(Path(spec).read_text().splitlines(), start=1):
        token = line.split("#", 1)[0].strip().split()[0] if line.split("#", 1)[0].strip() else ""
        if not token:
            continue
        if token.isdigit() and int(token) < len(index):
            chosen.add(int(token))
        elif token in index:
            chosen.add(index[token])
        else:
            raise ConfigError(f"--classes {spec}:{number}: {token[:40]!r} is neither a wnid nor a class index 0..999")
    if not chosen:
        raise ConfigError(f"--classes {spec}: no class in it")
    return chosen


def annotation_hash(items: Iterable[SourceRecord | Rejection]) -> str:
    """sha256 over the canonical JSON of what the reader produced: identifies the annotation set.

    One line per item (:func:`annotation_line`), hashed by :func:`hash_lines`.
    """
    return hash_lines(map(annotation_line, items))


def annotation_line(item: SourceRecord | Rejection) -> str:
    """``json.dumps(row, separators=(",", ":"))`` of ``[key, label, wnid, boxes, segmentation kind, size]``
    or ``["rejected", key, reason]``."""
    return json.dumps(_hash_row(item), separators=(",", ":"))


def hash_lines(lines: Iterable[str]) -> str:
    """sha256 of the lines, each ending in a newline (a few thousand hashed at a time)."""
    h = hashlib.sha256()
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == 4096:
            h.update("\n".join(batch).encode() + b"\n")
            batch.clear()
    if batch:
        h.update("\n".join(batch).encode() + b"\n")
    return h.hexdigest()


def _hash_row(item: SourceRecord | Rejection) -> list:
    if isinstance(item, SourceRecord):
        seg = item.segmentation
        return [item.key, item.label, item.wnid, [b.as_list() for b in item.boxes], seg.kind if seg else None,
                list(item.size) if item.size else None]
    return ["rejected", item.key, item.reason]


def list_textures(config: BuildConfig) -> list[str]:
    if not config.textures:
        return [f"procedural:{i:02d}" for i in range(N_PROCEDURAL)]
    root = Path(config.textures)
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXTURE_SUFFIXES
    )
    if not files:
        from builders.config import ConfigError

        raise ConfigError(f"--textures {root}: no image files found")
    return files


def make_plan(
    items: list[SourceRecord | Rejection],
    config: BuildConfig,
    probes: dict[str, Probe | Rejection],
) -> Plan:
    """Turn reader output and header probes into the plan (reads only the --classes file and the --textures folder)."""
    with gc_paused():
        return _make_plan(items, config, probes)


def _make_plan(
    items: list[SourceRecord | Rejection],
    config: BuildConfig,
    probes: dict[str, Probe | Rejection],
) -> Plan:
    rejections: list[Rejection] = []
    records: list[SourceRecord] = []
    chosen = selected_classes(config.classes)
    for item in items:
        if isinstance(item, Rejection):
            rejections.append(item)
        elif chosen is not None and item.label not in chosen:
            rejections.append(Rejection(item.key, "class_not_selected", f"label {item.label}", item.source))
        else:
            probe = probes[item.key]
            if isinstance(probe, Rejection):
                rejections.append(probe)
            elif config.mask == "segm" and item.segmentation is None:
                # known from the annotations: such an image can be neither a sample nor a partner
                rejections.append(Rejection(item.key, "bad_segmentation", "no segmentation (--mask segm)", item.source))
            elif probe.failures and ("multiple_boxes" in probe.failures or "box_cropped" in probe.failures):
                reason = "multiple_boxes" if "multiple_boxes" in probe.failures else "box_cropped"
                rejections.append(Rejection(item.key, reason, ", ".join(probe.failures), item.source))
            else:
                records.append(item)
    if config.per_class:
        by_class: dict[int, list[SourceRecord]] = {}
        for r in records:
            by_class.setdefault(r.label, []).append(r)
        # a seeded order, so the kept subset does not favour low image ids
        keys = [r.key for r in records]
        order = dict(zip(keys, [draw_unit(config.seed, k, "per_class") for k in keys], strict=True))
        keep: set[str] = set()
        for members in by_class.values():
            ordered = sorted(members, key=lambda r: order[r.key])
            keep.update(r.key for r in ordered[: config.per_class])
        for r in records:
            if r.key not in keep:
                rejections.append(Rejection(r.key, "over_per_class_limit", f"class {r.label}", r.source))
        records = [r for r in records if r.key in keep]
    records.sort(key=lambda r: r.key)

    by_key = {r.key: r for r in records}
    pools = PartnerPools.of(records, probes, config.partner_level)
    textures = list_textures(config) if any(VARIANT_SPECS[v].texture for v in config.variants) else []

    assignments: dict[str, dict[str, Assignment]] = {v: {} for v in config.variants}
    variant_rejections: dict[str, list[Rejection]] = {v: [] for v in config.variants}
    no_background = {r.key for r in records if not probes[r.key].bg_ok}  # type: ignore[union-attr]
    partner_assignments: dict[str, Assignment] = {}  # one per partner, shared by all who draw it (frozen)
    for variant in config.variants:
        spec = VARIANT_SPECS[variant]
        if not (spec.own_background or spec.partner is not None or spec.texture):
            continue  # needs nothing from elsewhere and keeps every record
        # (record index, rejection): a variant's rejections are listed in record order
        dropped: list[tuple[int, Rejection]] = []
        if spec.own_background and no_background:
            for i, r in enumerate(records):
                if r.key in no_background:
                    reason = "box_too_large" if "box_too_large" in probes[r.key].failures else "no_background"  # type: ignore[union-attr]
                    dropped.append((i, Rejection(r.key, reason, "background-only variant", r.source, variant)))
        if spec.partner is None and not spec.texture:
            variant_rejections[variant] = [rejection for _, rejection in dropped]
            continue
        if spec.own_background and no_background:
            eligible = [(i, r) for i, r in enumerate(records) if r.key not in no_background]
        else:
            eligible = list(enumerate(records))
        keys = [r.key for _, r in eligible]
        if spec.partner is not None:
            pool_of = {label: pools.pool(spec.partner, label) for label in {r.label for _, r in eligible}}
            drawn = draw_partners([pool_of[r.label] for _, r in eligible], keys, config.seed, variant)
            chosen_partners = assignments[variant]
            for (i, r), partner in zip(eligible, drawn, strict=True):
                if partner is None:
                    dropped.append((i, Rejection(r.key, "no_partner", f"no background image for {variant}", r.source,
                                                 variant)))
                elif (assignment := partner_assignments.get(partner)) is not None:
                    chosen_partners[r.key] = assignment
                else:
                    chosen_partners[r.key] = partner_assignments[partner] = Assignment(partner, by_key[partner].label)
        elif spec.texture:
            # one Assignment per texture, shared by every sample that draws it (they are frozen)
            shared = [Assignment(texture=name) for name in textures]
            picked = [draw_index(config.seed, k, "texture", len(textures)) for k in keys]
            assignments[variant] = {k: shared[t] for k, t in zip(keys, picked, strict=True)}
        dropped.sort(key=lambda pair: pair[0])
        variant_rejections[variant] = [rejection for _, rejection in dropped]
    # every partner, in the order the variants (then the samples) first drew it
    partners = {key: by_key[key] for key in partner_assignments}
    stamps = {r.key: probes[r.key].stamp for r in records}  # type: ignore[union-attr]
    for name in textures:
        if (path := texture_path(config, name)) is not None:
            stamps[f"texture:{name}"] = file_stamp(os.stat(path))
    return Plan(
        stamps=stamps,
        config=config,
        inputs=records,
        rejections=rejections,
        assignments=assignments,
        variant_rejections=variant_rejections,
        textures=textures,
        source_hash=annotation_hash(items),
        n_inputs=len(items),
        partners=partners,
    )


@dataclass
class PartnerPools:
    """The background partners each mixed variant draws from: images whose own background is usable."""

    any: list[str]  # sorted by key
    by_group: dict[int, list[str]]
    next_group: dict[int, int]
    level: str

    @classmethod
    def of(cls, records: list[SourceRecord], probes: dict[str, Probe | Rejection], level: str) -> PartnerPools:
        usable = [r for r in records if probes[r.key].bg_ok]  # type: ignore[union-attr]
        group = {label: group_of(label, level) for label in {r.label for r in records}}
        by_group: dict[int, list[str]] = {}
        for r in usable:
            by_group.setdefault(group[r.label], []).append(r.key)
        present = sorted(set(group.values()))
        next_group = {g: present[(i + 1) % len(present)] for i, g in enumerate(present)} if len(present) > 1 else {}
        return cls([r.key for r in usable], by_group, next_group, level)

    def pool(self, kind: str, label: int) -> list[str]:
        """``kind`` is a variant's ``partner`` (``pipeline.variants.PARTNER_POOLS``)."""
        group = group_of(label, self.level)
        if kind == "any":
            return self.any
        if kind == "same":
            return self.by_group.get(group, [])
        if kind == "next":
            return self.by_group.get(self.next_group[group], []) if group in self.next_group else []
        raise ValueError(f"unknown partner pool {kind!r}")


def pick_texture(textures: list[str], seed: int, key: str) -> str:
    """The texture a sample gets, from ``(seed, key)`` alone."""
    return textures[draw_index(seed, key, "texture", len(textures))]


def draw_partner(pool: list[str], key: str, seed: int, variant: str) -> str | None:
    """Uniform over ``pool`` (sorted) without ``key`` itself, from (seed, key, variant) alone."""
    return draw_partners([pool], [key], seed, variant)[0]


def draw_partners(pools: Sequence[list[str]], keys: Sequence[str], seed: int, variant: str) -> list[str | None]:
    """:func:`draw_partner` for many keys (``pools[i]`` is the sorted pool of ``keys[i]``)."""
    out: list[str | None] = []
    for pool, key in zip(pools, keys, strict=True):
        at = bisect.bisect_left(pool, key)
        own = at < len(pool) and pool[at] == key
        n = len(pool) - own
        if n <= 0:
            out.append(None)
            continue
        i = draw_index(seed, key, variant, n)
        out.append(pool[i + 1 if own and i >= at else i])
    return out


def texture_path(config: BuildConfig, name: str) -> str | None:
    return None if name.startswith("procedural:") else str(Path(config.textures) / name)


__all__ = [
    "Assignment",
    "Plan",
    "Probe",
    "make_plan",
    "probe_batch",
    "draw_partner",
    "draw_partners",
    "pick_texture",
    "PartnerPools",
    "annotation_hash",
    "annotation_line",
    "hash_lines",
    "list_textures",
    "group_of",
]
