"""Every metric the report shows: pure functions over numpy arrays, and one table of them.

Inputs are per-sample correctness vectors (bool arrays). Anything that
compares two variants takes vectors that are already aligned by sample key
(:func:`join_by_key`): the same index is the same source image in every
variant, so differences are paired, never positional accidents.

:data:`METRICS` names every number the report writes (one row per metric:
its group, the variants it reads, unit, formula, paper). ``metrics.csv``,
the report's tables, the trends and the README's metric section are all
rendered from it, so a metric is defined, named and documented here once.

Sources:

- *Time for a Background Check! Uncovering the impact of Background Features
  on Deep Neural Networks* (Sehwag, Oak, Chiang, Mittal, 2020): background
  invariance and background influence, both read against clean accuracy.
- *Noise or Signal: The Role of Image Backgrounds in Object Recognition*
  (Xiao, Engstrom, Ilyas, Madry, 2020): BG-Gap, per-image prediction
  categories (their Table 3 / Figure 7), and how often the background's
  class wins on Mixed-Next / Mixed-Rand (the background-class rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np

from pipeline.classes import in9_mapping
from pipeline.variants import VARIANT_SPECS, VARIANTS, variants_in_group

Z_95 = 1.96  # two-sided 95% normal quantile, as usually quoted

# Read from the variant table, never listed here: the foreground on a background it was not
# photographed with (Background Check invariance; NoS Mixed-Rand), and no foreground left
# (Background Check influence; NoS Only-BG-B/T, No-FG).
NOVEL_BACKGROUND_VARIANTS = variants_in_group("novel_background")
BACKGROUND_ONLY_VARIANTS = variants_in_group("background_only")
# The foreground over another image's background (a partner): each sample knows the class of the image its
# background came from (``bg_label``), so the model's answer can be checked against it.
MIXED_VARIANTS = tuple(v for v, spec in VARIANT_SPECS.items() if spec.partner is not None)

# NoS Table 3, in their order. Correctness on (Original, Mixed-Rand, Only-BG-T):
CATEGORIES = ("bg_required", "bg_fools", "bg_fg_required", "bg_fg_fools", "bg_irrelevant")
CATEGORY_TITLES = {
    "bg_required": "BG Required",
    "bg_fools": "BG Fools",
    "bg_fg_required": "BG+FG Required",
    "bg_fg_fools": "BG+FG Fools",
    "bg_irrelevant": "BG Irrelevant",
}

# The rule behind each category, as prediction_categories applies it (O, M, B: correct on each view).
CATEGORY_RULES = {
    "bg_required": "O ∧ ¬M ∧ B",
    "bg_fools": "¬O ∧ M ∧ ¬B",
    "bg_fg_required": "O ∧ ¬M ∧ ¬B",
    "bg_fg_fools": "¬O ∧ M ∧ B",
    "bg_irrelevant": "O = M",
}

BACKGROUND_CHECK = "Background Check (Sehwag et al. 2020)"
NOISE_OR_SIGNAL = "Noise or Signal (Xiao et al. 2020)"


@dataclass(frozen=True)
class Estimate:
    """A proportion (or difference of proportions) with a 95% interval over ``n`` samples."""

    value: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class Invariance:
    """Accuracy with the original background replaced, paired with clean accuracy on the same keys."""

    clean: Estimate
    acc: Estimate
    drop: float
    ratio: float

    @property
    def n(self) -> int:
        return self.acc.n


@dataclass(frozen=True)
class Influence:
    """Accuracy with only the background left, and how far it sits above guessing."""

    acc: Estimate
    chance: float
    above_chance: float


@dataclass(frozen=True)
class Categories:
    """Counts per NoS prediction category over ``n`` images seen in all three variants."""

    counts: dict[str, int]
    n: int

    @property
    def fractions(self) -> dict[str, float]:
        return {c: (self.counts[c] / self.n if self.n else math.nan) for c in self.counts}

    def share(self, category: str) -> Estimate:
        """Fraction of images in ``category`` with its Wilson interval."""
        lo, hi = wilson_interval(self.counts[category], self.n)
        return Estimate(self.counts[category] / self.n if self.n else math.nan, lo, hi, self.n)


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (Wilson, 1927).

    With p = k/n::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z * sqrt(p (1 - p) / n + z^2 / (4 n^2)) / (1 + z^2 / n)
        (lo, hi) = (centre - half, centre + half)

    Chosen over the normal approximation because it stays inside [0, 1] and
    keeps its coverage at accuracies near 0 (background-only) or 1 (clean).
    ``n == 0`` gives (nan, nan).
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(correct: np.ndarray, z: float = Z_95) -> Estimate:
    """Top-1 accuracy = mean(correct), with the Wilson interval; empty input gives nan."""
    correct = np.asarray(correct, dtype=bool)
    n = int(correct.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    k = int(correct.sum())
    lo, hi = wilson_interval(k, n, z)
    return Estimate(k / n, lo, hi, n)


def background_class_rate(pred: np.ndarray, bg_label: np.ndarray, z: float = Z_95) -> Estimate:
    """Share of mixed samples predicted as the class of the image their background came from.

    Over the samples that carry a background class (``bg_label >= 0``)::

        rate = mean(pred = bg_label)

    with the Wilson interval (:func:`accuracy` of that comparison). ``pred`` and
    ``bg_label`` are in one label space: ImageNet-1k indices, or IN-9 indices
    from :func:`in9_background_labels` (a background class outside the 370 IN-9
    classes is -1 there and drops out; an IN-9 prediction outside them, -1,
    never matches). The caller restricts rows as the label space's accuracy does.

    On mixed_rand and mixed_next this is the share of images where the
    background won over the foreground (NoS: predictions that follow the
    background). On mixed_same the background's class is the foreground's own
    under the builder's ``--partner-level`` (the in1k class, or the IN-9
    superclass), so there the rate equals accuracy in that label space. It is
    kept, not excluded: with ``--partner-level in9`` the in1k rate on mixed_same
    measures something accuracy does not (answering the partner's fine class),
    and a value for every mixed variant keeps the table beside accuracy
    complete; the group's caption says so.
    """
    pred = np.asarray(pred, dtype=np.int64)
    bg_label = np.asarray(bg_label, dtype=np.int64)
    if pred.shape != bg_label.shape:
        raise ValueError("predictions and background classes must be aligned (same length)")
    carries = bg_label >= 0
    return accuracy(pred[carries] == bg_label[carries], z)


def in9_background_labels(bg_label: np.ndarray) -> np.ndarray:
    """IN-9 superclass of each sample's background class; -1 without a background or outside the 370 classes."""
    bg_label = np.asarray(bg_label, dtype=np.int64)
    mapping = np.asarray(in9_mapping(), dtype=np.int64)
    return np.where(bg_label >= 0, mapping[np.clip(bg_label, 0, mapping.size - 1)], -1)


def background_invariance(clean_correct: np.ndarray, variant_correct: np.ndarray) -> Invariance:
    """Background Check invariance for one novel-background variant (only_fg, texture, mixed_rand).

    Over the keys present in both variants (inputs aligned by key)::

        drop  = acc(original) - acc(variant)
        ratio = acc(variant) / acc(original)      (nan when acc(original) = 0)

    A drop near 0 / ratio near 1 means the prediction survives losing the
    real background; Sehwag et al. plot acc(variant) against clean accuracy
    with a y = x line for this reason.
    """
    clean_correct = np.asarray(clean_correct, dtype=bool)
    variant_correct = np.asarray(variant_correct, dtype=bool)
    if clean_correct.shape != variant_correct.shape:
        raise ValueError("clean and variant correctness must be aligned by key (same length)")
    clean = accuracy(clean_correct)
    acc = accuracy(variant_correct)
    drop = clean.value - acc.value
    ratio = acc.value / clean.value if clean.value > 0 else math.nan
    return Invariance(clean=clean, acc=acc, drop=drop, ratio=ratio)


def background_influence(correct: np.ndarray, num_classes: int) -> Influence:
    """Background Check influence for one background-only variant (only_bg_b, only_bg_t, no_fg).

    ``chance = 1 / num_classes`` (1/1000 for ImageNet-1k, 1/9 for ImageNet-9)
    and ``above_chance = acc - chance``: any accuracy above guessing must come
    from the background alone, since the foreground has been removed.
    """
    if num_classes <= 0:
        raise ValueError("num_classes must be positive")
    acc = accuracy(correct)
    chance = 1.0 / num_classes
    return Influence(acc=acc, chance=chance, above_chance=acc.value - chance)


def bg_gap(
    same_correct: np.ndarray,
    rand_correct: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """NoS BG-Gap = acc(mixed_same) - acc(mixed_rand), with a paired bootstrap interval.

    Both images of a pair carry the same foreground, so the gap isolates how
    much a class-consistent background helps. Inputs are aligned by key. The
    interval resamples *keys* with replacement ``n_boot`` times (both variants
    of a key move together) using ``np.random.default_rng(seed)``, and takes
    the ((1 - level)/2, (1 + level)/2) percentiles of the resampled gaps.
    Deterministic for a fixed seed; ``n_boot = 0`` gives no interval.
    """
    same = np.asarray(same_correct, dtype=bool)
    rand = np.asarray(rand_correct, dtype=bool)
    if same.shape != rand.shape:
        raise ValueError("mixed_same and mixed_rand correctness must be aligned by key (same length)")
    n = int(same.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    diff = same.astype(np.float64) - rand.astype(np.float64)
    value = float(diff.mean())
    if n_boot <= 0:
        return Estimate(value, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    gaps = np.empty(n_boot, dtype=np.float64)
    # Chunks of replicates bound memory at chunk*n indices; drawing (chunk, n)
    # consumes the generator exactly as n_boot draws of size n would.
    chunk = max(1, min(n_boot, 2_000_000 // n))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        gaps[start:stop] = diff[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(gaps, [tail, 100.0 - tail])
    return Estimate(value, float(lo), float(hi), n)


def prediction_categories(
    original_correct: np.ndarray,
    mixed_rand_correct: np.ndarray,
    only_bg_t_correct: np.ndarray,
) -> Categories:
    """NoS per-image prediction categories (Xiao et al. 2020, Table 3 and Figure 7).

    NoS read the full image from ORIGINAL (O), the foreground alone from
    MIXED-RAND (M) and the background alone from ONLY-BG-T (B); inputs are
    aligned by key. With 1 = correct, 0 = wrong:

    ================  ===  ===  ===
    category           O    M    B
    ================  ===  ===  ===
    BG Required        1    0    1
    BG Fools           0    1    0
    BG+FG Required     1    0    0
    BG+FG Fools        0    1    1
    BG Irrelevant      O == M   any
    ================  ===  ===  ===

    The five cover all eight outcomes exactly once (they partition the
    images), so the counts sum to ``n`` and no "other" bucket exists.
    BG Required + BG+FG Required is NoS' "needs the background" share (about
    35% for their ORIGINAL-trained ResNet-50).
    """
    o = np.asarray(original_correct, dtype=bool)
    m = np.asarray(mixed_rand_correct, dtype=bool)
    b = np.asarray(only_bg_t_correct, dtype=bool)
    if not o.shape == m.shape == b.shape:
        raise ValueError("original, mixed_rand and only_bg_t must be aligned by key (same length)")
    masks = {
        "bg_required": o & ~m & b,
        "bg_fools": ~o & m & ~b,
        "bg_fg_required": o & ~m & ~b,
        "bg_fg_fools": ~o & m & b,
        "bg_irrelevant": o == m,
    }
    return Categories(counts={c: int(masks[c].sum()) for c in CATEGORIES}, n=int(o.size))


def linear_trend(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[float, float, float, int]:
    """Least-squares line y = slope * x + intercept and Pearson r over finite (x, y) pairs.

    ``slope = cov(x, y) / var(x)``, ``intercept = mean(y) - slope * mean(x)``,
    ``r = cov(x, y) / (sd(x) sd(y))``. This is the "line of best fit" both
    papers draw across models. Returns (slope, intercept, r, n); fewer than
    two points or constant x give nan slope/intercept/r, constant y gives nan r.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape:
        raise ValueError("x and y must have the same length")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    if n < 2:
        return (math.nan, math.nan, math.nan, n)
    dx, dy = xa - xa.mean(), ya - ya.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0.0:
        return (math.nan, math.nan, math.nan, n)
    slope = sxy / sxx
    intercept = float(ya.mean() - slope * xa.mean())
    r = sxy / math.sqrt(sxx * syy) if syy > 0.0 else math.nan
    return (slope, intercept, r, n)


def join_by_key(*columns: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Align ``(keys, values)`` pairs on the keys they all share, sorted by key.

    Returns ``(shared_keys, [values aligned to shared_keys, ...])``. Row order
    in the inputs is irrelevant: variants join by key, never by position.
    Keys must be unique within each input.
    """
    if not columns:
        return np.array([], dtype=str), []
    key_arrays = []
    for keys, values in columns:
        keys = np.asarray(keys).astype(str)
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        if np.unique(keys).size != keys.size:
            raise ValueError("duplicate keys")
        key_arrays.append(keys)
    shared = reduce(lambda a, b: np.intersect1d(a, b, assume_unique=True), key_arrays)
    aligned = []
    for keys, (_, values) in zip(key_arrays, columns, strict=True):
        order = np.argsort(keys, kind="stable")
        rows = order[np.searchsorted(keys[order], shared)]
        aligned.append(np.asarray(values)[rows])
    return shared, aligned


def t_critical(level: float, df: int) -> float:
    """Two-sided Student-t critical value: the t with P(|T| <= t) = ``level`` for ``df`` degrees of freedom.

    Regression bands over a handful of models need the exact small-df value
    (12.71 at df = 1, 4.30 at df = 2), where the normal 1.96 is far too
    narrow. P(|T| <= t) has a closed form for integer df (Abramowitz & Stegun
    26.7.3-4, with theta = atan(t / sqrt(df))), inverted here by bisection.
    """
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")

    def coverage(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        c2, s = math.cos(theta) ** 2, math.sin(theta)
        if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
            term, total = math.cos(theta), 0.0
            for k in range(1, (df - 1) // 2 + 1):
                total += term
                term *= c2 * (2 * k) / (2 * k + 1)
            return 2.0 / math.pi * (theta + s * total)
        term, total = 1.0, 0.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        return s * total

    lo, hi = 0.0, 1.0
    while coverage(hi) < level:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if coverage(mid) < level else (lo, mid)
    return (lo + hi) / 2.0


def linear_fit_band(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    grid: Sequence[float] | np.ndarray,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Least-squares line over finite (x, y) pairs and its confidence band for the mean, on ``grid``.

    With s^2 = sum(residual^2) / (n - 2) and t the two-sided Student-t value
    for ``level`` at n - 2 degrees of freedom::

        fit(x0)  = intercept + slope * x0
        half(x0) = t * s * sqrt(1/n + (x0 - mean(x))^2 / sum((x - mean(x))^2))

    This is the band drawn around each trend line in the report's figures
    (how uncertain the *line* is across models, not where one model falls).
    Returns (fit, lower, upper), or None with fewer than 3 points or constant x.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    slope, intercept, _, _ = linear_trend(xa, ya)
    if n < 3 or not math.isfinite(slope):
        return None
    g = np.asarray(grid, dtype=np.float64)
    residual = ya - (intercept + slope * xa)
    s = math.sqrt(float(residual @ residual) / (n - 2))
    sxx = float(((xa - xa.mean()) ** 2).sum())
    half = t_critical(level, n - 2) * s * np.sqrt(1.0 / n + (g - xa.mean()) ** 2 / sxx)
    fit = intercept + slope * g
    return fit, fit - half, fit + half


# ---------------------------------------------------------------- the metric table


@dataclass(frozen=True)
class MetricGroup:
    """Metrics computed together from the same variants; one report table each.

    ``name`` is also the field of the report's ``ModelMetrics`` that holds the
    group's typed results (a dict by variant, or one result for the group).
    """

    name: str
    title: str
    paper: str
    caption: str
    # Metrics of other groups shown beside this group's values, for the same model and variant (display only).
    beside: tuple[str, ...] = ()


@dataclass(frozen=True)
class Metric:
    """One named number of the report (a row of :data:`METRICS`)."""

    name: str  # the metrics.csv ``metric`` value
    group: str  # a MetricGroup name
    column: str  # short column title in the report's tables
    per_variant: tuple[str, ...]  # one value per variant present; () = one value for the group
    reads_also: tuple[str, ...]  # variants read beside the row's own variant
    unit: str  # "fraction" (shown in %), "difference" (of fractions, shown in points) or "ratio"
    formula: str
    interval: str  # how lo/hi are obtained; "" = no interval
    paper: str
    # The group's typed result (Estimate, Invariance, ...) -> {breakdown key: value}; key "" = no breakdown.
    values: Callable[[Any], dict[str, Estimate]]
    breakdown: str = ""  # metrics.csv column that holds the breakdown key ("category", "class")
    label_spaces: tuple[str, ...] = ("in1k", "in9")
    trend: bool = True  # trended across models

    def reads(self, variant: str = "") -> tuple[str, ...]:
        """Every variant one value of this metric is computed from."""
        return (*self.reads_also, variant) if variant else self.reads_also


def _point(value: float, n: int) -> Estimate:
    return Estimate(value, math.nan, math.nan, n)


def _whole(estimate: Estimate) -> dict[str, Estimate]:
    return {"": estimate}


def _above_chance(influence: Influence) -> dict[str, Estimate]:
    # The chance level is a constant, so the Wilson interval of acc shifts by it.
    acc, chance = influence.acc, influence.chance
    return {"": Estimate(influence.above_chance, acc.lo - chance, acc.hi - chance, acc.n)}


WILSON = "Wilson 95%"
METRIC_GROUPS: tuple[MetricGroup, ...] = (
    MetricGroup("accuracy", "Accuracy on every variant", "—",
                "Top-1 over each variant's own samples, Wilson 95% interval."),
    MetricGroup("background_class", "Background-class rate", NOISE_OR_SIGNAL,
                "The foreground over another image's background: how often the model answers the class of the "
                "image the background came from, over the samples whose background class is in the label space, "
                "Wilson 95% interval; `accuracy` beside it. On mixed_rand and mixed_next that is the background "
                "winning over the foreground. On mixed_same the background's class is the foreground's own "
                "(under the builder's --partner-level), so there the rate equals accuracy.",
                beside=("accuracy",)),
    MetricGroup("invariance", "Background invariance", BACKGROUND_CHECK,
                "The real background replaced; paired over the keys in both original and the variant."),
    MetricGroup("influence", "Background influence", BACKGROUND_CHECK,
                "The foreground removed: accuracy above chance can only come from the background."),
    MetricGroup("bg_gap", "BG-Gap", NOISE_OR_SIGNAL,
                "acc(mixed_same) − acc(mixed_rand) over their shared keys: how much a background of the "
                "right class helps the same foreground."),
    MetricGroup("categories", "Prediction categories", f"{NOISE_OR_SIGNAL}, Table 3",
                "Per image from correctness on original (full image), mixed_rand (foreground alone) and "
                "only_bg_t (background alone), over shared keys; the five categories partition the images."),
    MetricGroup("class_accuracy", "Accuracy per class", "—",
                "Top-1 over each variant's samples of one class, Wilson 95% interval."),
)

METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "accuracy", "top-1", VARIANTS, (), "fraction",
           "mean(pred = label) over the variant's samples (in9: IN-9 prediction = IN-9 label, over samples of the "
           "370 IN-9 classes; a prediction outside them is wrong)",
           f"{WILSON}: centre = (p + z²/2n)/(1 + z²/n), half-width = z·sqrt(p(1−p)/n + z²/4n²)/(1 + z²/n), z = 1.96",
           "—", _whole),
    Metric("background_class_rate", "background_class", "bg-class rate", MIXED_VARIANTS, (), "fraction",
           "mean(pred = bg_label) over the variant's samples with a background class (`bg_label`: the "
           "ImageNet-1k class of the image whose background the sample carries); in9: IN-9 prediction = IN-9 "
           "class of `bg_label`, over the IN-9 samples whose background class is one of the 370 IN-9 classes",
           WILSON, NOISE_OR_SIGNAL, _whole),
    Metric("invariance_clean_accuracy", "invariance", "clean", NOVEL_BACKGROUND_VARIANTS, ("original",),
           "fraction", "acc(original) over the keys shared with the variant", WILSON, BACKGROUND_CHECK,
           lambda inv: _whole(inv.clean), trend=False),
    Metric("invariance_accuracy", "invariance", "novel background", NOVEL_BACKGROUND_VARIANTS, ("original",),
           "fraction", "acc(variant) over the keys shared with original (equals `accuracy` of the variant "
           "when original has all of its keys)", WILSON, BACKGROUND_CHECK, lambda inv: _whole(inv.acc),
           trend=False),  # its trend would repeat the variant's `accuracy` trend
    Metric("invariance_drop", "invariance", "drop", NOVEL_BACKGROUND_VARIANTS, ("original",), "difference",
           "acc(original) − acc(variant) over the shared keys", "", BACKGROUND_CHECK,
           lambda inv: _whole(_point(inv.drop, inv.n))),
    Metric("invariance_ratio", "invariance", "ratio", NOVEL_BACKGROUND_VARIANTS, ("original",), "ratio",
           "acc(variant) / acc(original) over the shared keys (empty when acc(original) = 0)", "", BACKGROUND_CHECK,
           lambda inv: _whole(_point(inv.ratio, inv.n))),
    Metric("influence_above_chance", "influence", "above chance", BACKGROUND_ONLY_VARIANTS, (), "difference",
           "acc(variant) − chance, chance = 1/C of the label space (1/1000 in1k, 1/9 in9; in metrics.json); "
           "acc(variant) itself is `accuracy`", f"{WILSON} of acc(variant), minus chance", BACKGROUND_CHECK,
           _above_chance, trend=False),  # `accuracy` shifted by a constant: same slope and r
    Metric("bg_gap", "bg_gap", "BG-Gap", (), ("mixed_same", "mixed_rand"), "difference",
           "acc(mixed_same) − acc(mixed_rand) over the shared keys",
           "paired bootstrap 95%: resample keys with replacement B times (`numpy.random.default_rng(seed)`), "
           "percentiles 2.5/97.5 of the resampled gaps", NOISE_OR_SIGNAL, _whole),
    Metric("category_share", "categories", "share", (), ("original", "mixed_rand", "only_bg_t"), "fraction",
           "fraction of the shared keys in each category (`category` column), with O, M, B = correct on original, "
           "mixed_rand, only_bg_t: " + "; ".join(f"**{CATEGORY_TITLES[c]}** (`{c}`) {CATEGORY_RULES[c]}"
                                                 for c in CATEGORIES) + ". The five partition the images",
           WILSON, f"{NOISE_OR_SIGNAL}, Table 3",
           lambda cats: {c: cats.share(c) for c in CATEGORIES}, breakdown="category"),
    Metric("class_accuracy", "class_accuracy", "top-1", VARIANTS, (), "fraction",
           "`accuracy` over the variant's samples of one class (`class` column: the class name)", WILSON, "—",
           lambda by_class: dict(by_class), breakdown="class", label_spaces=("in9",), trend=False),
)

METRIC_BY_NAME = {m.name: m for m in METRICS}


# ---------------------------------------------------------------- published anchors


@dataclass(frozen=True)
class PublishedValue:
    """A number a paper reports for a model we can score, shown beside ours."""

    model: str  # our registry id
    weights: str  # the weights the published number was measured with
    label_space: str
    metric: str  # a METRICS name
    variant: str  # "" for metrics of a fixed set of variants (bg_gap)
    value: float
    source: str


NOS_README = "Noise or Signal, github.com/MadryLab/backgrounds_challenge README (pretrained ResNet-50)"
# torchvision had only these ResNet-50 weights in 2020; IMAGENET1K_V2 came later and scores differently.
PUBLISHED: tuple[PublishedValue, ...] = (
    PublishedValue("resnet50", "IMAGENET1K_V1", "in9", "accuracy", "original", 0.956, NOS_README),
    PublishedValue("resnet50", "IMAGENET1K_V1", "in9", "accuracy", "mixed_same", 0.862, NOS_README),
    PublishedValue("resnet50", "IMAGENET1K_V1", "in9", "accuracy", "mixed_rand", 0.789, NOS_README),
    PublishedValue("resnet50", "IMAGENET1K_V1", "in9", "bg_gap", "", 0.073, NOS_README),
)
