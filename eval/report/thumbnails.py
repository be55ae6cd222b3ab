"""The gallery's images: where the shards are, and reading only the samples the gallery shows.

Shards come from ``--shards SPEC`` (anything ``eval.score --shards`` takes) or,
without it, from what eval.score recorded: every ledger entry
(``predictions/<model>/.done/<variant>.json``) says where its shard was read
from (``url``). A ledger url beside a manifest that lists it is read through
that manifest, so each shard is verified against it as it streams.

Samples are read through the project's public reader, :func:`eval.stream.samples`
(imported only here, so a report without a gallery never loads torch). A
source stops as soon as it has yielded every key it was wanted for, and only
a small JPEG of each wanted sample is kept, never the decoded images.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import braceexpand
from PIL import Image

from eval.predictions import model_dir
from eval.report.gallery import PredictionStore, Thumbnail
from eval.report.inputs import Notes
from eval.resume import DONE_DIR  # the ledgers' folder; eval.resume loads neither torch nor webdataset
from pipeline.shard_format.errors import StreamError
from pipeline.shard_format.locate import ShardRef, load_manifest, resolve_shards, shard_refs
from pipeline.shard_format.spec import MANIFEST_NAME
from pipeline.shard_format.transport import is_pipe, is_remote
from pipeline.variants import VARIANT_SPECS

if TYPE_CHECKING:
    import torch

    from eval.stream import Sample

THUMB_PX = 96  # longest side; frames are square, so 96 x 96
THUMB_QUALITY = 80  # JPEG quality: ~3 KB a thumbnail, a few hundred stay well under 2 MB


@dataclass(frozen=True)
class ShardSource:
    """One spec for :func:`eval.stream.samples`, and what it is read for.

    ``variant``: the variant a ledger scored from it (reading stops once that
    variant's keys are found); ``single_variant``: a manifest, so all of one
    variant, though which one is known only from its first sample.
    """

    spec: str
    variant: str | None = None
    single_variant: bool = False


def _names_one_manifest(item: str) -> bool:
    """A manifest or a folder holding one: a manifest describes exactly one variant."""
    if is_pipe(item):
        return False
    if is_remote(item):
        return item.endswith(("/", ".json"))
    path = Path(item)
    return path.suffix == ".json" or (path.is_dir() and (path / MANIFEST_NAME).is_file())


def sources_from_specs(specs: Sequence[str]) -> list[ShardSource]:
    """``--shards`` specs, brace patterns expanded first so each manifest in one can stop on its own."""
    out: list[ShardSource] = []
    for spec in specs:
        spec = spec.strip()
        items = [spec] if is_pipe(spec) else list(braceexpand.braceexpand(spec))  # as resolve_shards expands
        out += [ShardSource(item, None, _names_one_manifest(item)) for item in items]
    return out


def _listed_names(manifest: str) -> set[str]:
    """The shard names a manifest lists; none when it cannot be read (its shards are then named by url)."""
    try:
        return {s.name for s in load_manifest(manifest).shards}
    except (ValueError, OSError):  # ShardSpecError is a ValueError
        return set()


def _manifest_beside(url: str) -> str | None:
    if is_pipe(url):
        return None
    if is_remote(url):
        return url.rsplit("/", 1)[0] + "/" + MANIFEST_NAME
    candidate = Path(url).parent / MANIFEST_NAME
    return str(candidate) if candidate.is_file() else None


def sources_from_ledgers(results_dir: Path, models: Iterable[str]) -> tuple[list[ShardSource], str]:
    """Per variant, the shards eval.score read, from every model's ledgers; and why there are none, if so."""
    urls: dict[str, dict[str, str]] = {}  # variant -> url -> shard name
    ledgers = 0
    for model in sorted(models):
        for path in sorted((model_dir(results_dir, model) / DONE_DIR).glob("*.json")):
            try:
                entries = json.loads(path.read_text(encoding="utf-8")).get("shards", {})
            except (OSError, ValueError, AttributeError):
                continue
            ledgers += 1
            for entry in entries.values() if isinstance(entries, dict) else ():
                if isinstance(entry, dict) and isinstance(entry.get("url"), str) and entry["url"]:
                    urls.setdefault(path.stem, {})[entry["url"]] = str(entry.get("shard") or "")
    if not urls:
        where = f"{results_dir / 'predictions'}/<model>/{DONE_DIR}/"
        why = (f"no --shards given and no ledger under {where} records where its shards were read from"
               if ledgers else f"no --shards given and no ledger under {where}")
        return [], why
    sources: list[ShardSource] = []
    listed: dict[str, set[str]] = {}  # manifest -> its shard names, each manifest read once
    for variant in sorted(urls):
        specs: list[str] = []
        for url, name in urls[variant].items():
            manifest = _manifest_beside(url)
            if manifest is not None and manifest not in listed:
                listed[manifest] = _listed_names(manifest)
            spec = manifest if manifest is not None and (name or url.rsplit("/", 1)[-1]) in listed[manifest] else url
            if spec not in specs:
                specs.append(spec)
        sources += [ShardSource(spec, variant) for spec in specs]
    return sources, ""


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_order(sources: Sequence[ShardSource]) -> list[ShardSource]:
    """Mixed variants before original, so the photos their backgrounds came from are wanted in time."""
    return sorted(sources, key=lambda s: 0 if s.variant in VARIANT_SPECS and VARIANT_SPECS[s.variant].partner else 1)


def thumbnail_jpeg(image: torch.Tensor, px: int = THUMB_PX, quality: int = THUMB_QUALITY) -> tuple[bytes, int, int]:
    """A uint8 (3, H, W) image as a JPEG whose longest side is ``px``; (bytes, width, height)."""
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    pil.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue(), pil.width, pil.height


class _Collector:
    """Keys still wanted per variant, and the thumbnails found so far."""

    def __init__(self, wanted: dict[str, set[str]], store: PredictionStore, notes: Notes) -> None:
        self.wanted = {v: set(keys) for v, keys in wanted.items()}
        self.store, self.notes = store, notes
        self.found: dict[tuple[str, str], Thumbnail] = {}

    def pending(self, variant: str | None = None) -> bool:
        return any(self.wanted.values()) if variant is None else bool(self.wanted.get(variant))

    def read(self, source: ShardSource) -> set[str]:
        """Read ``source`` until it can yield nothing more that is wanted; the variants it yielded."""
        from eval.stream import samples

        seen: set[str] = set()
        try:
            for sample in samples(source.spec, on_error="skip"):
                seen.add(sample.variant)
                self.take(sample, source.spec)
                read_for = source.variant or (sample.variant if source.single_variant else None)
                if not self.pending(read_for):
                    break  # the rest of this source holds nothing we still want
        except (StreamError, ValueError, OSError) as exc:  # ShardSpecError is a ValueError
            self.notes.add(f"gallery: shards {source.spec} not read ({_first_line(exc)})")
        return seen

    def take(self, sample: Sample, spec: str) -> None:
        keys = self.wanted.get(sample.variant)
        if not keys or sample.key not in keys:
            return
        keys.discard(sample.key)
        expected = self.store.label_of(sample.key)
        if expected is not None and sample.label != expected:
            self.notes.add(f"gallery: {sample.variant} {sample.key} in {spec} has label {sample.label}, its "
                           f"predictions {expected}: not the shards that were scored, image left out")
            return
        jpeg, width, height = thumbnail_jpeg(sample.image)  # type: ignore[arg-type]
        meta = sample.meta
        bg_key = meta.get("bg_key") if isinstance(meta.get("bg_key"), str) else None
        texture = meta.get("texture") if isinstance(meta.get("texture"), str) else None
        self.found[(sample.variant, sample.key)] = Thumbnail(sample.key, sample.variant, jpeg, width, height, bg_key,
                                                             sample.bg_label, texture)
        # The photo this image's background came from: worth a thumbnail when its original was scored.
        if bg_key and "original" in self.wanted and ("original", bg_key) not in self.found \
                and self.store.label_of(bg_key) is not None:
            self.wanted["original"].add(bg_key)


def read_thumbnails(sources: Sequence[ShardSource], wanted: dict[str, set[str]], store: PredictionStore,
                    notes: Notes, progress: bool = False) -> dict[tuple[str, str], Thumbnail]:
    """Thumbnails of the wanted (variant, key) samples, and of the original of each mixed image's background photo.

    A sample whose label differs from its predictions' is left out with a note:
    those shards are not the ones that were scored.
    """
    collector = _Collector(wanted, store, notes)
    ordered = read_order(sources)
    holds: dict[ShardSource, set[str]] = {}
    show = progress and sys.stderr.isatty()  # a status line only on a terminal, never in piped output
    for n, source in enumerate(ordered, 1):
        if not collector.pending():
            break
        if collector.pending(source.variant):
            if show:
                print(f"\rgallery: shards {n}/{len(ordered)}", end="", file=sys.stderr, flush=True)
            holds[source] = collector.read(source)
    if show:
        print(file=sys.stderr)
    # A background photo named after its original source was read (only with --shards in that order): once more.
    for source in ordered:
        if not collector.pending("original"):
            break
        if "original" in holds.get(source, ()):
            collector.read(source)
    return collector.found


# ---------------------------------------------------------------- shards a results file recorded, one by one


@dataclass(frozen=True)
class RecordedShard:
    """A shard a results file says was read: its name, where from, and the sha256 of the bytes read then."""

    name: str
    url: str
    sha256: str = ""


class ShardFinder:
    """Where to read a recorded shard now, verified: ``--shards`` first (the user says where the shards are),
    else where it was read, through the manifest beside it when that lists it."""

    def __init__(self, specs: Sequence[str] | None, notes: Notes) -> None:
        self.given: dict[str, ShardRef] = {}
        self._listed: dict[str, dict[str, ShardRef]] = {}  # manifest -> its shards by name, each read once
        for spec in specs or ():
            try:
                refs = resolve_shards(spec)
            except (ValueError, StreamError) as exc:  # ShardSpecError is a ValueError
                notes.add(f"challenge gallery: --shards {spec} not usable ({_first_line(exc)})")
                continue
            for ref in refs:
                self.given.setdefault(ref.name, ref)

    def _beside(self, url: str) -> dict[str, ShardRef]:
        manifest = _manifest_beside(url)
        if manifest is None:
            return {}
        if manifest not in self._listed:
            try:
                self._listed[manifest] = {r.name: r for r in shard_refs(load_manifest(manifest), manifest)}
            except (ValueError, OSError):  # ShardSpecError is a ValueError
                self._listed[manifest] = {}
        return self._listed[manifest]

    def ref(self, shard: RecordedShard) -> ShardRef | str:
        """The shard to read, or one line saying why it cannot be read."""
        ref = self.given.get(shard.name)
        if ref is None:
            if is_pipe(shard.url):
                return (f"shard {shard.name} was read from a command, which the report never runs from a results "
                        "file: pass --shards")
            ref = self._beside(shard.url).get(shard.name) or ShardRef(shard.url, shard.name)
        if shard.sha256 and ref.sha256 is None:
            ref = replace(ref, sha256=shard.sha256)  # checked as the shard streams, as a manifest's would be
        elif shard.sha256 and ref.sha256 != shard.sha256:
            return f"shard {shard.name} at {ref.url} is not the one that was read (its manifest gives another sha256)"
        return ref


def read_recorded(wanted: Mapping[ShardRef, set[str]], notes: Notes, masks: bool = False
                  ) -> dict[tuple[str, str], Sample]:
    """``(shard name, key) -> decoded sample`` for the wanted keys of each shard, read once each.

    A shard's samples count only once it is read to its end and verified (as
    :func:`eval.stream.samples` holds them); one that fails becomes a note.
    """
    from eval.stream import ReadOptions, ShardEnd, iter_shard

    found: dict[tuple[str, str], Sample] = {}
    options = ReadOptions(on_error="skip", decode_masks=masks)
    for ref, keys in wanted.items():
        held: list[Sample] = []
        try:
            for item in iter_shard(ref, options):
                if isinstance(item, ShardEnd):
                    found.update({(ref.name, s.key): s for s in held})
                elif item.key in keys:
                    held.append(item)
        except (StreamError, ValueError, OSError) as exc:
            notes.add(f"challenge gallery: shard {ref.name} ({ref.url}) not read ({_first_line(exc)})")
    return found
