"""The report's tables as plain data, rendered alike by report.md and report.html.

Metric tables are generated from ``eval.metrics.METRICS``: one table per
metric group, one column per metric (or per breakdown key, e.g. category),
so a new METRICS row shows up in metrics.csv, the Markdown and the HTML at
once. metrics.csv itself is :func:`long_rows` of the same values.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eval import metrics as M
from eval.report.compute import Comparison, MetricValue, ModelMetrics, breakdown_columns, model_order
from eval.report.inputs import NUM_CLASSES, class_names

if TYPE_CHECKING:
    from eval.report.challenge import ChallengeResult

CSV_COLUMNS = ("model", "label_space", "metric", "variant", "variants", "category", "class", "value", "lo", "hi", "n")
TREND_COLUMNS = ("label_space", "metric", "variant", "variants", "category", "class", "x", "slope", "intercept",
                 "pearson_r", "n")
UNIT_SUFFIX = {"fraction": " (%)", "difference": " (pp)", "ratio": ""}


@dataclass(frozen=True)
class Cell:
    """One table cell: the value as text, its 95% interval as text ("" = none) and a hover note."""

    text: str
    interval: str = ""
    note: str = ""
    numeric: bool = False
    markup: bool = False  # text carries `code` / **bold** marks (our own definitions, never user data)


MISSING = Cell("–", numeric=True)


@dataclass(frozen=True)
class Table:
    ident: str  # stable anchor id
    title: str
    caption: str
    header: tuple[str, ...]
    rows: list[tuple[Cell, ...]]
    empty: str = "No data."  # shown instead of an empty table


# ---------------------------------------------------------------- formatting


def fmt(value: float | None, unit: str = "fraction") -> str:
    """A number as the tables show it: fractions and differences in %, ratios as is."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if unit == "ratio" else f"{100 * value:.1f}"


def estimate_cell(est: M.Estimate, unit: str = "fraction") -> Cell:
    interval = f"[{fmt(est.lo, unit)}, {fmt(est.hi, unit)}]" if math.isfinite(est.lo) and math.isfinite(est.hi) else ""
    return Cell(fmt(est.value, unit), interval, note=f"n = {est.n}", numeric=True)


def text_cell(value: object) -> Cell:
    if value is None or value == "":
        return Cell("–")
    if isinstance(value, bool):
        return Cell(str(value))
    if isinstance(value, int | float):
        return Cell(f"{value:.4g}" if isinstance(value, float) or abs(value) >= 1e4 else str(value), numeric=True)
    return Cell(str(value))


