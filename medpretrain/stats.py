"""Statistics for "which initialisation, and how sure": paired comparisons of two arms on one test set.

* :func:`auc_score`: ROC AUC from ranks (Mann-Whitney U with mid-ranks; binary, macro one-vs-rest for
  multi-class, macro over labels for multi-label), equal to torchmetrics' AUROC.
* :func:`paired_bootstrap`: the gap ``metric(a) - metric(b)`` with both arms scored on the *same* resampled
  test cases (the pairing removes the case-difficulty variance both arms share), percentile CI and two-sided
  bootstrap p-value (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13 and 16).
* :func:`combine_with_seeds`: the gap between two arms' mean test metrics over training seeds, with the
  variance of the test-set sampling (from the bootstrap) and of the between-seed spread added, and a
  Student-t interval with the seeds' degrees of freedom.
* :func:`holm`: Holm's step-down adjustment of p-values (Holm 1979, *Scand. J. Statist.* 6:65-70).
* :func:`delong`: DeLong's test of two correlated binary AUCs (DeLong, DeLong & Clarke-Pearson 1988,
  *Biometrics* 44:837-845) with the fast mid-rank algorithm of Sun & Xu 2014 (*IEEE Signal Process. Lett.*
  21:1389-1393).
* :func:`youden_threshold`, :func:`threshold_for`: operating points of a binary score (Youden 1950,
  *Cancer* 3:32-35), meant to be chosen on validation and applied to test.

Everything is numpy / scipy on CPU and deterministic given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

Metric = str | Callable[[np.ndarray, np.ndarray | None], float]


# ------------------------------------------------------------------------------------------------
# AUC from ranks
# ------------------------------------------------------------------------------------------------


def _binary_auc_rows(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUC of each row of ``scores [B, N]`` against ``y [B, N]`` in {0, 1} (NaN where a row has one class):
    ``(sum of positive mid-ranks - n1 (n1 + 1) / 2) / (n1 n0)``, the Mann-Whitney form (ties count 1/2)."""
    ranks = _st.rankdata(scores, axis=1)
    n1 = y.sum(axis=1)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def _auc_rows(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC (binary / macro) of the resamples ``idx [B, N]`` of one arm."""
    if probs.ndim == 1:
        return _binary_auc_rows(probs[idx], (labels[idx] > 0).astype(np.float64))
    k = probs.shape[1]
    onehot = labels if labels.ndim == 2 else (labels[:, None] == np.arange(k)[None, :])
    per_class = [_binary_auc_rows(probs[:, c][idx], onehot[:, c][idx].astype(np.float64)) for c in range(k)]
    return np.mean(per_class, axis=0)  # NaN when a class is absent from a resample, as torchmetrics' AUC


def _as_probs(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary scores as ``[N]`` (a two-column softmax becomes its positive column), otherwise unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2 and np.asarray(labels).ndim == 1:
        return p[:, 1]
    return p


def auc_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC: binary (``probs [N]``, ``labels [N]`` in {0, 1}), macro one-vs-rest (``probs [N, K]``,
    ``labels [N]`` in ``0..K-1``) or macro over labels (``probs [N, K]``, ``labels [N, K]``). NaN when a class
    is absent. Raises ``ValueError`` for mismatched shapes."""
    p, y = _as_probs(probs, labels), np.asarray(labels)
    _check_pair(p, p, y)
    return float(_auc_rows(p, y, np.arange(len(y))[None, :])[0])


def _check_pair(a: np.ndarray, b: np.ndarray, labels: np.ndarray | None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"the two arms must score the same cases: shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("no test cases")
    if labels is not None and len(labels) != len(a):
        raise ValueError(f"{len(labels)} labels for {len(a)} cases")


# ------------------------------------------------------------------------------------------------
# Paired bootstrap
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapGap:
    """:func:`paired_bootstrap` result: ``gap`` = metric(a) - metric(b) on all cases; ``low``/``high`` the
    percentile CI at ``level``; ``p_value`` two-sided; ``var`` the variance of the resampled gaps (the
    test-sampling variance of the gap); ``n_boot`` resamples on which both metrics were defined."""

    gap: float
    low: float
    high: float
    p_value: float
    var: float
    n_boot: int
    level: float
    metric: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray | None, metric: Metric = "auc",
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> BootstrapGap:
    """Paired percentile bootstrap of ``metric(pred_a) - metric(pred_b)`` over test cases.

    Each resample draws ``N`` case indices with replacement and scores *both* arms on them, so the gap's
    variance excludes what the arms share (which cases are hard). ``metric``:

    * ``"auc"``: ``pred_*`` are probabilities as :func:`auc_score` takes them, ``labels`` the targets;
    * ``"mean"`` (alias ``"dice"``): ``pred_*`` are per-case values ``[N]`` (segmentation: the per-image Dice of
      each arm on the same images) and the metric is their mean; ``labels`` is ignored;
    * a callable ``f(pred, labels) -> float`` (evaluated per resample in a loop: slower).

    CI: the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resampled gaps. Two-sided p-value
    of "gap = 0": ``min(1, 2 (1 + min(#{g* <= 0}, #{g* >= 0})) / (B + 1))``, the achieved significance level of
    the percentile interval (the largest ``1 - level`` at which it still covers 0), with the +1 that keeps a
    Monte-Carlo p-value above 0. Identical arms give gap 0, CI [0, 0], p = 1. Resamples on which the metric is
    undefined (an AUC without one of the classes) are dropped. Raises ``ValueError`` for mismatched shapes,
    ``n_boot < 1``, a level outside (0, 1), an unknown metric, or when no resample is defined.
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap needs n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    y = None if labels is None else np.asarray(labels)
    if metric == "auc":
        if y is None:
            raise ValueError("metric 'auc' needs labels")
        a, b = _as_probs(pred_a, y), _as_probs(pred_b, y)
    else:
        a, b = np.asarray(pred_a, dtype=np.float64), np.asarray(pred_b, dtype=np.float64)
    _check_pair(a, b, y if metric == "auc" or callable(metric) else None)
    n = len(a)
    rng = np.random.default_rng(seed)
    gaps: list[np.ndarray] = []
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # bounded memory for large test sets
    full = np.arange(n)[None, :]
    if metric == "auc":
        assert y is not None
        point = float(_auc_rows(a, y, full)[0] - _auc_rows(b, y, full)[0])
        for start in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
            gaps.append(_auc_rows(a, y, idx) - _auc_rows(b, y, idx))
        name = "auc"
    elif metric in ("mean", "dice"):
        if a.ndim != 1:
            raise ValueError(f"metric {metric!r} takes per-case values [N], got shape {a.shape}")
        d = a - b  # the mean of the paired differences is the gap of the means
        point = float(d.mean())
        for start in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
            gaps.append(d[idx].mean(axis=1))
        name = str(metric)
    elif callable(metric):
        point = float(metric(a, y) - metric(b, y))
        idx = rng.integers(0, n, size=(n_boot, n))
        gaps.append(np.array([metric(a[i], None if y is None else y[i]) - metric(b[i], None if y is None else y[i])
                              for i in idx], dtype=np.float64))
        name = getattr(metric, "__name__", "custom")
    else:
        raise ValueError(f"unknown metric {metric!r}; expected 'auc', 'mean', 'dice' or a callable")
    g = np.concatenate(gaps)
    g = g[np.isfinite(g)]
    if g.size == 0:
        raise ValueError(f"paired_bootstrap: the metric {name!r} was undefined on every resample")
    # A gap that is exactly 0 on every resample (identical arms) must not become +-1e-17 by rounding.
    g = np.where(np.abs(g) < 1e-12, 0.0, g)
    lo, hi = np.percentile(g, [50 * (1 - level), 50 * (1 + level)])
    tail = min(int((g <= 0).sum()), int((g >= 0).sum()))
    p = min(1.0, 2 * (1 + tail) / (g.size + 1))
    return BootstrapGap(gap=point, low=float(lo), high=float(hi), p_value=float(p),
                        var=float(g.var(ddof=1)) if g.size > 1 else 0.0, n_boot=int(g.size), level=level, metric=name)


# ------------------------------------------------------------------------------------------------
# Test-set sampling + seed spread
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GapEstimate:
    """:func:`combine_with_seeds` result: the gap of the seed means, its standard error ``se``, Student-t
    ``df`` (``inf``: no seed spread measured, normal quantiles), CI ``low``/``high`` at ``level``, two-sided
    ``p_value``, the two variance parts (``var_test``, ``var_seed`` = the between-seed term already divided by
    the seed counts), the seed counts and whether the seeds were ``paired``."""

    gap: float
    se: float
    df: float
    low: float
    high: float
    p_value: float
    var_test: float
    var_seed: float
    n_seeds: tuple[int, int]
    paired: bool
    level: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_seeds"] = list(self.n_seeds)
        return d


def t_interval(gap: float, var: float, df: float, level: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, p)``: ``gap -+ t_{df, (1 + level) / 2} sqrt(var)`` and the two-sided p-value
    ``2 (1 - T_df(|gap| / sqrt(var)))`` (normal for ``df = inf``; ``var = 0``: the interval is the point and
    p is 1 for a zero gap, 0 otherwise)."""
    if not var > 0:
        return gap, gap, 1.0 if gap == 0 else 0.0
    se = math.sqrt(var)
    dist = _st.norm if math.isinf(df) else _st.t(df)
    q = float(dist.ppf((1 + level) / 2))
    return gap - q * se, gap + q * se, float(2 * dist.sf(abs(gap) / se))


def combine_with_seeds(var_test: float, seeds_a: Sequence[float], seeds_b: Sequence[float], *, paired: bool,
                       level: float = 0.95) -> GapEstimate:
    """Gap of the seed means ``mean(seeds_a) - mean(seeds_b)`` with test sampling and seed spread combined.

    ``seeds_a``, ``seeds_b``: each arm's test metric per training seed, all scored on the same test set (so the
    seed-to-seed spread holds no test-sampling variance, and the test-sampling variance is *not* divided by the
    number of seeds). ``var_test``: the test-sampling variance of the gap, e.g. :attr:`BootstrapGap.var` of the
    paired bootstrap of the seed-averaged predictions.

    * ``paired`` (both arms ran the same seeds, in the same order): ``d_s = a_s - b_s``,
      ``var = var_test + s_d^2 / S``, ``df = S - 1``;
    * unpaired, both arms with >= 2 seeds (Welch): ``var = var_test + s_a^2 / S_a + s_b^2 / S_b``, ``df`` by
      Welch-Satterthwaite, ``(s_a^2/S_a + s_b^2/S_b)^2 / ((s_a^2/S_a)^2/(S_a-1) + (s_b^2/S_b)^2/(S_b-1))``;
    * unpaired, one arm with one seed: its spread is taken to equal the other arm's, ``var = var_test +
      s^2 (1/S_a + 1/S_b)``, ``df = S_other - 1``;
    * a single seed each (or no spread): ``var = var_test``, ``df = inf`` (normal quantiles).

    CI: ``gap -+ t_{df, (1 + level)/2} sqrt(var)`` (:func:`t_interval`). The seeds' degrees of freedom are used
    for the whole variance, which is conservative: the bootstrap part is estimated from many resamples.
    Raises ``ValueError`` for an empty arm, a negative ``var_test`` or paired arms of different lengths.
    """
    a, b = np.asarray(seeds_a, dtype=np.float64), np.asarray(seeds_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("combine_with_seeds needs at least one seed per arm")
    if not var_test >= 0:
        raise ValueError(f"var_test must be >= 0, got {var_test}")
    gap = float(a.mean() - b.mean())
    if paired:
        if a.size != b.size:
            raise ValueError(f"paired seeds need equal counts, got {a.size} and {b.size}")
        s = a.size
        var_seed, df = (float((a - b).var(ddof=1)) / s, float(s - 1)) if s > 1 else (0.0, math.inf)
    elif a.size > 1 and b.size > 1:
        va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
        var_seed = va + vb
        den = va**2 / (a.size - 1) + vb**2 / (b.size - 1)
        df = var_seed**2 / den if den > 0 else math.inf
    elif a.size > 1 or b.size > 1:
        many = a if a.size > 1 else b
        var_seed = float(many.var(ddof=1)) * (1 / a.size + 1 / b.size)
        df = float(many.size - 1)
    else:
        var_seed, df = 0.0, math.inf
    if var_seed == 0:
        df = math.inf  # no spread measured: only the bootstrap part is left
    var = var_test + var_seed
    lo, hi, p = t_interval(gap, var, df, level)
    return GapEstimate(gap=gap, se=math.sqrt(var), df=df, low=lo, high=hi, p_value=p, var_test=float(var_test),
                       var_seed=var_seed, n_seeds=(int(a.size), int(b.size)), paired=paired, level=level)


# ------------------------------------------------------------------------------------------------
# Multiple comparisons
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HolmResult:
    """:func:`holm` result, in the input order: ``adjusted`` p-values and ``reject`` at ``alpha`` (NaN inputs
    stay NaN and are not rejected)."""

    adjusted: np.ndarray
    reject: np.ndarray
    alpha: float


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> HolmResult:
    """Holm's step-down adjustment (Holm 1979), which controls the family-wise error rate at ``alpha``.

    With the ``m`` finite p-values sorted ascending ``p_(1) <= ... <= p_(m)``:
    ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; a hypothesis is rejected when ``adj < alpha`` (the
    same as rejecting ``p_(1..i)`` while ``p_(j) < alpha / (m - j + 1)``). NaN p-values are not counted in
    ``m``. Raises ``ValueError`` for p-values outside [0, 1] or ``alpha`` outside (0, 1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    ok = np.isfinite(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    adjusted = np.full(p.shape, np.nan)
    idx = np.flatnonzero(ok)
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
        adjusted[order] = np.maximum.accumulate(steps)
    reject = np.where(ok, adjusted < alpha, False)
    return HolmResult(adjusted=adjusted, reject=reject.astype(bool), alpha=alpha)


# ------------------------------------------------------------------------------------------------
# DeLong
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeLongResult:
    """:func:`delong` result: both AUCs, their difference ``a - b``, its variance, z and two-sided p-value."""

    auc_a: float
    auc_b: float
    diff: float
    var: float
    z: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def structural_components(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(auc, V10 [m], V01 [n])`` of one binary score by mid-ranks (Sun & Xu 2014): for the ``m`` positives
    ``X`` and ``n`` negatives ``Y``, ``V10_i = (1/n) sum_j psi(X_i, Y_j)``, ``V01_j = (1/m) sum_i psi(X_i, Y_j)``
    with ``psi = 1, 1/2, 0`` for ``X > Y``, ``X = Y``, ``X < Y``; computed as ``V10 = (T_Z - T_X) / n`` and
    ``V01 = 1 - (T_Z - T_Y) / m`` from the mid-ranks within the positives, negatives and all cases."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).reshape(-1) > 0
    x, z = s[y], s[~y]
    m, n = x.size, z.size
    if m == 0 or n == 0:
        raise ValueError("DeLong needs both positive and negative cases")
    tz = _st.rankdata(np.concatenate([x, z]))
    v10 = (tz[:m] - _st.rankdata(x)) / n
    v01 = 1.0 - (tz[m:] - _st.rankdata(z)) / m
    return float(v10.mean()), v10, v01


def delong(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> DeLongResult:
    """DeLong's test of ``AUC(a) - AUC(b)`` for two binary scores of the same cases (DeLong et al. 1988; the
    O(N log N) algorithm of Sun & Xu 2014).

    With the structural components of both scores, ``S10`` (2x2 covariance of ``V10`` over the ``m``
    positives) and ``S01`` (of ``V01`` over the ``n`` negatives): ``var(diff) = c' (S10 / m + S01 / n) c`` with
    ``c = (1, -1)``, ``z = diff / sqrt(var)``, ``p = 2 (1 - Phi(|z|))``; ``var = 0`` (identical scores) gives
    p = 1 for a zero difference. Binary only (``labels`` in {0, 1}; a two-column softmax is taken at its positive
    column). Raises ``ValueError`` for shapes that differ, a multi-class input, or a missing class.
    """
    y = np.asarray(labels)
    a, b = _as_probs(pred_a, y), _as_probs(pred_b, y)
    _check_pair(a, b, y)
    if a.ndim != 1 or y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError("delong: binary scores [N] and labels in {0, 1} only")
    auc_a, a10, a01 = structural_components(a, y)
    auc_b, b10, b01 = structural_components(b, y)
    m, n = a10.size, a01.size
    s10 = np.cov(np.stack([a10, b10])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack([a01, b01])) if n > 1 else np.zeros((2, 2))
    c = np.array([1.0, -1.0])
    var = float(c @ (s10 / m + s01 / n) @ c)
    diff = auc_a - auc_b
    if var <= 1e-15:
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / math.sqrt(var)
        p = float(2 * _st.norm.sf(abs(z)))
    return DeLongResult(auc_a=auc_a, auc_b=auc_b, diff=diff, var=max(var, 0.0), z=z, p_value=p)


# ------------------------------------------------------------------------------------------------
# Operating points
# ------------------------------------------------------------------------------------------------


def _roc_points(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds (the distinct scores, descending) and the sensitivity / specificity of the rule
    ``positive if score >= threshold`` at each."""
    s = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0
    if s.size != y.size:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("an operating point needs both positive and negative cases")
    thr = np.unique(s)[::-1]
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.searchsorted(-s_sorted, -thr, side="right") - 1  # last case with score >= each threshold
    return thr, tp[last] / pos, 1.0 - fp[last] / neg


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """The threshold ``t`` maximising Youden's J = sensitivity + specificity - 1 for ``positive if score >= t``.

    ``probs [N]``: the positive-class score (binary; call it per label for multi-label); ``labels [N]`` in
    {0, 1}. Candidates are the distinct scores; among equal J the highest threshold wins (fewest positive
    calls). Choose it on validation and apply it to test. Raises ``ValueError`` without both classes, for
    non-finite scores or mismatched lengths.
    """
    thr, sens, spec = _roc_points(probs, labels)
    j = sens + spec - 1.0
    # Equal J (equal tp/pos - fp/neg) can differ in the last bit (1/3 + 1 - 1 against 2/3 + (1 - 1/3) - 1), and
    # argmax would then pick a lower threshold; distinct J differ by at least 1/(pos neg), far above 1e-12.
    return float(thr[int(np.flatnonzero(j >= j.max() - 1e-12)[0])])


def threshold_for(probs: np.ndarray, labels: np.ndarray, *, sensitivity: float | None = None,
                  specificity: float | None = None) -> float:
    """The threshold meeting a target: with ``sensitivity``, the highest threshold whose sensitivity is at least
    the target (the most specific such rule); with ``specificity``, the lowest threshold whose specificity is at
    least the target (the most sensitive such rule). Rule: ``positive if score >= threshold``. Exactly one target,
    in [0, 1]. Raises ``ValueError`` otherwise, or for data :func:`youden_threshold` refuses."""
    if (sensitivity is None) == (specificity is None):
        raise ValueError("threshold_for: give exactly one of sensitivity= or specificity=")
    target = float(sensitivity if sensitivity is not None else specificity)  # type: ignore[arg-type]
    if not 0 <= target <= 1:
        raise ValueError(f"threshold_for: the target must lie in [0, 1], got {target}")
    thr, sens, spec = _roc_points(probs, labels)
    if sensitivity is not None:
        return float(thr[int(np.flatnonzero(sens >= target - 1e-12)[0])])  # sens rises as the threshold falls
    ok = np.flatnonzero(spec >= target - 1e-12)
    if ok.size == 0:  # no distinct score reaches it: above the top score nothing is called positive
        return float(np.nextafter(thr[0], np.inf))
    return float(thr[int(ok[-1])])


__all__ = [
    "BootstrapGap", "DeLongResult", "GapEstimate", "HolmResult", "auc_score", "combine_with_seeds", "delong",
    "holm", "paired_bootstrap", "structural_components", "t_interval", "threshold_for", "youden_threshold",
]
