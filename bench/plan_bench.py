"""``python -m bench.plan_bench --records 50000,544000,1281167``: the builder's planning stage at ImageNet scale.

Planning is everything ``builders.make_shards`` does before it builds a
chunk: read the annotation source, probe every image header, apply the
selection filters and class limits, build the partner pools, draw partners
and textures for every variant (``builders.plan.make_plan``), then hash each
chunk of the plan and slice it for the workers. A build runs it once, in one
process, before any parallel work starts, so it is timed here on one core.

Real files for 1.28M images do not fit on a laptop's disk, so each size N is
measured like this, every size in a fresh process (so its peak RSS is its own):

- a LOC-CSV source (the Kaggle ``LOC_train_solution.csv`` format, the
  ``loc-csv`` reader) with one row per image (the real file has 544,546 rows
  for 1,281,167 train images; one row each is the worst case), over
  ``<wnid>/<wnid>_<n>.JPEG`` names that are hard links to the images of a
  small generated tree (``bench.make_tree``): the reader lists, stats and
  parses N real entries, and no image data is copied;
- probes from known headers: the probe's geometry (frame, framed boxes,
  selection filters) runs for every record, the header values come from a
  table read once from the tree (no disk per record);
- the real ``make_shards._build_locked`` with its ``read_inputs``,
  ``probe_all`` and ``make_plan`` timed in place and stopped where the build
  stage starts, so nothing is re-implemented here.

Reading image headers from disk is measured apart, on the real generated
tree (``--probe-files`` images, page cache warm, one worker), and
extrapolated linearly to N; the projected planning time uses it in place of
the header-table probe. Reading VOC XML boxes (``imagenet-val``) is measured
on the same tree and extrapolated to the 50,000 val images.

Target: planning 1,281,167 records in under 2 minutes on one core and under
4 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bgcheck-bench-trees"
TARGET_RECORDS = 1_281_167
TARGET_SECONDS = 120.0
TARGET_RSS_MIB = 4096.0
VAL_IMAGES = 50_000
STAGES = ("read", "probe", "plan", "prep")
STAGE_HELP = {
    "read": "read_inputs: the loc-csv reader over N names and N CSV rows",
    "probe": "probe geometry for every record from known headers (no disk)",
    "plan": "make_plan: filters, class limits, pools, partners and textures for every variant",
    "prep": "make_shards from the plan to its first build job: chunk hashes, per-chunk slices of the plan",
}
CSV_NAME = "LOC_train_solution.csv"
PROBE_BATCH = 512  # make_shards.probe_all's batch


class BenchError(ValueError):
    """Bad options; reported as one line with exit code 2."""


class _PrepStopped(Exception):
    """Raised when the prep stage runs past --prep-limit: its time is then a lower bound."""


def _stop_prep(signum: int, frame: object) -> None:
    raise _PrepStopped


class _BuildReached(Exception):
    """Raised where make_shards starts its first build job: the planning stage is over."""


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


# --------------------------------------------------------------------------- the real tree: headers and rates


def tree_headers(images: Path, boxes: Path) -> list[dict]:
    """Per generated image, in key order: its header (size, orientation, stamp) and its VOC box numbers."""
    from builders.plan import file_stamp
    from pipeline.decode import SOURCE_FORMATS, exif_transpose_code, open_image
    from pipeline.sources.voc import parse_voc_xml

    rows = []
    for path in sorted(images.iterdir()):
        with open(path, "rb") as fh:
            img = open_image(fh, formats=SOURCE_FORMATS)
            size, orientation = img.size, exif_transpose_code(img)
            stamp = file_stamp(os.fstat(fh.fileno()))
        voc = parse_voc_xml((boxes / "val" / f"{path.stem}.xml").read_bytes())
        rows.append({"path": str(path), "size": list(size), "orientation": orientation, "stamp": stamp,
                     "boxes": [list(corners) for _, corners in voc.objects]})
    return rows


def measure_tree(images: Path, boxes: Path, variants: tuple[str, ...]) -> dict:
    """Header probes and VOC XML reading on the real tree, the builder's own code, one worker."""
    from builders.config import BuildConfig
    from builders.make_shards import probe_all, read_inputs
    from builders.plan import Probe

    config = BuildConfig(variants=variants, source="imagenet-val", images=str(images), annotations=str(boxes),
                         out=str(images.parent / "unused-out"), workers=1).validate()
    for path in images.iterdir():  # warm the page cache: the rate is the builder's, not the disk's
        path.read_bytes()
    started = time.perf_counter()
    items = read_inputs(config)
    read_s = time.perf_counter() - started
    probe_s = math.inf
    for _ in range(2):  # the first pass also pays for one-time set-up (plugin imports): keep the faster
        started = time.perf_counter()
        probes = probe_all(config, items, progress=False)
        probe_s = min(probe_s, time.perf_counter() - started)
    if not probes or not all(isinstance(p, Probe) for p in probes.values()):
        raise RuntimeError("the generated tree has images the probe rejects")
    return {
        "files": len(probes),
        "voc_read_s": read_s,
        "voc_read_per_s": len(items) / read_s,
        "probe_s": probe_s,
        "probe_per_s": len(probes) / probe_s,
        "how": f"builder's read_inputs (imagenet-val, XML folder) and probe_all (workers=1) on {len(probes)} "
        "generated 500x375/640x480 JPEGs, page cache warm, faster of two passes; extrapolated linearly",
    }


