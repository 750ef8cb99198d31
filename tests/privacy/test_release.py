"""What of a site's counts may leave it: suppression rules and the noise's calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from fedmed.config import PrivacyConfig
from fedmed.privacy.accounting import epsilon_spent
from fedmed.privacy.release import (
    add_noise,
    noise_generator,
    noise_multiplier,
    publishable_sums,
    suppress,
)


def test_counts_below_the_minimum_are_null_zeros_and_large_counts_are_kept() -> None:
    cells = {"cohort": [40], "outcome": [0, 12, 28], "feature/age": [0, 3, 20, 14, 3]}

    out = suppress(cells, 10)

    assert out["cohort"] == [40]
    assert out["outcome"] == [0, 12, 28]
    assert out["feature/age"] == [0, None, 20, 14, None]


def test_a_lone_suppressed_cell_takes_the_smallest_other_with_it() -> None:
    # 40 = 3 + 23 + 14: with the total known, a single null would be recovered by subtraction.
    out = suppress({"cohort": [40], "feature/age": [0, 3, 23, 14]}, 10)

    assert out["feature/age"] == [0, None, 23, None]


def test_cumulative_counts_are_not_partitions() -> None:
    out = suppress({"km/at_risk": [40, 25, 9], "cohort": [5]}, 10)

    assert out == {"km/at_risk": [40, 25, None], "cohort": [None]}


def test_sums_leave_only_when_pass_one_published_the_count_they_divide_by() -> None:
    sums = {"age": [600.0, 36500.0], "bp": [1300.0, 170000.0]}
    first = {"cohort": [13], "feature/age": [0, 13], "feature/bp": [None, 10]}

    assert publishable_sums(sums, first, 10, noisy=False) == {"age": [600.0, 36500.0], "bp": None}
    assert publishable_sums(sums, first, 10, noisy=True) == {"age": None, "bp": None}
    assert publishable_sums(sums, {**first, "cohort": [None]}, 10, noisy=False)["age"] is None


@pytest.mark.parametrize(("epsilon", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6)])
def test_two_releases_at_the_noise_multiplier_cost_the_target_epsilon(
    epsilon: float, delta: float
) -> None:
    z = noise_multiplier(epsilon, delta)

    spent = epsilon_spent([(z, 1.0, 2)], PrivacyConfig(enabled=True, delta=delta))

    assert spent == pytest.approx(epsilon, rel=0.02)
    # Reference: two Gaussian releases of noise z compose exactly into one of noise z / sqrt(2),
    # whose exact privacy curve is Balle & Wang's (2018, Thm 8). RDP's bound must cover it.
    mu = np.sqrt(2) / z
    exact = norm.cdf(mu / 2 - epsilon / mu) - np.exp(epsilon) * norm.cdf(-mu / 2 - epsilon / mu)
    assert exact <= delta
    assert exact > delta / 100  # and not by orders of magnitude (no noise wasted)


def test_noise_is_rounded_clipped_at_zero_and_reproducible() -> None:
    cells = {"cohort": [100], "outcome": [0, 40, 60]}

    a = add_noise(cells, 3.0, noise_generator("seed"))
    b = add_noise(cells, 3.0, noise_generator("seed"))
    c = add_noise(cells, 3.0, noise_generator("other"))

    assert a == b and a != c
    assert all(isinstance(v, int) and v >= 0 for vs in a.values() for v in vs)
    assert abs(a["cohort"][0] - 100) < 20
