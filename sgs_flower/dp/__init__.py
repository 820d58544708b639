"""Differential privacy for sgs-flower: mechanisms, events, accountants and budget.

Flower-free by design (the Flower glue lives in ``strategies/`` and ``clients/``);
Opacus is only imported by :mod:`sgs_flower.dp.sample_dp`.
"""

from sgs_flower.dp.accounting import (
    Accountant,
    EpsilonPair,
    PldAccountant,
    PrivacyAccountant,
    RdpAccountant,
    RoundEvents,
    UnsupportedEventError,
    make_accountant,
    round_events,
)
from sgs_flower.dp.budget import BudgetExhaustedError, PrivacyBudget
from sgs_flower.dp.config import DPConfig, DPConfigError
from sgs_flower.dp.events import (
    Composed,
    GaussianEvent,
    NonPrivateEvent,
    PoissonSampled,
    SampledWithoutReplacement,
    SkellamEvent,
    event_from_dict,
    event_to_dict,
)

__all__ = [
    "Accountant",
    "BudgetExhaustedError",
    "Composed",
    "DPConfig",
    "DPConfigError",
    "EpsilonPair",
    "GaussianEvent",
    "NonPrivateEvent",
    "PldAccountant",
    "PoissonSampled",
    "PrivacyAccountant",
    "PrivacyBudget",
    "RdpAccountant",
    "RoundEvents",
    "SampledWithoutReplacement",
    "SkellamEvent",
    "UnsupportedEventError",
    "event_from_dict",
    "event_to_dict",
    "make_accountant",
    "round_events",
]