# --------------------------------------------------------------------------- the source at size N


def source_dir(cache: Path, n: int, headers: list[dict]) -> Path:
    return cache / f"plan-n{n}-p{len(headers)}"


def make_source(cache: Path, n: int, headers: list[dict]) -> tuple[Path, Path, float]:
    """N train-style names (hard links into the tree) and a LOC CSV with one row each; cached like make_tree."""
    from pipeline.classes import imagenet_classes

    root = source_dir(cache, n, headers)
    images, csv_path = root / "train", root / CSV_NAME
    done = root / "DONE"
    if done.exists():
        return images, csv_path, 0.0
    started = time.perf_counter()
    wnids = imagenet_classes().wnids
    for wnid in wnids[: min(n, len(wnids))]:
        (images / wnid).mkdir(parents=True, exist_ok=True)
    tmp_csv = csv_path.with_suffix(".tmp")
    with open(tmp_csv, "w", newline="") as out:
        out.write("ImageId,PredictionString\n")
        for i in range(n):
            wnid = wnids[i % len(wnids)]
            key = f"{wnid}_{i + 1}"
            head = headers[i % len(headers)]
            target = images / wnid / f"{key}.JPEG"
            if not target.exists():
                try:
                    os.link(head["path"], target)
                except OSError:  # another filesystem, or the link limit of an inode
                    os.symlink(head["path"], target)
            boxes = " ".join(f"{wnid} " + " ".join(str(int(v)) for v in box) for box in head["boxes"])
            out.write(f"{key},{boxes} \n")
    os.replace(tmp_csv, csv_path)
    done.write_text(f"{n} names over {len(headers)} images\n")
    return images, csv_path, time.perf_counter() - started


# --------------------------------------------------------------------------- one size, in its own process


