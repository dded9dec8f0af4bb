"""Known-answer tests of medpretrain.stats: paired bootstrap, seed combination, Holm, DeLong, operating points."""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import roc_auc_score

from medpretrain import stats
from medpretrain.metrics import classification_metrics


def _arms(n: int, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arm A: score = 1.5 y + N(0, 1). Arm B: A's scores with N(0, 2^2) noise added to a fraction ``frac`` of cases."""
    y = (rng.random(n) < 0.4).astype(int)
    a = 1.5 * y + rng.normal(size=n)
    b = a + np.where(rng.random(n) < frac, rng.normal(scale=2.0, size=n), 0.0)
    return a, b, y


def test_auc_score_equals_torchmetrics_for_every_task() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 257)
    s = np.round(rng.normal(size=257) + y, 1)  # rounded: ties count 1/2
    p = 1 / (1 + np.exp(-s))
    assert stats.auc_score(p, y) == pytest.approx(classification_metrics(p, y, "binary")["auc"], abs=1e-6)
    assert stats.auc_score(np.stack([1 - p, p], 1), y) == pytest.approx(stats.auc_score(p, y))
    y3 = rng.integers(0, 3, 257)
    p3 = rng.dirichlet([1, 1, 1], 257)
    p3[np.arange(257), y3] += 0.4
    p3 /= p3.sum(1, keepdims=True)
    assert stats.auc_score(p3, y3) == pytest.approx(classification_metrics(p3, y3, "multiclass")["auc"], abs=1e-6)
    yl = rng.integers(0, 2, (257, 4))
    pl = rng.random((257, 4)) * 0.6 + 0.3 * yl
    assert stats.auc_score(pl, yl) == pytest.approx(classification_metrics(pl, yl, "multilabel")["auc"], abs=1e-6)
    assert math.isnan(stats.auc_score(p, np.zeros(257, dtype=int)))


def test_paired_bootstrap_covers_a_known_gap_and_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    # The population gap, from 400 000 cases of the same process (Monte-Carlo sd of the gap ~ 0.001).
    big_a, big_b, big_y = _arms(400_000, 0.5, rng)
    true_gap = stats.auc_score(big_a, big_y) - stats.auc_score(big_b, big_y)
    assert 0.05 < true_gap < 0.12
    covered = 0
    for rep in range(40):
        a, b, y = _arms(300, 0.5, np.random.default_rng(100 + rep))
        g = stats.paired_bootstrap(a, b, y, "auc", n_boot=400, seed=rep)
        covered += g.low <= true_gap <= g.high
        assert g.gap == pytest.approx(stats.auc_score(a, y) - stats.auc_score(b, y))
        assert g.n_boot == 400 and g.low <= g.gap <= g.high
    assert 34 <= covered <= 40  # nominal 95% of 40 = 38
    a, b, y = _arms(600, 0.5, np.random.default_rng(7))
    g = stats.paired_bootstrap(a, b, y, "auc", n_boot=2000, seed=0)
    assert g.low > 0 and g.p_value < 0.01
    # the bootstrap variance of the gap agrees with DeLong's
    assert g.var == pytest.approx(stats.delong(a, b, y).var, rel=0.25)
    # pairing: the gap's variance is below var(AUC_a) + var(AUC_b), what independent arms would give (the case
    # difficulty both arms share cancels); a constant arm has AUC 0.5 on every resample, so the gap's variance
    # against it is the other arm's own
    va = stats.paired_bootstrap(a, np.zeros_like(a), y, n_boot=2000).var
    vb = stats.paired_bootstrap(b, np.zeros_like(b), y, n_boot=2000).var
    assert g.var < 0.75 * (va + vb)


def test_paired_bootstrap_identical_arms_and_means() -> None:
    a, _, y = _arms(200, 0.5, np.random.default_rng(2))
    g = stats.paired_bootstrap(a, a.copy(), y, "auc", n_boot=500, seed=3)
    assert (g.gap, g.low, g.high, g.p_value, g.var) == (0.0, 0.0, 0.0, 1.0, 0.0)
    # per-image values (segmentation Dice): the gap of the means; a constant difference has a point CI
    da = np.array([0.7, 0.8, 0.6, 0.9])
    g = stats.paired_bootstrap(da, da - 0.1, None, "dice", n_boot=300)
    assert g.gap == pytest.approx(0.1) and g.low == pytest.approx(0.1) and g.high == pytest.approx(0.1)
    assert g.p_value == pytest.approx(2 / 301)  # every resampled gap > 0: the smallest p of 300 resamples
    # the bootstrap of the mean difference by hand: same generator, same indices
    db = np.array([0.75, 0.7, 0.65, 0.8])
    g = stats.paired_bootstrap(da, db, None, "mean", n_boot=1000, seed=5)
    idx = np.random.default_rng(5).integers(0, 4, size=(1000, 4))
    ref = (da - db)[idx].mean(1)
    assert g.low == pytest.approx(np.percentile(ref, 2.5)) and g.high == pytest.approx(np.percentile(ref, 97.5))
    assert g.p_value == pytest.approx(min(1, 2 * (1 + min((ref <= 0).sum(), (ref >= 0).sum())) / 1001))
    with pytest.raises(ValueError, match="same cases"):
        stats.paired_bootstrap(da, db[:3], None, "mean")
    with pytest.raises(ValueError, match="unknown metric"):
        stats.paired_bootstrap(da, db, None, "kappa")


