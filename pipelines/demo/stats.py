"""Statistics for paired comparisons of policies: t intervals over seeds, a hierarchical paired bootstrap over
seeds and problems, Holm's correction across claims, and the split of variance between seeds and problems.

Every policy of a study is trained with the same seeds (same student initialisation and data order for seed
s) and evaluated on the same problems, so policies are compared through paired values

    d[s, i] = Σ_p c_p · x_p[s, i]        (seeds s, problems i; a contrast with coefficients c_p)

A claim "the contrast exceeds a margin m" is held when its one-sided bootstrap p-value, Holm-adjusted over
the study's claims, is below α. Intervals are two-sided 95 % and unadjusted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


# ----------------------------------------------------------------------------------------------
# Student's t distribution (no scipy): CDF from the regularized incomplete beta function, quantile by bisection


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p, by bisection on t_cdf (|t| < 1e4 covers df ≥ 1 at p in [1e-6, 1 − 1e-6])."""
    low, high = -1e4, 1e4
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------------------------
# Paired differences


@dataclass(frozen=True)
class Interval:
    estimate: float  # mean over seeds of the per-seed mean of d
    low: float  # two-sided 95 %
    high: float
    p_value: float  # one-sided: P(contrast ≤ margin) (bootstrap); 1.0 when it cannot be computed


def t_interval(per_seed: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of per-seed values with a t interval (n − 1 df); p-value one-sided for a mean > 0. Needs ≥ 2 seeds."""
    n = len(per_seed)
    mean = float(np.mean(per_seed))
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), 1.0)
    se = float(np.std(per_seed, ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return Interval(mean, mean, mean, 0.0 if mean > 0 else 1.0)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
    return Interval(mean, mean - half, mean + half, 1.0 - t_cdf(mean / se, n - 1))


def paired_bootstrap(values: np.ndarray, margin: float = 0.0, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """Hierarchical bootstrap of mean d over (seeds, problems): resample seeds, then problems within each seed.

    values: (S, P) paired contrast values d[s, i] (NaN where problem i does not count, e.g. not exposed).
    Percentile interval; p-value = share of resampled means ≤ margin (one-sided, with the +1 correction).
    """
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = values.shape
    seed_index = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # (B, S)
    problem_index = rng.integers(0, n_problems, size=(resamples, n_seeds, n_problems))  # (B, S, P)
    resampled = values[seed_index[:, :, None], problem_index]  # (B, S, P)
    with warnings.catch_warnings():  # a resample may draw only problems where the value does not apply (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(np.nanmean(resampled, axis=2), axis=1)  # (B,)
    estimate = float(np.nanmean(np.nanmean(values, axis=1)))
    low, high = np.nanpercentile(means, [2.5, 97.5])
    p_value = (1 + int(np.sum(means <= margin))) / (resamples + 1)
    return Interval(estimate, float(low), float(high), p_value)


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level `alpha`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


@dataclass(frozen=True)
class VarianceSplit:
    between_seeds: float  # variance of the per-seed means (ddof 1)
    within_seeds: float  # what problem sampling alone would give the per-seed means: mean over seeds of var_i / P
    seed_share: float  # max(0, between − within) / between: the share of the spread due to the seeds


def variance_split(values: np.ndarray) -> VarianceSplit:
    """How much of the spread of per-seed means (S, P) → (S,) comes from the seeds rather than the problems."""
    per_seed = np.nanmean(values, axis=1)
    counts = np.sum(~np.isnan(values), axis=1)
    between = float(np.var(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
    within = float(np.mean(np.nanvar(values, axis=1, ddof=1) / counts))
    share = max(0.0, between - within) / between if between and between > 0 else float("nan")
    return VarianceSplit(between, within, share)
