"""The privacy budget: a round that would exceed it is refused BEFORE it runs.

The check asks the accountant "what would epsilon be after this round?" on a copy,
so refusing costs nothing. For distributed DP, check with the noise of the
*minimum* survivor count (the least noise the round may end with): the actual
round then spends at most what was checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sgs_flower.dp.accounting import Accountant, EpsilonPair, PrivacyAccountant, RoundEvents
from sgs_flower.dp.events import Event

BudgetView = Literal["consumer", "server", "both"]


class BudgetExhaustedError(RuntimeError):
    """Running the next round would spend more than the budget allows."""

    def __init__(self, message: str, spent: float, would_be: float, max_epsilon: float) -> None:
        super().__init__(message)
        self.spent = spent
        self.would_be = would_be
        self.max_epsilon = max_epsilon


@dataclass(frozen=True)
class PrivacyBudget:
    """``max_epsilon`` at ``delta``; ``view`` says which epsilon the budget limits.

    The default limits the consumer view (what the released model leaks). Use
    ``"both"`` to also bound what the server learns (meaningful for distributed DP;
    in central DP the server view is infinite, so "both" refuses every round).
    """

    max_epsilon: float
    delta: float
    view: BudgetView = "consumer"

    def __post_init__(self) -> None:
        if not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise ValueError(f"PrivacyBudget.max_epsilon must be finite and > 0, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"PrivacyBudget.delta must be in (0, 1), got {self.delta}")
        if self.view not in ("consumer", "server", "both"):
            raise ValueError(f"PrivacyBudget.view must be consumer, server or both, got {self.view!r}")

    def limited(self, eps: EpsilonPair) -> float:
        """The epsilon this budget limits, from a pair."""
        if self.view == "consumer":
            return eps.consumer
        if self.view == "server":
            return eps.server
        return max(eps.consumer, eps.server)

    def would_exceed(self, accountant: Accountant, next_event: Event) -> bool:
        """Whether composing ``next_event`` would take ``accountant`` over ``max_epsilon``."""
        return accountant.epsilon_after(next_event, self.delta) > self.max_epsilon

    def check_round(self, accountant: PrivacyAccountant, events: RoundEvents) -> EpsilonPair:
        """Return the epsilons after the round, or raise :class:`BudgetExhaustedError`."""
        after = accountant.epsilons_after(events, self.delta)
        would_be = self.limited(after)
        if would_be > self.max_epsilon:
            spent = self.limited(accountant.epsilons(self.delta))
            raise BudgetExhaustedError(
                f"privacy budget exhausted: round {accountant.rounds + 1} would raise the "
                f"{self.view} epsilon from {spent:.4g} to {would_be:.4g}, above max_epsilon="
                f"{self.max_epsilon:g} (delta={self.delta:g}); the round was not run and the "
                f"current model is final",
                spent=spent,
                would_be=would_be,
                max_epsilon=self.max_epsilon,
            )
        return after
