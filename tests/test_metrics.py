"""eval.metrics on small prediction sets whose answers are worked out by hand below."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from eval import metrics as M

# Wilson with z = 1.96 (z^2 = 3.8416), n = 10: denom = 1 + 3.8416/10 = 1.38416.
#   k = 7: p = .7, centre = (.7 + .19208)/1.38416 = .644492,
#          half = 1.96*sqrt(.021 + .009604)/1.38416 = 1.96*.174940/1.38416 = .247718
#          -> (.396774, .892210)
#   k = 4: centre = (.4 + .19208)/1.38416 = .427754,
#          half = 1.96*sqrt(.024 + .009604)/1.38416 = .259577 -> (.168177, .687331)
#   k = 0: centre = half = .19208/1.38416 = .138770 -> (0, .277540)
#   k = 10: mirror of k = 0 -> (.722460, 1)
WILSON_10 = {7: (0.396774, 0.892210), 4: (0.168177, 0.687331), 0: (0.0, 0.277540), 10: (0.722460, 1.0)}


@pytest.mark.parametrize("k", sorted(WILSON_10))
def test_wilson_matches_hand_computation(k):
    lo, hi = M.wilson_interval(k, 10)
    assert lo == pytest.approx(WILSON_10[k][0], abs=2e-6)
    assert hi == pytest.approx(WILSON_10[k][1], abs=2e-6)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in M.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        M.wilson_interval(11, 10)
    # Wider z -> wider interval around the same data.
    lo95, hi95 = M.wilson_interval(7, 10)
    lo99, hi99 = M.wilson_interval(7, 10, z=2.576)
    assert lo99 < lo95 and hi99 > hi95


def test_accuracy_ten_samples():
    # samples 0..9; correct: 0,1,2,4,5,7,9 -> 7/10
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    est = M.accuracy(correct)
    assert est.value == pytest.approx(0.7)
    assert est.n == 10
    assert (est.lo, est.hi) == pytest.approx(WILSON_10[7], abs=2e-6)
    empty = M.accuracy(np.array([], dtype=bool))
    assert empty.n == 0 and math.isnan(empty.value)


def test_background_invariance_ten_samples():
    # clean: 7/10 correct (0..6); variant: 4/10 correct (0, 2, 5, 8)
    clean = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    variant = np.array([1, 0, 1, 0, 0, 1, 0, 0, 1, 0], dtype=bool)
    inv = M.background_invariance(clean, variant)
    assert inv.clean.value == pytest.approx(0.7)
    assert inv.acc.value == pytest.approx(0.4)
    assert inv.drop == pytest.approx(0.3)  # .7 - .4
    assert inv.ratio == pytest.approx(4 / 7)  # .4 / .7 = .571429
    assert (inv.acc.lo, inv.acc.hi) == pytest.approx(WILSON_10[4], abs=2e-6)
    assert inv.n == 10
    zero = M.background_invariance(np.zeros(3, bool), np.ones(3, bool))
    assert math.isnan(zero.ratio)
    with pytest.raises(ValueError):
        M.background_invariance(clean, variant[:5])


def test_background_influence_chance():
    # 2 of 10 correct with no foreground.
    correct = np.array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    in1k = M.background_influence(correct, 1000)
    assert in1k.acc.value == pytest.approx(0.2)
    assert in1k.chance == pytest.approx(0.001)
    assert in1k.above_chance == pytest.approx(0.199)  # .2 - 1/1000
    in9 = M.background_influence(correct, 9)
    assert in9.above_chance == pytest.approx(0.2 - 1 / 9)  # = .088889
    with pytest.raises(ValueError):
        M.background_influence(correct, 0)


def _bootstrap_reference(same, rand, n_boot, seed, level=0.95):
    """Independent, deliberately plain reimplementation: one resample of keys per loop."""
    rng = np.random.default_rng(seed)
    n = len(same)
    gaps = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        gaps.append(same[idx].mean() - rand[idx].mean())
    tail = (1 - level) / 2 * 100
    return np.percentile(gaps, [tail, 100 - tail])


def test_bg_gap_point_and_bootstrap_ten_samples():
    # mixed_same correct on 8/10, mixed_rand on 5/10 -> BG-Gap = .8 - .5 = .3
    same = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    rand = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, 1], dtype=bool)
    gap = M.bg_gap(same, rand, n_boot=500, seed=3)
    assert gap.value == pytest.approx(0.3)
    assert gap.n == 10
    ref_lo, ref_hi = _bootstrap_reference(same, rand, 500, 3)
    assert gap.lo == pytest.approx(ref_lo, abs=1e-12)
    assert gap.hi == pytest.approx(ref_hi, abs=1e-12)
    assert -1 <= gap.lo <= gap.value <= gap.hi <= 1
    # Same seed -> same interval; no resamples -> no interval.
    assert M.bg_gap(same, rand, n_boot=500, seed=3) == gap
    none = M.bg_gap(same, rand, n_boot=0)
    assert none.value == pytest.approx(0.3) and math.isnan(none.lo) and math.isnan(none.hi)


def test_bg_gap_bootstrap_many_chunks_and_width():
    # n large enough that replicates are drawn in several chunks.
    rng = np.random.default_rng(11)
    n = 5000
    same = rng.random(n) < 0.85
    rand = np.where(rng.random(n) < 0.8, same, rng.random(n) < 0.5)
    gap = M.bg_gap(same, rand, n_boot=1000, seed=7)
    ref_lo, ref_hi = _bootstrap_reference(same, rand, 1000, 7)
    assert (gap.lo, gap.hi) == pytest.approx((ref_lo, ref_hi), abs=1e-12)
    # Sanity: the percentile interval is close to the normal one for paired differences.
    diff = same.astype(float) - rand.astype(float)
    normal_width = 2 * 1.96 * diff.std(ddof=1) / math.sqrt(n)
    assert gap.hi - gap.lo == pytest.approx(normal_width, rel=0.2)
    assert M.bg_gap(same, rand, n_boot=1000, seed=8) != gap


def test_bg_gap_empty_and_misaligned():
    assert math.isnan(M.bg_gap(np.array([], bool), np.array([], bool)).value)
    with pytest.raises(ValueError):
        M.bg_gap(np.ones(3, bool), np.ones(4, bool))


def test_prediction_categories_known_counts():
    # (original, mixed_rand, only_bg_t) correctness -> how many images of each.
    plan = {
        (1, 0, 1): 3,  # BG Required
        (0, 1, 0): 2,  # BG Fools
        (1, 0, 0): 4,  # BG+FG Required
        (0, 1, 1): 1,  # BG+FG Fools
        (1, 1, 0): 5,  # BG Irrelevant (O == M) ...
        (1, 1, 1): 6,
        (0, 0, 0): 7,
        (0, 0, 1): 2,  # ... 5 + 6 + 7 + 2 = 20
    }
    rows = [combo for combo, count in plan.items() for _ in range(count)]
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    o, m, b = (np.array(col, dtype=bool) for col in zip(*rows, strict=True))
    cats = M.prediction_categories(o, m, b)
    assert cats.n == 30
    assert cats.counts == {"bg_required": 3, "bg_fools": 2, "bg_fg_required": 4, "bg_fg_fools": 1, "bg_irrelevant": 20}
    assert sum(cats.counts.values()) == cats.n  # the five categories partition the images
    assert cats.fractions["bg_irrelevant"] == pytest.approx(20 / 30)
    assert sum(cats.fractions.values()) == pytest.approx(1.0)
    # share = fraction with its Wilson interval; 0 of 30 for an empty category
    share = cats.share("bg_fg_fools")
    assert (share.value, share.n) == pytest.approx((1 / 30, 30))
    assert (share.lo, share.hi) == pytest.approx(M.wilson_interval(1, 30))


def test_linear_trend_hand_computed():
    # x = 1,2,3; y = 2,4,7: mean x = 2, mean y = 13/3, sxy = 5, sxx = 2, syy = 114/9
    # slope = 2.5, intercept = 13/3 - 5 = -2/3, r = 5 / sqrt(2 * 114/9) = .993399
    slope, intercept, r, n = M.linear_trend([1, 2, 3], [2, 4, 7])
    assert (slope, intercept, n) == pytest.approx((2.5, -2 / 3, 3))
    assert r == pytest.approx(0.993399, abs=1e-6)
    assert r == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    # Non-finite pairs are dropped; under two points or constant x -> nan.
    assert M.linear_trend([1, 2, math.nan, 3], [2, 4, 9, 7])[:3] == pytest.approx((slope, intercept, r))
    assert math.isnan(M.linear_trend([1], [1])[0])
    assert math.isnan(M.linear_trend([2, 2], [1, 3])[0])
    s, _, r_const, _ = M.linear_trend([1, 2], [5, 5])
    assert s == 0 and math.isnan(r_const)


def test_join_by_key_ignores_row_order():
    keys_a = np.array(["k3", "k1", "k2", "k9"], dtype=object)
    vals_a = np.array([30, 10, 20, 90])
    keys_b = np.array(["k2", "k5", "k3", "k1"], dtype=object)
    vals_b = np.array([True, False, False, True])
    shared, (a, b) = M.join_by_key((keys_a, vals_a), (keys_b, vals_b))
    assert shared.tolist() == ["k1", "k2", "k3"]
    assert a.tolist() == [10, 20, 30]
    assert b.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        M.join_by_key((np.array(["a", "a"]), np.array([1, 2])))


def test_paired_invariance_uses_shared_keys_only():
    # clean: keys a..j, correct a..g (7/10). variant: no 'a' (clean-correct) and no 'j'
    # (clean-wrong), rows shuffled; correct on b, c, h.
    # Paired over b..i: clean correct b..g = 6/8 = .75; variant 3/8 = .375;
    # drop = .375, ratio = .5 (a positional join would give nonsense here).
    clean_keys = np.array(list("abcdefghij"), dtype=object)
    clean = np.array([1] * 7 + [0] * 3, dtype=bool)
    var_keys = np.array(list("ihgfedcb"), dtype=object)
    var = np.array([k in "bch" for k in var_keys])
    _, (c, v) = M.join_by_key((clean_keys, clean), (var_keys, var))
    inv = M.background_invariance(c, v)
    assert (inv.clean.value, inv.acc.value, inv.drop, inv.ratio) == pytest.approx((0.75, 0.375, 0.375, 0.5))


# Two-sided 95% Student-t critical values, from any printed t table.
T_TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_TABLE_95))
def test_t_critical_matches_the_t_table(df):
    assert M.t_critical(0.95, df) == pytest.approx(T_TABLE_95[df], abs=6e-4)


def test_t_critical_limits():
    assert M.t_critical(0.99, 1) == pytest.approx(63.657, abs=1e-3)
    assert M.t_critical(0.95, 100_000) == pytest.approx(1.95996, abs=1e-4)  # -> the normal quantile
    with pytest.raises(ValueError):
        M.t_critical(0.95, 0)


def test_linear_fit_band_hand_computed():
    # x = 1,2,3; y = 2,4,7: fit = 2.5 x - 2/3 -> 1.8333, 4.3333, 6.8333; residuals 1/6, -1/3, 1/6;
    # SSE = 1/36 + 1/9 + 1/36 = 1/6, s = sqrt(SSE / (n - 2)) = .408248, sxx = 2, t(.95, df 1) = 12.7062.
    # x0 = 2: half = 12.7062 * .408248 * sqrt(1/3) = 2.99490; x0 = 1: * sqrt(1/3 + 1/2) -> 4.73533.
    fit, lower, upper = M.linear_fit_band([1, 2, 3], [2, 4, 7], [1, 2])
    assert fit == pytest.approx([11 / 6, 13 / 3])
    assert upper - fit == pytest.approx([4.73533, 2.99490], abs=1e-4)
    assert fit - lower == pytest.approx(upper - fit)
    assert M.linear_fit_band([1, 2], [2, 4], [1, 2]) is None  # no degrees of freedom left
    assert M.linear_fit_band([2, 2, 2], [1, 2, 3], [2]) is None


def test_influence_above_chance_interval_shifts_by_chance():
    # 4 of 10 right with no foreground, 9 classes: .4 - 1/9 = .288889, interval Wilson(4, 10) - 1/9.
    correct = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    value = M.METRIC_BY_NAME["influence_above_chance"].values(M.background_influence(correct, 9))[""]
    assert value.value == pytest.approx(0.4 - 1 / 9)
    assert (value.lo, value.hi) == pytest.approx((WILSON_10[4][0] - 1 / 9, WILSON_10[4][1] - 1 / 9), abs=2e-6)


def test_metric_table_is_consistent():
    """Every METRICS row names a group, reads real variants, and has a unique name the CSV can carry."""
    from pipeline.variants import VARIANTS

    names = [m.name for m in M.METRICS]
    assert len(set(names)) == len(names)
    groups = {g.name for g in M.METRIC_GROUPS}
    for m in M.METRICS:
        assert m.group in groups, m.name
        assert set(m.per_variant) | set(m.reads_also) <= set(VARIANTS), m.name
        assert m.per_variant or m.reads_also, m.name
        assert m.unit in ("fraction", "difference", "ratio") and m.formula, m.name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", m.name), m.name
    for anchor in M.PUBLISHED:
        metric = M.METRIC_BY_NAME[anchor.metric]
        assert anchor.variant in metric.per_variant or (not anchor.variant and not metric.per_variant)
