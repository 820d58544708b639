"""Sample-level DP-SGD: one Opacus accountant carried across rounds as plain data."""

from __future__ import annotations

import json
import warnings

import pytest
from opacus.accountants import RDPAccountant

from sgs_flower.app.client_train import private_step
from sgs_flower.digits import Net, load_partition, make_loader
from sgs_flower.dp.sample_dp import (
    RDP_ORDERS,
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
        res = train_private_round(net, loader, 1, 0.05, SETTINGS, state, train_step=private_step)
        state = json.loads(json.dumps(res.state))  # what Context.state can hold
        results.append(res)
    total_steps = sum(r.steps for r in results)
    assert total_steps == 3 * len(loader)
    reference = RDPAccountant()
    reference.history = [(1.0, 1 / len(loader), total_steps)]
    eps_all = reference.get_epsilon(1e-5, alphas=list(RDP_ORDERS))
    assert results[-1].epsilon == pytest.approx(eps_all, rel=1e-9)
    # fewer orders than Opacus' default: never below its epsilon (a valid bound), and close
    assert reference.get_epsilon(1e-5) <= results[-1].epsilon <= 1.05 * reference.get_epsilon(1e-5)
    fresh = RDPAccountant()
    fresh.history = [(1.0, 1 / len(loader), results[-1].steps)]
    assert fresh.get_epsilon(1e-5, alphas=list(RDP_ORDERS)) < 0.9 * results[-1].epsilon  # a fresh engine under-reports
    assert results[0].epsilon < results[1].epsilon < results[2].epsilon


def test_refuses_to_train_past_client_budget() -> None:
    net, loader = Net(), _loader()
    first = train_private_round(net, loader, 1, 0.05, SETTINGS, None, train_step=private_step)
    limited = SampleDPSettings(1.0, 1.0, 1e-5, max_epsilon=first.epsilon * 1.1)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ClientBudgetExhaustedError, match="budget exhausted"):
        train_private_round(net, loader, 1, 0.05, limited, first.state, train_step=private_step)
    assert all((a == b).all() for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_both_clipping_modes_train_and_account_the_same(mode: str) -> None:
    """Ghost clipping changes how per-example norms are computed, not the accounting."""
    net, loader = Net(), _loader()
    settings = SampleDPSettings(1.0, 1.0, 1e-5, grad_sample_mode=mode)  # type: ignore[arg-type]
    before = [p.detach().clone() for p in net.parameters()]
    res = train_private_round(net, loader, 1, 0.05, settings, None, train_step=private_step)
    assert res.steps == len(loader)
    assert any(not (a == b).all() for a, b in zip(before, net.parameters(), strict=True))
    reference = RDPAccountant()
    reference.history = [(1.0, 1 / len(loader), len(loader))]
    assert res.epsilon == pytest.approx(reference.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), rel=1e-9)
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())  # hooks removed


def test_the_core_does_not_import_the_app() -> None:
    import ast
    from pathlib import Path

    import sgs_flower.dp.sample_dp as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("sgs_flower.app") or m.startswith("flwr")]


def test_calibrated_z_reaches_the_target_and_not_more() -> None:
    from sgs_flower.dp.sample_dp import noise_multiplier_for

    z = noise_multiplier_for(8.0, 1e-5, 0.2, 100)
    acct = RDPAccountant()
    acct.history = [(z, 0.2, 100)]
    eps = acct.get_epsilon(1e-5, alphas=list(RDP_ORDERS))
    assert 7.8 <= eps <= 8.0


def test_epsilon_from_cached_one_step_rdp_equals_opacus_and_dp_accounting() -> None:
    """The per-(z, q) cache of one step's RDP changes no number: a history of several
    (z, q, steps) entries gives Opacus' RDPAccountant's epsilon, and agrees with Google's
    dp-accounting (an independent implementation of the sampled Gaussian's RDP)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from sgs_flower.dp.sample_dp import _epsilon_of, _merged, _rdp_per_step

    history = [(1.1, 0.2, 10), (0.9, 1 / 6, 7), (1.1, 0.2, 30), (2.0, 0.05, 100)]
    _rdp_per_step.cache_clear()
    eps = _epsilon_of(_merged(history), 1e-5)
    eps_again = _epsilon_of(_merged(history), 1e-5)  # from the cache
    assert _rdp_per_step.cache_info().hits >= 3
    opacus_acct = RDPAccountant()
    opacus_acct.history = list(history)
    assert eps == eps_again == pytest.approx(opacus_acct.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), rel=1e-12)
    google = RdpAccountant(list(RDP_ORDERS))
    for z, q, n in history:
        google.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    assert eps == pytest.approx(google.get_epsilon(1e-5), rel=0.02)
    assert eps > _epsilon_of(_merged(history[:3]), 1e-5)  # more steps, more epsilon