def count_cell(value: object) -> Cell:
    """Parameter and image counts as people quote them (25.6M, 1.28M, 1B)."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return text_cell(value)
    if not math.isfinite(v):
        return Cell("–")
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return Cell(f"{v / scale:.3g}{suffix}", numeric=True)
    return Cell(f"{v:g}", numeric=True)


def label_space_title(label_space: str) -> str:
    names = class_names(label_space)
    classes = ", ".join(names) if len(names) <= 12 else f"{len(names)} ImageNet-1k classes"
    return f"Label space {label_space}: {classes}; chance {100 / NUM_CLASSES[label_space]:.2f}%"


# ---------------------------------------------------------------- metric tables


def _header(metric: M.Metric) -> str:
    return metric.column + UNIT_SUFFIX[metric.unit]


def metric_tables(label_space: str, per_model: dict[str, ModelMetrics]) -> list[Table]:
    """One table per metric group that applies to the label space, models by clean accuracy."""
    order = model_order(per_model)
    values = {m: per_model[m].values() for m in order}
    tables = []
    for group in M.METRIC_GROUPS:
        metrics = [m for m in M.METRICS if m.group == group.name and label_space in m.label_spaces]
        if not metrics:
            continue
        group_values = {m: [v for v in values[m] if v.metric.group == group.name] for m in order}
        beside = [M.METRIC_BY_NAME[n] for n in group.beside if label_space in M.METRIC_BY_NAME[n].label_spaces]
        single = metrics[0]
        caption = group.caption
        if beside:
            # The same model's values of another group for the variants this group has (the rate beside accuracy).
            for m in order:
                own = {v.variant for v in group_values[m]}
                group_values[m] = [v for v in values[m] if v.metric in beside and v.variant in own] + group_values[m]
            header, rows = _value_rows([*beside, *metrics], group_values, label_space)
        elif len(metrics) == 1 and single.per_variant and not single.breakdown:
            header, rows = _variant_matrix(single, group_values)
            caption += f" Values: {single.column} (`{single.name}`)."
        else:
            header, rows = _value_rows(metrics, group_values, label_space)
        tables.append(Table(
            ident=f"{label_space}-{group.name}",
            title=group.title + (f" — {group.paper}" if group.paper != "—" else ""),
            caption=caption,
            header=header, rows=rows, empty=f"No model has {_needs(metrics)}.",
        ))
    return tables


def _needs(metrics: list[M.Metric]) -> str:
    """The variants a group reads, in words: 'original and one of only_fg, mixed_rand, texture'."""
    fixed = list(dict.fromkeys(v for m in metrics for v in m.reads_also))
    each = list(dict.fromkeys(v for m in metrics for v in m.per_variant))
    words = [", ".join(fixed[:-1]) + " and " + fixed[-1] if len(fixed) > 1 else "".join(fixed)]
    if each:
        words.append(("one of " if len(each) > 1 else "") + ", ".join(each))
    return " and ".join(w for w in words if w)


def _variant_matrix(metric: M.Metric, group_values: dict[str, list[MetricValue]]):
    """model x variant, for a group with one per-variant metric (accuracy, above chance)."""
    present = [v for v in metric.per_variant if any(x.variant == v for xs in group_values.values() for x in xs)]
    header = ("model", *(f"{v}{UNIT_SUFFIX[metric.unit]}" for v in present))
    rows = []
    for model, xs in group_values.items():
        by_variant = {x.variant: x.estimate for x in xs}
        if by_variant:
            rows.append((Cell(model), *(estimate_cell(by_variant[v], metric.unit) if v in by_variant else MISSING
                                        for v in present)))
    return header, rows


def breakdown_order(metric: M.Metric, label_space: str) -> tuple[str, ...]:
    """Breakdown keys in their natural order: the NoS category order, or class index order."""
    if metric.breakdown == "category":
        return M.CATEGORIES
    if metric.breakdown == "class":
        return class_names(label_space)
    return ("",)


def _value_rows(metrics: list[M.Metric], group_values: dict[str, list[MetricValue]], label_space: str):
    """(model, variant) x (metric, breakdown key); an n column when each row's values share one n."""
    has_variant = any(m.per_variant for m in metrics)
    present = {(x.metric.name, x.key) for xs in group_values.values() for x in xs}
    columns = [(m.name, key) for m in metrics for key in breakdown_order(m, label_space) if (m.name, key) in present]
    titles = [breakdown_title(key) + UNIT_SUFFIX[M.METRIC_BY_NAME[name].unit] if key
              else _header(M.METRIC_BY_NAME[name]) for name, key in columns]
    rows, shared_n = [], []
    for model, xs in group_values.items():
        for variant in dict.fromkeys(x.variant for x in xs):
            cells = {(x.metric.name, x.key): x for x in xs if x.variant == variant}
            ns = {x.estimate.n for x in cells.values()}
            shared_n.append(Cell(str(ns.pop()), numeric=True) if len(ns) == 1 else MISSING)
            rows.append((Cell(model), *([Cell(variant)] if has_variant else []),
                         *(estimate_cell(cells[c].estimate, cells[c].metric.unit) if c in cells else MISSING
                           for c in columns)))
    lead = ["model", *(["variant"] if has_variant else [])]
    if any(n is not MISSING for n in shared_n):  # per-class values each have their own n (hover a cell)
        at = len(lead)
        return ((*lead, "n", *titles), [(*r[:at], n, *r[at:]) for r, n in zip(rows, shared_n, strict=True)])
    return (*lead, *titles), rows


