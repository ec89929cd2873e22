"""Tests for modelsoup.cook.stats: bootstrap intervals and paired comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsoup import stats
from modelsoup.cook.stats import bootstrap_ci, mcnemar_p_value, paired_difference
from modelsoup.errors import ConfigError


def bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_ci_covers_true_mean_on_large_sample() -> None:
    ci = bootstrap_ci(bernoulli(0.7, 5000, seed=1))
    assert ci.low < 0.7 < ci.high
    assert ci.high - ci.low < 0.03


def test_ci_has_roughly_nominal_coverage() -> None:
    # Over many independent samples, a 95% interval should cover the truth ~95% of the time.
    hits = 0
    for rep in range(200):
        ci = bootstrap_ci(bernoulli(0.8, 200, seed=rep), n_resamples=1000, seed=rep)
        hits += ci.low <= 0.8 <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_ci_on_continuous_values_covers_true_mean() -> None:
    # Many distinct values take the index-resampling path instead of multinomial counts.
    values = np.random.default_rng(3).normal(loc=2.0, scale=1.0, size=3000)
    ci = bootstrap_ci(values)
    assert ci.estimate == pytest.approx(values.mean())
    assert ci.low < 2.0 < ci.high
    assert ci.high - ci.low == pytest.approx(2 * 1.96 / math.sqrt(3000), rel=0.15)


def test_ci_shrinks_as_n_grows() -> None:
    small = bootstrap_ci(bernoulli(0.7, 250, seed=2))
    large = bootstrap_ci(bernoulli(0.7, 4000, seed=2))
    # Width scales like 1/sqrt(n): 16x the data, about a quarter of the width.
    ratio = (small.high - small.low) / (large.high - large.low)
    assert 3.0 < ratio < 5.0


def test_higher_confidence_gives_wider_interval() -> None:
    data = bernoulli(0.6, 500, seed=4)
    narrow = bootstrap_ci(data, confidence=0.8)
    wide = bootstrap_ci(data, confidence=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_same_seed_same_result_and_other_seed_differs() -> None:
    data = bernoulli(0.6, 300, seed=5)
    assert bootstrap_ci(data, seed=7) == bootstrap_ci(data, seed=7)
    assert bootstrap_ci(data, seed=7) != bootstrap_ci(data, seed=8)
    b = bernoulli(0.5, 300, seed=6)
    assert paired_difference(data, b, seed=7) == paired_difference(data, b, seed=7)


def test_identical_inputs_give_zero_difference() -> None:
    a = bernoulli(0.8, 1000, seed=8)
    cmp = paired_difference(a, a.copy())
    assert (cmp.difference, cmp.low, cmp.high) == (0.0, 0.0, 0.0)
    assert cmp.p_value == 1.0
    assert cmp.n == 1000
    assert cmp.describe() == "no detectable difference (+0.0 points, CI [0.0, 0.0])"


def test_clear_win_is_detected() -> None:
    rng = np.random.default_rng(9)
    b = (rng.random(2000) < 0.8).astype(int)
    a = b.copy()
    # a fixes 10% of b's mistakes and breaks nothing: a 2-point paired win.
    wrong = np.flatnonzero(b == 0)
    a[wrong[: len(wrong) // 2]] = 1
    cmp = paired_difference(a, b)
    assert cmp.difference == pytest.approx(a.mean() - b.mean())
    assert cmp.low > 0
    assert cmp.p_value is not None and cmp.p_value < 1e-6
    text = cmp.describe()
    assert text.startswith("+") and "no detectable" not in text


def test_small_noisy_difference_is_not_claimed() -> None:
    a = bernoulli(0.80, 300, seed=10)
    b = bernoulli(0.80, 300, seed=11)
    cmp = paired_difference(a, b)
    assert cmp.low < 0 < cmp.high
    assert cmp.describe().startswith("no detectable difference (")


def test_mcnemar_matches_hand_computed_binomial() -> None:
    # 8 discordant pairs for a, 2 for b: P(X <= 2 | n=10, p=1/2) = (1 + 10 + 45) / 1024, doubled.
    expected = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_p_value(8, 2) == pytest.approx(expected)
    assert mcnemar_p_value(2, 8) == pytest.approx(expected)
    a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 5
    assert paired_difference(a, b).p_value == pytest.approx(expected)
    assert mcnemar_p_value(0, 0) == 1.0


def test_exact_fallback_matches_scipy() -> None:
    # The scipy-free path must agree with scipy.stats.binomtest.
    for a_only, b_only in [(8, 2), (0, 5), (30, 12), (500, 430), (7, 7)]:
        fallback = stats._two_sided_fair_coin(min(a_only, b_only), a_only + b_only)
        assert fallback == pytest.approx(mcnemar_p_value(a_only, b_only), rel=1e-9)


def test_non_binary_results_get_the_paired_randomization_test() -> None:
    cmp = paired_difference([0.1, 0.5, 0.9], [0.2, 0.4, 0.8])
    assert cmp.p_value == 1.0  # three differences of 0.1: half the flips are as far
    assert cmp.difference == pytest.approx(1 / 30)


def test_a_handful_of_losses_never_calls_a_difference_the_exact_tests_do_not_back() -> None:
    # three of six examples carry the whole difference: the bootstrap interval excludes 0,
    # but no exact paired test (sign flips p = 0.25, sign test p = 1) backs it
    cmp = paired_difference([0, 0, 0, 1.01, 1.01, 1.01], [1.0] * 6)
    assert cmp.high < 0 and cmp.p_value == 0.25 and not cmp.significant
    # a real case: MeanLoss on 6 test examples, sign test p = 0.69
    diffs = np.array([-0.989, -0.009, -1.4e-5, 1.6e-4, -1.125, 0.002])
    cmp = paired_difference(1.0 + diffs, np.ones(6))
    assert not cmp.significant and cmp.p_value > 0.05
    # six that agree are as far as six examples can go: 2 / 64
    cmp = paired_difference([0.5, 0.2, 0.9, 0.4, 0.3, 0.6], [0.0] * 6)
    assert cmp.p_value == pytest.approx(2 / 64) and cmp.significant
    # many examples: random flips, close to the paired t-test there
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.1, 1, 400), rng.normal(0, 1, 400)
    flips = stats.sign_flip_p_value(a - b, n_resamples=4000, seed=1)
    assert flips == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, abs=0.03)
    far = paired_difference(a + 1.0, b)
    assert far.significant and far.p_value == pytest.approx(1 / 2001)


def test_describe_formats_negative_and_custom_units() -> None:
    cmp = stats.Comparison(difference=-0.006, low=-0.011, high=-0.001, p_value=0.01, n=900)
    assert cmp.describe() == "-0.6 points, CI [-1.1, -0.1]"
    assert cmp.describe(scale=1, unit="", digits=3) == "-0.006, CI [-0.011, -0.001]"
    # A rounded-to-zero negative bound must not print as "-0.0".
    assert "-0.0" not in stats.Comparison(0.004, -0.0001, 0.01, None, 10).describe()


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([], [], "empty"),
        ([1, 0, 1], [1, 0], "length"),
        ([1, float("nan")], [1, 0], "non-finite"),
        ([1, float("inf")], [1, 0], "non-finite"),
        ([[1, 0]], [[1, 0]], "1-D"),
        (["x", "y"], [1, 0], "numbers"),
    ],
)
def test_bad_inputs_raise_config_error(a: list, b: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        paired_difference(a, b)


@pytest.mark.parametrize(
    "options",
    [
        {"confidence": 1.0},
        {"confidence": 0.0},
        {"confidence": float("nan")},
        {"n_resamples": 0},
        {"n_resamples": 10.5},
        {"seed": -1},
    ],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError):
        bootstrap_ci([1, 0, 1], **options)


def test_error_messages_are_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        paired_difference([1, 0, 1], [1, 0])
    assert "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=80),
    st.integers(min_value=0, max_value=2**32),
)
def test_interval_contains_estimate(values: list[float], seed: int) -> None:
    ci = bootstrap_ci(values, n_resamples=200, seed=seed)
    assert ci.low <= ci.estimate <= ci.high
    assert min(values) - 1e-6 <= ci.low and ci.high <= max(values) + 1e-6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_paired_difference_properties(pairs: list[tuple[bool, bool]]) -> None:
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    forward = paired_difference(a, b, n_resamples=200)
    backward = paired_difference(b, a, n_resamples=200)
    assert forward.low <= forward.difference <= forward.high
    assert forward.difference == -backward.difference
    assert forward.p_value == pytest.approx(backward.p_value)
    assert 0.0 <= forward.p_value <= 1.0


@pytest.mark.parametrize(
    "soup, best, significant",
    [
        ([1], [0], False),  # one example: a zero-width interval proves nothing
        ([1] * 5, [0] * 5, False),  # McNemar p = 0.0625
        ([1] * 4 + [1] * 96, [0] * 4 + [1] * 96, False),  # 4 of 100 differ: p = 0.125
        ([1] * 8 + [1] * 92, [0] * 8 + [1] * 92, True),  # 8 of 100: p = 0.0078
        ([0.5] * 5, [0.1] * 5, False),  # losses: 5 differing examples are too few
        ([0.5] * 8, [0.1] * 8, True),
    ],
)
def test_a_difference_is_significant_only_when_the_paired_evidence_can_say_so(
    soup, best, significant
):
    cmp = stats.paired_difference(soup, best, n_resamples=500)
    assert cmp.significant is significant
    assert cmp.describe().startswith("no detectable difference") is not significant


def test_accuracies_averaged_over_runs_keep_an_exact_paired_test():
    # two runs of a soup: each example's share of runs right, against the best model's 0/1
    soup = [0.5] * 3 + [1.0] * 9
    best = [0.0] * 3 + [1.0] * 9
    cmp = paired_difference(soup, best, seed=0)
    # the sign test on the 3 differing examples (McNemar's case): p = 2 * 0.5**3
    assert cmp.p_value == pytest.approx(0.25) and not cmp.significant
    assert paired_difference([1.0] * 3 + [0.0], [0.0] * 4).p_value == pytest.approx(0.25)


def test_an_interval_from_too_few_resamples_never_calls_a_difference():
    strong = paired_difference([1.0] * 40, [0.0] * 40, n_resamples=2000)
    assert strong.significant
    rough = paired_difference([1.0] * 40, [0.0] * 40, n_resamples=5)
    assert not rough.significant and rough.describe().startswith("no detectable")


def test_the_sign_test_backs_a_difference_only_in_the_means_direction():
    # the soup is ahead on 70 examples by a little and behind on 30 by a lot: the mean
    # says worse, the signs say better; neither is called
    soup, best = [0.2] * 70 + [0.0] * 30, [0.0] * 70 + [1.0] * 30
    cmp = paired_difference(soup, best, seed=0)
    assert cmp.difference < 0 and cmp.high < 0 and not cmp.significant


def test_many_differing_examples_use_the_flips_normal_limit_quickly() -> None:
    # 200,000 differing examples: the normal limit plus its Berry-Esseen bound, not
    # 2000 x 200,000 flips
    import time

    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.005, 1, 200_000), rng.normal(0, 1, 200_000)
    start = time.perf_counter()
    p = stats.sign_flip_p_value(a - b)
    assert time.perf_counter() - start < 2.0  # generous: it takes milliseconds
    d = np.abs(a - b)
    slack = 2 * 0.56 * float((d**3).sum()) / float((d**2).sum()) ** 1.5  # Berry-Esseen
    assert 0.003 < slack < 0.005
    normal = scipy_stats.ttest_rel(a, b).pvalue  # the normal limit, near enough
    assert normal < p < normal + slack + 0.002
    # one example that carries the sum of squares keeps the random flips: only flipping
    # none of the 3000 small ones reaches the observed 53 (the normal limit says p = 0.29)
    heavy = np.concatenate([np.full(3000, 0.001), [50.0]])
    assert stats.sign_flip_p_value(heavy, n_resamples=2000) == pytest.approx(1 / 2001)


def test_the_flips_normal_limit_is_never_trusted_where_it_calls_a_difference_too_soon():
    # 100 differences of 1 (60 up, 40 down) among 3000 tiny ones: the sum is that of 100
    # coin flips, whose exact two-sided p is 0.057 (the sign test); the normal limit says
    # 0.046, a difference at 0.05 that no exact test backs
    d = np.concatenate([np.ones(60), -np.ones(40), np.full(3000, 1e-12)])
    exact = mcnemar_p_value(60, 40)
    assert 0.05 < exact < 0.06
    p = stats.sign_flip_p_value(d, n_resamples=10_000, seed=0)
    assert p > 0.05 and p == pytest.approx(exact, abs=0.008)


@pytest.mark.parametrize("up", [100_480, 100_500, 100_700])
def test_the_flips_normal_limit_is_conservative_for_equal_differences(up):
    # 200,000 differences of one size: the flips' sum is a fair-coin count, so the exact
    # p-value is the sign test's; the normal limit with its bound is never below it
    d = np.concatenate([np.ones(up), -np.ones(200_000 - up)])
    exact = mcnemar_p_value(up, 200_000 - up)
    p = stats.sign_flip_p_value(d)
    assert exact <= p <= exact + 0.006