def measure_size(spec: dict) -> dict:
    """Plan N records with the builder's own code, timing each stage; called in a fresh process."""
    import builders.make_shards as make_shards
    from builders.config import BuildConfig
    from builders.plan import probe_header
    from pipeline.records import SourceRecord, gc_paused

    headers = spec["headers"]
    config = BuildConfig(
        variants=tuple(spec["variants"]), source="loc-csv", images=spec["images"], annotations=spec["csv"],
        out=spec["out"], workers=1, per_class=spec["per_class"], partner_level=spec["partner_level"],
    ).validate()
    baseline = current_rss_mib()
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    peaks: dict[str, float] = {}
    counts: dict[str, int] = {}
    clock = {"t": 0.0, "cpu": 0.0}
    real_read, real_plan = make_shards.read_inputs, make_shards.make_plan

    def timed(stage: str, value):
        seconds[stage] = time.perf_counter() - clock["t"]
        cpu[stage] = time.process_time() - clock["cpu"]
        peaks[stage] = peak_rss_mib()
        clock["t"], clock["cpu"] = time.perf_counter(), time.process_time()
        return value

    def read_inputs(cfg):
        clock["t"], clock["cpu"] = time.perf_counter(), time.process_time()
        items = timed("read", real_read(cfg))
        counts["inputs"] = len(items)
        counts["records"] = sum(isinstance(r, SourceRecord) for r in items)
        return items

    def probe_all(cfg, items, progress):
        # as make_shards.probe_all: batches of 512, each probed like probe_batch (collection paused)
        records = [r for r in items if isinstance(r, SourceRecord)]
        probes = {}
        for start in range(0, len(records), PROBE_BATCH):
            with gc_paused():
                for r in records[start : start + PROBE_BATCH]:
                    head = headers[(int(r.key.rsplit("_", 1)[1]) - 1) % len(headers)]
                    probes[r.key] = probe_header(r, tuple(head["size"]), head["orientation"], head["stamp"], cfg)
        return timed("probe", probes)

    def make_plan(items, cfg, probes):
        if not spec["tracemalloc"]:
            plan = real_plan(items, cfg, probes)
        else:
            import tracemalloc

            tracemalloc.start()
            try:
                plan = real_plan(items, cfg, probes)
                counts["plan_tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        timed("plan", None)
        counts["planned"] = len(plan.inputs)
        counts["assignments"] = sum(len(a) for a in plan.assignments.values())
        counts["chunks"] = len(plan.chunks())
        if spec["prep_limit_s"]:
            signal.signal(signal.SIGALRM, _stop_prep)
            signal.setitimer(signal.ITIMER_REAL, spec["prep_limit_s"])
        clock["t"], clock["cpu"] = time.perf_counter(), time.process_time()  # the counting above is no stage
        return plan

    def run_jobs(cfg, calls, weights, desc, progress):
        signal.setitimer(signal.ITIMER_REAL, 0)
        if desc == "plan":
            raise RuntimeError("make_shards probed without probe_all")
        counts["build_calls"] = len(calls)
        timed("prep", None)
        raise _BuildReached

    patched = {"read_inputs": read_inputs, "probe_all": probe_all, "make_plan": make_plan, "run_jobs": run_jobs}
    saved = {name: getattr(make_shards, name) for name in patched}
    started = time.perf_counter()
    try:
        for name, fn in patched.items():
            setattr(make_shards, name, fn)
        make_shards.build(config, progress=False)  # its notes go to stderr, which the parent discards
    except _BuildReached:
        counts["prep_complete"] = 1
    except _PrepStopped:
        timed("prep", None)
        counts["prep_complete"] = 0
    else:
        raise RuntimeError("make_shards finished without reaching the build stage")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for name, fn in saved.items():
            setattr(make_shards, name, fn)
    total = time.perf_counter() - started
    return {
        "n": spec["n"], "seconds": seconds, "cpu_seconds": cpu, "wall_s": total, "peak_rss_mib_after": peaks,
        "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline, "counts": counts,
    }


def run_size(spec: dict, in_process: bool) -> dict:
    if in_process:
        return measure_size(spec)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run([sys.executable, "-m", "bench.plan_bench", "--one", fh.name],
                              cwd=root, capture_output=True, text=True)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"planning {spec['n']} records failed: {tail[0]}")
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- the whole benchmark


