"""Sample-level DP-SGD: one Opacus accountant carried across rounds as plain data."""

from __future__ import annotations

import json
import warnings

import pytest
from opacus.accountants import RDPAccountant

from sgs_flower.app.task import Net, load_partition, make_loader
from sgs_flower.dp.sample_dp import (
    ClientBudgetExhaustedError,
    SampleDPSettings,
    train_private_round,
)

SETTINGS = SampleDPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore")


def _loader():
    return make_loader(load_partition(0, 10), batch_size=32, shuffle=True)


def test_three_rounds_with_restore_equal_one_accountant() -> None:
    net, loader = Net(), _loader()
    state = None
    results = []
    for _ in range(3):
        res = train_private_round(net, loader, 1, 0.05, SETTINGS, state)
        state = json.loads(json.dumps(res.state))  # what Context.state can hold
        results.append(res)
    total_steps = sum(r.steps for r in results)
    assert total_steps == 3 * len(loader)
    reference = RDPAccountant()
    reference.history = [(1.0, 1 / len(loader), total_steps)]
    eps_all = reference.get_epsilon(1e-5)
    assert results[-1].epsilon == pytest.approx(eps_all, rel=1e-9)
    fresh = RDPAccountant()
    fresh.history = [(1.0, 1 / len(loader), results[-1].steps)]
    assert fresh.get_epsilon(1e-5) < 0.9 * results[-1].epsilon  # a fresh engine under-reports
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon


def test_refuses_to_train_past_client_budget() -> None:
    net, loader = Net(), _loader()
    first = train_private_round(net, loader, 1, 0.05, SETTINGS, None)
    limited = SampleDPSettings(1.0, 1.0, 1e-5, max_epsilon=first.epsilon * 1.1)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ClientBudgetExhaustedError, match="budget exhausted"):
        train_private_round(net, loader, 1, 0.05, limited, first.state)
    assert all((a == b).all() for a, b in zip(before, net.parameters(), strict=True))
