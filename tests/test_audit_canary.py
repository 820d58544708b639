"""The canary audit catches a DP run whose noise was removed, and never over-reports an honest one."""

from __future__ import annotations

import pytest
import torch

from sgs_flower.audit.canary import run_canary_audit


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("epsilon", [2.0, 8.0])
def test_honest_run_lower_bound_stays_below_accounted(epsilon: float) -> None:
    res = run_canary_audit(epsilon=epsilon, rounds=2)
    assert res.noise_applied
    assert res.epsilon_accounted == pytest.approx(epsilon, abs=0.05)
    assert 0 < res.epsilon_lower <= res.epsilon_accounted


def test_broken_run_is_caught() -> None:
    """No noise, but the accountant still claims epsilon = 2: the audit proves otherwise."""
    res = run_canary_audit(epsilon=2.0, rounds=2, remove_noise=True)
    assert res.epsilon_lower > res.epsilon_accounted
    assert res.correct >= 0.99 * res.guesses  # canaries (nearly) perfectly separated


def test_broken_default_run_is_flagged_by_the_estimate() -> None:
    """At the default epsilon = 8 the proof is capped by the delta term (ceiling < 8); the
    GDP estimate still exposes the missing noise by orders of magnitude."""
    res = run_canary_audit(epsilon=8.0, rounds=2, remove_noise=True)
    assert res.epsilon_ceiling < 8.0
    assert res.epsilon_lower > 5.0  # far above any honest run's bound at this budget
    assert res.epsilon_gdp_estimate > 10 * res.epsilon_accounted
