"""Is the gain real? Bootstrap intervals and paired tests on per-example results.

A soup that scores 0.3 points above the best ingredient on 2,000 held-out
examples may be noise. These helpers take per-example results (0/1 correct,
or any per-example score) and say how sure we can be. Everything is seeded and
deterministic: the same inputs and seed always give the same interval.

Example:
    >>> from modelsoup.cook.stats import paired_difference
    >>> soup = [1] * 90 + [0] * 10
    >>> best = [1] * 80 + [0] * 20
    >>> paired_difference(soup, best).describe()
    '+10.0 points, CI [4.0, 16.0]'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelsoup.errors import ConfigError

__all__ = ["Comparison", "Interval", "bootstrap_ci", "mcnemar_p_value", "paired_difference"]

# Above this many distinct values, resampling indices is cheaper than drawing
# multinomial counts over the distinct values.
_MAX_DISTINCT_FOR_COUNTS = 64
# Resamples are drawn in blocks of at most this many numbers to bound memory.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval ``[low, high]``.

    Example:
        >>> Interval(estimate=0.5, low=0.4, high=0.6).high
        0.6
    """

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two systems on the same examples.

    ``difference`` is mean(a) - mean(b); ``[low, high]`` its bootstrap interval;
    ``p_value`` the exact McNemar p-value when the results are accuracies (0/1, or
    shares of runs right against 0/1), else the paired randomization test's
    (:func:`sign_flip_p_value`);
    ``n`` the number of examples; ``nonzero`` how many of them the two score differently;
    ``alpha`` one minus the interval's confidence.

    Example:
        >>> Comparison(difference=0.002, low=-0.003, high=0.007, p_value=0.5, n=1000).describe()
        'no detectable difference (+0.2 points, CI [-0.3, 0.7])'
    """

    difference: float
    low: float
    high: float
    p_value: float | None
    n: int
    nonzero: int | None = None
    alpha: float = 0.05
    #: the bootstrap's resamples: below :data:`MIN_RESAMPLES` its interval is too rough
    #: to call any difference (one resample's "interval" is that resample's mean)
    resamples: int = 2000

    @property
    def significant(self) -> bool:
        """True when the confidence interval excludes zero and the paired evidence can
        say so: the paired test agrees (p < ``alpha``: McNemar for 0/1 results, the
        randomization test for others); without one, at least enough examples differ
        that an exact paired test could (a sign test needs 6 at 0.05). A bootstrap over
        one example, or over a few that differ, gives an interval of zero width that
        proves nothing.

        Example:
            >>> Comparison(1.0, 1.0, 1.0, p_value=1.0, n=1).significant  # one example
            False
            >>> Comparison(0.5, 0.1, 0.9, p_value=None, n=40, nonzero=5).significant
            False
        """
        if self.resamples < MIN_RESAMPLES or not (self.low > 0 or self.high < 0):
            return False
        if self.p_value is not None:
            return self.p_value < self.alpha
        if self.nonzero is not None:  # no paired test given: at least what a sign test needs
            return 2 * 0.5**self.nonzero < self.alpha
        return True

    def describe(self, scale: float = 100, unit: str = "points", digits: int = 1) -> str:
        """One line for humans, e.g. ``"+0.6 points, CI [0.1, 1.1]"``.

        Values are multiplied by ``scale`` (100 turns accuracy into points).

        Example:
            >>> Comparison(0.006, 0.001, 0.011, None, 500).describe()
            '+0.6 points, CI [0.1, 1.1]'
            >>> Comparison(0.25, 0.1, 0.4, None, 50).describe(scale=1, unit="", digits=2)
            '+0.25, CI [0.10, 0.40]'
        """

        def fmt(value: float, sign: str = "") -> str:
            # Adding 0.0 turns a rounded -0.0 into 0.0, so we never print "-0.0".
            return f"{round(value * scale, digits) + 0.0:{sign}.{digits}f}"

        suffix = f" {unit}" if unit else ""
        text = f"{fmt(self.difference, '+')}{suffix}, CI [{fmt(self.low)}, {fmt(self.high)}]"
        return text if self.significant else f"no detectable difference ({text})"


#: the fewest bootstrap resamples whose interval can call a difference (2000 by default)
MIN_RESAMPLES = 100
#: the most: each resample's mean is kept, 8 bytes apiece
MAX_RESAMPLES = 1_000_000


def bootstrap_ci(
    per_example: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap confidence interval of the mean over examples.

    ``per_example`` holds one result per example (0/1 correct, a loss, ...).
    Use at least 1,000 resamples for a 95% interval.

    Example:
        >>> ci = bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], seed=0)
        >>> ci.estimate
        0.7
        >>> ci.low <= 0.7 <= ci.high
        True
    """
    _check_options(confidence, n_resamples, seed)
    values = _as_results(per_example, "per_example")
    return _percentile_interval(values, confidence, n_resamples, seed)


