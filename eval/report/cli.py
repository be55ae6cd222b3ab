"""``python -m eval.report``: the command line over build_report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.report.build import build_report
from eval.report.inputs import ReportError
from eval.report.markdown import metrics_reference_markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--markdown-metrics", action="store_true",
                        help="print the metric definitions section of README.md (generated from eval/metrics.py) "
                        "and exit")
    return parser.parse_args(argv)


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
    try:
        result = build_report(
            args.results_dir, args.out, label_space=args.label_space, n_boot=args.bootstrap,
            seed=args.seed, models_json=args.models_json, progress=True,
        )
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(result["outputs"][0]).parent
    print(f"report written to {out}: {', '.join(Path(p).name for p in result['outputs'])}")
    print(f"open {(out / 'report.html').resolve().as_uri()}")
    if result["notes"]:
        print(f"{len(result['notes'])} note(s), see {out / 'report.md'}")
    return 0
