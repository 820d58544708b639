"""Gaussian noise calibrated to an (epsilon, delta) target, for the audit's DP settings.

Why this lives in ``audit`` and not in ``sgs_flower.dp``: the audit must be able to
state "this is what DP at epsilon=8 looks like to an attacker" without depending on
the production DP pipeline (which it is meant to check). It therefore calibrates the
noise itself, with Google's ``dp_accounting`` PLD accountant, never with a
hand-rolled formula.

Convention: ``noise_multiplier`` z = noise standard deviation / L2 sensitivity (the
clip norm), the mechanism is a Gaussian on a clipped sum released ``compositions``
times without subsampling (the server knows who took part, so no amplification).
"""

from __future__ import annotations

from functools import lru_cache

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

#: PLD discretisation. Coarser than the library default (1e-4) so calibration takes
#: milliseconds, not seconds; PLD discretisation is pessimistic, so the epsilon it
#: reports is still an upper bound (the noise is, if anything, slightly larger).
_PLD_INTERVAL = 1e-2


def _accountant() -> pld_privacy_accountant.PLDAccountant:
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=_PLD_INTERVAL)


def _event(noise_multiplier: float, compositions: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise_multiplier), compositions)


@lru_cache(maxsize=64)
def noise_multiplier_for_epsilon(epsilon: float, delta: float, compositions: int = 1) -> float:
    """Smallest z such that ``compositions`` Gaussian releases are (epsilon, delta)-DP."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if compositions < 1:
        raise ValueError(f"compositions must be >= 1, got {compositions}")
    z = dp_accounting.calibrate_dp_mechanism(
        _accountant,
        lambda z: _event(z, compositions),
        epsilon,
        delta,
        dp_accounting.ExplicitBracketInterval(0.05, 500.0),
        tol=1e-4,
    )
    return float(z)


def epsilon_for_noise(noise_multiplier: float, delta: float, compositions: int = 1) -> float:
    """The accounted epsilon of ``compositions`` Gaussian releases with multiplier z."""
    acc = _accountant()
    acc.compose(_event(noise_multiplier, compositions))
    return float(acc.get_epsilon(delta))