def summarise(row: dict, rates: dict, setup_s: float) -> dict:
    s, n = row["seconds"], row["n"]
    planned = row["counts"]["records"]
    probe_files_s = planned / rates["probe_per_s"]
    measured = sum(s[k] for k in STAGES)
    projected = measured - s["probe"] + probe_files_s
    return {
        "records": n,
        "planned": row["counts"]["planned"],
        "seconds": {k: s[k] for k in STAGES},
        "cpu_seconds": {k: row["cpu_seconds"][k] for k in STAGES},
        "probe_files_s_extrapolated": probe_files_s,
        "planning_s_measured": measured,
        "planning_s_projected": projected,
        "records_per_s": n / projected,
        "prep_complete": bool(row["counts"]["prep_complete"]),
        "stage_records_per_s": {k: n / max(s[k], 1e-9) for k in STAGES},
        "peak_rss_mib": row["peak_rss_mib"],
        "peak_rss_mib_after": row["peak_rss_mib_after"],
        "baseline_rss_mib": row["baseline_rss_mib"],
        "counts": row["counts"],
        "source_setup_s": setup_s,
    }


def run_bench(
    records: list[int],
    *,
    probe_files: int = 2000,
    variants: tuple[str, ...] | None = None,
    per_class: int | None = None,
    partner_level: str = "class",
    cache: Path = DEFAULT_CACHE,
    use_tracemalloc: bool = False,
    prep_limit_s: float | None = None,
    in_process: bool = False,
    log=print,
) -> dict:
    from bench.make_tree import make_tree
    from pipeline.variants import VARIANTS

    variants = tuple(variants or VARIANTS)
    cache = Path(cache)
    log(f"tree: {probe_files} generated images (cached under {cache})")
    images, boxes = make_tree(cache, probe_files, n_classes=1000, workers=1)
    headers = tree_headers(images, boxes)
    rates = measure_tree(images, boxes, variants)
    log(f"header probe: {rates['probe_per_s']:.0f} files/s; VOC XML read: {rates['voc_read_per_s']:.0f} files/s")
    sizes = {}
    for n in records:
        log(f"source: {n} names + {n} CSV rows")
        src_images, csv_path, setup_s = make_source(cache, n, headers)
        with tempfile.TemporaryDirectory(prefix="plan-bench-out-") as out:
            spec = {"n": n, "headers": headers, "images": str(src_images), "csv": str(csv_path), "out": out,
                    "variants": list(variants), "per_class": per_class, "partner_level": partner_level,
                    "tracemalloc": use_tracemalloc, "prep_limit_s": prep_limit_s}
            log(f"planning {n} records ({len(variants)} variants, one core)")
            row = summarise(run_size(spec, in_process), rates, setup_s)
        sizes[str(n)] = row
        log(f"  {row['planning_s_projected']:.1f} s projected, peak RSS {row['peak_rss_mib']:.0f} MiB")
    largest = sizes[str(max(records))]
    return {
        "config": {"variants": list(variants), "per_class": per_class, "partner_level": partner_level,
                   "workers": 1, "source": "loc-csv"},
        "method": {
            "source": f"{CSV_NAME} format, one row per image, over <wnid>/<wnid>_<n>.JPEG hard links to the "
            f"{probe_files} generated images",
            "probe": "stage 'probe' runs the probe's geometry from known headers; "
            "probe_files_s_extrapolated = planned records / the header probe rate measured on the real tree, "
            "and replaces it in planning_s_projected",
            "peak_rss": "ru_maxrss of a fresh process per size (imports included)",
            "stages": STAGE_HELP,
        },
        "tree": rates,
        "val_voc_read_s_extrapolated": VAL_IMAGES / rates["voc_read_per_s"],
        "sizes": sizes,
        "target": {
            "records": largest["records"],
            "seconds": largest["planning_s_projected"],
            "peak_rss_mib": largest["peak_rss_mib"],
            "limit_s": TARGET_SECONDS,
            "limit_rss_mib": TARGET_RSS_MIB,
            "pass": largest["planning_s_projected"] < TARGET_SECONDS and largest["peak_rss_mib"] < TARGET_RSS_MIB
            and largest["prep_complete"],
            "at_target_size": largest["records"] >= TARGET_RECORDS,
        },
    }