def paired_difference(
    a_per_example: Sequence[float] | np.ndarray,
    b_per_example: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Paired bootstrap interval of mean(a) - mean(b), plus McNemar when both are 0/1.

    Resampling the same examples for both systems removes the shared
    example difficulty, so the interval is much tighter than comparing two
    separate intervals.

    Example:
        >>> cmp = paired_difference([1, 1, 0, 1], [1, 1, 0, 1])
        >>> cmp.difference, cmp.p_value, cmp.describe()
        (0.0, 1.0, 'no detectable difference (+0.0 points, CI [0.0, 0.0])')
    """
    _check_options(confidence, n_resamples, seed)
    a = _as_results(a_per_example, "a_per_example")
    b = _as_results(b_per_example, "b_per_example")
    if a.shape != b.shape:
        raise ConfigError(
            f"paired results differ in length ({a.size} vs {b.size}); "
            "score both systems on the same examples"
        )
    diff = _percentile_interval(a - b, confidence, n_resamples, seed)
    p_value = None
    if _is_binary(b) and bool(((a >= 0) & (a <= 1)).all()):
        # accuracies: McNemar on the discordant pairs; for ``a`` averaged over runs (each
        # example's share of runs right) the same exact test on the signs of the
        # differences, the sign test McNemar is a case of
        a_only = int(np.count_nonzero(a > b))
        b_only = int(np.count_nonzero(a < b))
        p_value = mcnemar_p_value(a_only, b_only)
        if (a_only - b_only) * diff.estimate < 0:
            p_value = 1.0  # the signs favour the side the mean does not: no evidence for it
    else:
        # losses and other values: the paired randomization test (exact over every sign
        # flip of the differences when few differ); the percentile bootstrap alone calls
        # differences on a handful of examples that no exact paired test backs
        p_value = sign_flip_p_value(a - b, n_resamples, seed)
    nonzero = int(np.count_nonzero(a != b))
    return Comparison(
        diff.estimate,
        diff.low,
        diff.high,
        p_value,
        int(a.size),
        nonzero,
        1.0 - confidence,
        n_resamples,
    )


def sign_flip_p_value(
    differences: Sequence[float] | np.ndarray, n_resamples: int = 2000, seed: int = 0
) -> float:
    """Two-sided p-value of the paired randomization test: how often flipping the signs
    of the per-example differences gives a mean at least as far from zero (under no
    difference, each sign is a coin flip). Exact over all flips when at most
    :data:`_EXACT_FLIPS` examples differ; else from random flips (``n_resamples``, at
    most :data:`_MAX_FLIPS`), or, when so many differ that the flips' sum is nearly
    normal, from that normal limit (mean 0, variance the sum of squares) plus the most
    it can be off by: twice the Berry-Esseen bound ``0.56 sum|d|^3 / (sum d^2)^1.5``
    (Shevtsova 2010), used only when that is at most :data:`_NORMAL_SLACK`. So the
    p-value is never below the exact one but by the random flips' own noise.

    Example:
        >>> sign_flip_p_value([0.5, 0.2, 0.9, 0.4, 0.3, 0.6])  # all six agree: 2 / 64
        0.03125
        >>> sign_flip_p_value([0, 0, 0, 1.01, 1.01, 1.01])  # three examples carry it
        0.25
        >>> sign_flip_p_value([0.1, 0.1, 0.1, -0.3])  # a sum of zero: no evidence at all
        1.0
    """
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    m = d.size
    if m == 0:
        return 1.0
    # ties of the statistic count as extreme: a tolerance on the scale of the sums
    observed = abs(float(d.sum())) - 1e-9 * float(np.abs(d).sum())
    if m <= _EXACT_FLIPS:
        signs = 1 - 2 * ((np.arange(2**m)[:, None] >> np.arange(m)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed))
    scale = np.abs(d) / float(np.abs(d).max())  # the bound is scale-free; no overflow
    spread = float((scale * scale).sum())
    slack = 2 * _BERRY_ESSEEN * float((scale**3).sum()) / spread**1.5
    if slack <= _NORMAL_SLACK:
        z = max(observed, 0.0) / math.sqrt(float((d * d).sum()))
        return min(1.0, math.erfc(z / math.sqrt(2.0)) + slack)
    flips = min(n_resamples, _MAX_FLIPS)
    rng = np.random.default_rng(seed)
    hits = 0
    block = max(1, _BLOCK_ELEMENTS // m)
    for start in range(0, flips, block):
        rows = min(block, flips - start)
        signs = np.where(rng.random((rows, m)) < 0.5, -1.0, 1.0)
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed))
    return (hits + 1) / (flips + 1)


#: random sign flips at most (a p-value to 1e-4 is more than a verdict at 0.05 needs)
_MAX_FLIPS = 10_000
#: the most the flips' normal limit may be off by for it to be used: added to it, so
#: the p-value stays conservative (equal differences: from about 50,000 examples)
_NORMAL_SLACK = 0.005
#: Berry-Esseen constant for independent terms of unequal distributions (Shevtsova 2010)
_BERRY_ESSEEN = 0.56
#: differing examples up to which the randomization test enumerates every sign flip
_EXACT_FLIPS = 16


def mcnemar_p_value(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant-pair counts.

    ``a_only`` counts examples only system a got right, ``b_only`` those only
    b got right. Under "no difference" each discordant pair is a fair coin.

    Example:
        >>> mcnemar_p_value(8, 2)  # 2 * (1 + 10 + 45) / 2**10
        0.109375
    """
    for name, count in (("a_only", a_only), ("b_only", b_only)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ConfigError(f"{name} must be a non-negative integer count, got {count!r}")
    trials = int(a_only) + int(b_only)
    if trials == 0:
        return 1.0
    try:
        from scipy.stats import binomtest
    except ImportError:
        return _two_sided_fair_coin(min(a_only, b_only), trials)
    return float(binomtest(int(a_only), trials, 0.5, alternative="two-sided").pvalue)


def _two_sided_fair_coin(smaller: int, trials: int) -> float:
    """P(a fair-coin count is as extreme as ``smaller``), two-sided, exact up to rounding.

    Summed in log space so that thousands of discordant pairs cannot overflow.
    """
    log_half = trials * math.log(0.5)
    log_terms = np.array(
        [
            math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + log_half
            for k in range(smaller + 1)
        ]
    )
    top = log_terms.max()
    tail = math.exp(top) * float(np.exp(log_terms - top).sum())
    return min(1.0, 2.0 * tail)


def _percentile_interval(
    values: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> Interval:
    estimate = float(values.mean())
    means = _bootstrap_means(values, n_resamples, np.random.default_rng(seed))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Widen (never narrow) so the interval always contains the estimate: tiny
    # samples plus Monte Carlo noise can otherwise leave it a hair outside.
    return Interval(estimate, min(float(low), estimate), max(float(high), estimate))


def _bootstrap_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``values``."""
    n = values.size
    distinct, counts = np.unique(values, return_counts=True)
    if distinct.size <= _MAX_DISTINCT_FOR_COUNTS:
        # 0/1 and other few-valued results: a resample is fully described by how
        # often each distinct value is drawn, a multinomial draw. Same
        # distribution as resampling indices, but O(distinct) instead of O(n).
        means = np.empty(n_resamples)
        block = max(1, _BLOCK_ELEMENTS // distinct.size)
        for start in range(0, n_resamples, block):
            stop = min(start + block, n_resamples)
            draws = rng.multinomial(n, counts / n, size=stop - start)
            means[start:stop] = draws @ distinct / n
        return means
    means = np.empty(n_resamples)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _as_results(per_example: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        values = np.asarray(per_example, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a 1-D sequence of numbers") from None
    if values.ndim != 1:
        raise ConfigError(f"{name} must be 1-D (one result per example), got shape {values.shape}")
    if values.size == 0:
        raise ConfigError(f"{name} is empty; need at least one per-example result")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ConfigError(
            f"{name} has {bad.size} non-finite value(s), first at index {bad[0]}; "
            "drop or fix those examples"
        )
    return values


def _check_options(confidence: float, n_resamples: int, seed: int) -> None:
    if not isinstance(confidence, numbers.Real) or not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if n_resamples > MAX_RESAMPLES:
        raise ConfigError(
            f"n_resamples {n_resamples} is more than {MAX_RESAMPLES:,} (the interval's "
            "Monte-Carlo error is long gone below its rounding there); use 2000 to 100000"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))
