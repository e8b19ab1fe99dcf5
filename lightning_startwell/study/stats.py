"""Paired comparisons across seeds: a run and its reference share the seed (initialisation, split, data order), so
the tests are on the per-seed differences d_s = value_s - reference_s.

* The paired t-test: t = mean(d) / (sd(d) / sqrt(n)) with n - 1 degrees of freedom (scipy.stats.ttest_rel), and the
  95 % confidence interval mean(d) ± t_{0.975, n-1} sd(d) / sqrt(n).
* The exact sign-flip permutation test: under the null hypothesis each d_s is as likely to be -d_s, so p is the share
  of the 2^n sign patterns whose |mean| is at least the observed one. It assumes no normality and is defined when
  sd(d) = 0, where the t-test is not (its smallest possible p is 2 / 2^n: 0.25 with 3 seeds, 0.0078 with 8).
* The power of the design: the smallest true mean difference the two-sided t-test at level ``ALPHA`` detects with
  probability 80 %, in units of sd(d): the non-centrality sqrt(n) delta / sd of the non-central t distribution.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

ALPHA = 0.05
POWER = 0.8
#: Up to this many seeds the sign-flip test enumerates every sign pattern (2^n); above, it draws this many patterns.
EXACT_SEEDS = 16
RANDOM_PATTERNS = 100_000


@dataclass(frozen=True)
class Comparison:
    """A cell against its reference over the seeds both have: means, standard deviations (n - 1), the mean and std of
    the per-seed differences with their 95 % confidence interval, the paired t-test's t and p, the sign-flip test's p,
    and the smallest difference the design detects at 80 % power (NaN where undefined: fewer than 2 seeds, or no
    spread of the differences for the interval and the power).

    ``p`` is the p-value the report adjusts and decides on: the t-test's, or the sign-flip test's where the t-test is
    undefined (every difference equal: no variance, no t)."""

    seeds: int
    mean: float
    std: float
    reference_mean: float
    reference_std: float
    difference_mean: float
    difference_std: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    p_sign_flip: float
    detectable: float

    @property
    def p(self) -> float:
        return self.p_sign_flip if math.isnan(self.p_t) else self.p_t


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided p of the sign-flip permutation test of mean(differences) = 0: exact over the 2^n sign patterns for
    n <= ``EXACT_SEEDS``, else over ``RANDOM_PATTERNS`` random ones (fixed seed, the observed pattern counted). All
    zero differences give 1; fewer than 1, NaN."""
    import numpy as np

    n = len(differences)
    if n == 0:
        return math.nan
    d = np.asarray(differences, dtype=np.float64)
    observed = abs(d.mean())
    if n <= EXACT_SEEDS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        extra = 0
    else:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(RANDOM_PATTERNS, n))
        extra = 1
    # A relative tolerance so that patterns equal to the observed one up to rounding count as "at least as extreme".
    extreme = np.abs(signs @ d / n) >= observed * (1 - 1e-12)
    return float((extreme.sum() + extra) / (len(signs) + extra))


def detectable_effect(seeds: int, difference_std: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest mean difference that the two-sided paired t-test at level ``alpha`` detects with probability
    ``power`` given ``seeds`` pairs whose differences have standard deviation ``difference_std`` (NaN with fewer than
    2 seeds or a non-positive std). Power(delta) = P(|T'| > t_crit), T' non-central t with n - 1 degrees of freedom
    and non-centrality sqrt(n) delta / sd."""
    from scipy import optimize, stats

    if seeds < 2 or not difference_std > 0:
        return math.nan
    df = seeds - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def power_minus_target(effect_size: float) -> float:
        nc = math.sqrt(seeds) * effect_size
        # The opposite tail is below 1e-6 once the effect matters, and scipy returns NaN for some far-tail values.
        opposite = float(stats.nct.cdf(-critical, df, nc))
        return float(stats.nct.sf(critical, df, nc)) + (0.0 if math.isnan(opposite) else opposite) - power

    upper = 1.0
    while power_minus_target(upper) < 0:  # the power grows with the effect: bracket the root
        upper *= 2
    effect_size = optimize.brentq(power_minus_target, 0.0, upper)
    return effect_size * difference_std


def paired_comparison(values: dict[int, float], reference: dict[int, float]) -> Comparison:
    """Compare ``values`` with ``reference`` (both ``{seed: value}``) on their common seeds (see the module doc)."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    a, b = [values[s] for s in seeds], [reference[s] for s in seeds]
    differences = [x - y for x, y in zip(a, b, strict=True)]
    n, spread = len(seeds), _std(differences)
    t = p_t = low = high = math.nan
    if n >= 2 and spread > 0:
        result = stats.ttest_rel(a, b)
        t, p_t = float(result.statistic), float(result.pvalue)
        half_width = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * spread / math.sqrt(n)
        low, high = statistics.mean(differences) - half_width, statistics.mean(differences) + half_width
    elif n >= 2:  # every difference equal: the interval is that one value, the t-test is undefined
        low = high = differences[0]
    return Comparison(
        seeds=n,
        mean=statistics.mean(a) if a else math.nan,
        std=_std(a),
        reference_mean=statistics.mean(b) if b else math.nan,
        reference_std=_std(b),
        difference_mean=statistics.mean(differences) if differences else math.nan,
        difference_std=spread,
        ci_low=low,
        ci_high=high,
        t=t,
        p_t=p_t,
        p_sign_flip=sign_flip_p(differences) if n >= 2 else math.nan,
        detectable=detectable_effect(n, spread),
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
