"""Noise shares, clipping and rotation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sgs_flower.dp.clipping import clip_l2
from sgs_flower.dp.noise import (
    InsufficientSurvivorsError,
    add_central_noise,
    noise_present,
    secure_rng,
    skellam_event,
    skellam_sensitivities,
    skellam_share,
    skellam_share_mu,
)
from sgs_flower.dp.rotation import padded_length, rotate, unrotate

N_CLIENTS, MIN_SURVIVORS, TARGET_VAR, DIM = 10, 7, 60.0, 40_000


def _variance_ok(sample: np.ndarray, expected: float) -> tuple[bool, float]:
    """Chi-square test of the sample variance at two-sided level 1e-6.

    Skellam sums are near-normal for these mu (excess kurtosis 1/(2*mu) < 0.02), so
    (N-1) s^2 / sigma^2 ~ chi2(N-1); with N = 40,000 the acceptance band is about
    +/- 3.5 % of the variance, and a wrong calibration (e.g. 10/7 too much) is far outside.
    """
    n = sample.size
    stat = (n - 1) * sample.var(ddof=1) / expected
    lo, hi = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], n - 1)
    return bool(lo <= stat <= hi), float(stat / (n - 1))


@pytest.mark.parametrize("survivors", [MIN_SURVIVORS, 9, N_CLIENTS])
def test_summed_skellam_shares_have_recorded_variance(survivors: int) -> None:
    rng = np.random.default_rng(1234 + survivors)
    mu = skellam_share_mu(TARGET_VAR, MIN_SURVIVORS)
    shares = [skellam_share(DIM, mu, rng) for _ in range(N_CLIENTS)]
    total = np.sum(shares[:survivors], axis=0)  # the dropped clients' shares are absent
    present = noise_present(mu, survivors, MIN_SURVIVORS)
    assert present.variance == pytest.approx(TARGET_VAR * survivors / MIN_SURVIVORS)
    assert present.variance >= TARGET_VAR  # never less than promised
    ok, ratio = _variance_ok(total.astype(float), present.variance)
    assert ok, f"sample variance / recorded variance = {ratio}"
    assert abs(total.mean()) < 5 * np.sqrt(present.variance / DIM)
    if survivors > MIN_SURVIVORS:
        # the target (not what is present) would be rejected: recording it would be wrong
        assert not _variance_ok(total.astype(float), TARGET_VAR)[0]


def test_too_few_survivors_abort() -> None:
    mu = skellam_share_mu(TARGET_VAR, MIN_SURVIVORS)
    with pytest.raises(InsufficientSurvivorsError, match="only 6 survivors"):
        noise_present(mu, MIN_SURVIVORS - 1, MIN_SURVIVORS)


def test_skellam_event_uses_present_noise_and_integer_sensitivity() -> None:
    present = noise_present(2.0, 9, 7)
    ev = skellam_event(present, scaled_clip_norm=100.0, dim=64)
    assert ev.mu == pytest.approx(18.0)
    l1, l2 = skellam_sensitivities(100.0, 64)
    assert (ev.l1_sensitivity, ev.l2_sensitivity) == (l1, l2)
    assert l2 == pytest.approx(108.0) and l1 == pytest.approx(8 * 108.0)


def test_central_noise_std_and_event() -> None:
    rng = np.random.default_rng(0)
    noisy, ev = add_central_noise(np.zeros(50_000), clip_norm=2.0, noise_multiplier=1.5, rng=rng)
    assert ev.noise_multiplier == 1.5
    assert _variance_ok(noisy, 9.0)[0]


def test_secure_rng_streams_differ() -> None:
    assert not np.array_equal(secure_rng().integers(0, 2**62, 8), secure_rng().integers(0, 2**62, 8))


def test_clip_reports() -> None:
    v = np.array([3.0, 4.0])
    res = clip_l2(v, 1.0)
    assert res.clipped and res.original_norm == pytest.approx(5.0) and res.scale == pytest.approx(0.2)
    assert np.linalg.norm(res.vector) == pytest.approx(1.0)
    res2 = clip_l2(v, 10.0)
    assert not res2.clipped and np.array_equal(res2.vector, v) and res2.scale == 1.0
    with pytest.raises(ValueError, match="NaN"):
        clip_l2(np.array([np.nan]), 1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_l2(v, 0.0)


@pytest.mark.parametrize("n", [1, 5, 64, 1000])
def test_rotation_round_trip_and_norm(n: int) -> None:
    x = np.random.default_rng(n).normal(size=n)
    y = rotate(x, seed=42)
    assert y.shape == (padded_length(n),)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(unrotate(y, 42, n), x, atol=1e-12)
    assert not np.allclose(unrotate(y, 43, n), x)


def test_rotation_spreads_a_spike() -> None:
    x = np.zeros(1024)
    x[3] = 1.0
    y = rotate(x, seed=7)
    assert np.max(np.abs(y)) == pytest.approx(1 / 32)
