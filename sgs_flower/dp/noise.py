"""Noise generation: Gaussian for central DP, Skellam shares for distributed DP.

Randomness: :func:`secure_rng` seeds numpy's PCG64DXSM generator with 256 bits from
``os.urandom``. PCG64 is not a cryptographic generator (its state could in principle
be reconstructed from enough raw outputs), but no raw noise value is ever revealed:
a distributed-DP share is masked before upload and only the survivors' *sum* is
unmasked; central noise is only seen added to the sum. The OS seed makes the stream
unpredictable to anyone who did not see it. Never use a fixed seed outside tests.

Distributed DP with dropouts: each of the n clients adds Sk(mu_share, mu_share) per
coordinate; the released sum carries Sk(k*mu_share, k*mu_share) where k is the number
of *survivors* (a dropped client's share is not in the sum). Shares are calibrated so
that ``min_survivors`` clients already carry the target variance; a round with fewer
survivors must abort (:class:`InsufficientSurvivorsError`). What gets accounted and
recorded is the noise actually present (k shares), never the target.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from sgs_flower.dp.events import GaussianEvent, SkellamEvent


class InsufficientSurvivorsError(RuntimeError):
    """Fewer survivors than the noise calibration assumed: the round must abort."""


#: Integer-domain noise is kept within this many standard deviations of the field's
#: range: the probability that it wraps around mod 2^b is below 1e-30 per coordinate.
NOISE_SIGMAS = 12.0


def noise_headroom(mu_share: float, shares: int) -> int:
    """The magnitude that the sum of ``shares`` Skellam shares of parameter ``mu_share``
    stays below but with probability under 1e-30 per coordinate (``NOISE_SIGMAS`` std):
    the range a field must reserve for the noise beside the cohort's sum."""
    return math.ceil(NOISE_SIGMAS * math.sqrt(2.0 * shares * mu_share))


def secure_rng() -> np.random.Generator:
    """A generator seeded with 256 bits of OS entropy (see module docstring)."""
    seed = int.from_bytes(os.urandom(32), "big")
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(seed)))


# ---------------------------------------------------------------- central Gaussian


def central_gaussian_std(clip_norm: float, noise_multiplier: float) -> float:
    """Std of the Gaussian added to the SUM of clipped updates (sensitivity = clip_norm)."""
    if clip_norm <= 0 or noise_multiplier <= 0:
        raise ValueError(
            f"clip_norm and noise_multiplier must be > 0, got {clip_norm}, {noise_multiplier}"
        )
    return clip_norm * noise_multiplier


def add_central_noise(
    summed: np.ndarray, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[np.ndarray, GaussianEvent]:
    """Noise the sum of clipped updates; returns it and the event to account."""
    std = central_gaussian_std(clip_norm, noise_multiplier)
    noisy = np.asarray(summed, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(summed))
    return noisy, GaussianEvent(noise_multiplier)


# ---------------------------------------------------------------- Skellam shares


def skellam_share_mu(target_variance: float, min_survivors: int) -> float:
    """Per-client Skellam parameter so ``min_survivors`` shares sum to ``target_variance``.

    Sk(mu, mu) has variance 2*mu and independent Skellams add their mu.
    """
    if target_variance <= 0:
        raise ValueError(f"target_variance must be > 0, got {target_variance}")
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be >= 1, got {min_survivors}")
    return target_variance / (2.0 * min_survivors)


def skellam_share(dim: int, mu_share: float, rng: np.random.Generator) -> np.ndarray:
    """One client's integer noise share: Poisson(mu) - Poisson(mu) per coordinate."""
    if mu_share <= 0:
        raise ValueError(f"mu_share must be > 0, got {mu_share}")
    return rng.poisson(mu_share, dim).astype(np.int64) - rng.poisson(mu_share, dim).astype(np.int64)


@dataclass(frozen=True)
class NoisePresent:
    """The distributed noise that is really in a released sum (what the ledger records)."""

    survivors: int
    min_survivors: int
    mu_share: float
    total_mu: float
    variance: float  # per coordinate, integer domain


def noise_present(mu_share: float, survivors: int, min_survivors: int) -> NoisePresent:
    """Noise in the sum of ``survivors`` shares; aborts below ``min_survivors``."""
    if survivors < min_survivors:
        raise InsufficientSurvivorsError(
            f"only {survivors} survivors, but noise shares were calibrated for at least "
            f"{min_survivors}: the sum would carry less noise than promised; abort the round"
        )
    total_mu = survivors * mu_share
    return NoisePresent(survivors, min_survivors, mu_share, total_mu, 2.0 * total_mu)


def rounded_l2_bound(scaled_clip_norm: float, dim: int) -> float:
    """L2 norm bound of a vector of norm <= ``scaled_clip_norm`` after stochastic rounding.

    Each coordinate moves by less than 1, so the rounded vector is within sqrt(dim)
    of the original: a deterministic bound (conservative next to the probabilistic
    conditional-rounding bound of Kairouz et al. 2021).
    """
    return scaled_clip_norm + math.sqrt(dim)


def skellam_sensitivities(scaled_clip_norm: float, dim: int) -> tuple[float, float]:
    """(L1, L2) sensitivity of the integer sum after scaling by ``scale`` and rounding.

    ``scaled_clip_norm`` = clip_norm * scale (the fixed-point scale). For an integer
    vector v, |v|_1 <= min(sqrt(d)*|v|_2, |v|_2^2) since every non-zero entry has
    |v_i| >= 1.
    """
    l2 = rounded_l2_bound(scaled_clip_norm, dim)
    l1 = min(math.sqrt(dim) * l2, l2 * l2)
    return l1, l2


def skellam_event(noise: NoisePresent, scaled_clip_norm: float, dim: int) -> SkellamEvent:
    """The event to account for a released sum carrying ``noise``."""
    l1, l2 = skellam_sensitivities(scaled_clip_norm, dim)
    return SkellamEvent(noise.total_mu, l1, l2)
