"""Noise calibration used by the audit's DP settings (dp_accounting PLD)."""

from __future__ import annotations

import pytest

from sgs_flower.audit.calibrate import epsilon_for_noise, noise_multiplier_for_epsilon


def test_calibrated_noise_meets_the_target() -> None:
    z = noise_multiplier_for_epsilon(8.0, 1e-5, 1)
    assert z == pytest.approx(0.60, abs=0.01)
    assert epsilon_for_noise(z, 1e-5, 1) == pytest.approx(8.0, abs=0.05)


def test_more_rounds_or_smaller_epsilon_need_more_noise() -> None:
    z1 = noise_multiplier_for_epsilon(8.0, 1e-5, 1)
    assert noise_multiplier_for_epsilon(8.0, 1e-5, 10) > z1
    assert noise_multiplier_for_epsilon(1.0, 1e-5, 1) > z1


@pytest.mark.parametrize("bad", [dict(epsilon=0.0, delta=1e-5), dict(epsilon=1.0, delta=1.5)])
def test_invalid_targets_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        noise_multiplier_for_epsilon(bad["epsilon"], bad["delta"], 1)