def test_combine_with_seeds_hand_computed() -> None:
    # paired: d = (0.05, 0.04, 0.08), mean 0.056667, s_d^2 = 0.00043333; var = 1e-4 + 0.00043333 / 3
    e = stats.combine_with_seeds(1e-4, [0.90, 0.92, 0.94], [0.85, 0.88, 0.86], paired=True)
    var = 1e-4 + 0.00043333333333 / 3
    t975_df2 = 4.302652729911275
    assert e.gap == pytest.approx(0.0566666667) and e.df == 2 and e.se == pytest.approx(math.sqrt(var))
    assert e.low == pytest.approx(0.0566666667 - t975_df2 * math.sqrt(var))
    assert e.high == pytest.approx(0.0566666667 + t975_df2 * math.sqrt(var))
    assert e.p_value == pytest.approx(2 * st.t(2).sf(0.0566666667 / math.sqrt(var)))
    assert e.low < 0 < e.high  # two seeds' worth of df: 4.30 x se
    # Welch: s_a^2 = 4e-4 (3 seeds), s_b^2 = 4.5e-4 (2 seeds); df = (va + vb)^2 / (va^2 / 2 + vb^2 / 1)
    e = stats.combine_with_seeds(0.0, [0.90, 0.92, 0.94], [0.85, 0.88], paired=False)
    va, vb = 4e-4 / 3, 4.5e-4 / 2
    assert e.var_seed == pytest.approx(va + vb) and e.df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2))
    assert e.df == pytest.approx(2.1575, abs=1e-3) and e.gap == pytest.approx(0.92 - 0.865)
    # one arm with one seed: the other arm's spread for both, df of the other
    e = stats.combine_with_seeds(1e-4, [0.90, 0.92, 0.94], [0.85], paired=False)
    assert e.var_seed == pytest.approx(4e-4 * (1 / 3 + 1)) and e.df == 2
    # one seed each: bootstrap only, normal quantiles
    e = stats.combine_with_seeds(1e-4, [0.9], [0.85], paired=True)
    assert math.isinf(e.df) and e.se == pytest.approx(0.01)
    assert e.high == pytest.approx(0.05 + 1.959963985 * 0.01)
    e = stats.combine_with_seeds(0.0, [0.9], [0.9], paired=True)
    assert (e.low, e.high, e.p_value) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="equal counts"):
        stats.combine_with_seeds(0.0, [0.9, 0.8], [0.9], paired=True)


def test_holm_textbook() -> None:
    # Holm (1979) step-down on four p-values: sorted 0.005, 0.01, 0.03, 0.04 x (4, 3, 2, 1) = 0.02, 0.03, 0.06,
    # 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06
    h = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(h.adjusted, [0.03, 0.06, 0.06, 0.02])
    assert h.reject.tolist() == [True, False, False, True]
    h = stats.holm([0.04, 0.04])  # each below 0.05, but not both after the correction
    assert np.allclose(h.adjusted, [0.08, 0.08]) and not h.reject.any()
    h = stats.holm([0.5, float("nan"), 0.001])  # NaN not counted: m = 2
    assert h.adjusted[0] == 0.5 and math.isnan(h.adjusted[1]) and h.adjusted[2] == pytest.approx(0.002)
    assert h.reject.tolist() == [False, False, True]
    assert stats.holm([0.9, 0.8]).adjusted.tolist() == [1.0, 1.0]  # 2 x 0.8 capped at 1, then the running max
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([1.2])


