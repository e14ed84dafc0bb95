"""Statistics across seeds: intervals, tests and the multiple-testing correction.

A study compares every layer and metric at once (the quick config alone makes about 144
A − B tests), so a 95% interval that excludes zero at one of them says little. Each
difference therefore carries a t-test p-value, and significance is decided on p-values
adjusted with Benjamini–Hochberg (false discovery rate 5%) within each family of tests.
The distributions and tests come from ``scipy.stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

#: False discovery rate of the correction, and the adjusted p-value below which a difference is significant.
ALPHA = 0.05
#: The correction as written in ``difference.csv``'s ``correction`` column (ASCII, for tables).
CORRECTION = "Benjamini-Hochberg"
#: The correction's name in prose: figures, findings and the report's captions use these words.
CORRECTION_NAME = "Benjamini–Hochberg"
#: The correction with its rate, as the figure's legend and the findings state it.
CORRECTION_TEXT = f"{CORRECTION_NAME} (FDR {ALPHA:.0%})"
#: The interval every A − B carries (:func:`paired_difference`, :func:`welch_difference`).
INTERVAL_DESCRIPTION = (
    "95% t-interval of A − B across seeds, paired by seed when A and B share their seeds, otherwise Welch's"
)
#: The test behind every p-value.
TEST_DESCRIPTION = (
    "two-sided t-test across seeds: paired by seed (one-sample on the per-seed differences) when A and B "
    "share their seeds, otherwise Welch's unequal-variance test"
)


@dataclass(frozen=True)
class Difference:
    """A − B across seeds. ``effect_size`` is the mean difference in units of the
    seed-to-seed spread: Cohen's d_z (mean / s.d. of the paired differences) when
    paired, Cohen's d with the pooled s.d. when not."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    effect_size: float
    df: float
    n_a: int
    n_b: int
    method: str  # paired | welch | single-seed | no-data


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float, float, int]:
    """Mean and two-sided 95% t-interval (n−1 df) of the finite values: (mean, low, high, n).
    With fewer than 2 values the interval is NaN: one seed says nothing about seed variance."""
    v = _finite(values)
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.975, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def _no_spread(sd: float, values: np.ndarray) -> bool:
    """A spread at rounding level (e.g. 1.0 − 0.9 against 2.0 − 1.9) is no spread."""
    return sd <= 1e-12 * max(float(np.abs(values).max()), 1e-300)


def _degenerate(mean: float, df: float, n_a: int, n_b: int, method: str) -> Difference:
    """No spread at all: the interval is the point, and only a non-zero mean is a difference."""
    if abs(mean) <= 1e-12 * max(abs(mean), 1e-300) or mean == 0.0:
        mean = 0.0
    p = 1.0 if mean == 0.0 else 0.0
    effect = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return Difference(mean, mean, mean, p, effect, df, n_a, n_b, method)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """A − B for values matched by seed (a[i] and b[i] share seed i): a one-sample t-test
    on the differences, so noise the seeds share (data order, init draws) cancels."""
    d = _finite(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    n = int(d.size)
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, "no-data")
    mean = float(d.mean())
    if n == 1:
        return Difference(mean, math.nan, math.nan, math.nan, math.nan, math.nan, 1, 1, "single-seed")
    sd = float(d.std(ddof=1))
    if _no_spread(sd, d):
        return _degenerate(mean, float(n - 1), n, n, "paired")
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(0.95)
    return Difference(mean, float(ci.low), float(ci.high), float(result.pvalue), mean / sd, float(n - 1),
                      n, n, "paired")


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """A − B for unmatched seeds: Welch's t-test, which does not assume equal spreads."""
    va, vb = _finite(a), _finite(b)
    n_a, n_b = int(va.size), int(vb.size)
    if n_a == 0 or n_b == 0:
        return Difference(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, n_a, n_b, "no-data")
    mean = float(va.mean() - vb.mean())
    if n_a < 2 or n_b < 2:
        return Difference(mean, math.nan, math.nan, math.nan, math.nan, math.nan, n_a, n_b, "single-seed")
    var_a, var_b = float(va.var(ddof=1)), float(vb.var(ddof=1))
    if _no_spread(math.sqrt(var_a), va) and _no_spread(math.sqrt(var_b), vb):
        return _degenerate(mean, math.nan, n_a, n_b, "welch")
    result = stats.ttest_ind(va, vb, equal_var=False)
    ci = result.confidence_interval(0.95)
    pooled = math.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    return Difference(mean, float(ci.low), float(ci.high), float(result.pvalue), mean / pooled,
                      float(result.df), n_a, n_b, "welch")


def adjust_pvalues(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values over one family of tests. NaN p-values (a
    single seed, no data) are not tests: they stay NaN and do not enlarge the family."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    if tested.any():
        adjusted[tested] = stats.false_discovery_control(p[tested], method="bh")
    return adjusted
