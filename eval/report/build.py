"""build_report: predictions in, metrics.csv, trends.csv, metrics.json, report.md, report.html and figures out.

A Backgrounds Challenge in the same results folder (``challenge.csv``) adds
its section, figure, metrics.csv rows and images; without one nothing changes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.predictions import list_predictions
from eval.report.challenge import (
    NOS_REFERENCE,
    Challenge,
    ChallengeGallery,
    challenge_gallery,
    challenge_json,
    challenge_long_rows,
    has_challenge,
    read_challenge,
)
from eval.report.compute import (
    ModelMetrics,
    compute_model,
    model_order,
    published_comparisons,
    trend_axes,
    trends,
)
from eval.report.figures import all_figure_names, draw_challenge, draw_figures
from eval.report.gallery import (
    GALLERY_SEED,
    GALLERY_SIZE,
    PredictionStore,
    choose_sections,
    gallery_models,
    gallery_sections,
)
from eval.report.html import Gallery, report_html
from eval.report.inputs import (
    LABEL_SPACES,
    NUM_CLASSES,
    Notes,
    Outcomes,
    ReportError,
    load_model_metadata,
    load_scores,
    model_metadata,
    models_json_path,
    outcomes,
    read_model_predictions,
)
from eval.report.markdown import report_markdown
from eval.report.tables import (
    CSV_COLUMNS,
    TREND_COLUMNS,
    ChallengeSection,
    LabelSpaceSection,
    ReportDocument,
    challenge_table,
    csv_text,
    label_space_title,
    long_rows,
    metric_tables,
    metrics_reference,
    models_table,
    published_table,
    trends_table,
)
from eval.report.thumbnails import THUMB_PX, read_thumbnails, sources_from_ledgers, sources_from_specs
from pipeline.files import atomic_write_text
from pipeline.variants import VARIANTS


def _json_safe(obj: object) -> object:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def compute_all(found: dict[str, dict[str, Path]], spaces: tuple[str, ...], n_boot: int, seed: int,
                notes: Notes, progress: bool, store: PredictionStore | None = None
                ) -> dict[str, dict[str, ModelMetrics]]:
    """Every model's metrics per label space; models without data in a space are absent from it.

    ``store`` keeps what the gallery needs of each model's predictions, so no file is read twice.
    """
    from tqdm import tqdm

    per_space: dict[str, dict[str, ModelMetrics]] = {ls: {} for ls in spaces}
    # A bar only on a terminal: piped or logged output gets no carriage-return noise.
    for model in tqdm(sorted(found), desc="models", unit="model", disable=not (progress and sys.stderr.isatty())):
        preds = read_model_predictions(model, found[model], notes)
        if store is not None and preds:
            store.add(model, preds)
        for ls in spaces:
            data: dict[str, Outcomes] = {}
            for variant, p in preds.items():
                if (o := outcomes(p, ls, model, variant, notes)) is not None:
                    data[variant] = o
            if data:
                per_space[ls][model] = compute_model(model, ls, data, n_boot, seed, notes)
    return per_space


def gallery_markdown_lines(gallery: Gallery) -> list[str]:
    """report.md has no images: it says what the gallery in report.html holds, or why there is none."""
    if not gallery.sections:
        return list(gallery.lines)
    counts = ", ".join(f"{s.title} ({len(s.rows)})" for s in gallery.sections)
    return [f"report.html shows {sum(len(s.rows) for s in gallery.sections)} rows of thumbnails: {counts}.",
            *gallery.lines]


def build_gallery(results_dir: Path, store: PredictionStore, shards: Sequence[str] | None, size: int, seed: int,
                  requested_models: Sequence[str] | None, notes: Notes, progress: bool) -> tuple[Gallery, dict]:
    """The gallery's rows with their thumbnails, and its metrics.json entry; a one-line reason when there is none."""

    def none(reason: str, **extra: object) -> tuple[Gallery, dict]:
        return Gallery(lines=(reason,)), {"shown": False, "reason": reason, **extra}

    if size <= 0:
        return none("No gallery: --gallery-size 0.")
    if not store.models:
        return none("No gallery: no readable predictions.")
    try:
        models = gallery_models(store, requested_models)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    reference = models[0]
    choices, lines = choose_sections(store, reference, size, seed)
    if not choices:
        return none(lines[0], reference_model=reference)
    keys = {r.key for c in choices for r in c.rows}
    if not keys:
        return none(f"No gallery: no image qualifies for any section for {reference} "
                    f"({', '.join(c.title for c in choices)} are all empty).", reference_model=reference)
    if shards:
        sources, why, origin = sources_from_specs(shards), "", "--shards"
    else:
        sources, why = sources_from_ledgers(results_dir, store.models)
        origin = "the shards eval.score recorded in its ledgers"
    if not sources:
        return none(f"No gallery: {why}; pass --shards SPEC to show images.", reference_model=reference)
    variants = [v for v in VARIANTS if any(v in store.models[m] for m in models)]
    wanted = {v: {k for m in models for k in store.lookup(m, v, keys)} for v in variants}
    thumbs = read_thumbnails(sources, wanted, store, notes, progress)
    shown = [v for v in variants if any((v, k) in thumbs for k in keys)]
    specs = [s.spec for s in sources]
    if not shown:
        return none(f"No gallery: none of the {len(keys)} chosen images was found in {len(specs)} shard source(s) "
                    f"from {origin} (see the notes).", reference_model=reference, sources=specs)
    absent = [v for v in variants if v not in shown and wanted[v]]
    if absent:
        lines.append(f"No {', '.join(absent)} images in the shards read: those columns are left out.")
    sections = gallery_sections(store, choices, models, shown, thumbs, THUMB_PX)
    who = models[0] if len(models) == 1 else f"{len(models)} models ({', '.join(models)})"
    intro = (f"One row per source image, its variants side by side ({', '.join(shown)}), from {origin}. Rows are "
             f"chosen from {reference}'s ImageNet-1k top-1; under each thumbnail the top-1 class and p(true) of "
             f"{who}; ✓/✗: right or wrong. Up to {size} rows per section (--gallery-size), seed {seed} "
             "(--gallery-seed).")
    summary = {"shown": True, "reference_model": reference, "models": models, "size": size, "seed": seed,
               "variants": shown, "sources": specs, "thumbnails": len(thumbs),
               "sections": {c.ident: [r.key for r in c.rows] for c in choices}, "lines": lines}
    return Gallery(tuple(sections), tuple(lines), intro), summary