def _naive_components(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V10 and V01 by the O(m n) definition (DeLong 1988): psi = 1, 1/2, 0 for X > Y, X = Y, X < Y."""
    x, z = s[y == 1], s[y == 0]
    psi = np.array([[1.0 if xi > zj else 0.5 if xi == zj else 0.0 for zj in z] for xi in x])
    return psi.mean(1), psi.mean(0)


def test_delong_against_the_naive_structural_components() -> None:
    rng = np.random.default_rng(4)
    y = np.array([1] * 13 + [0] * 17)
    a = np.round(rng.normal(size=30) + y, 1)  # ties within and across classes
    b = np.round(rng.normal(size=30) + 0.5 * y, 1)
    for s in (a, b):
        auc, v10, v01 = stats.structural_components(s, y)
        n10, n01 = _naive_components(s, y)
        assert np.allclose(v10, n10) and np.allclose(v01, n01) and auc == pytest.approx(n10.mean())
        assert auc == pytest.approx(stats.auc_score(s, y))
    a10, a01 = _naive_components(a, y)
    b10, b01 = _naive_components(b, y)
    var = (np.var(a10 - b10, ddof=1) / 13 + np.var(a01 - b01, ddof=1) / 17)  # c'Sc with c = (1, -1)
    r = stats.delong(a, b, y)
    assert r.var == pytest.approx(var) and r.diff == pytest.approx(a10.mean() - b10.mean())
    assert r.p_value == pytest.approx(2 * st.norm.sf(abs(r.diff) / math.sqrt(var)))
    same = stats.delong(a, a.copy(), y)
    assert same.p_value == 1.0 and same.diff == 0.0 and same.var == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="binary"):
        stats.delong(np.ones((30, 3)) / 3, np.ones((30, 3)) / 3, rng.integers(0, 3, 30))


def test_youden_and_target_thresholds_on_a_toy_roc() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    # J at t = 0.6: sens 3/4 + spec 4/4 - 1 = 0.75 (the maximum); at 0.3: 1 + 2/4 - 1 = 0.5
    assert stats.youden_threshold(s, y) == 0.6
    assert stats.threshold_for(s, y, sensitivity=1.0) == 0.3
    assert stats.threshold_for(s, y, sensitivity=0.7) == 0.6
    assert stats.threshold_for(s, y, specificity=1.0) == 0.6
    assert stats.threshold_for(s, y, specificity=0.5) == 0.3
    # the top score a negative: no threshold at a score has specificity 1, so just above the top score
    t = stats.threshold_for(np.array([0.2, 0.9]), np.array([1, 0]), specificity=1.0)
    assert t > 0.9 and t == pytest.approx(0.9)
    perm = np.random.default_rng(0).permutation(8)
    assert stats.youden_threshold(s[perm], y[perm]) == 0.6  # order does not matter
    with pytest.raises(ValueError, match="exactly one"):
        stats.threshold_for(s, y)
    with pytest.raises(ValueError, match="both positive and negative"):
        stats.youden_threshold(s, np.ones(8))


# ------------------------------------------------------------------------------------------------
# Known answers for each branch (issue 20: these kill the mutants the tests above let survive)
# ------------------------------------------------------------------------------------------------


def _two_u(s: np.ndarray, y: np.ndarray) -> int:
    """Twice the Mann-Whitney U of ``s`` against ``y`` by counting pairs (an integer: ties count 1 of 2)."""
    x, z = s[y == 1][:, None], s[y == 0][None, :]
    return int(2 * (x > z).sum() + (x == z).sum())


def test_auc_score_edge_cases() -> None:
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 40)
    p = rng.random(40) + 0.3 * y
    # a two-column score with binary labels is taken at its positive column, whatever the other column holds
    assert stats.auc_score(np.stack([rng.random(40), p], 1), y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # two labels of a multi-label task ([N, 2] labels) stay a macro over both labels
    yl = np.stack([y, 1 - y], 1)
    ql = np.stack([p, rng.random(40)], 1)
    assert stats.auc_score(ql, yl) == pytest.approx(
        (roc_auc_score(y, p) + roc_auc_score(1 - y, ql[:, 1])) / 2, abs=1e-12)
    # one positive (or one negative) is enough for an AUC
    assert stats.auc_score(np.array([0.9, 0.1, 0.5, 0.95]), np.array([1, 0, 0, 0])) == pytest.approx(2 / 3)
    assert stats.auc_score(np.array([0.9, 0.1, 0.5, 0.95]), np.array([1, 0, 1, 1])) == 1.0
    # an absent class gives NaN without a warning (resamples without a positive are common in the bootstrap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stats.auc_score(p, np.ones(40, dtype=int)))
        assert math.isnan(stats.auc_score(p, np.zeros(40, dtype=int)))
    with pytest.raises(ValueError, match=r"^39 labels for 40 cases$"):
        stats.auc_score(p, y[:39])
    with pytest.raises(ValueError, match=r"^no test cases$"):
        stats.auc_score(np.zeros(0), np.zeros(0))


def test_paired_bootstrap_auc_by_hand() -> None:
    # 12 cases, 3 positives: about 3% of resamples hold no positive and are dropped. The reference scores each
    # resample by counting pairs (an exact integer 2U per arm), so a gap of 0 is exactly 0.
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    a = np.array([0.9, 0.3, 0.5, 0.7, 0.2, 0.6, 0.1, 0.4, 0.8, 0.3, 0.35, 0.5])
    b = np.array([0.6, 0.4, 0.5, 0.3, 0.2, 0.7, 0.1, 0.5, 0.9, 0.6, 0.55, 0.45])
    g = stats.paired_bootstrap(a, b, y, n_boot=300, seed=11)  # metric "auc" by default
    ref = []
    for i in np.random.default_rng(11).integers(0, 12, size=(300, 12)):
        yi = y[i]
        n1 = int(yi.sum())
        if 0 < n1 < 12:
            ref.append((_two_u(a[i], yi) - _two_u(b[i], yi)) / (2 * n1 * (12 - n1)))
    ref = np.array(ref)
    assert 280 < ref.size < 300 and g.n_boot == ref.size
    assert g.gap == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert g.low == pytest.approx(np.percentile(ref, 2.5), abs=1e-12)
    assert g.high == pytest.approx(np.percentile(ref, 97.5), abs=1e-12)
    assert g.var == pytest.approx(np.var(ref, ddof=1), rel=1e-10)
    tail = min(int((ref <= 0).sum()), int((ref >= 0).sum()))
    assert g.p_value == pytest.approx(2 * (1 + tail) / (ref.size + 1), abs=1e-15)
    assert g.to_dict() == {"gap": g.gap, "low": g.low, "high": g.high, "p_value": g.p_value, "var": g.var,
                           "n_boot": ref.size, "level": 0.95, "metric": "auc"}
    json.dumps(g.to_dict())
    # a two-column softmax is scored at its positive column (the other column is not looked at)
    rng = np.random.default_rng(0)
    two = stats.paired_bootstrap(np.stack([rng.random(12), a], 1), np.stack([rng.random(12), b], 1), y, "auc",
                                 n_boot=300, seed=11)
    assert two == g
    with pytest.raises(ValueError, match=r"^metric 'auc' needs labels$"):
        stats.paired_bootstrap(a, b, None, "auc")
    with pytest.raises(ValueError, match=r"^13 labels for 12 cases$"):
        stats.paired_bootstrap(a, b, np.append(y, 0), "auc")
    with pytest.raises(ValueError, match=r"^paired_bootstrap: the metric 'auc' was undefined on every resample$"):
        stats.paired_bootstrap(a, b, np.zeros(12, dtype=int), "auc", n_boot=20)


def test_paired_bootstrap_means_level_seed_and_defaults() -> None:
    rng = np.random.default_rng(12)
    da, db = rng.random(50), rng.random(50)
    g = stats.paired_bootstrap(da, db, None, "mean", n_boot=500, seed=3, level=0.9)
    ref = (da - db)[np.random.default_rng(3).integers(0, 50, size=(500, 50))].mean(1)
    assert g.gap == pytest.approx((da - db).mean(), abs=1e-15)
    assert g.low == pytest.approx(np.percentile(ref, 5), abs=1e-14)  # level 0.9: the 5th and 95th percentiles
    assert g.high == pytest.approx(np.percentile(ref, 95), abs=1e-14)
    assert g.var == pytest.approx(np.var(ref, ddof=1), rel=1e-12)
    tail = min(int((ref <= 0).sum()), int((ref >= 0).sum()))
    assert g.p_value == pytest.approx(2 * (1 + tail) / 501, abs=1e-15)
    assert (g.n_boot, g.level, g.metric) == (500, 0.9, "mean")
    assert stats.paired_bootstrap(da, db, None, "dice", n_boot=500, seed=3, level=0.9).metric == "dice"
    # labels are ignored by the per-case metrics, whatever their length
    assert stats.paired_bootstrap(da, db, np.zeros(7), "mean", n_boot=500, seed=3, level=0.9) == g
    # the seed fixes the resamples: the same seed repeats, another seed moves the interval
    assert stats.paired_bootstrap(da, db, None, "mean", n_boot=500, seed=3, level=0.9) == g
    other = stats.paired_bootstrap(da, db, None, "mean", n_boot=500, seed=4, level=0.9)
    assert other.gap == g.gap and other.low != g.low and other.high != g.high
    # defaults: 2000 resamples, seed 0, level 0.95
    d = stats.paired_bootstrap(da, db, None, "mean")
    assert d == stats.paired_bootstrap(da, db, None, "mean", n_boot=2000, seed=0, level=0.95) and d.n_boot == 2000
    # one and two resamples: the interval is the resampled gap itself, the variance 0 for one resample
    r = (da - db)[np.random.default_rng(0).integers(0, 50, size=(2, 50))].mean(1)
    one = stats.paired_bootstrap(da, db, None, "mean", n_boot=1)
    assert (one.low, one.high, one.var, one.n_boot, one.p_value) == pytest.approx((r[0], r[0], 0.0, 1, 1.0))
    two = stats.paired_bootstrap(da, db, None, "mean", n_boot=2)
    assert two.var == pytest.approx(np.var(r, ddof=1), rel=1e-12) and two.n_boot == 2
    for bad in ({"n_boot": 0}, {"level": 0.0}, {"level": 1.0}, {"level": 1.5}):
        with pytest.raises(ValueError, match=r"^paired_bootstrap needs n_boot >= 1 and 0 < level < 1, got "):
            stats.paired_bootstrap(da, db, None, "mean", **bad)
    with pytest.raises(ValueError, match=r"^metric 'mean' takes per-case values \[N\], got shape \(25, 2\)$"):
        stats.paired_bootstrap(da.reshape(25, 2), db.reshape(25, 2), None, "mean")
    with pytest.raises(ValueError, match=r"^no test cases$"):
        stats.paired_bootstrap(np.zeros(0), np.zeros(0), None, "mean")


def test_paired_bootstrap_counts_exact_zero_gaps_as_zero() -> None:
    # Per-case differences 0.1, 0.2, -0.3: a resample holding each once has gap 0, which floating point
    # sums to about 2e-17. The reference sums them in integer tenths; both tails must count those resamples.
    d = np.array([0.1, 0.2, -0.3])
    g = stats.paired_bootstrap(d, np.zeros(3), None, "mean", n_boot=200, seed=0)
    sums = np.array([1, 2, -3])[np.random.default_rng(0).integers(0, 3, size=(200, 3))].sum(1)
    assert (sums == 0).sum() == 41
    tail = min(int((sums <= 0).sum()), int((sums >= 0).sum()))  # 84 without the zeros on the smaller side
    assert g.p_value == pytest.approx(min(1.0, 2 * (1 + tail) / 201), abs=1e-15)
    # the rounding stops below 1e-12: a gap of exactly 1e-12 on one case is kept (every resample > 0)
    g = stats.paired_bootstrap(np.array([1e-12]), np.zeros(1), None, "mean", n_boot=10)
    assert (g.gap, g.low, g.high, g.var, g.p_value) == (1e-12, 1e-12, 1e-12, 0.0, pytest.approx(2 / 11))


def test_paired_bootstrap_draws_in_chunks_as_in_one_draw() -> None:
    # 20 001 cases x 201 resamples exceeds the 4M-index chunk: 199 resamples, then 2 more. The generator's
    # stream is the same either way, so the result is that of one draw of all 201 resamples.
    n = 20_001
    rng = np.random.default_rng(13)
    y = (rng.random(n) < 0.3).astype(int)
    a, b = y + rng.normal(size=n), y + 1.5 * rng.normal(size=n)
    idx = np.random.default_rng(1).integers(0, n, size=(201, n))
    ref = (a - b)[idx].mean(1)
    g = stats.paired_bootstrap(a, b, None, "mean", n_boot=201, seed=1)
    assert g.n_boot == 201 and g.var == pytest.approx(np.var(ref, ddof=1), rel=1e-12)
    assert (g.low, g.high) == pytest.approx((np.percentile(ref, 2.5), np.percentile(ref, 97.5)), abs=1e-14)
    ref = np.array([stats.auc_score(a[i], y[i]) - stats.auc_score(b[i], y[i]) for i in idx])
    g = stats.paired_bootstrap(a, b, y, "auc", n_boot=201, seed=1)
    assert g.n_boot == 201 and g.var == pytest.approx(np.var(ref, ddof=1), rel=1e-12)
    assert (g.low, g.high) == pytest.approx((np.percentile(ref, 2.5), np.percentile(ref, 97.5)), abs=1e-14)


def _accuracy(p: np.ndarray, y: np.ndarray | None) -> np.float32:
    """Accuracy at 0.5 as a float32 number, as a torch metric returns it."""
    assert y is not None
    return np.float32(np.mean((p > 0.5) == y))


def _median(p: np.ndarray, y: np.ndarray | None) -> float:
    assert y is None and p.dtype == np.float64  # float32 predictions reach a custom metric as float64
    return float(np.median(p))


def test_paired_bootstrap_custom_metrics() -> None:
    rng = np.random.default_rng(14)
    y = rng.integers(0, 2, 30)
    a, b = np.clip(0.5 * y + rng.random(30) * 0.7, 0, 1), rng.random(30)
    g = stats.paired_bootstrap(a, b, y, _accuracy, n_boot=300, seed=2)
    idx = np.random.default_rng(2).integers(0, 30, size=(300, 30))
    ref = np.array([_accuracy(a[i], y[i]) - _accuracy(b[i], y[i]) for i in idx], dtype=np.float64)
    assert g.gap == pytest.approx(float(_accuracy(a, y) - _accuracy(b, y)), abs=1e-15) and g.gap > 0.2
    assert g.var == pytest.approx(np.var(ref, ddof=1), rel=1e-12)  # the gaps are averaged in float64
    assert (g.low, g.high) == pytest.approx((np.percentile(ref, 2.5), np.percentile(ref, 97.5)), abs=1e-12)
    tail = min(int((ref <= 0).sum()), int((ref >= 0).sum()))
    assert g.p_value == pytest.approx(2 * (1 + tail) / 301, abs=1e-15)
    assert (g.n_boot, g.metric) == (300, "_accuracy")
    # labels None reach the metric as None; a callable without a __name__ is called "custom"
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    g = stats.paired_bootstrap(a32, b32, None, functools.partial(_median), n_boot=300, seed=2)
    ref = np.array([np.median(a32[i].astype(np.float64)) - np.median(b32[i].astype(np.float64)) for i in idx])
    assert g.gap == pytest.approx(np.median(a32.astype(np.float64)) - np.median(b32.astype(np.float64)), abs=1e-15)
    assert g.var == pytest.approx(np.var(ref, ddof=1), rel=1e-12) and g.metric == "custom"
    with pytest.raises(ValueError, match=r"^31 labels for 30 cases$"):
        stats.paired_bootstrap(a, b, np.append(y, 1), _accuracy)


def test_t_interval_against_t_quantiles() -> None:
    # t_{4, 0.975} = 2.7764451 and t_{4, 0.95} = 2.1318468 (scipy.stats.t.ppf; tables: 2.776, 2.132)
    lo, hi, p = stats.t_interval(0.1, 0.0004, 4)  # level 0.95 by default, se 0.02, t = 5
    assert (lo, hi) == pytest.approx((0.1 - 2.7764451051977934 * 0.02, 0.1 + 2.7764451051977934 * 0.02), rel=1e-12)
    assert p == pytest.approx(2 * st.t(4).sf(5.0), rel=1e-12) and p == pytest.approx(0.0075, abs=1e-4)
    lo, hi, p = stats.t_interval(-0.1, 0.0004, 4, level=0.9)
    assert (lo, hi) == pytest.approx((-0.1 - 2.1318467863266495 * 0.02, -0.1 + 2.1318467863266495 * 0.02), rel=1e-12)
    assert p == pytest.approx(2 * st.t(4).sf(5.0), rel=1e-12)  # two-sided: the sign of the gap does not matter
    # df = inf: the normal quantile itself (scipy's t at df = inf agrees with it only to the last bit)
    lo, hi, p = stats.t_interval(0.1, 0.0004, math.inf)
    z = st.norm.ppf(0.975)
    assert (lo, hi, p) == (0.1 - z * 0.02, 0.1 + z * 0.02, 2 * st.norm.sf(5.0))
    # no variance: the point, p 0 for a non-zero gap and 1 for a zero one
    assert stats.t_interval(0.1, 0.0, 3) == (0.1, 0.1, 0.0)
    assert stats.t_interval(0.0, 0.0, 3) == (0.0, 0.0, 1.0)


def test_combine_with_seeds_every_branch() -> None:
    def check(e: stats.GapEstimate, gap: float, var_seed: float, df: float, var_test: float, level: float) -> None:
        assert e.gap == pytest.approx(gap, abs=1e-15) and e.var_seed == pytest.approx(var_seed, rel=1e-12)
        assert e.df == pytest.approx(df, rel=1e-12) and e.var_test == var_test and e.level == level
        assert e.se == pytest.approx(math.sqrt(var_test + var_seed), rel=1e-12)
        q = st.norm.ppf((1 + level) / 2) if math.isinf(df) else st.t(df).ppf((1 + level) / 2)
        assert (e.low, e.high) == pytest.approx((gap - q * e.se, gap + q * e.se), rel=1e-12)
        z = abs(gap) / e.se
        assert e.p_value == pytest.approx(2 * (st.norm.sf(z) if math.isinf(df) else st.t(df).sf(z)), rel=1e-12)

    # (values in binary fractions, so the seed statistics are exact)
    # paired, 2 seeds: d = (0.25, 0.125), s_d^2 = 2 x 0.0625^2 = 0.0078125, / 2 seeds; df 1; level 0.9
    e = stats.combine_with_seeds(1e-4, [0.5, 0.75], [0.25, 0.625], paired=True, level=0.9)
    check(e, 0.1875, 0.00390625, 1.0, 1e-4, 0.9)
    assert (e.n_seeds, e.paired) == ((2, 2), True)
    assert e.to_dict() == {"gap": e.gap, "se": e.se, "df": 1.0, "low": e.low, "high": e.high,
                           "p_value": e.p_value, "var_test": 1e-4, "var_seed": e.var_seed, "n_seeds": [2, 2],
                           "paired": True, "level": 0.9}
    json.dumps(e.to_dict())
    # paired with a constant difference: no spread measured, normal quantiles
    check(stats.combine_with_seeds(1e-4, [0.5, 0.75, 0.625], [0.25, 0.5, 0.375], paired=True), 0.25, 0.0,
          math.inf, 1e-4, 0.95)
    # Welch, 2 and 3 seeds: va = 0.03125 / 2 = 1/64, vb = 0.0625 / 3 = 1/48; df = (7/192)^2 / (va^2 / 1 + vb^2 / 2)
    # = 49 / 17
    e = stats.combine_with_seeds(1e-4, [0.5, 0.75], [0.25, 0.5, 0.75], paired=False)
    check(e, 0.125, 7 / 192, 49 / 17, 1e-4, 0.95)
    assert (e.n_seeds, e.paired) == ((2, 3), False)
    # Welch with no spread in either arm: the bootstrap part alone
    check(stats.combine_with_seeds(1e-4, [0.5, 0.5], [0.25, 0.25, 0.25], paired=False), 0.25, 0.0, math.inf,
          1e-4, 0.95)
    # one arm with one seed: the other arm's spread for both arms, its df
    check(stats.combine_with_seeds(1e-4, [0.5], [0.25, 0.5, 0.75], paired=False), 0.0, 0.0625 * (1 + 1 / 3), 2.0,
          1e-4, 0.95)
    check(stats.combine_with_seeds(1e-4, [0.5, 0.75], [0.25], paired=False), 0.375, 0.03125 * 1.5, 1.0, 1e-4, 0.95)
    check(stats.combine_with_seeds(1e-4, [0.5], [0.25, 0.5], paired=False), 0.125, 0.03125 * 1.5, 1.0, 1e-4, 0.95)
    # one seed each, unpaired: the bootstrap part alone
    check(stats.combine_with_seeds(1e-4, [0.5], [0.25], paired=False), 0.25, 0.0, math.inf, 1e-4, 0.95)
    # float32 metrics (as torch returns them) are combined in float64
    a32, b32 = np.array([0.91, 0.93, 0.94], np.float32), np.array([0.85, 0.88, 0.87, 0.9], np.float32)
    e = stats.combine_with_seeds(1e-4, a32, b32, paired=False)
    assert e == stats.combine_with_seeds(1e-4, a32.astype(np.float64), b32.astype(np.float64), paired=False)
    for a, b in (([], [0.5]), ([0.5], [])):
        with pytest.raises(ValueError, match=r"^combine_with_seeds needs at least one seed per arm$"):
            stats.combine_with_seeds(0.0, a, b, paired=False)
    for bad in (-1e-6, float("nan")):
        with pytest.raises(ValueError, match=r"^var_test must be >= 0, got "):
            stats.combine_with_seeds(bad, [0.5], [0.25], paired=False)


def test_holm_by_hand() -> None:
    # m = 5: sorted 0.001, 0.01, 0.01, 0.02, 0.3 x (5, 4, 3, 2, 1) = 0.005, 0.04, 0.03, 0.04, 0.3; running
    # maximum 0.005, 0.04, 0.04, 0.04, 0.3 (the tie gets the same value whichever of the two comes first)
    p = [0.3, 0.01, 0.001, 0.02, 0.01]
    h = stats.holm(p)
    assert h.adjusted.tolist() == [0.3, 0.04, 0.005, 0.04, 0.04]  # x 4 and x 2 are exact in binary
    assert h.reject.tolist() == [False, True, True, True, True] and h.reject.dtype == bool and h.alpha == 0.05
    # alpha edge: rejected when adjusted < alpha, so 0.04 is not rejected at alpha = 0.04
    h = stats.holm(p, alpha=0.04)
    assert h.reject.tolist() == [False, False, True, False, False] and h.alpha == 0.04
    # the cap at 1 comes before the running maximum: 0.2, 0.6, 0.9 x (3, 2, 1) = 0.6, 1.2 -> 1, 0.9 -> 1
    assert stats.holm([0.6, 0.2, 0.9]).adjusted == pytest.approx(np.array([1.0, 0.6, 1.0]), abs=1e-15)
    # 0 and 1 are valid p-values
    h = stats.holm([0.0, 1.0])
    assert h.adjusted.tolist() == [0.0, 1.0] and h.reject.tolist() == [True, False]
    # a grid (methods x datasets) is one family, flattened: sorted 0.001, 0.01, 0.02, 0.3 x (4, 3, 2, 1)
    h = stats.holm(np.array([[0.3, 0.01], [0.001, 0.02]]))
    assert h.adjusted == pytest.approx(np.array([0.3, 0.03, 0.004, 0.04]), abs=1e-15)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"^alpha must be in \(0, 1\), got "):
            stats.holm([0.01], alpha=alpha)
    with pytest.raises(ValueError, match=r"^p-values must lie in \[0, 1\]$"):
        stats.holm([0.5, -0.01])


def test_delong_small_classes_and_degenerate_variance() -> None:
    # one positive: S10 is 0 (one structural component); V01 of a = (1, 0), of b = (1, 1): var = 0.5 / 2
    y = np.array([1, 0, 0])
    r = stats.delong(np.array([0.9, 0.2, 0.95]), np.array([0.5, 0.1, 0.4]), y)
    assert (r.auc_a, r.auc_b, r.diff) == (0.5, 1.0, -0.5)
    assert r.var == pytest.approx(0.25, abs=1e-15) and r.z == pytest.approx(-1.0)
    assert r.p_value == pytest.approx(2 * st.norm.sf(1.0), rel=1e-12)
    # one negative: S01 is 0; V10 of a = (1, 0), of b = (1, 1)
    r = stats.delong(np.array([0.9, 0.2, 0.5]), np.array([0.9, 0.8, 0.5]), np.array([1, 1, 0]))
    assert (r.diff, r.var, r.z) == pytest.approx((-0.5, 0.25, -1.0), abs=1e-15)
    # a perfect score against a constant one: the components differ by a constant, var 0, the gap is certain
    y = np.array([1, 1, 0, 0, 0])
    perfect, flat = np.array([0.9, 0.8, 0.1, 0.2, 0.3]), np.full(5, 0.5)
    r = stats.delong(perfect, flat, y)
    assert (r.auc_a, r.auc_b, r.diff, r.var, r.z, r.p_value) == (1.0, 0.5, 0.5, 0.0, math.inf, 0.0)
    r = stats.delong(flat, perfect, y)
    assert (r.diff, r.z, r.p_value) == (-0.5, -math.inf, 0.0)
    assert r.to_dict() == {"auc_a": 0.5, "auc_b": 1.0, "diff": -0.5, "var": 0.0, "z": -math.inf, "p_value": 0.0}


def test_delong_inputs() -> None:
    rng = np.random.default_rng(15)
    y = rng.integers(0, 2, 60)
    a, b = rng.random(60) + 0.4 * y, rng.random(60) + 0.2 * y
    r = stats.delong(a, b, y)
    assert r.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert r.z == pytest.approx(r.diff / math.sqrt(r.var), rel=1e-12)
    # a two-column softmax is taken at its positive column
    assert stats.delong(np.stack([rng.random(60), a], 1), np.stack([rng.random(60), b], 1), y) == r
    assert stats.delong(a, a.copy(), y).z == 0.0
    with pytest.raises(ValueError, match=r"^59 labels for 60 cases$"):
        stats.delong(a, b, y[:59])
    binary_only = r"^delong: binary scores \[N\] and labels in \{0, 1\} only$"
    for s, labels in ((a, np.where(y == 1, 2, y)), (np.ones((60, 3)) / 3, y), (a, np.stack([y, y], 1))):
        with pytest.raises(ValueError, match=binary_only):
            stats.delong(s, s.copy(), labels)
    for labels in (np.ones(60), np.zeros(60)):
        with pytest.raises(ValueError, match=r"^DeLong needs both positive and negative cases$"):
            stats.delong(a, b, labels)
    # labels as a column [N, 1] are read as [N]
    auc, v10, v01 = stats.structural_components(a, y[:, None])
    ref = stats.structural_components(a, y)
    assert auc == ref[0] and np.array_equal(v10, ref[1]) and np.array_equal(v01, ref[2])


def test_operating_points_with_tied_scores() -> None:
    # thresholds 0.9, 0.7 (three cases), 0.4 (two), 0.2, 0.1; 4 positives, 4 negatives:
    # sens 1/4, 3/4, 1, 1, 1 and spec 1, 3/4, 1/2, 1/4, 0 -> J 0.25, 0.5, 0.5, 0.25, 0
    s = np.array([0.9, 0.7, 0.7, 0.7, 0.4, 0.4, 0.2, 0.1])
    y = np.array([1, 1, 0, 1, 0, 1, 0, 0])
    assert stats.youden_threshold(s, y) == 0.7  # the tie at J = 0.5: the higher threshold
    assert stats.threshold_for(s, y, sensitivity=0.75) == 0.7
    assert stats.threshold_for(s, y, sensitivity=0.8) == 0.4
    assert stats.threshold_for(s, y, specificity=0.75) == 0.7
    assert stats.threshold_for(s, y, specificity=0.5) == 0.4
    assert stats.threshold_for(s, y, sensitivity=0.0) == 0.9  # every threshold qualifies: the most specific
    assert stats.threshold_for(s, y, specificity=0.0) == 0.1  # every threshold qualifies: the most sensitive
    # a target within 1e-12 above an achieved rate counts as met (0.75 + 1e-12 - 1e-12 is 0.75 exactly)
    assert stats.threshold_for(s, y, sensitivity=0.75 + 1e-12) == 0.7
    assert stats.threshold_for(s, y, specificity=0.75 + 1e-12) == 0.7
    # columns [N, 1] and rows [1, N] are read as [N]
    assert stats.youden_threshold(s[:, None], y[:, None]) == 0.7
    assert stats.threshold_for(s[:, None], y, sensitivity=0.8) == 0.4
    assert stats.threshold_for(s, y[:, None], specificity=0.75) == 0.7
    assert stats.youden_threshold(s[None, :], y[None, :]) == 0.7


def test_youden_ties_that_floating_point_splits() -> None:
    # 3 positives, 3 negatives. At 0.5: sens 1/3, spec 1; at 0.4: sens 2/3, spec 2/3. J = 1/3 at both, but
    # 1/3 + 1 - 1 and 2/3 + (1 - 1/3) - 1 differ in the last bit; the tie rule (higher threshold) still holds
    s = np.array([0.1, 0.4, 0.2, 0.5, 0.0, 0.4])
    y = np.array([0, 1, 0, 1, 1, 0])
    assert stats.youden_threshold(s, y) == 0.5
    # against exact counts on random small ROCs: the first threshold with the largest tp neg - fp pos
    rng = np.random.default_rng(16)
    for _ in range(300):
        n = int(rng.integers(4, 20))
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = rng.integers(0, n, n) / n
        thr = np.unique(s)[::-1]
        pos, neg = int(y.sum()), int((1 - y).sum())
        k = [int(((s >= t) & (y == 1)).sum()) * neg - int(((s >= t) & (y == 0)).sum()) * pos for t in thr]
        assert stats.youden_threshold(s, y) == thr[int(np.argmax(k))]


def test_operating_point_inputs() -> None:
    # float32 scores: the threshold above the top score is the next float64, not the next float32
    s32 = np.array([0.2, 0.9], dtype=np.float32)
    t = stats.threshold_for(s32, np.array([1, 0]), specificity=1.0)
    assert t == np.nextafter(float(s32[1]), math.inf)
    s, y = np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1])
    with pytest.raises(ValueError, match=r"^3 scores for 2 labels$"):
        stats.youden_threshold(s, y[:2])
    with pytest.raises(ValueError, match=r"^scores must be finite$"):
        stats.youden_threshold(np.array([0.1, np.nan, 0.9]), y)
    with pytest.raises(ValueError, match=r"^an operating point needs both positive and negative cases$"):
        stats.threshold_for(s, np.zeros(3), sensitivity=0.5)
    with pytest.raises(ValueError, match=r"^threshold_for: give exactly one of sensitivity= or specificity=$"):
        stats.threshold_for(s, y, sensitivity=0.5, specificity=0.5)
    for target in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"^threshold_for: the target must lie in \[0, 1\], got "):
            stats.threshold_for(s, y, sensitivity=target)
