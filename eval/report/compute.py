"""Every metric of one model in one label space, as the typed results of eval.metrics.

:class:`ModelMetrics` holds one field per metric group (``eval.metrics.METRIC_GROUPS``);
:meth:`ModelMetrics.values` flattens it through ``eval.metrics.METRICS`` into
the named numbers that metrics.csv, the tables and the trends all use, so no
consumer walks the results by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from eval import metrics as M
from eval.report.inputs import NUM_CLASSES, Notes, Outcomes, class_names

TREND_AXES = ("clean_acc", "log10_params", "log10_train_images")
CLEAN = ("accuracy", "original")  # the metric every figure and trend reads as "clean accuracy"


@dataclass(frozen=True)
class MetricValue:
    """One named number: a METRICS row applied to one variant (and breakdown key) of one model."""

    metric: M.Metric
    variant: str  # "" for metrics of a fixed set of variants
    key: str  # breakdown key (category or class name); "" when none
    estimate: M.Estimate

    @property
    def variants(self) -> tuple[str, ...]:
        return self.metric.reads(self.variant)

    @property
    def ident(self) -> tuple[str, str, str]:
        """What identifies the number across models (for trends and comparisons)."""
        return (self.metric.name, self.variant, self.key)


@dataclass
class ModelMetrics:
    """All results of one model in one label space; one field per metric group."""

    model: str
    label_space: str
    accuracy: dict[str, M.Estimate] = field(default_factory=dict)
    background_class: dict[str, M.Estimate] = field(default_factory=dict)
    invariance: dict[str, M.Invariance] = field(default_factory=dict)
    influence: dict[str, M.Influence] = field(default_factory=dict)
    bg_gap: M.Estimate | None = None
    categories: M.Categories | None = None
    class_accuracy: dict[str, dict[str, M.Estimate]] = field(default_factory=dict)

    def results(self, group: str) -> dict[str, Any]:
        """A group's typed results by variant ("" for a group computed from a fixed set of variants)."""
        value = getattr(self, group)
        if value is None:
            return {}
        return value if isinstance(value, dict) else {"": value}

    def values(self) -> list[MetricValue]:
        """Every METRICS number this model has, in METRICS order."""
        out: list[MetricValue] = []
        for metric in M.METRICS:
            if self.label_space not in metric.label_spaces:
                continue
            for variant, result in self.results(metric.group).items():
                for key, estimate in metric.values(result).items():
                    out.append(MetricValue(metric, variant, key, estimate))
        return out

    @property
    def clean(self) -> M.Estimate | None:
        return self.accuracy.get(CLEAN[1])

    def to_json(self) -> dict:
        return {f: v for f, v in asdict(self).items() if f not in ("model", "label_space")}


def group_applies(group: str, label_space: str) -> bool:
    return any(m.group == group and label_space in m.label_spaces for m in M.METRICS)


def _accuracy(data: dict[str, Outcomes], ctx: _Context) -> dict[str, M.Estimate]:
    return {v: M.accuracy(data[v].correct) for v in M.VARIANTS if v in data}


def _background_class(data: dict[str, Outcomes], ctx: _Context) -> dict[str, M.Estimate]:
    out: dict[str, M.Estimate] = {}
    for variant in M.MIXED_VARIANTS:
        if variant not in data:
            continue
        o = data[variant]
        rate = M.background_class_rate(o.pred, o.bg_label)
        if rate.n == 0:
            where = "in IN-9" if ctx.label_space == "in9" else "(bg_label; older predictions files lack it)"
            ctx.note(f"no {variant} sample carries a background class {where}, its background-class rate is left out")
            continue
        out[variant] = rate
    return out


def _invariance(data: dict[str, Outcomes], ctx: _Context) -> dict[str, M.Invariance]:
    if "original" not in data:
        ctx.note("original missing, clean accuracy and background invariance are left out")
        return {}
    out: dict[str, M.Invariance] = {}
    for variant in M.NOVEL_BACKGROUND_VARIANTS:
        if variant not in data:
            ctx.note(f"{variant} missing, its background invariance is left out")
            continue
        keys, (clean, alt) = M.join_by_key(data["original"].column(), data[variant].column())
        if keys.size == 0:
            ctx.note(f"original and {variant} share no keys, invariance left out")
            continue
        out[variant] = M.background_invariance(clean, alt)
    return out


