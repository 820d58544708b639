"""The budget refuses the round that would exceed it; configs name bad fields."""

from __future__ import annotations

import pytest

from sgs_flower.dp.accounting import PrivacyAccountant, RdpAccountant, round_events
from sgs_flower.dp.budget import BudgetExhaustedError, PrivacyBudget
from sgs_flower.dp.config import DPConfig, DPConfigError
from sgs_flower.dp.events import GaussianEvent, PoissonSampled


def _events():
    return round_events(
        GaussianEvent(1.0), server_adds_noise=True, sampling="poisson", population=100, cohort_size=10
    )


def test_run_stops_before_exceeding_max_epsilon() -> None:
    budget = PrivacyBudget(max_epsilon=5.0, delta=1e-5)
    acct = PrivacyAccountant("rdp", "poisson")
    ran = 0
    with pytest.raises(BudgetExhaustedError) as info:
        for _ in range(1000):
            budget.check_round(acct, _events())
            acct.compose_round(_events())
            ran += 1
    spent = acct.epsilons(1e-5).consumer
    assert 0 < ran < 1000
    assert spent <= 5.0
    assert acct.epsilons_after(_events(), 1e-5).consumer > 5.0  # the refused round really would exceed
    assert acct.rounds == ran  # refusing spent nothing
    err = info.value
    assert err.spent == pytest.approx(spent) and err.would_be > 5.0
    assert f"round {ran + 1}" in str(err) and "max_epsilon=5" in str(err)


def test_would_exceed_on_plain_accountant() -> None:
    acct = RdpAccountant()
    ev = PoissonSampled(0.1, GaussianEvent(1.0))
    budget = PrivacyBudget(5.0, 1e-5)
    assert not budget.would_exceed(acct, ev)
    acct.compose(ev, 200)
    assert budget.would_exceed(acct, ev)
    assert len(acct.events) == 1  # asking did not compose


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="max_epsilon"):
        PrivacyBudget(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(1.0, 1.0)


def test_config_validation_names_fields() -> None:
    DPConfig("central-dp", clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(DPConfigError, match="mode"):
        DPConfig("local-dp")  # type: ignore[arg-type]
    with pytest.raises(DPConfigError, match="clip_norm"):
        DPConfig("central-dp", noise_multiplier=1.0)
    with pytest.raises(DPConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        DPConfig("central-dp", clip_norm=1.0, noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(DPConfigError, match="rounds"):
        DPConfig("central-dp", clip_norm=1.0, target_epsilon=2.0)
    with pytest.raises(DPConfigError, match="min_survivors"):
        DPConfig("distributed-dp", clip_norm=1.0, noise_multiplier=1.0, min_survivors=0)
    DPConfig("distributed-dp", clip_norm=1.0, noise_multiplier=1.0)  # None: the whole cohort
    with pytest.raises(DPConfigError, match="accountant"):
        DPConfig("distributed-dp", clip_norm=1.0, noise_multiplier=1.0, min_survivors=3, accountant="pld")
    with pytest.raises(DPConfigError, match="budget_view"):
        DPConfig("central-dp", clip_norm=1.0, noise_multiplier=1.0, budget_view="server")
    cfg = DPConfig("distributed-dp", clip_norm=1.0, noise_multiplier=1.0, min_survivors=3)
    assert DPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DPConfigError, match="unknown"):
        DPConfig.from_dict({"mode": "none", "bogus": 1})
