"""Known-answer tests of medpretrain.stats: paired bootstrap, seed combination, Holm, DeLong, operating points."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

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
