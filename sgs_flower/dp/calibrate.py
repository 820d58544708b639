"""Find the noise for a target epsilon by bisection on the accountants' own epsilon.

No closed-form Gaussian formula: we ask the same accountant that will later account
the run, so the calibrated noise is exactly what the accounting will accept.
Epsilon is decreasing in the noise, so bisection on the noise is sound; the returned
noise is on the safe side (epsilon <= target).
"""

from __future__ import annotations

from collections.abc import Callable

from sgs_flower.dp.accounting import AccountantKind, Neighboring, make_accountant
from sgs_flower.dp.events import Event, GaussianEvent, PoissonSampled, SkellamEvent


class CalibrationError(ValueError):
    """No noise in the search range reaches the target epsilon."""


def epsilon_for(
    make_event: Callable[[float], Event],
    noise: float,
    rounds: int,
    delta: float,
    kind: AccountantKind = "rdp",
    neighboring: Neighboring = "add_remove",
) -> float:
    """Epsilon after ``rounds`` repetitions of ``make_event(noise)``."""
    acct = make_accountant(kind, neighboring)
    acct.compose(make_event(noise), rounds)
    return acct.get_epsilon(delta)


def calibrate_noise(
    make_event: Callable[[float], Event],
    target_epsilon: float,
    delta: float,
    rounds: int,
    kind: AccountantKind = "rdp",
    neighboring: Neighboring = "add_remove",
    low: float = 1e-2,
    high: float = 1e4,
    rel_tol: float = 1e-3,
) -> float:
    """Smallest noise parameter (to ``rel_tol``) whose epsilon is <= ``target_epsilon``."""
    if target_epsilon <= 0 or not 0 < delta < 1 or rounds < 1:
        raise ValueError(
            f"need target_epsilon > 0, 0 < delta < 1, rounds >= 1; got "
            f"{target_epsilon}, {delta}, {rounds}"
        )

    def eps(noise: float) -> float:
        return epsilon_for(make_event, noise, rounds, delta, kind, neighboring)

    if eps(high) > target_epsilon:
        raise CalibrationError(
            f"even noise={high:g} gives epsilon {eps(high):.4g} > target {target_epsilon:g}"
        )
    if eps(low) <= target_epsilon:
        return low
    lo, hi = low, high
    while hi - lo > rel_tol * hi:
        mid = (lo * hi) ** 0.5 if hi / lo > 4 else (lo + hi) / 2
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_gaussian(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float = 1.0,
    kind: AccountantKind = "rdp",
) -> float:
    """Noise multiplier z for ``rounds`` Poisson-sampled (rate q) Gaussian releases."""

    def make(z: float) -> Event:
        return GaussianEvent(z) if sampling_rate >= 1 else PoissonSampled(sampling_rate, GaussianEvent(z))

    return calibrate_noise(make, target_epsilon, delta, rounds, kind)


def calibrate_skellam_variance(
    target_epsilon: float,
    delta: float,
    rounds: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    sampling_rate: float = 1.0,
) -> float:
    """Aggregate per-coordinate variance (2*mu) the Skellam sum needs for the target.

    Feed the result to :func:`sgs_flower.dp.noise.skellam_share_mu` with the minimum
    survivor count to get each client's share.
    """

    def make(variance: float) -> Event:
        ev = SkellamEvent(variance / 2.0, l1_sensitivity, l2_sensitivity)
        return ev if sampling_rate >= 1 else PoissonSampled(sampling_rate, ev)

    scale = l2_sensitivity**2
    return calibrate_noise(make, target_epsilon, delta, rounds, "rdp", low=1e-3 * scale, high=1e6 * scale)
