"""The one-run audit statistics (Steinke, Nasr, Jagielski 2023)."""

from __future__ import annotations

import math

import numpy as np

from sgs_flower.audit.one_run import audit_scores, epsilon_lower_bound, p_value


def test_chance_level_guessing_proves_nothing() -> None:
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0


def test_more_correct_guesses_prove_more() -> None:
    lbs = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in (150, 180, 200)]
    assert 0 < lbs[0] < lbs[1] < lbs[2]


def test_delta_term_only_makes_the_bound_smaller() -> None:
    assert p_value(1000, 100, 90, 1.0, 1e-5) >= p_value(1000, 100, 90, 1.0, 0.0)
    assert epsilon_lower_bound(10_000, 10_000, 10_000, 1e-5) < epsilon_lower_bound(
        10_000, 10_000, 10_000, 0.0
    )


def test_bound_is_valid_for_randomized_response() -> None:
    """An exactly eps-DP mechanism: the bound may exceed eps only with probability <= beta."""
    eps, beta, trials = 2.0, 0.05, 40
    q = 1 / (1 + math.exp(-eps))
    over = 0
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        included = rng.random(2000) < 0.5
        truthful = rng.random(2000) < q
        reported = np.where(truthful, included, ~included)
        scores = reported + rng.random(2000) * 1e-3  # random tie-break
        over += audit_scores(scores, included, 0.0, beta).epsilon_lower > eps
    assert over / trials <= 3 * beta  # expected <= beta; slack against a flaky test
