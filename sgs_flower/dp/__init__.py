"""Differential privacy for sgs-flower: mechanisms, events, accountants and budget.

Flower-free by design (the Flower glue lives in ``strategies/`` and ``clients/``);
Opacus is only imported by :mod:`sgs_flower.dp.sample_dp`.

The names below are loaded on first use (PEP 562), not when the package is imported:
a Flower client process that only answers a protocol message (``secagg_mod`` imports
``sgs_flower.dp.rotation``) must not pay for dp-accounting and SciPy, which cost
seconds per message in a deployment, where every message starts a new process.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Accountant": "sgs_flower.dp.accounting",
    "EpsilonPair": "sgs_flower.dp.accounting",
    "PldAccountant": "sgs_flower.dp.accounting",
    "PrivacyAccountant": "sgs_flower.dp.accounting",
    "RdpAccountant": "sgs_flower.dp.accounting",
    "RoundEvents": "sgs_flower.dp.accounting",
    "UnsupportedEventError": "sgs_flower.dp.accounting",
    "make_accountant": "sgs_flower.dp.accounting",
    "round_events": "sgs_flower.dp.accounting",
    "BudgetExhaustedError": "sgs_flower.dp.budget",
    "PrivacyBudget": "sgs_flower.dp.budget",
    "DPConfig": "sgs_flower.dp.config",
    "DPConfigError": "sgs_flower.dp.config",
    "Composed": "sgs_flower.dp.events",
    "GaussianEvent": "sgs_flower.dp.events",
    "NonPrivateEvent": "sgs_flower.dp.events",
    "PoissonSampled": "sgs_flower.dp.events",
    "SampledWithoutReplacement": "sgs_flower.dp.events",
    "SkellamEvent": "sgs_flower.dp.events",
    "event_from_dict": "sgs_flower.dp.events",
    "event_to_dict": "sgs_flower.dp.events",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sgs_flower.dp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_WHERE)
