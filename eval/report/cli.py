"""``python -m eval.report``: the command line over build_report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.report.build import build_report
from eval.report.gallery import GALLERY_SEED, GALLERY_SIZE
from eval.report.inputs import ReportError
from eval.report.markdown import metrics_reference_markdown
from pipeline.cli import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m eval.report",
        description="Background-reliance metrics, tables, figures and a self-contained report.html from "
        "per-sample predictions (RESULTS_DIR/predictions/<model>/<variant>.csv).",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR", type=Path, nargs="?", help="evaluator output folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--label-space", choices=("in1k", "in9", "both"), default="both",
                        help="ImageNet-1k (pred == label), ImageNet-9 superclasses, or both (default)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                        help="bootstrap resamples for the BG-Gap interval (0 = none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--models-json", type=Path, default=None,
                        help="model zoo file with params/train_images (default: data_manifests/models.json)")
    parser.add_argument("--shards", action="append", default=None, metavar="SPEC",
                        help="shards for the gallery's images (repeatable; anything eval.score --shards takes: a "
                        "variant folder, a manifest path or URL, a brace pattern); default: the shards eval.score "
                        "recorded in RESULTS_DIR/predictions/<model>/.done/")
    parser.add_argument("--gallery-size", type=int, default=GALLERY_SIZE, metavar="N",
                        help=f"gallery rows per section (default {GALLERY_SIZE}; 0 = no gallery)")
    parser.add_argument("--gallery-seed", type=int, default=GALLERY_SEED, metavar="S",
                        help=f"seed of the gallery's sample of keys per category (default {GALLERY_SEED})")
    parser.add_argument("--gallery-model", action="append", default=None, metavar="ID",
                        help="model whose top-1 the gallery captions show (repeatable); the first picks the rows "
                        "(default: every model, rows picked by the most accurate on original)")
    parser.add_argument("--markdown-metrics", action="store_true",
                        help="print the metric definitions section of README.md (generated from eval/metrics.py) "
                        "and exit")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown_metrics:
        sys.stdout.write(metrics_reference_markdown())
        return 0
    if args.results_dir is None:
        print("error: RESULTS_DIR is required (or --markdown-metrics)", file=sys.stderr)
        return 2
    if args.bootstrap < 0:
        print("error: --bootstrap must be >= 0", file=sys.stderr)
        return 2
    if args.gallery_size < 0:
        print("error: --gallery-size must be >= 0", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.results_dir / "report"
    if out.exists() and not out.is_dir():  # as eval.score and the builder say it, before any work
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        result = build_report(
            args.results_dir, args.out, label_space=args.label_space, n_boot=args.bootstrap,
            seed=args.seed, models_json=args.models_json, progress=True, shards=args.shards,
            gallery_size=args.gallery_size, gallery_seed=args.gallery_seed, gallery_model=args.gallery_model,
        )
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(result["outputs"][0]).parent
    print(f"report written to {out}: {', '.join(Path(p).name for p in result['outputs'])}")
    print(f"open {(out / 'report.html').resolve().as_uri()}")
    gallery = result["gallery"]
    if gallery["shown"]:
        print(f"gallery: {sum(map(len, gallery['sections'].values()))} rows, {gallery['thumbnails']} thumbnails")
    else:
        print(gallery["reason"])
    if "challenge" in result:
        rows = [r for r in result["challenge"]["results"] if r["challenge_accuracy"] is not None]
        print(f"Backgrounds Challenge: {len(rows)} of {len(result['challenge']['results'])} model(s) with results")
    if result["notes"]:
        print(f"{len(result['notes'])} note(s), see {out / 'report.md'}")
    return 0
