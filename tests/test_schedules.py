"""Schedules: closed forms, validation, and the contract every schedule keeps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyak.schedules import (
    constant,
    delayed,
    gamma_from_sigma_rel,
    inverse_gamma,
    linear_warmup,
    power_function,
    ratio_warmup,
    sigma_rel_from_gamma,
)

ALL_SCHEDULES = [
    constant(0.01),
    linear_warmup(0.2, 0.002, 100),
    linear_warmup(0.0, 0.5, 1),
    linear_warmup(0.001, 0.1, 7),
    inverse_gamma(),
    inverse_gamma(gamma=10.0, power=0.75, max_decay=0.999, min_decay=0.5),
    power_function(gamma=0),
    power_function(sigma_rel=0.05),
    ratio_warmup(),
    ratio_warmup(max_decay=0.99, min_decay=0.5),
    delayed(constant(0.01), 3),
    delayed(inverse_gamma(), 0),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_contract_momentum_in_unit_interval_and_pure(schedule):
    values = [schedule(k) for k in range(1, 2000)]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)
    assert values == [schedule(k) for k in range(1, 2000)]  # a pure function of k


def test_linear_warmup_matches_ignite_formula():
    s = linear_warmup(0.2, 0.002, 100)
    for k in range(1, 300):
        expected = 0.2 + (0.002 - 0.2) * (k - 1) / 99
        assert s(k) == pytest.approx(max(0.002, expected), abs=0, rel=1e-15)
    assert s(1) == 0.2
    assert s(100) == pytest.approx(0.002, rel=1e-14)  # ignite's arithmetic, rounding included
    assert s(101) == 0.002


def test_linear_warmup_matches_ignite_ewarmup_object():
    from ignite.handlers.ema_handler import EMAWarmUp

    for mw, m, w in [(0.2, 0.002, 100), (0.0, 0.5, 1), (0.001, 0.1, 7), (0.5, 0.5, 3)]:
        ours, theirs = linear_warmup(mw, m, w), EMAWarmUp(mw, w, m)
        assert [ours(k) for k in range(1, 3 * w + 2)] == [theirs(k) for k in range(1, 3 * w + 2)]


def test_increasing_warmup_is_clamped_at_momentum():
    s = linear_warmup(0.001, 0.1, 7)
    assert s(1) == 0.001
    assert s(7) == pytest.approx(0.1)
    assert s(1000) == 0.1


def test_inverse_gamma_closed_form():
    s = inverse_gamma(gamma=1.0, power=2 / 3, max_decay=0.9999)
    assert s(1) == 1.0
    for k in [2, 10, 1000, 10**6]:
        decay = 1 - (1 + (k - 1)) ** (-2 / 3)
        assert s(k) == pytest.approx(1 - min(0.9999, decay), rel=1e-12)
    assert s(10**9) == pytest.approx(1e-4)
    assert inverse_gamma(min_decay=0.5)(1) == 1.0  # the first update copies, as in timm, ema-pytorch, diffusers
    assert inverse_gamma(min_decay=0.5)(2) == 0.5


@pytest.mark.parametrize(
    ("sigma_rel", "gamma"),
    [(0.05, 16.9721986023), (0.10, 6.9372039376), (0.15, 3.5578687749), (0.20, 1.8262137799)],
)
def test_gamma_from_sigma_rel_design_values(sigma_rel, gamma):
    assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma, abs=1e-9)
    assert sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)


@given(st.floats(min_value=1e-3, max_value=12**-0.5 - 1e-6))
def test_sigma_rel_round_trip(sigma_rel):
    assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_function_closed_form_and_running_mean():
    s = power_function(gamma=6.0)
    assert s(1) == 1.0
    for k in [2, 3, 50, 1000]:
        assert s(k) == pytest.approx(1 - (1 - 1 / k) ** 7, rel=1e-13)
    mean = power_function(gamma=0)
    assert [mean(k) for k in range(1, 6)] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], rel=1e-15)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: constant(0.0), ValueError, r"momentum must be in \(0, 1\), got 0.0"),
        (lambda: constant(1.0), ValueError, "momentum must be in"),
        (lambda: constant(float("nan")), ValueError, "momentum must be finite"),
        (lambda: constant("0.1"), TypeError, "momentum must be a real number"),
        (lambda: constant(True), TypeError, "momentum must be a real number"),
        (lambda: linear_warmup(1.5, 0.1, 10), ValueError, r"momentum_warmup must be in \[0, 1\], got 1.5"),
        (lambda: linear_warmup(-0.1, 0.1, 10), ValueError, "momentum_warmup must be in"),
        (lambda: linear_warmup(0.5, 0.1, -1), ValueError, "warmup_iters must be >= 0, got -1"),
        (lambda: linear_warmup(0.5, 0.1, 2.5), TypeError, "warmup_iters must be an int, got 2.5"),
        (lambda: inverse_gamma(gamma=0), ValueError, "gamma must be > 0, got 0.0"),
        (lambda: inverse_gamma(power=-1), ValueError, "power must be > 0"),
        (lambda: inverse_gamma(max_decay=0.5, min_decay=0.6), ValueError, "min_decay must be <="),
        (lambda: power_function(), ValueError, "exactly one of gamma or sigma_rel"),
        (lambda: power_function(gamma=1, sigma_rel=0.1), ValueError, "exactly one of gamma or sigma_rel"),
        (lambda: power_function(gamma=-0.5), ValueError, "gamma must be >= 0, got -0.5"),
        (lambda: power_function(sigma_rel=0.3), ValueError, r"sigma_rel must be in \[0.0001, 1/sqrt\(12\)"),
        (lambda: gamma_from_sigma_rel(0.0), ValueError, "sigma_rel must be in"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_sigma_rel_limit_is_gamma_zero():
    assert sigma_rel_from_gamma(0.0) == pytest.approx(math.sqrt(1 / 12))
