"""The studies' claims: each a one-sided hypothesis about paired per-(seed, problem) values of several
policies, tested with the hierarchical paired bootstrap, Holm-corrected across every claim of the run.

A claim holds when all of its parts hold (an intersection-union test: the claim's p-value is the largest
of its parts' p-values). A part is a contrast Σ_p c_p · metric_p[s, i] that must exceed a margin, or a
custom statistic of resampled values (the text study's "closest to the oracle").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipelines.demo.stats import BOOTSTRAP_RESAMPLES, Interval, holm, paired_bootstrap, t_interval

ALPHA = 0.05


@dataclass(frozen=True)
class Part:
    """metric: name in the study's per-problem table; coefficients: policy → c_p; the contrast must exceed margin."""

    metric: str
    coefficients: dict[str, float]
    margin: float = 0.0
    scale: float = 1.0  # for display: 100 turns a share into points
    unit: str = ""


@dataclass(frozen=True)
class Claim:
    study: str
    text: str  # the claim in words
    parts: tuple[Part, ...] = ()
    statistic: Callable[[dict, np.ndarray, np.ndarray], float] | None = field(default=None, compare=False)  # custom, with `unit_name`
    statistic_text: str = ""  # what the custom statistic is


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    intervals: tuple[Interval, ...]  # one per part (bootstrap)
    seed_intervals: tuple[Interval, ...]  # t intervals over per-seed means (NaN with one seed)
    p_value: float  # the largest part p-value, before Holm
    held: bool = False  # after Holm across the run's claims


def contrast(values: dict[str, dict[str, np.ndarray]], part: Part) -> np.ndarray:
    """(S, P) Σ_p c_p · values[metric][p], NaN where any policy's value is NaN."""
    return sum(c * values[part.metric][policy] for policy, c in part.coefficients.items())


def custom_bootstrap(values: dict, statistic, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile interval and one-sided p (statistic ≤ 0) of statistic(values, seed_index, problem_index)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = next(iter(next(iter(values.values())).values())).shape
    estimate = statistic(values, np.arange(n_seeds)[:, None], np.tile(np.arange(n_problems), (n_seeds, 1)))
    draws = np.array([
        statistic(values, rng.integers(0, n_seeds, size=(n_seeds, 1)), rng.integers(0, n_problems, size=(n_seeds, n_problems)))
        for _ in range(resamples)
    ])
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(float(estimate), float(low), float(high), (1 + int(np.sum(draws <= 0))) / (resamples + 1))


def judge(claims: list[Claim], tables: dict[str, dict], resamples: int = BOOTSTRAP_RESAMPLES) -> list[Verdict]:
    """Every claim's intervals and p-value from its study's table (metric → policy → (S, P)), then Holm."""
    verdicts = []
    for claim in claims:
        values = tables[claim.study]
        if claim.statistic is not None:
            interval = custom_bootstrap(values, claim.statistic, resamples)
            verdicts.append(Verdict(claim, (interval,), (Interval(interval.estimate, float("nan"), float("nan"), 1.0),), interval.p_value))
            continue
        intervals, seed_intervals = [], []
        for part in claim.parts:
            d = contrast(values, part)
            intervals.append(paired_bootstrap(d, margin=part.margin, resamples=resamples))
            seed_intervals.append(t_interval(np.nanmean(d, axis=1) - part.margin))
        verdicts.append(Verdict(claim, tuple(intervals), tuple(seed_intervals), max(i.p_value for i in intervals)))
    held = holm([v.p_value for v in verdicts], ALPHA)
    return [Verdict(v.claim, v.intervals, v.seed_intervals, v.p_value, h) for v, h in zip(verdicts, held)]


def claims_table(verdicts: list[Verdict], n_seeds: int) -> str:
    """Markdown: claim, metric and contrast, estimate [95 % bootstrap interval] (and the seeds' t interval), p, held."""
    lines = [
        "| study | claim | part: contrast > margin | estimate [95 % CI] | seeds' t CI | p (one-sided) | held (Holm, α = 0.05) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for verdict in verdicts:
        claim = verdict.claim
        descriptions = [part_text(part) for part in claim.parts] or [claim.statistic_text]
        scales = [(part.scale, part.unit) for part in claim.parts] or [(1.0, "")]
        for k, (text, interval, seed_interval, (scale, unit)) in enumerate(zip(descriptions, verdict.intervals, verdict.seed_intervals, scales)):
            first = k == 0
            seed_cell = "–" if np.isnan(seed_interval.low) else f"[{(seed_interval.low + claim.parts[k].margin) * scale:+.2f}, {(seed_interval.high + claim.parts[k].margin) * scale:+.2f}]"
            lines.append(
                f"| {claim.study if first else ''} | {claim.text if first else ''} | {text} | "
                f"{interval.estimate * scale:+.2f}{unit} [{interval.low * scale:+.2f}, {interval.high * scale:+.2f}] | {seed_cell} | "
                f"{interval.p_value:.4f} | {('**yes**' if verdict.held else 'no') if first else ''} |"
            )
    note = "" if n_seeds > 1 else "\nOne seed: the intervals cover problem sampling only, not the variation between training runs.\n"
    return "\n".join(lines) + "\n" + note


def part_text(part: Part) -> str:
    terms = " ".join(f"{'+' if c > 0 else '−'} {abs(c):g}·{policy}" if abs(c) != 1 else f"{'+' if c > 0 else '−'} {policy}"
                     for policy, c in part.coefficients.items()).lstrip("+ ")
    return f"{part.metric}: {terms} > {part.margin * part.scale:g}{part.unit}"