def _influence(data: dict[str, Outcomes], ctx: _Context) -> dict[str, M.Influence]:
    out: dict[str, M.Influence] = {}
    for variant in M.BACKGROUND_ONLY_VARIANTS:
        if variant not in data:
            ctx.note(f"{variant} missing, its background influence is left out")
            continue
        out[variant] = M.background_influence(data[variant].correct, NUM_CLASSES[ctx.label_space])
    return out


def _needs(data: dict[str, Outcomes], needed: tuple[str, ...], what: str, ctx: _Context) -> bool:
    lacking = [v for v in needed if v not in data]
    if lacking:
        ctx.note(f"{' and '.join(lacking)} missing, {what} left out")
    return not lacking


def _bg_gap(data: dict[str, Outcomes], ctx: _Context) -> M.Estimate | None:
    needed = M.METRIC_BY_NAME["bg_gap"].reads()  # (mixed_same, mixed_rand): the order bg_gap takes them in
    if not _needs(data, needed, "BG-Gap is", ctx):
        return None
    _, (same, rand) = M.join_by_key(*(data[v].column() for v in needed))
    return M.bg_gap(same, rand, n_boot=ctx.n_boot, seed=ctx.seed)


def _categories(data: dict[str, Outcomes], ctx: _Context) -> M.Categories | None:
    needed = M.METRIC_BY_NAME["category_share"].reads()  # (original, mixed_rand, only_bg_t), in that order
    if not _needs(data, needed, "prediction categories are", ctx):
        return None
    _, aligned = M.join_by_key(*(data[v].column() for v in needed))
    return M.prediction_categories(*aligned)


def _class_accuracy(data: dict[str, Outcomes], ctx: _Context) -> dict[str, dict[str, M.Estimate]]:
    names = class_names(ctx.label_space)
    out: dict[str, dict[str, M.Estimate]] = {}
    for variant in M.VARIANTS:
        if variant not in data:
            continue
        o = data[variant]
        out[variant] = {names[c]: M.accuracy(o.correct[o.labels == c]) for c in np.unique(o.labels).tolist()}
    return out


@dataclass(frozen=True)
class _Context:
    label_space: str
    n_boot: int
    seed: int
    where: str
    notes: Notes

    def note(self, text: str) -> None:
        self.notes.add(f"{self.where}: {text}")


# One function per metric group, keyed by the group (= ModelMetrics field) it fills.
GROUP_COMPUTE: dict[str, Callable[[dict[str, Outcomes], _Context], Any]] = {
    "accuracy": _accuracy,
    "background_class": _background_class,
    "invariance": _invariance,
    "influence": _influence,
    "bg_gap": _bg_gap,
    "categories": _categories,
    "class_accuracy": _class_accuracy,
}


def compute_model(model: str, label_space: str, data: dict[str, Outcomes], n_boot: int, seed: int,
                  notes: Notes) -> ModelMetrics:
    """Every metric group that applies to the label space, from ``data`` (variant -> outcomes)."""
    ctx = _Context(label_space, n_boot, seed, f"{model} [{label_space}]", notes)
    results = {g.name: GROUP_COMPUTE[g.name](data, ctx) for g in M.METRIC_GROUPS if group_applies(g.name, label_space)}
    return ModelMetrics(model=model, label_space=label_space, **results)


def model_order(per_model: dict[str, ModelMetrics]) -> list[str]:
    """Models by clean accuracy (unknown last), then name: tables and figures read left to right."""

    def clean(m: str) -> float:
        est = per_model[m].clean
        return est.value if est is not None and math.isfinite(est.value) else math.inf

    return sorted(per_model, key=lambda m: (clean(m), m))


