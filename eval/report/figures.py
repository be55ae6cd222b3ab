"""The papers' figures, drawn only when they have data.

(1) accuracy with a novel background against clean accuracy, one point per
model with its 95% intervals, a least-squares line with its confidence band per
variant, and y = x (Background Check, Fig. 1); (2) background-only accuracy
against clean accuracy with the chance line; (3) BG-Gap per model with its
interval (Noise or Signal); (4) the prediction categories as stacked bars;
and, when the results hold a Backgrounds Challenge, (5) challenge accuracy
against clean accuracy per model, with y = x (``fig_challenge.png``).
A figure without data is not written; the report gets the reason instead.
Drawn on matplotlib ``Figure`` objects (no pyplot), so no global backend is
switched and nothing leaks between calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eval import metrics as M
from eval.report.compute import Comparison, ModelMetrics, model_order
from eval.report.inputs import NUM_CLASSES
from eval.report.tables import FigureFile

if TYPE_CHECKING:
    from eval.report.challenge import ChallengeResult

MARKERS = ("o", "s", "^", "D", "v", "P")
# Horizontal offset between series as a share of the x range: equal points of two series (same
# model, same accuracy) would otherwise hide one another. A marker is about 2% of the axis wide.
DODGE_SHARE = 0.02
DPI = 110

Drawn = tuple[Any, str]  # (matplotlib Figure, caption)


def figure_name(stem: str, label_space: str) -> str:
    return f"{stem}{'' if label_space == 'in1k' else '_' + label_space}.png"


CHALLENGE_FIGURE = "fig_challenge.png"  # one figure for both label spaces: a marker per label space


def all_figure_names() -> list[str]:
    return [*(figure_name(stem, ls) for stem in FIGURES for ls in NUM_CLASSES), CHALLENGE_FIGURE]


def draw_figures(out_dir: Path, label_space: str, per_model: dict[str, ModelMetrics],
                 comparisons: list[Comparison]) -> tuple[list[FigureFile], list[str]]:
    """Write the figures of one label space that have data; returns them and one line per figure not drawn."""
    try:
        from matplotlib.figure import Figure  # noqa: F401  (optional extra: bgcheck[plots])
    except ImportError:
        return [], [f"{label_space}: matplotlib is not installed (pip install 'bgcheck[plots]'), no figures drawn"]
    order = model_order(per_model)
    written, skipped = [], []
    for stem, (title, build) in FIGURES.items():
        name = figure_name(stem, label_space)
        drawn = build(label_space, order, per_model, comparisons)
        if isinstance(drawn, str):
            skipped.append(f"{name} not drawn: {drawn}")
            continue
        fig, caption = drawn
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=DPI)
        written.append(FigureFile(name, f"{title} ({label_space})", caption))
    return written, skipped


def _new_figure(width: float = 6.4, height: float = 5.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _colors() -> list[str]:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _err(est: M.Estimate) -> tuple[float, float]:
    """Asymmetric error bar lengths in points (0 where there is no interval)."""
    if not _finite(est.lo, est.hi):
        return (0.0, 0.0)
    # Wilson's end can sit a rounding error past the value at 0% or 100%; matplotlib refuses negatives.
    return (max(0.0, 100 * (est.value - est.lo)), max(0.0, 100 * (est.hi - est.value)))


def _scatter_series(ax, series: dict[str, list[tuple[M.Estimate, M.Estimate]]]
                    ) -> tuple[list[float], list[float], float]:
    """Points with x and y intervals, a least-squares line and its 95% band per series.

    Returns the x and the y extents drawn (interval ends included), for the axis limits,
    and the horizontal offset between neighbouring series in points.
    """
    colors, seen_x, seen_y = _colors(), [], []
    k = len(series)
    ends = [100 * v for points in series.values() for x, _ in points for v in (x.lo, x.value, x.hi) if _finite(v)]
    dodge = round(max(0.2, DODGE_SHARE * (max(ends) - min(ends))), 1) if k > 1 else 0.0
    for i, (label, points) in enumerate(series.items()):
        color, marker = colors[i % len(colors)], MARKERS[i % len(MARKERS)]
        xs = np.array([100 * x.value for x, _ in points])
        ys = np.array([100 * y.value for _, y in points])
        offset = (i - (k - 1) / 2) * dodge
        xerr = np.array([_err(x) for x, _ in points]).T
        yerr = np.array([_err(y) for _, y in points]).T
        ax.errorbar(xs + offset, ys, xerr=xerr, yerr=yerr, fmt=marker, color=color, markersize=6,
                    markerfacecolor=color if i % 2 == 0 else "white", elinewidth=0.8, capsize=2,
                    label=f"{label} ({len(points)} model{'s' if len(points) != 1 else ''})", zorder=3)
        seen_x += [*(xs + offset - xerr[0]), *(xs + offset + xerr[1])]
        seen_y += [*(ys - yerr[0]), *(ys + yerr[1])]
        if len(points) >= 2 and np.ptp(xs) > 0:
            grid = np.linspace(xs.min(), xs.max(), 50)
            band = M.linear_fit_band(xs, ys, grid)
            if band is None:  # two models: the line, but no band (no degrees of freedom left)
                slope, intercept, _, _ = M.linear_trend(xs, ys)
                ax.plot(grid, slope * grid + intercept, color=color, linewidth=1.2)
            else:
                fit, lower, upper = band
                ax.plot(grid, fit, color=color, linewidth=1.2)
                ax.fill_between(grid, lower, upper, color=color, alpha=0.12, linewidth=0)
    return seen_x, seen_y, dodge


def _limits(values: list[float], pad: float = 5.0) -> tuple[float, float]:
    """Axis range around the data in points, kept inside [0, 100]."""
    return max(0.0, min(values) - pad), min(100.0, max(values) + pad)


def _fit_note(dodge: float) -> str:
    note = "lines: least-squares fit per variant with its 95% confidence band (band from 3 models, line from 2)"
    if dodge:
        note += (f"; series are offset by {dodge:g} point{'' if dodge == 1 else 's'} horizontally and use distinct "
                 "markers so overlapping ones stay visible")
    return note


def _invariance(label_space: str, order: list[str], per_model: dict[str, ModelMetrics],
                _comparisons: list[Comparison]) -> Drawn | str:
    series = {}
    for variant in M.NOVEL_BACKGROUND_VARIANTS:
        points = [(inv.clean, inv.acc) for m in order if (inv := per_model[m].invariance.get(variant))
                  and _finite(inv.clean.value, inv.acc.value)]
        if points:
            series[variant] = points
    if not series:
        return "no model has original and a novel-background variant (" + ", ".join(M.NOVEL_BACKGROUND_VARIANTS) + ")"
    fig, ax = _new_figure()
    seen_x, seen_y, dodge = _scatter_series(ax, series)
    lo, hi = _limits(seen_x + seen_y)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"clean accuracy, original ({label_space}, %)")
    ax.set_ylabel("accuracy with a novel background (%)")
    ax.set_title("Background invariance")
    ax.legend(fontsize=8, loc="upper left")
    caption = ("Accuracy with the real background replaced against clean accuracy on the same keys: one point per "
               f"model and variant with Wilson 95% intervals on both axes; {_fit_note(dodge)}; dashed: y = x "
               "(on the line = fully invariant).")
    return fig, caption


def _influence(label_space: str, order: list[str], per_model: dict[str, ModelMetrics],
               _comparisons: list[Comparison]) -> Drawn | str:
    series = {}
    for variant in M.BACKGROUND_ONLY_VARIANTS:
        points = [(mm.clean, infl.acc) for m in order if (mm := per_model[m]).clean
                  and (infl := mm.influence.get(variant)) and _finite(mm.clean.value, infl.acc.value)]
        if points:
            series[variant] = points
    if not series:
        return "no model has original and a background-only variant (" + ", ".join(M.BACKGROUND_ONLY_VARIANTS) + ")"
    fig, ax = _new_figure()
    seen_x, seen_y, dodge = _scatter_series(ax, series)
    chance = 100 / NUM_CLASSES[label_space]
    ax.axhline(chance, color="k", linestyle=":", linewidth=1, label=f"chance (1/{NUM_CLASSES[label_space]})")
    ax.set_xlim(*_limits(seen_x))
    # A little below 0, so a model at 0% (common with the background alone) is not hidden by the axis.
    ax.set_ylim(-2.5, min(100.0, max(*seen_y, chance) + 5))
    ax.set_xlabel(f"clean accuracy, original ({label_space}, %)")
    ax.set_ylabel("accuracy on the background alone (%)")
    ax.set_title("Background influence")
    ax.legend(fontsize=8, loc="upper left")
    caption = ("Accuracy with the foreground removed against clean accuracy: one point per model and variant with "
               f"Wilson 95% intervals; {_fit_note(dodge)}; dotted: chance, 1/{NUM_CLASSES[label_space]} (above it, the "
               "background alone carries label information).")
    return fig, caption


def _bg_gap(label_space: str, order: list[str], per_model: dict[str, ModelMetrics],
            comparisons: list[Comparison]) -> Drawn | str:
    models = [m for m in order if (gap := per_model[m].bg_gap) is not None and math.isfinite(gap.value)]
    if not models:
        return "no model has both mixed_same and mixed_rand"
    fig, ax = _new_figure(max(5.0, 0.45 * len(models) + 2.5), 4.2)
    gaps = [per_model[m].bg_gap for m in models]
    ys = np.array([100 * g.value for g in gaps])  # type: ignore[union-attr]
    err = np.array([_err(g) for g in gaps]).T  # type: ignore[arg-type]
    ax.errorbar(range(len(models)), ys, yerr=err, fmt="o", color=_colors()[0], capsize=3, label="ours (95% bootstrap)")
    published = [(models.index(c.published.model), 100 * c.published.value) for c in comparisons
                 if c.published.metric == "bg_gap" and c.published.label_space == label_space
                 and c.published.model in models]
    if published:
        ax.scatter(*zip(*published, strict=True), marker="*", s=110, color=_colors()[1], zorder=3, label="published")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=60 if len(models) > 3 else 0, ha="right" if len(models) > 3
                  else "center", fontsize=7)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("BG-Gap (points)")
    ax.set_title("BG-Gap: acc(mixed_same) − acc(mixed_rand)", fontsize=10)
    ax.legend(fontsize=8)
    caption = ("BG-Gap per model (models by clean accuracy) with its paired-bootstrap 95% interval"
               + ("; stars: the published value" if published else "") + ".")
    return fig, caption


def _categories(label_space: str, order: list[str], per_model: dict[str, ModelMetrics],
                _comparisons: list[Comparison]) -> Drawn | str:
    models = [m for m in order if (cats := per_model[m].categories) is not None and cats.n > 0]
    if not models:
        return "no model has original, mixed_rand and only_bg_t"
    fig, ax = _new_figure(max(5.5, 0.45 * len(models) + 4.0), 4.2)
    colors = _colors()
    bottom = np.zeros(len(models))
    for i, category in enumerate(M.CATEGORIES):
        shares = np.array([100 * per_model[m].categories.fractions[category] for m in models])  # type: ignore[union-attr]
        ax.bar(range(len(models)), shares, bottom=bottom, color=colors[i % len(colors)],
               label=M.CATEGORY_TITLES[category], edgecolor="white", linewidth=0.5)
        bottom += shares
    ax.set_xticks(range(len(models)), models, rotation=60 if len(models) > 3 else 0, ha="right" if len(models) > 3
                  else "center", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("images (%)")
    ax.set_title("Prediction categories (Noise or Signal)")
    handles, labels = ax.get_legend_handles_labels()  # listed top-down, as the bars stack
    ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    caption = ("Share of images per Noise or Signal category per model (original, mixed_rand, only_bg_t over "
               "shared keys); each bar sums to 100%.")
    return fig, caption


# File stem -> (title, drawing function returning the figure and its caption, or why it is not drawn).
FIGURES: dict[str, tuple[str, Callable[[str, list[str], dict[str, ModelMetrics], list[Comparison]], Drawn | str]]] = {
    "fig_invariance": ("Background invariance", _invariance),
    "fig_influence": ("Background influence", _influence),
    "fig_bg_gap": ("BG-Gap per model", _bg_gap),
    "fig_categories": ("Prediction categories", _categories),
}


def draw_challenge(out_dir: Path, results: Sequence[ChallengeResult],
                   reference: Sequence[tuple[str, float, float]]) -> tuple[list[FigureFile], list[str]]:
    """fig_challenge.png when a model has both a challenge and a clean accuracy; else why it is not drawn."""
    points = [r for r in results if r.accuracy is not None and r.clean is not None
              and _finite(r.accuracy.value, r.clean.value)]
    if not points:
        return [], [f"{CHALLENGE_FIGURE} not drawn: no model has both a challenge accuracy and a clean accuracy "
                    "(accuracy on original, scored by eval.score) in the challenge's label space"]
    try:
        from matplotlib.figure import Figure  # noqa: F401  (optional extra: bgcheck[plots])
    except ImportError:
        return [], [f"{CHALLENGE_FIGURE} not drawn: matplotlib is not installed (pip install 'bgcheck[plots]')"]
    fig, ax = _new_figure()
    colors, seen = _colors(), []
    spaces = [ls for ls in NUM_CLASSES if any(r.label_space == ls for r in points)]
    for i, ls in enumerate(spaces):
        mine = [r for r in points if r.label_space == ls]
        xs = np.array([100 * r.clean.value for r in mine])  # type: ignore[union-attr]
        ys = np.array([100 * r.accuracy.value for r in mine])  # type: ignore[union-attr]
        xerr = np.array([_err(r.clean) for r in mine]).T  # type: ignore[arg-type]
        yerr = np.array([_err(r.accuracy) for r in mine]).T  # type: ignore[arg-type]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=MARKERS[i], color=colors[i], markersize=6, elinewidth=0.8,
                    capsize=2, label=f"{ls} ({len(mine)} model{'s' if len(mine) != 1 else ''})", zorder=3)
        for r, x, y in zip(mine, xs, ys, strict=True):  # names to the left of points in the right half
            right = x > 50
            ax.annotate(r.model, (x, y), xytext=(-4 if right else 4, 4), textcoords="offset points", fontsize=7,
                        ha="right" if right else "left")
        seen += [*(xs - xerr[0]), *(xs + xerr[1]), *(ys - yerr[0]), *(ys + yerr[1])]
    shown_reference = "in9" in spaces and bool(reference)
    if shown_reference:
        rx, ry = [100 * c for _, _, c in reference], [100 * a for _, a, _ in reference]
        ax.scatter(rx, ry, marker="*", s=110, color=colors[len(spaces) % len(colors)], zorder=3,
                   label="Noise or Signal (in9, published)")
        for (name, _, _), x, y in zip(reference, rx, ry, strict=True):
            ax.annotate(name, (x, y), xytext=(-4, -10), textcoords="offset points", fontsize=7, ha="right")
        seen += rx + ry
    lo, hi = _limits(seen)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="y = x")
    # Room past 0 and 100, so a point there (common: 0% challenge accuracy) is not hidden by the frame.
    ax.set_xlim(lo - 2.5, hi + 2.5)
    ax.set_ylim(lo - 2.5, hi + 2.5)
    ax.set_xlabel("clean accuracy, original (%)")
    ax.set_ylabel("challenge accuracy (%)")
    ax.set_title("Backgrounds Challenge")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / CHALLENGE_FIGURE, dpi=DPI)
    caption = ("Challenge accuracy (share of foregrounds no background fools) against clean accuracy on original, "
               "in the challenge's label space: one point per model with Wilson 95% intervals on both axes; dashed: "
               "y = x (how far below it a model lies is roughly what its worst-case backgrounds cost)"
               + ("; stars: Noise or Signal's published ResNet-50s (IN-9)." if shown_reference else "."))
    left_out = [r.model for r in results if r.accuracy is not None and r not in points]
    skipped = [f"{CHALLENGE_FIGURE}: {', '.join(left_out)} left out (no clean accuracy in the challenge's label "
               "space)"] if left_out else []
    return [FigureFile(CHALLENGE_FIGURE, "Backgrounds Challenge", caption)], skipped
