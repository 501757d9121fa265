"""The Wilson score interval against published and independently computed values."""

import math

import pytest

from ar2dlm.eval.intervals import Z_95, successes_of, wilson_interval

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (score
# interval without continuity correction), to 4 decimals; the rest were computed independently by
# bisection of the score test |k/n - p| = z sqrt(p (1 - p) / n) (they equal statsmodels'
# proportion_confint(k, n, method="wilson")).
KNOWN = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
]
BISECTION = [
    (7, 10, 0.3967781475, 0.8922087326),
    (70, 100, 0.6041514537, 0.7810511471),
    (0, 500, 0.0, 0.0076243405),
    (500, 500, 0.9923756595, 1.0),
    (1, 1, 0.2065493144, 1.0),
]


@pytest.mark.parametrize("successes, n, low, high", KNOWN)
def test_newcombe_table(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("successes, n, low, high", BISECTION)
def test_score_test_inversion(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-9)


def test_ends_are_exact_and_contain_the_estimate():
    assert wilson_interval(0, 37)[0] == 0.0 and wilson_interval(37, 37)[1] == 1.0
    for n in (1, 2, 5, 100, 500):
        for k in range(0, n + 1, max(1, n // 7)):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0


def test_empty_sample_is_the_vacuous_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wider_z_widens_and_more_prompts_narrow():
    assert wilson_interval(30, 100, z=2.576)[0] < wilson_interval(30, 100)[0]
    narrow, wide = wilson_interval(150, 500), wilson_interval(30, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert Z_95 == pytest.approx(1.959963984540054) and math.isclose(Z_95 ** 2, 3.8414588206941245)


@pytest.mark.parametrize("successes, n", [(-1, 3), (4, 3), (0, -1)])
def test_impossible_counts_raise(successes, n):
    with pytest.raises(ValueError):
        wilson_interval(successes, n)


def test_successes_of_an_accuracy():
    assert successes_of(0.7, 100) == 70 and successes_of(2 / 3, 3) == 2 and successes_of(0.29, 100) == 29
