"""Every metric the report shows, as pure functions over numpy arrays.

Inputs are per-sample correctness vectors (bool arrays). Anything that
compares two variants takes vectors that are already aligned by sample key
(:func:`join_by_key`): the same index is the same source image in every
variant, so differences are paired, never positional accidents.

Sources:

- *Time for a Background Check! Uncovering the impact of Background Features
  on Deep Neural Networks* (Sehwag, Oak, Chiang, Mittal, 2020): background
  invariance and background influence, both read against clean accuracy.
- *Noise or Signal: The Role of Image Backgrounds in Object Recognition*
  (Xiao, Engstrom, Ilyas, Madry, 2020): BG-Gap and per-image prediction
  categories (their Table 3 / Figure 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

Z_95 = 1.96  # two-sided 95% normal quantile, as usually quoted

# Variants that keep the foreground but put it on a background it was not
# photographed with (Background Check invariance; NoS Mixed-Rand).
NOVEL_BACKGROUND_VARIANTS = ("only_fg", "texture", "mixed_rand")
# Variants with no foreground left (Background Check influence; NoS Only-BG-B/T, No-FG).
BACKGROUND_ONLY_VARIANTS = ("only_bg_b", "only_bg_t", "no_fg")

# NoS Table 3, in their order. Correctness on (Original, Mixed-Rand, Only-BG-T):
CATEGORIES = ("bg_required", "bg_fools", "bg_fg_required", "bg_fg_fools", "bg_irrelevant")
CATEGORY_TITLES = {
    "bg_required": "BG Required",
    "bg_fools": "BG Fools",
    "bg_fg_required": "BG+FG Required",
    "bg_fg_fools": "BG+FG Fools",
    "bg_irrelevant": "BG Irrelevant",
    "other": "Other",
}


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

    @property
    def other(self) -> int:
        """Images in no category; zero for the NoS table, which covers all eight outcomes."""
        return self.n - sum(self.counts.values())


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

    The five cover all eight outcomes exactly once, so ``Categories.other``
    is 0; it is kept so a reader can check that the fractions sum to 1.
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
