"""Accounting against independent references (libraries and the literature)."""

from __future__ import annotations

import math
from itertools import pairwise

import dp_accounting
import numpy as np
import pytest
from opacus.accountants import RDPAccountant as OpacusRDP

from sgs_flower.dp.accounting import (
    AccountantStateError,
    PldAccountant,
    PrivacyAccountant,
    RdpAccountant,
    UnsupportedEventError,
    accountant_from_state,
    round_events,
)
from sgs_flower.dp.calibrate import calibrate_gaussian, calibrate_skellam_variance, epsilon_for
from sgs_flower.dp.events import (
    Composed,
    EventError,
    GaussianEvent,
    NonPrivateEvent,
    PoissonSampled,
    SampledWithoutReplacement,
    SkellamEvent,
    event_from_dict,
    event_to_dict,
)
from sgs_flower.dp.skellam_rdp import poisson_subsampled_rdp, skellam_rdp

Q, Z, T, DELTA = 0.01, 0.8, 1000, 1e-5
EVENT = PoissonSampled(Q, GaussianEvent(Z))


def test_rdp_matches_library_opacus_and_literature() -> None:
    acct = RdpAccountant()
    acct.compose(EVENT, T)
    eps = acct.get_epsilon(DELTA)
    lib = dp_accounting.rdp.RdpAccountant()
    lib.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z)), T)
    opacus = OpacusRDP()
    opacus.history = [(Z, Q, T)]
    assert eps == pytest.approx(lib.get_epsilon(DELTA), rel=1e-9)
    assert eps == pytest.approx(opacus.get_epsilon(DELTA), rel=2e-3)  # different order grids
    assert eps == pytest.approx(3.70, abs=0.02)  # literature value


def test_pld_matches_library_and_literature_and_is_tighter() -> None:
    acct = PldAccountant()
    acct.compose(EVENT, T)
    eps = acct.get_epsilon(DELTA)
    lib = dp_accounting.pld.PLDAccountant()
    lib.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z)), T)
    assert eps == pytest.approx(lib.get_epsilon(DELTA), rel=1e-9)
    assert eps == pytest.approx(3.14, abs=0.03)
    rdp = RdpAccountant()
    rdp.compose(EVENT, T)
    assert eps < rdp.get_epsilon(DELTA)


def test_separate_rounds_equal_composed_and_replay_restores() -> None:
    one = RdpAccountant()
    one.compose(EVENT, 50)
    many = RdpAccountant()
    for _ in range(50):
        many.compose(EVENT)
    assert many.get_epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA), rel=1e-12)
    restored = accountant_from_state(many.state_dict())
    assert restored.get_epsilon(DELTA) == pytest.approx(many.get_epsilon(DELTA), rel=1e-12)
    assert len(restored.events) == 50


def test_state_dict_refuses_wrong_schema_and_kind() -> None:
    state = RdpAccountant().state_dict()
    with pytest.raises(AccountantStateError, match="schema"):
        RdpAccountant().load_state_dict({**state, "schema": 99})
    with pytest.raises(AccountantStateError, match="rdp"):
        PldAccountant().load_state_dict(state)


@pytest.mark.parametrize(
    "event",
    [
        GaussianEvent(1.1),
        SkellamEvent(100.0, 30.0, 10.0),
        NonPrivateEvent(),
        PoissonSampled(0.1, Composed(SkellamEvent(5.0, 2.0, 1.0), 3)),
        SampledWithoutReplacement(100, 10, GaussianEvent(2.0)),
    ],
)
def test_events_round_trip_json(event: object) -> None:
    import json

    data = json.loads(json.dumps(event_to_dict(event)))  # type: ignore[arg-type]
    assert event_from_dict(data) == event


def test_event_validation_names_field() -> None:
    with pytest.raises(EventError, match="noise_multiplier"):
        GaussianEvent(0.0)
    with pytest.raises(EventError, match="q"):
        PoissonSampled(1.5, GaussianEvent(1.0))
    with pytest.raises(EventError, match="unknown event type"):
        event_from_dict({"type": "laplace"})


def test_skellam_bound_approaches_gaussian_as_variance_grows() -> None:
    """Same noise-to-sensitivity ratio z, finer quantisation (larger sensitivity and mu)."""
    z, rounds = 1.0, 10
    integer_orders = list(range(2, 257))
    gauss = RdpAccountant(orders=integer_orders)
    gauss.compose(GaussianEvent(z), rounds)
    eps_g = gauss.get_epsilon(DELTA)
    gaps = []
    for l2 in (1.0, 3.0, 10.0, 100.0, 1000.0):
        mu = (z * l2) ** 2 / 2  # variance 2*mu = (z * l2)^2
        sk = RdpAccountant(orders=integer_orders)
        sk.compose(SkellamEvent(mu, l2 * l2, l2), rounds)  # worst-case L1 = L2^2
        eps_s = sk.get_epsilon(DELTA)
        assert eps_s >= eps_g - 1e-9  # never better than the Gaussian
        gaps.append(eps_s - eps_g)
    assert all(b <= a + 1e-12 for a, b in pairwise(gaps))  # monotone
    assert gaps[0] > 0.5  # coarse quantisation costs a lot
    assert gaps[-1] < 1e-2 * eps_g  # fine quantisation: within 1 %