def format_table(results: dict) -> str:
    head = f"{'records':>9} {'read s':>7} {'probe s':>8} {'(files s)':>9} {'plan s':>7} {'prep s':>7} " \
           f"{'total s':>8} {'rec/s':>8} {'peak MiB':>9}"
    lines = [head, "-" * len(head)]
    for row in results["sizes"].values():
        s, at_least = row["seconds"], " " if row["prep_complete"] else ">"
        lines.append(
            f"{row['records']:>9} {s['read']:>7.1f} {s['probe']:>8.1f} {row['probe_files_s_extrapolated']:>9.1f} "
            f"{s['plan']:>7.1f} {at_least}{s['prep']:>6.1f} {at_least}{row['planning_s_projected']:>7.1f} "
            f"{row['records_per_s']:>8.0f} {row['peak_rss_mib']:>9.0f}"
        )
    t, tree = results["target"], results["tree"]
    lines.append(
        f"total = read + probe from files (extrapolated: {tree['probe_per_s']:.0f} files/s on {tree['files']} real "
        f"JPEGs) + plan + prep; probe s = geometry from known headers"
    )
    if not all(row["prep_complete"] for row in results["sizes"].values()):
        lines.append("> : prep stopped at --prep-limit, so the figure is a lower bound")
    lines.append(f"VOC XML read (imagenet-val): {tree['voc_read_per_s']:.0f} files/s, "
                 f"{results['val_voc_read_s_extrapolated']:.1f} s for {VAL_IMAGES} val images (extrapolated)")
    verdict = "PASS" if t["pass"] else "MISS"
    note = "" if t["at_target_size"] else f" (below the target size {TARGET_RECORDS})"
    lines.append(f"target: {t['records']} records in < {t['limit_s']:.0f} s and < {t['limit_rss_mib']:.0f} MiB: "
                 f"{t['seconds']:.1f} s, {t['peak_rss_mib']:.0f} MiB -> {verdict}{note}")
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_records(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--records {text!r}: expected comma-separated whole numbers") from None
    if not values or min(values) < 1:
        raise BenchError("--records needs at least one size >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan_bench", description=__doc__.splitlines()[0])
    p.add_argument("--records", default="50000,544000,1281167", help="sizes N, comma-separated")
    p.add_argument("--quick", action="store_true", help="smoke run: 2000 records, a 200-image tree")
    p.add_argument("--probe-files", type=int, default=2000, help="generated images to probe for real (default 2000)")
    p.add_argument("--variant", action="append", help="variants to plan (repeatable; default all)")
    p.add_argument("--per-class", type=int, help="class limit, as make_shards --per-class")
    p.add_argument("--partner-level", choices=["class", "in9"], default="class")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where trees and sources are cached")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also report the Python-heap peak of make_plan (slows planning several-fold)")
    p.add_argument("--prep-limit", type=float, default=600.0, metavar="S",
                   help="stop the prep stage (make_shards, not the planner) after S seconds and report that "
                   "as a lower bound (default 600; 0 = no limit)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one size from this spec file
    args = p.parse_args(argv)
    if args.one:
        spec = json.loads(Path(args.one).read_text())
        print(json.dumps(measure_size(spec)))
        return 0
    try:
        records = [2000] if args.quick else parse_records(args.records)
        probe_files = 200 if args.quick else args.probe_files
        if probe_files < 1:
            raise BenchError("--probe-files must be at least 1")
        if args.prep_limit < 0:
            raise BenchError("--prep-limit must be >= 0")
        if args.per_class is not None and args.per_class < 1:
            raise BenchError("--per-class must be at least 1")
        from pipeline.variants import VARIANTS

        variants = tuple(v for arg in args.variant or [] for v in arg.split(",")) or None
        if variants and set(variants) - set(VARIANTS):
            raise BenchError(f"unknown variant(s) {', '.join(sorted(set(variants) - set(VARIANTS)))}")
    except BenchError as exc:
        print(f"plan_bench: error: {exc}", file=sys.stderr)
        return 2
    results = run_bench(records, probe_files=probe_files, variants=variants, per_class=args.per_class,
                        partner_level=args.partner_level, cache=Path(args.cache),
                        use_tracemalloc=args.tracemalloc, prep_limit_s=args.prep_limit or None, log=_log)
    text = json.dumps(results, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