def build_challenge(results_dir: Path, out_dir: Path, challenge: Challenge, shards: Sequence[str] | None,
                    gallery_size: int, notes: Notes) -> tuple[ChallengeSection, ChallengeGallery, dict]:
    """The Backgrounds Challenge's section, its images and its metrics.json entry."""
    figures, skipped = draw_challenge(out_dir, challenge.results, NOS_REFERENCE)
    images = challenge_gallery(results_dir, challenge, shards, gallery_size, notes) if challenge.results \
        else ChallengeGallery()
    shown = sum(len(s.rows) for s in images.sections)
    in_html = [f"report.html shows {shown} row(s) of challenge images: "
               + ", ".join(f"{s.title} ({len(s.rows)})" for s in images.sections) + "."] if shown else []
    figure = {"written": [f.name for f in figures], "not_drawn": skipped}
    section = ChallengeSection(challenge_table(challenge.results, NOS_REFERENCE), figures, skipped,
                               [*challenge.lines, *images.lines], in_html)
    return section, images, challenge_json(challenge, figure, images)


def build_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    label_space: str = "both",
    n_boot: int = 1000,
    seed: int = 0,
    models_json: str | Path | None = None,
    progress: bool = False,
    shards: Sequence[str] | None = None,
    gallery_size: int = GALLERY_SIZE,
    gallery_seed: int = GALLERY_SEED,
    gallery_model: Sequence[str] | None = None,
) -> dict:
    """Compute every metric and write metrics.csv, trends.csv, metrics.json, report.md, report.html and figures.

    ``shards`` (specs as eval.score takes them) are where the gallery's images
    are read; without them, the shards eval.score recorded in its ledgers.
    Returns the metrics.json content plus ``outputs`` (paths written). Raises
    ReportError when ``results_dir`` is missing or holds no predictions.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ReportError(f"results directory not found: {results_dir}")
    found = list_predictions(results_dir)
    if not found:
        raise ReportError(f"no predictions under {results_dir / 'predictions'}")
    if label_space not in (*LABEL_SPACES, "both"):
        raise ReportError(f"unknown label space {label_space!r}")
    spaces = LABEL_SPACES if label_space == "both" else (label_space,)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = Notes()

    zoo_rows = load_model_metadata(Path(models_json) if models_json else models_json_path(), notes)
    store = PredictionStore()
    per_space = compute_all(found, spaces, n_boot, seed, notes, progress, store)
    gallery, gallery_summary = build_gallery(results_dir, store, shards, gallery_size, gallery_seed, gallery_model,
                                             notes, progress)
    del store  # up to ~14 bytes a prediction: not kept while the figures draw
    metadata = model_metadata(found, zoo_rows, load_scores(results_dir), notes)
    comparisons = published_comparisons(per_space, metadata, notes)

    # A figure from an earlier run into the same folder would sit there unexplained: clear ours first.
    for name in all_figure_names():
        (out_dir / name).unlink(missing_ok=True)
    csv_rows: list[dict] = []
    trend_rows: dict[str, list[dict]] = {}
    sections: list[LabelSpaceSection] = []
    for ls in spaces:
        per_model = per_space[ls]
        if not per_model:
            notes.add(f"{ls}: no model has predictions in this label space, left out")
            continue
        for model in model_order(per_model):
            csv_rows += long_rows(per_model[model])
        trend_rows[ls] = trends(per_model, trend_axes(per_model, metadata), notes, ls)
        figures, skipped = draw_figures(out_dir, ls, per_model, comparisons)
        tables = [*metric_tables(ls, per_model), trends_table(ls, trend_rows[ls])]
        sections.append(LabelSpaceSection(ls, label_space_title(ls), figures, skipped, tables))

    challenge_section, challenge_images, challenge_summary = None, ChallengeGallery(), None
    if has_challenge(results_dir):
        challenge = read_challenge(results_dir, per_space, notes)
        challenge_section, challenge_images, challenge_summary = build_challenge(
            results_dir, out_dir, challenge, shards, gallery_size, notes)
        csv_rows += challenge_long_rows(challenge)

    models = sorted(found)
    summary = {
        "results_dir": str(results_dir),
        "bootstrap": n_boot,
        "seed": seed,
        "models_seen": models,
        "metadata": metadata,
        "chance": {ls: 1 / NUM_CLASSES[ls] for ls in spaces if per_space[ls]},
        "label_spaces": {ls: {m: per_space[ls][m].to_json() for m in model_order(per_space[ls])}
                         for ls in spaces if per_space[ls]},
        "trends": trend_rows,
        "published": [{"model": c.published.model, "label_space": c.published.label_space,
                       "metric": c.published.metric, "variant": c.published.variant,
                       "published": c.published.value, "ours": c.ours.value, "lo": c.ours.lo, "hi": c.ours.hi,
                       "n": c.ours.n, "published_weights": c.published.weights, "our_weights": c.weights,
                       "source": c.published.source} for c in comparisons],
        "figures": {"written": [f.name for s in sections for f in s.figures],
                    "not_drawn": [r for s in sections for r in s.figures_skipped]},
        "gallery": gallery_summary,
        "notes": notes.items,
    }
    if challenge_section is not None:
        summary["challenge"] = challenge_summary
        summary["figures"]["written"] += [f.name for f in challenge_section.figures]
        summary["figures"]["not_drawn"] += challenge_section.figures_skipped
    safe = _json_safe(summary)
    doc = ReportDocument(
        intro=(f"Results: {results_dir}. Models: {len(models)}. Intervals: Wilson 95% for accuracies; paired "
               f"bootstrap ({n_boot} resamples, seed {seed}) for BG-Gap. Values in %; differences in points."),
        models=models_table(models, metadata),
        published=published_table(comparisons),
        sections=sections,
        definitions=metrics_reference(),
        notes=notes.items,
        gallery=gallery_markdown_lines(gallery),
        challenge=challenge_section,
    )
    figure_names = [f.name for s in sections for f in s.figures]
    figure_names += [f.name for f in challenge_section.figures] if challenge_section is not None else []
    atomic_write_text(out_dir / "metrics.csv", csv_text(CSV_COLUMNS, csv_rows))
    atomic_write_text(out_dir / "trends.csv", csv_text(TREND_COLUMNS, [r for rs in trend_rows.values() for r in rs]))
    atomic_write_text(out_dir / "metrics.json", json.dumps(safe, indent=1, sort_keys=False) + "\n")
    atomic_write_text(out_dir / "report.md", report_markdown(doc))
    atomic_write_text(out_dir / "report.html", report_html(doc, out_dir, gallery, challenge_images.sections))
    names = ("metrics.csv", "trends.csv", "metrics.json", "report.md", "report.html", *figure_names)
    return {**safe, "outputs": [str(out_dir / n) for n in names]}  # type: ignore[dict-item]
