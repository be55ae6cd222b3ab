"""``python -m bench.scale_build --n 50000 --workers 2``: full recipe builds at the size of ImageNet val.

Generates (or reuses) an ImageNet-shaped val tree of ``--n`` photo-like
JPEGs with VOC boxes over the 1000 classes (``bench.make_tree``), then runs
each recipe exactly as a user would::

    python -m builders.make_shards --recipe background_check --source imagenet-val \\
        --images TREE/val --annotations TREE/ILSVRC2012_bbox_val_v3 --out OUT --workers 2 --no-progress

and reports, per recipe: wall time (plan included), sources accepted,
images/s per core (accepted sources over wall time and workers), CPU
seconds, peak RSS summed over the builder and its workers, and the samples
and bytes on disk of every variant (from its manifest). The same recipe on
a ``--baseline-n`` tree gives the RSS growth from 1k sources to ``--n``.

From these it projects ImageNet builds (val: 50,000 images, all with boxes;
train: the 544,546 images that have boxes) on 16 and 64 cores and on a Dask
cluster: time = plan time (``bench.plan_bench``, one core, given with
``--plan-s-per-million``) + sources accepted at the measured fraction /
(images/s per core x cores). Chunks are independent, so the build part
scales with cores (2 workers reach ~1.85x one); what does not is the plan,
the filesystem and, on Dask, the shared storage, whose load the projection
states in MB/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.builder_bench import measure_process

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bgcheck-bench-trees"
RECIPES = ("background_check", "imagenet9")
IMAGENET = {"val": 50_000, "train_with_boxes": 544_546}
CORES = (16, 64)


def variant_bytes(out: Path) -> dict[str, dict[str, Any]]:
    """Samples and bytes on disk of every variant built under ``out`` (its manifest's shards)."""
    from pipeline.shard_format import load_manifest

    rows = {}
    for manifest_path in sorted(out.glob("*/manifest.json")):
        manifest = load_manifest(manifest_path)
        nbytes = sum(s.nbytes for s in manifest.shards)
        samples = sum(s.count for s in manifest.shards)
        rows[manifest_path.parent.name] = {
            "samples": samples, "bytes": nbytes, "kb_per_sample": round(nbytes / max(samples, 1) / 1e3, 2),
        }
    return rows


def build_recipe(recipe: str, images: Path, boxes: Path, out: Path, workers: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "builders.make_shards", "--recipe", recipe, "--source", "imagenet-val",
           "--images", str(images), "--annotations", str(boxes), "--out", str(out), "--workers", str(workers),
           "--no-progress"]
    measured = measure_process(cmd, poll_s=0.25)
    variants = variant_bytes(out)
    accepted = max(row["samples"] for row in variants.values()) if variants else 0
    notes = [line for line in measured.pop("stderr").splitlines() if line.startswith("make_shards:")]
    return {**measured, "command": " ".join(["python", *cmd[1:]]), "sources_accepted": accepted,
            "images_per_s_per_core": round(accepted / measured["seconds"] / workers, 2),
            "bytes_total": sum(v["bytes"] for v in variants.values()), "variants": variants, "notes": notes}


def project(row: dict[str, Any], n_tree: int, plan_s_per_million: float) -> dict[str, Any]:
    """Minutes for ImageNet val and train on 16 and 64 cores (plan on one core), and the write load it implies."""
    from builders.config import BuildConfig
    from builders.partner_cache import total_bytes

    rate = row["images_per_s_per_core"]
    fraction = row["sources_accepted"] / n_tree
    per_source_bytes = row["bytes_total"] / max(row["sources_accepted"], 1)
    out: dict[str, Any] = {"accepted_fraction": round(fraction, 4)}
    for split, n_images in IMAGENET.items():
        accepted = n_images * fraction
        plan_s = plan_s_per_million * n_images / 1e6
        for cores in CORES:
            build_s = accepted / (rate * cores)
            out[f"{split}_{cores}_cores_min"] = round((plan_s + build_s) / 60, 1)
            out[f"{split}_{cores}_cores_write_mb_s"] = round(accepted * per_source_bytes / build_s / 1e6, 1)
        out[f"{split}_partner_cache_gb"] = round(total_bytes(round(accepted), BuildConfig().size) / 1e9, 1)
    return out


def run_bench(n: int, baseline_n: int, workers: int, recipes: tuple[str, ...], cache: Path, work: Path,
              plan_s_per_million: float, log=print) -> dict[str, Any]:
    from bench.make_tree import make_tree

    results: dict[str, Any] = {"n": n, "baseline_n": baseline_n, "workers": workers, "recipes": {}}
    log(f"tree n={n} under {cache} (reused when present)")
    big = make_tree(cache, n, workers=workers, progress=sys.stderr.isatty())
    small = make_tree(cache, baseline_n, workers=workers) if baseline_n else None
    for recipe in recipes:
        log(f"{recipe}: building {n} sources on {workers} workers")
        row = build_recipe(recipe, *big, work / recipe, workers)
        shutil.rmtree(work / recipe, ignore_errors=True)
        if small is not None:
            base = build_recipe(recipe, *small, work / f"{recipe}-baseline", workers)
            shutil.rmtree(work / f"{recipe}-baseline", ignore_errors=True)
            row["baseline_peak_rss_mib"] = base["peak_rss_mib"]
            row["rss_growth"] = round(row["peak_rss_mib"] / base["peak_rss_mib"], 3)
        row["projection"] = project(row, n, plan_s_per_million)
        results["recipes"][recipe] = row
        log(json.dumps({k: v for k, v in row.items() if k not in ("variants", "projection")}))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale_build", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="tree size (default 50000, ImageNet val)")
    p.add_argument("--baseline-n", type=int, default=1000, help="tree size of the RSS baseline (0 = none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--recipe", action="append", choices=RECIPES, help="recipes to build (default both)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where generated trees are kept")
    p.add_argument("--work", type=Path, default=None, help="where the shards go while measured (removed after)")
    p.add_argument("--plan-s-per-million", type=float, default=0.0,
                   help="planning seconds per million records, from bench.plan_bench (enters the projection)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.n < 1 or args.baseline_n < 0 or args.workers < 1 or args.plan_s_per_million < 0:
        print("scale_build: error: need --n >= 1, --baseline-n >= 0, --workers >= 1", file=sys.stderr)
        return 2
    recipes = tuple(dict.fromkeys(args.recipe or RECIPES))
    with tempfile.TemporaryDirectory(prefix="bgcheck-scale-", dir=args.work) as work:
        try:
            results = run_bench(args.n, args.baseline_n, args.workers, recipes, args.cache, Path(work),
                                args.plan_s_per_million, log=lambda m: print(m, file=sys.stderr))
        except RuntimeError as exc:
            print(f"scale_build: error: {exc}".splitlines()[0], file=sys.stderr)
            return 1
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