def breakdown_title(key: str) -> str:
    return M.CATEGORY_TITLES.get(key, key)


# ---------------------------------------------------------------- other tables


def models_table(models: Sequence[str], metadata: dict[str, dict]) -> Table:
    def row(m: str) -> tuple[Cell, ...]:
        meta = metadata.get(m, {})
        return (Cell(m), count_cell(meta.get("params")), count_cell(meta.get("train_images")),
                *(text_cell(meta.get(f)) for f in ("train_data", "top1", "weights", "precision")))

    return Table(
        "models", "Models", "Zoo facts from models.json; weights and precision as the run recorded them in scores.csv.",
        ("model", "params", "train images", "train data", "reference top-1 (%)", "weights", "precision"),
        [row(m) for m in models],
    )


def published_table(comparisons: list[Comparison]) -> Table:
    rows = []
    for c in comparisons:
        unit = M.METRIC_BY_NAME[c.published.metric].unit
        inside = {True: "yes", False: "no", None: "–"}[c.inside]
        rows.append((Cell(c.published.model), Cell(c.published.label_space), Cell(c.published.metric),
                     Cell(c.published.variant or "–"), Cell(fmt(c.published.value, unit), numeric=True),
                     estimate_cell(c.ours, unit), Cell(inside), Cell(c.published.weights),
                     Cell(c.weights or "–"), Cell(c.published.source)))
    return Table(
        "published", "Published figures beside ours",
        "Numbers a paper reports for a model scored here, in %. Differences also reflect the paper's own test "
        "images and preprocessing, not only the model.",
        ("model", "label space", "metric", "variant", "published", "ours [95% CI]", "published in our interval",
         "published weights", "our weights", "source"),
        rows, empty="No scored model has a published figure.",
    )


def trends_table(label_space: str, trend_rows: list[dict]) -> Table:
    rows = [(Cell(t["metric"]), Cell(t["variant"] or "–"), Cell(breakdown_title(t["category"] or t["class"]) or "–"),
             Cell(t["x"]),
             Cell(_num(t["slope"]), numeric=True), Cell(_num(t["intercept"]), numeric=True),
             Cell(_num(t["pearson_r"]), numeric=True), Cell(str(t["n"]), numeric=True)) for t in trend_rows]
    return Table(
        f"{label_space}-trends", "Trends across models",
        "Least-squares slope and Pearson r of each metric (as a fraction) against clean accuracy, "
        "log10(parameters) and log10(training images).",
        ("metric", "variant", "category", "x", "slope", "intercept", "r", "models"), rows,
        empty="Fewer than two models: no trend.",
    )


def challenge_table(results: Sequence[ChallengeResult], reference: Sequence[tuple[str, float, float]]) -> Table:
    """One row per model of challenge.csv, its clean accuracy (the report's own) beside it."""
    errors = any(r.error for r in results)

    def row(r: ChallengeResult) -> tuple[Cell, ...]:
        challenge = estimate_cell(r.accuracy) if r.accuracy is not None else MISSING
        clean = estimate_cell(r.clean) if r.clean is not None else MISSING
        search = "–" if r.accuracy is None else "exhaustive" if r.exhaustive else "first fooling background"
        cells = (Cell(r.model), Cell(r.label_space or "–"), text_cell(r.foregrounds), text_cell(r.vulnerable),
                 challenge, clean, text_cell(r.backgrounds), Cell(search))
        return (*cells, Cell(r.error or "–")) if errors else cells

    refs = "; ".join(f"{name} {100 * acc:.1f}% (clean {100 * clean:.1f}%)" for name, acc, clean in reference)
    caption = (f"The Backgrounds Challenge of {M.NOISE_OR_SIGNAL}, read from `challenge.csv`: {CHALLENGE_RULE}. "
               "Challenge accuracy with its Wilson 95% interval, in the challenge's label space; clean accuracy is "
               "this report's `accuracy` on `original` of the same model in that label space (– where it was not "
               f"scored). Noise or Signal's reference (IN-9, their repository's README): {refs}.")
    header = ("model", "label space", "foregrounds", "vulnerable", "challenge accuracy (%)", "clean accuracy (%)",
              "backgrounds", "search", *(("error",) if errors else ()))
    return Table("challenge", "Backgrounds Challenge", caption, header, [row(r) for r in results],
                 empty="challenge.csv holds no model.")


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


