"""Turn per-sample predictions into background-reliance tables, figures and a report page.

``python -m eval.report RESULTS_DIR [--out DIR]`` reads
``RESULTS_DIR/predictions/<model>/<variant>.csv`` (see eval.predictions), joins
variants by sample key, computes every metric of ``eval.metrics.METRICS`` per
model and label space, and writes ``metrics.csv`` (long format),
``trends.csv``, ``metrics.json``, ``report.md``, ``report.html`` and the
``fig_*.png`` that have data. Metrics are recomputed from predictions only,
so a report never disagrees with the per-sample files. report.html also
holds a gallery of thumbnails per source image, read from the shards
(``--shards``, or where eval.score's ledgers say they were read). When
``RESULTS_DIR/challenge.csv`` exists (``python -m eval.challenge``), the
report adds the Backgrounds Challenge: a table per model beside its clean
accuracy, ``fig_challenge.png``, ``challenge_accuracy`` rows in metrics.csv
and, from the shards the challenge recorded, fooled foregrounds with their
composites and the strongest backgrounds.

Modules, one job each: ``inputs`` (read and vet predictions), ``compute``
(typed results per model), ``tables`` (metrics.csv rows and the tables),
``figures``, ``gallery`` (which keys, and their rows of captioned images),
``thumbnails`` (finding the shards, reading only the samples shown),
``challenge`` (the Backgrounds Challenge's results and images),
``markdown`` (report.md, README section), ``html`` (report.html), ``build``
(writes everything), ``cli``.
"""

from __future__ import annotations

from eval.report.build import build_report
from eval.report.cli import build_parser, main, parse_args
from eval.report.compute import TREND_AXES, ModelMetrics
from eval.report.inputs import LABEL_SPACES, NUM_CLASSES, ReportError
from eval.report.markdown import metrics_reference_markdown

__all__ = [
    "build_parser",
    "LABEL_SPACES",
    "NUM_CLASSES",
    "TREND_AXES",
    "ModelMetrics",
    "ReportError",
    "build_report",
    "main",
    "metrics_reference_markdown",
    "parse_args",
]