def test_skellam_rdp_formula_values() -> None:
    """Agarwal et al. 2021 Thm 3.5 at hand-checked points."""
    r = skellam_rdp([2, 3], mu=10.0, l1=4.0, l2=2.0)
    # alpha=2: 2*4/40 + min((3*4+24)/1600, 12/40) = 0.2 + 0.0225
    assert r[0] == pytest.approx(0.2225)
    assert r[1] == pytest.approx(3 * 4 / 40 + (5 * 4 + 24) / 1600)
    assert math.isinf(skellam_rdp([1.5], 10.0, 4.0, 2.0)[0])


def test_generic_subsampling_bound_is_sound_and_amplifies() -> None:
    """Zhu-Wang on the Gaussian curve must upper-bound the tight library analysis."""
    orders = list(range(2, 65))
    base = RdpAccountant(orders=orders)
    tight = base.event_rdp(PoissonSampled(0.05, GaussianEvent(1.0)))
    unsampled = base.event_rdp(GaussianEvent(1.0))
    generic = poisson_subsampled_rdp(orders, 0.05, unsampled)
    assert np.all(generic >= tight - 1e-9)
    assert np.all(generic <= unsampled + 1e-12)
    assert generic[0] < 0.2 * unsampled[0]


def test_pld_refuses_skellam_and_rdp_refuses_skellam_without_replacement() -> None:
    with pytest.raises(UnsupportedEventError, match="Skellam"):
        PldAccountant().compose(SkellamEvent(10.0, 3.0, 1.0))
    acct = RdpAccountant("replace_one")
    with pytest.raises(UnsupportedEventError):
        acct.compose(SampledWithoutReplacement(100, 10, SkellamEvent(10.0, 3.0, 1.0)))
    assert acct.events == ()


def test_two_views_central_dp() -> None:
    ev = round_events(
        GaussianEvent(1.0), server_adds_noise=True, sampling="poisson", population=100, cohort_size=10
    )
    acct = PrivacyAccountant("rdp", "poisson")
    acct.compose_round(ev)
    eps = acct.epsilons(DELTA)
    assert math.isinf(eps.server)  # the server saw the noiseless sum
    assert 0 < eps.consumer < epsilon_for(GaussianEvent, 1.0, 1, DELTA)


def test_two_views_distributed_dp_server_gets_no_amplification() -> None:
    mech = SkellamEvent(5000.0, 200.0, 100.0)
    ev = round_events(mech, server_adds_noise=False, sampling="poisson", population=1000, cohort_size=50)
    acct = PrivacyAccountant("rdp", "poisson")
    for _ in range(5):
        acct.compose_round(ev)
    eps = acct.epsilons(DELTA)
    alone = RdpAccountant()
    alone.compose(mech, 5)
    assert eps.server == pytest.approx(alone.get_epsilon(DELTA))
    assert eps.consumer < 0.5 * eps.server


def test_fixed_size_sampling_uses_replace_one_without_replacement() -> None:
    ev = round_events(
        GaussianEvent(1.0), server_adds_noise=True, sampling="fixed", population=100, cohort_size=10
    )
    assert ev.consumer == SampledWithoutReplacement(100, 10, GaussianEvent(0.5))
    acct = PrivacyAccountant("pld", "fixed")  # consumer view falls back to RDP (replace-one)
    acct.compose_round(ev)
    assert acct.consumer.kind == "rdp" and acct.consumer.neighboring == "replace_one"
    assert math.isfinite(acct.epsilons(DELTA).consumer)
    restored = PrivacyAccountant.from_state_dict(acct.state_dict())
    assert restored.epsilons(DELTA) == acct.epsilons(DELTA)


def test_calibrate_gaussian_hits_target() -> None:
    z = calibrate_gaussian(3.0, DELTA, 100, sampling_rate=0.1)
    eps = epsilon_for(lambda s: PoissonSampled(0.1, GaussianEvent(s)), z, 100, DELTA)
    assert eps <= 3.0
    assert eps > 2.95
    variance = calibrate_skellam_variance(3.0, DELTA, 10, 1000.0, 100.0)
    eps_s = epsilon_for(lambda v: SkellamEvent(v / 2, 1000.0, 100.0), variance, 10, DELTA)
    assert 2.95 < eps_s <= 3.0