# The Backgrounds Challenge in words; its number comes from eval.challenge (challenge.csv), not from predictions,
# so it is no METRICS row: the report reads it (eval/report/challenge.py) and this says what it is.
CHALLENGE_RULE = ("every foreground (an `original` image's masked pixels) is pasted onto every background "
                  "(`only_bg_t`); a foreground is **vulnerable** once any background makes the model misclassify "
                  "it, and challenge accuracy is the share of foregrounds that no background fools")
CHALLENGE_DEFINITION = (
    "`challenge_accuracy`", "`original` (foregrounds, with masks) + `only_bg_t` (backgrounds), from `challenge.csv` "
    "(`python -m eval.challenge`), in the label space of that run", "fraction",
    "1 − vulnerable / foregrounds: " + CHALLENGE_RULE + "; `n` = foregrounds", M.WILSON, M.NOISE_OR_SIGNAL,
)


def metrics_reference() -> Table:
    """Every metrics.csv metric name with its definition (the README and the report show this table)."""
    rows = []
    for m in M.METRICS:
        fixed = ", ".join(f"`{v}`" for v in m.reads_also)
        each = "each of " + ", ".join(f"`{v}`" for v in m.per_variant) if m.per_variant else ""
        if len(m.per_variant) == len(M.VARIANTS):
            each = "each variant"
        reads = " + ".join(x for x in (fixed, each) if x)
        if m.breakdown:
            reads += f"; one row per `{m.breakdown}`"
        if m.label_spaces != ("in1k", "in9"):
            reads += f" ({', '.join(m.label_spaces)} only)"
        rows.append(tuple(Cell(text, markup=True) for text in (f"`{m.name}`", reads, m.unit, m.formula,
                                                                m.interval or "none", m.paper)))
    rows.append(tuple(Cell(text, markup=True) for text in CHALLENGE_DEFINITION))
    return Table("definitions", "Metric definitions", "", ("metric", "variants it reads", "unit", "definition",
                                                           "95% interval", "paper"), rows)


# ---------------------------------------------------------------- metrics.csv / trends.csv


def long_rows(mm: ModelMetrics) -> list[dict]:
    """metrics.csv rows for one model in one label space: one per METRICS value."""
    return [{"model": mm.model, "label_space": mm.label_space, "metric": v.metric.name, "variant": v.variant,
             "variants": ",".join(v.variants), **breakdown_columns(v), "value": v.estimate.value,
             "lo": v.estimate.lo, "hi": v.estimate.hi, "n": v.estimate.n} for v in mm.values()]


def csv_text(columns: tuple[str, ...], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


# ---------------------------------------------------------------- the document both renderers show


@dataclass(frozen=True)
class FigureFile:
    """A figure written next to the report."""

    name: str  # file name in the report folder
    title: str
    caption: str


@dataclass
class LabelSpaceSection:
    label_space: str
    title: str
    figures: list[FigureFile]
    figures_skipped: list[str]  # one line per figure not drawn, saying why
    tables: list[Table]


@dataclass
class ChallengeSection:
    """The Backgrounds Challenge: its table, its figure (or why there is none) and one line per thing not shown."""

    table: Table
    figures: list[FigureFile]
    figures_skipped: list[str]
    lines: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # report.md's lines about report.html's challenge images


@dataclass
class ReportDocument:
    """Everything report.md and report.html show, in order."""

    intro: str
    models: Table
    published: Table
    sections: list[LabelSpaceSection]
    definitions: Table
    notes: list[str]
    missing_spaces: list[str] = field(default_factory=list)
    gallery: list[str] = field(default_factory=list)  # report.md's lines about report.html's gallery
    challenge: ChallengeSection | None = None  # only when the results folder holds challenge.csv
