"""The statistics of an A/B test of a code change, on numbers whose answers are known."""

from __future__ import annotations

import math

import pytest

from engine.ab import Comparison, compare, noise_floor, t_975


def test_the_t_quantiles_are_students_and_cautious_between_listed_values():
    assert t_975(1) == 12.706 and t_975(4) == 2.776 and t_975(30) == 2.042
    assert t_975(27) == t_975(25)  # between 25 and 30: the wider interval
    assert t_975(10_000) == 1.960
    with pytest.raises(ValueError):
        t_975(0)


def test_the_noise_floor_is_the_spread_of_one_config_over_seeds():
    assert noise_floor([0.90, 0.92, 0.94]) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        noise_floor([0.9])


def test_a_clear_gain_beyond_the_noise_helped():
    # deltas 0.02, 0.03, 0.04: mean 0.03, sd 0.01, se 0.01/sqrt(3), t(2) = 4.303
    result = compare([1, 2, 3], [0.90, 0.91, 0.92], [0.92, 0.94, 0.96], noise=0.005)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert result.mean_delta == pytest.approx(0.03)
    assert (result.low, result.high) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert result.verdict == "helped" and result.beyond_noise
    assert result.summary().endswith("over 3 seeds, noise 0.0050: helped")


def test_an_interval_across_zero_or_a_gain_inside_the_noise_is_no_effect():
    across = compare([1, 2, 3], [0.90, 0.90, 0.90], [0.95, 0.86, 0.92], noise=0.001)
    assert across.low < 0 < across.high and across.verdict == "no effect"
    # a steady gain, but smaller than what reseeding one config moves R² by
    small = compare([1, 2, 3], [0.90, 0.91, 0.92], [0.902, 0.912, 0.922], noise=0.01)
    assert small.low > 0 and not small.beyond_noise and small.verdict == "no effect"


def test_a_clear_loss_hurt_and_a_result_survives_the_journal():
    result = compare([1, 2], [0.9, 0.8], [0.7, 0.61], noise=0.02)
    assert result.mean_delta == pytest.approx(-0.195) and result.high < 0
    assert result.verdict == "hurt"
    assert Comparison.from_dict(result.to_dict()) == result


def test_an_ab_test_needs_two_paired_seeds():
    with pytest.raises(ValueError):
        compare([1], [0.9], [0.91], noise=0.0)
    with pytest.raises(ValueError):
        compare([1, 2], [0.9, 0.8], [0.91], noise=0.0)
