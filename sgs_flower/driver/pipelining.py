"""The next round, set up during the current one (docs/protocol.md, "Pipelined rounds").

Round r + 1's keys ride on round r's consistency exchange and its shares on round r's
unmask exchange, so a steady-state round makes three exchanges instead of five. Its
cohort is drawn after round r's masked inputs are summed; its protocol server has no
model bound yet (the model travels with its masked-input request). A failure of the
setup only means that round sets up in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np

from sgs_flower.dp.budget import BudgetExhaustedError
from sgs_flower.driver.report import RoundReport
from sgs_flower.secagg.errors import SecAggError
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import ShareBundle

if TYPE_CHECKING:  # only for annotations: the driver passes itself in, so no import cycle
    from sgs_flower.driver.rounds import RoundDriver
    from sgs_flower.driver.transport import Transport


@dataclass
class Ahead:
    """The next round, set up during the current one: its cohort (drawn by
    :meth:`RoundDriver.sample_cohort`, not by the wrapped strategy's ``configure_train``,
    which runs once, when that round starts), its protocol server (no model bound yet),
    and once its keys are shared, the share bundles that go out with its masked-input
    request."""

    server_round: int
    cohort: list[int]
    params: RoundParams
    server: SecAggServer
    report: RoundReport
    bundles: dict[int, ShareBundle] | None = None


def prepare_ahead(
    driver: RoundDriver, transport: Transport, server_round: int, like: list[np.ndarray], model_size: int,
) -> Ahead | None:
    """Set round ``server_round`` up during the previous one, or say why not (None).

    Its cohort comes from the learner's ``sample_cohort`` (no hook of the wrapped strategy
    is called; its model and config go out with its masked-input request, from its one
    ``configure_train`` call when it starts). Under DP its budget plan is checked here,
    and again before it trains."""
    if server_round > driver.num_rounds:
        return None
    cohort = sorted(set(driver.learner.sample_cohort(server_round, transport)))
    if len(cohort) < 2:
        return None
    driver.logger.log(INFO, "round %s: cohort of %d nodes drawn for its setup ahead", server_round, len(cohort))
    plan = None
    try:
        if driver.privacy is not None:
            plan = driver.privacy.plan(server_round, len(cohort), len(transport.node_ids()), model_size)
        spec = driver.sizing.make_spec(len(cohort), plan, like, ahead=True, model_key=driver.model_key)
        params = driver.round_params(transport, server_round, cohort, spec, model_size, plan)
    except (BudgetExhaustedError, ValueError) as exc:  # ConfigurationError is a ValueError
        driver.logger.log(INFO, "round %s is not set up ahead: %s", server_round, exc)
        return None
    return Ahead(server_round, cohort, params, SecAggServer(params, bound_digest=None, groups=driver.cohorts.groups,
                                                             min_group=driver.config.min_group),
                 RoundReport(server_round, "aborted", cohort=cohort))


def ahead_failed(driver: RoundDriver, ahead: Ahead, exc: SecAggError) -> None:
    """A stage of the round set up ahead failed (too few keys or shares): that round will
    set up in full; what its setup saw goes into its report."""
    driver.logger.log(INFO, "round %s could not be set up ahead (it will be in full): %s", ahead.server_round, exc)
    driver.fill(ahead.report, ahead.server)
