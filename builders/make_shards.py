"""``python -m builders.make_shards``: ImageNet images + boxes/masks -> variant shards.

Plan first (filters, partners, textures, rejections), then build shard by
shard in parallel (joblib: loky locally, or an existing Dask cluster), then
write one manifest per variant. Rerunning the same command skips the shards
that are already complete and valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import builders.version
from builders import partner_cache
from builders.config import BuildConfig, ConfigError, list_recipes, load_recipe
from builders.jobs import run_jobs
from builders.plan import Plan, annotation_line, hash_lines, make_plan, probe_batch
from builders.shards import (
    BUILD_DIR,
    ShardResult,
    build_chunk,
    completion_path,
    read_completion,
)
from pipeline.classes import to_in9
from pipeline.cli import OneLineParser
from pipeline.files import atomic_write_text, remove_temporaries
from pipeline.frame import FRAME_INTERPOLATIONS
from pipeline.locks import FolderBusy, exclusive
from pipeline.masks import MASK_SOURCES
from pipeline.records import Rejection, SourceRecord
from pipeline.shard_format.manifest import Manifest, RejectedFile, ShardEntry, Totals, timm_info
from pipeline.shard_format.spec import IMAGE_CODECS, MANIFEST_NAME, REJECTED_NAME, TIMM_INFO_NAME, shard_name
from pipeline.sources import READERS, SourceError
from pipeline.variants import FILLS, VARIANTS


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m builders.make_shards",
        description="Build background-variant WebDataset shards (Background Check / ImageNet-9) "
        "from ImageNet-style images and boxes or masks. With no --source, builds the embedded demo.",
    )
    p.add_argument("--variant", action="append", metavar="ID",
                   help=f"variant to build (repeatable, or 'all'): {', '.join(VARIANTS)}. Default mixed_rand")
    p.add_argument("--recipe", help=f"JSON build config (file, or built-in name: {', '.join(list_recipes())}); "
                   "command-line options override it")
    p.add_argument("--source", choices=list(READERS),
                   help="input layout (default demo): "
                   + "; ".join(f"{kind}: {spec.description}" for kind, spec in READERS.items()))
    p.add_argument("--images", help="image folder (val: flat; train: <wnid>/ subfolders)")
    p.add_argument("--annotations", help="boxes/masks: VOC XML folder or .tgz, LOC_*_solution.csv, COCO JSON, "
                   "or a PNG mask folder")
    p.add_argument("--category-map", help="coco: JSON mapping category id/name -> ImageNet wnid; "
                   "mask-dir: JSON mapping ImageNet-S class id -> wnid (foreground = the image's own class)")
    p.add_argument("--out", help="output folder (default ./shards)")
    p.add_argument("--size", type=int, help="frame size after the centre crop (default 224)")
    p.add_argument("--resize", type=int, help="shorter side before the crop (default 256)")
    p.add_argument("--interpolation", choices=list(FRAME_INTERPOLATIONS),
                   help="resampling for the frame resize (default bilinear, antialiased)")
    p.add_argument("--mask", choices=list(MASK_SOURCES), help="foreground mask source (default box)")
    p.add_argument("--fill", choices=list(FILLS), help="fill for only_fg/only_bg_b/no_fg (default black)")
    p.add_argument("--textures", help="folder of texture images for 'texture' (default: built-in procedural set)")
    p.add_argument("--classes", help="all | in9 | FILE of wnids or class indices (default all)")
    p.add_argument("--per-class", type=int, help="keep at most N images per class (seeded choice)")
    p.add_argument("--partner-level", choices=["class", "in9"],
                   help="class relation for mixed_same/mixed_next (default class; the imagenet9 recipe uses in9)")
    p.add_argument("--exactly-one-box", action="store_true", default=None, help="NoS filter: drop images with >1 box")
    p.add_argument("--max-box-fraction", type=float,
                   help="background-only variants: drop boxes covering more of the frame (default 0.9; 1 = off)")
    p.add_argument("--max-box-cropped", type=float,
                   help="drop images whose box loses at least this fraction to the crop (default 0.5; 1 = off)")
    p.add_argument("--seed", type=int, help="seed for partners, textures and noise fills (default 0)")
    p.add_argument("--workers", type=int, help="parallel workers (default 1)")
    p.add_argument("--backend", choices=["loky", "dask"], help="joblib backend (default loky)")
    p.add_argument("--scheduler", help="Dask scheduler address tcp://HOST:PORT (with --backend dask)")
    p.add_argument("--shard-size", type=int, help="source images per shard (default 1000)")
    p.add_argument("--format", choices=list(IMAGE_CODECS), help="image encoding (default jpg)")
    p.add_argument("--quality", type=int, help="JPEG/WebP quality (default 95)")
    p.add_argument("--with-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="also store <key>.mask.png (default: on for --source demo, so the Backgrounds Challenge runs "
                   "on it out of the box; off otherwise)")
    p.add_argument("--partner-cache-limit", type=float, metavar="GB",
                   help="disk the mixed variants may use for framed sources under <out>/.partner-cache, so each "
                   "source is decoded once per build (default 16; 0 = off; removed when the build ends; with "
                   "--backend dask every worker must see --out, as it must anyway); a larger cache, or one the "
                   "disk has no room for, falls back to decoding partners again in each shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[BuildConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)

    values: dict = {}
    if args.recipe:
        values.update(load_recipe(args.recipe))
        values["recipe"] = args.recipe
    for f in fields(BuildConfig):  # every option is a BuildConfig field of the same name
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    for name in ("max_box_fraction", "max_box_cropped"):
        if values.get(name) is not None and values[name] >= 1:
            values[name] = None
    if args.variant:
        chosen: list[str] = []
        for v in args.variant:
            for part in v.split(","):
                chosen.extend(VARIANTS if part == "all" else [part])
        values["variants"] = tuple(dict.fromkeys(chosen))
    if values.get("with_masks") is None and values.get("source", BuildConfig.source) == "demo":
        values["with_masks"] = True  # the challenge's foregrounds need them; the demo is small
    known = {f.name for f in fields(BuildConfig)}
    config = replace(BuildConfig(), **{k: v for k, v in values.items() if k in known})
    if "variants" in values:
        config = replace(config, variants=tuple(config.variants))
    return config.validate(), args


def read_inputs(config: BuildConfig) -> list[SourceRecord | Rejection]:
    from pipeline.sources import read_source

    # the reader's options that are also build options (e.g. category_map) come from the config
    options = {name: getattr(config, name) for name in READERS[config.source].options if getattr(config, name, None)}
    return list(read_source(config.source, config.images, config.annotations, **options))


def probe_all(config: BuildConfig, items: list, progress: bool) -> dict:
    import joblib

    records = [r for r in items if isinstance(r, SourceRecord)]
    batch = 512
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    calls = [joblib.delayed(probe_batch)(b, config) for b in batches]
    out = run_jobs(config, calls, [len(b) for b in batches], "plan", progress)
    probes = {}
    for b, result in zip(batches, out, strict=True):
        for record, probe in zip(b, result, strict=True):
            probes[record.key] = probe
    return probes


def versions() -> dict:
    import numpy
    import PIL

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "pillow": PIL.__version__}
    try:
        from PIL import features

        out["libjpeg_turbo"] = features.version("libjpeg_turbo")
    except Exception:
        pass
    for name in ("webdataset", "pycocotools", "joblib"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            pass
    try:
        from importlib.metadata import version

        out["bgcheck"] = version("bgcheck")
    except Exception:
        out["bgcheck"] = "source"
    return out


def note_on_stderr(message: str) -> None:
    print(f"make_shards: {message}", file=sys.stderr, flush=True)


def build(config: BuildConfig, progress: bool = True,
          note: Callable[[str], None] = note_on_stderr) -> dict[str, Manifest]:
    """Plan, build missing shards, write manifests; one build at a time per ``--out``.

    ``note`` receives the one-line remarks a build makes on the way (the
    partner cache's size, or why it is off).
    """
    out = Path(config.out)
    with exclusive(out, "build"):
        return _build_locked(config, out, progress, note)


def _build_locked(config: BuildConfig, out: Path, progress: bool, note: Callable[[str], None]) -> dict[str, Manifest]:
    items = read_inputs(config)
    if not items:
        raise ConfigError("no input images found")
    probes = probe_all(config, items, progress)
    plan = make_plan(items, config, probes)
    chunks = plan.chunks()
    dropped = {v: {r.key for r in plan.variant_rejections[v]} for v in config.variants}

    done: dict[tuple[str, int], ShardResult] = {}
    todo: list[tuple[int, list[str]]] = []
    lines = AnnotationLines()
    digests = [hash_lines(map(lines.of, chunk)) for chunk in chunks]
    hashes = {(v, i): chunk_hash(config, plan, v, chunk, dropped[v], digests[i], lines)
              for i, chunk in enumerate(chunks) for v in config.variants}
    for index in range(len(chunks)):
        missing = []
        for v in config.variants:
            prior = read_completion(out / v, shard_name(v, index), hashes[(v, index)])
            if prior is None:
                missing.append(v)
            else:
                done[(v, index)] = prior
        if missing:
            todo.append((index, missing))
    _clear_stale(out, config, len(chunks))
    partner_cache.clear_temporary(out)

    def call(index: int, variants: list[str], cache_hash: str | None = None,
             read_from: partner_cache.CachePlan | None = None):  # a joblib delayed call
        import joblib

        chunk = chunks[index]
        keys = {r.key for r in chunk}
        # looked up per record of the chunk: a scan of the whole plan per chunk is quadratic in the dataset
        assignments = {v: {r.key: a for r in chunk if (a := plan.assignments[v].get(r.key)) is not None}
                       for v in variants}
        partners = {
            a.bg_key: plan.partners[a.bg_key] for per in assignments.values() for a in per.values() if a.bg_key
        }
        chunk_dropped = {v: dropped[v] & keys for v in variants}
        loader = read_from.loader(config, [*keys, *partners]) if read_from is not None else None
        return joblib.delayed(build_chunk)(
            index, chunk, variants, config, assignments, chunk_dropped, partners,
            {v: hashes[(v, index)] for v in variants}, cache_hash=cache_hash, cached=loader,
        )

    cache = partner_cache.plan_cache(config, plan, chunks, todo, out, note)
    if cache is None:
        passes = [[(index, variants, call(index, variants)) for index, variants in todo]]
    else:
        passes = [cache.first_pass(todo, call), cache.second_pass(todo, call)]
    for name, jobs in zip(("build", "mixed"), passes, strict=False):
        if not jobs:
            continue
        built = run_jobs(config, [c for _, _, c in jobs], [len(chunks[i]) for i, _, _ in jobs], name, progress)
        for (index, _, _), results in zip(jobs, built, strict=True):
            for res in results:
                done[(res.variant, index)] = res
    partner_cache.remove(out)  # every shard is complete: nothing will read it again
    manifests = {}
    for v in config.variants:
        shards = [done[(v, i)] for i in range(len(chunks))]
        manifests[v] = write_manifest(out / v, v, config, plan, shards)
    empty = [v for v, m in manifests.items() if not m.totals.samples]
    if empty:
        reasons = manifests[empty[0]].rejected_reasons or {}
        top = max(reasons.items(), key=lambda kv: kv[1]) if reasons else ("none", 0)
        raise ConfigError(
            f"no sample accepted for {', '.join(empty)}: {plan.n_inputs} input(s), most often rejected as "
            f"{top[0]} ({top[1]}); see {out / empty[0] / REJECTED_NAME}"
        )
    return manifests


class AnnotationLines(dict):
    """Each record's :func:`builders.plan.annotation_line`, made once per build (chunks and partners share them)."""

    def of(self, record: SourceRecord) -> str:
        line = self.get(record.key)
        if line is None:
            line = self[record.key] = annotation_line(record)
        return line


def chunk_hash(config: BuildConfig, plan: Plan, variant: str, chunk: list[SourceRecord], dropped_keys: set[str],
               chunk_digest: str, lines: AnnotationLines) -> str:
    """What one shard is built from: the variant's config plus its chunk of the plan.

    A rerun keeps a finished shard only if this matches, so changed inputs
    (annotations, or the files themselves: their size and modification time),
    partners or textures rebuild the shards they touch instead of publishing
    shards written from an older plan. ``dropped_keys`` are the variant's
    rejected keys (the whole plan's: looked up, never scanned, per chunk);
    ``chunk_digest`` is the chunk's annotation hash, the same for every variant.
    """
    keys = [r.key for r in chunk]
    dropped = sorted(k for k in keys if k in dropped_keys)
    assignments = plan.assignments[variant]
    chosen = [(k, [a.bg_key, a.bg_label, a.texture] if (a := assignments.get(k)) is not None else None) for k in keys]
    partners = sorted({a[0] for _, a in chosen if a and a[0]})
    textures = sorted({a[2] for _, a in chosen if a and a[2]})
    files = [plan.stamps.get(k) for k in (*keys, *partners)] + [plan.stamps.get(f"texture:{t}") for t in textures]
    payload = json.dumps(
        [config.variant_hash(variant), chunk_digest, dropped, chosen,
         hash_lines(lines.of(plan.partners[k]) for k in partners), files],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _clear_stale(out: Path, config: BuildConfig, n_chunks: int) -> None:
    """Remove temporary files of killed runs and shards beyond this plan's count (the build holds the lock)."""
    for v in config.variants:
        folder = out / v
        if not folder.is_dir():
            continue
        remove_temporaries(folder)
        remove_temporaries(folder / BUILD_DIR)
        index = n_chunks
        while (folder / shard_name(v, index)).exists():
            (folder / shard_name(v, index)).unlink()
            completion_path(folder, shard_name(v, index)).unlink(missing_ok=True)
            index += 1


def write_manifest(folder: Path, variant: str, config: BuildConfig, plan: Plan, shards: list[ShardResult]) -> Manifest:
    """manifest.json, rejected.jsonl and _info.json for one variant; accepted + rejected = inputs."""
    rejected = [r.to_json() for r in plan.rejections]
    rejected += [r.to_json() for r in plan.variant_rejections[variant]]
    for s in shards:
        rejected.extend(s.rejections)
    rejected.sort(key=lambda r: r["key"])
    histogram: dict[str, int] = {}
    for s in shards:
        for label, n in s.labels.items():
            histogram[label] = histogram.get(label, 0) + n
    total = sum(s.count for s in shards)
    if total + len(rejected) != plan.n_inputs:
        raise RuntimeError(
            f"{variant}: {total} accepted + {len(rejected)} rejected != {plan.n_inputs} inputs (internal error)"
        )
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    rejected_text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected)
    manifest = Manifest(
        variant=variant,
        builder_version=builders.version.BUILDER_VERSION,
        config=config.output_config(),
        config_hash=config.variant_hash(variant),
        seed=config.seed,
        versions=versions(),
        source={"kind": config.source, "annotation_sha256": plan.source_hash, "inputs": plan.n_inputs},
        textures=tuple(plan.textures) if plan.textures and variant == "texture" else None,
        shards=tuple(ShardEntry(s.name, s.sha256, s.nbytes, s.count) for s in shards),
        totals=Totals(total, len(shards), sum(s.nbytes for s in shards), plan.n_inputs, len(rejected)),
        class_histogram=dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
        rejected_reasons=dict(sorted(reasons.items())),
        rejected=RejectedFile(REJECTED_NAME, hashlib.sha256(rejected_text.encode()).hexdigest(), len(rejected)),
    )
    in9_lengths = [sum(n for label, n in s.labels.items() if to_in9(int(label)) >= 0) for s in shards]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / REJECTED_NAME, rejected_text)
    atomic_write_text(folder / TIMM_INFO_NAME, json.dumps(timm_info(manifest, in9_lengths), indent=1) + "\n")
    atomic_write_text(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = parse_args(argv)
    except ConfigError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    started = time.time()
    try:
        manifests = build(config, progress=progress)
    except (ConfigError, SourceError, FolderBusy, RuntimeError) as exc:
        print(f"make_shards: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_shards: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"make_shards: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    elapsed = time.time() - started
    for v, m in manifests.items():
        t = m.totals
        print(f"{v:>11}: {t.samples} samples in {t.shards} shard(s), {t.rejected} rejected "
              f"-> {Path(config.out) / v}")
    n = max(m.source["inputs"] for m in manifests.values())
    print(f"{n} inputs, {len(manifests)} variant(s) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
