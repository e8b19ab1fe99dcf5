"""Paired comparisons across seeds: a run and its reference share the seed (initialisation, split, data order), so
the test is on the per-seed differences."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """A cell against its reference over the seeds both have: means, standard deviations (n - 1), the mean and std of
    the per-seed differences, and the two-sided paired t-test's t and p (NaN with fewer than 2 seeds)."""

    seeds: int
    mean: float
    std: float
    reference_mean: float
    reference_std: float
    difference_mean: float
    difference_std: float
    t: float
    p: float


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def paired_comparison(values: dict[int, float], reference: dict[int, float]) -> Comparison:
    """Compare ``values`` with ``reference`` (both ``{seed: value}``) on their common seeds with a two-sided paired
    t-test (scipy.stats.ttest_rel). Differences that are all equal and non-zero give p = 0; all zero, p = 1."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    a, b = [values[s] for s in seeds], [reference[s] for s in seeds]
    differences = [x - y for x, y in zip(a, b)]
    if len(seeds) < 2:
        t = p = math.nan
    elif _std(differences) == 0:
        t, p = (math.copysign(math.inf, differences[0]), 0.0) if differences[0] else (0.0, 1.0)
    else:
        result = stats.ttest_rel(a, b)
        t, p = float(result.statistic), float(result.pvalue)
    return Comparison(
        seeds=len(seeds),
        mean=statistics.mean(a) if a else math.nan,
        std=_std(a),
        reference_mean=statistics.mean(b) if b else math.nan,
        reference_std=_std(b),
        difference_mean=statistics.mean(differences) if differences else math.nan,
        difference_std=_std(differences),
        t=t,
        p=p,
    )


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN): reject where the adjusted p is below the level."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted
