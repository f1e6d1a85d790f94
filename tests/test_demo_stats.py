"""The study's statistics on synthetic data with known answers: t quantiles, interval coverage, paired
differences, the hierarchical bootstrap, Holm's procedure and the split of variance.

Run: .venv/bin/pytest -q tests/test_demo_stats.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.demo.stats import holm, paired_bootstrap, t_cdf, t_interval, t_quantile, variance_split


@pytest.mark.parametrize("df, p, expected", [(1, 0.975, 12.7062), (2, 0.975, 4.3027), (4, 0.975, 2.7764), (9, 0.95, 1.8331), (29, 0.975, 2.0452), (1e6, 0.975, 1.9600)])
def test_t_quantiles_match_tables(df, p, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-4)
    assert t_cdf(expected, df) == pytest.approx(p, abs=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=2e-4)  # symmetric


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        interval = t_interval(rng.normal(0.3, 1.0, size=5))
        covered += interval.low <= 0.3 <= interval.high
    assert abs(covered / trials - 0.95) < 0.015  # binomial sd at 2000 trials: 0.005


def test_t_interval_by_hand():
    interval = t_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.3027 * 1.0 / math.sqrt(3)  # sd 1, t(0.975, 2) = 4.3027
    assert interval.estimate == 2.0 and interval.low == pytest.approx(2.0 - half, abs=1e-3) and interval.high == pytest.approx(2.0 + half, abs=1e-3)
    assert interval.p_value == pytest.approx(1 - t_cdf(2.0 / (1 / math.sqrt(3)), 2), rel=1e-9)
    assert math.isnan(t_interval(np.array([1.0])).low)


def hierarchical(rng, n_seeds: int, n_problems: int, mean: float, seed_sd: float, problem_sd: float) -> np.ndarray:
    """(S, P) values: a mean, a seed effect shared by the seed's problems, and independent problem noise."""
    return mean + rng.normal(0, seed_sd, size=(n_seeds, 1)) + rng.normal(0, problem_sd, size=(n_seeds, n_problems))


def test_paired_bootstrap_covers_the_true_mean():
    rng = np.random.default_rng(1)
    trials, covered = 300, 0
    for trial in range(trials):
        values = hierarchical(rng, n_seeds=20, n_problems=50, mean=0.1, seed_sd=0.2, problem_sd=1.0)
        interval = paired_bootstrap(values, resamples=1000, seed=trial)
        covered += interval.low <= 0.1 <= interval.high
    assert 0.88 <= covered / trials <= 0.99  # percentile bootstrap with 20 seeds: close to, slightly under, 0.95


def test_paired_differences_cancel_what_policies_share():
    """A seed effect shared by two policies drops out of their paired difference: the interval is narrow."""
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 5.0, size=(5, 1)) + rng.normal(0, 1.0, size=(5, 200))  # seed and problem effects of both
    a, b = shared + 0.5 + rng.normal(0, 0.1, size=(5, 200)), shared + rng.normal(0, 0.1, size=(5, 200))
    paired = paired_bootstrap(a - b, resamples=2000)
    assert paired.low > 0.4 and paired.high < 0.6 and paired.p_value < 1e-3
    assert t_interval(np.mean(a - b, axis=1)).low > 0.4
    unpaired_sd = math.sqrt(np.var(np.mean(a, axis=1), ddof=1) + np.var(np.mean(b, axis=1), ddof=1))
    assert unpaired_sd > 2.0  # without pairing the seed effect (sd 5) would swamp the 0.5 difference


def test_bootstrap_p_value_against_a_margin_and_nan_problems():
    values = np.full((3, 4), 1.0)
    values[:, 0] = np.nan  # a problem that does not count (e.g. not exposed)
    assert paired_bootstrap(values, margin=0.5, resamples=200).p_value == pytest.approx(1 / 201)
    assert paired_bootstrap(values, margin=1.5, resamples=200).p_value == 1.0
    assert paired_bootstrap(values, resamples=200).estimate == 1.0


def test_holm_by_hand():
    # Sorted p: 0.01 ≤ 0.05/4, 0.015 ≤ 0.05/3, 0.04 > 0.05/2: stop; the rest is not rejected either.
    assert holm([0.04, 0.01, 0.30, 0.015]) == [False, True, False, True]
    assert holm([0.04, 0.01, 0.30, 0.02]) == [False, True, False, False]  # 0.02 > 0.05/3 stops at the second
    assert holm([0.001, 0.001]) == [True, True]
    assert holm([0.03, 0.03]) == [False, False]  # 0.03 > 0.025
    assert holm([]) == []


def test_holm_controls_the_family_wise_error_rate():
    rng = np.random.default_rng(3)
    false_rejections = sum(any(holm(list(rng.uniform(size=5)))) for _ in range(4000))
    assert false_rejections / 4000 <= 0.05 + 0.01


def test_variance_split_recovers_the_seed_share():
    rng = np.random.default_rng(4)
    values = hierarchical(rng, n_seeds=400, n_problems=100, mean=0.0, seed_sd=0.3, problem_sd=1.0)
    split = variance_split(values)
    # Var(per-seed mean) = 0.09 + 1/100; the problems alone give 0.01.
    assert split.between_seeds == pytest.approx(0.10, rel=0.15)
    assert split.within_seeds == pytest.approx(0.01, rel=0.05)
    assert split.seed_share == pytest.approx(0.9, abs=0.03)
    no_seed_effect = variance_split(hierarchical(rng, n_seeds=400, n_problems=100, mean=0.0, seed_sd=0.0, problem_sd=1.0))
    assert no_seed_effect.seed_share < 0.15