def positive_log10(value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return math.log10(v) if v > 0 and math.isfinite(v) else math.nan


def trend_axes(per_model: dict[str, ModelMetrics], metadata: dict[str, dict]) -> dict[str, dict[str, float]]:
    """x values per model for each trend axis (nan where unknown)."""
    return {
        "clean_acc": {m: mm.clean.value if mm.clean else math.nan for m, mm in per_model.items()},
        "log10_params": {m: positive_log10(metadata.get(m, {}).get("params")) for m in per_model},
        "log10_train_images": {m: positive_log10(metadata.get(m, {}).get("train_images")) for m in per_model},
    }


def trends(per_model: dict[str, ModelMetrics], axes: dict[str, dict[str, float]], notes: Notes,
           label_space: str) -> list[dict]:
    """Linear trend of each trended metric across models against each x axis with >= 2 known points."""
    models = sorted(per_model)
    by_model = {m: {v.ident: v for v in per_model[m].values() if v.metric.trend and v.ident[:2] != CLEAN}
                for m in models}
    idents: dict[tuple[str, str, str], MetricValue] = {}
    key_rank: dict[str, int] = {}  # breakdown keys in the order values() yields them (CATEGORIES order)
    for values in by_model.values():
        for ident, value in values.items():
            idents.setdefault(ident, value)
            key_rank.setdefault(ident[2], len(key_rank))
    order = sorted(idents, key=lambda i: (M.METRICS.index(idents[i].metric),
                                          M.VARIANTS.index(i[1]) if i[1] else -1, key_rank[i[2]]))
    rows: list[dict] = []
    for axis in TREND_AXES:
        xs = np.array([axes[axis].get(m, math.nan) for m in models], dtype=np.float64)
        if int(np.isfinite(xs).sum()) < 2:
            if axis != "clean_acc" or len(models) >= 2:
                notes.add(f"{label_space}: fewer than two models with {axis}, trends against it left out")
            continue
        for ident in order:
            ys = [by_model[m][ident].estimate.value if ident in by_model[m] else math.nan for m in models]
            slope, intercept, r, n = M.linear_trend(xs, ys)
            if n >= 2:
                value = idents[ident]
                rows.append({"label_space": label_space, "metric": ident[0], "variant": ident[1],
                             "variants": ",".join(value.variants), **breakdown_columns(value),
                             "x": axis, "slope": slope, "intercept": intercept, "pearson_r": r, "n": n})
    return rows


def breakdown_columns(value: MetricValue) -> dict[str, str]:
    """The metrics.csv / trends.csv breakdown columns of one value (all empty when it has none)."""
    columns = {"category": "", "class": ""}
    if value.metric.breakdown:
        columns[value.metric.breakdown] = value.key
    return columns


@dataclass(frozen=True)
class Comparison:
    """A published number beside ours for the same model, metric and variant."""

    published: M.PublishedValue
    ours: M.Estimate
    weights: str | None  # the weights our run used

    @property
    def inside(self) -> bool | None:
        """Whether the published value lies in our interval (None when we have no interval)."""
        lo, hi = self.ours.lo, self.ours.hi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        return lo <= self.published.value <= hi


def published_comparisons(per_space: dict[str, dict[str, ModelMetrics]], metadata: dict[str, dict],
                          notes: Notes) -> list[Comparison]:
    """Our value beside every published anchor whose model we scored in its label space."""
    out: list[Comparison] = []
    for anchor in M.PUBLISHED:
        mm = per_space.get(anchor.label_space, {}).get(anchor.model)
        if mm is None:
            continue
        ours = {v.ident: v.estimate for v in mm.values()}.get((anchor.metric, anchor.variant, ""))
        if ours is None:
            continue
        weights = metadata.get(anchor.model, {}).get("weights")
        if weights and weights != anchor.weights:
            notes.add(f"{anchor.model}: published numbers are for weights {anchor.weights}, this run used "
                      f"{weights}; expect a difference")
        out.append(Comparison(anchor, ours, weights))
    return out
