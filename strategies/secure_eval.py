"""Secure federated evaluation for :class:`~strategies.secagg_strategy.SecAggStrategy`:
the round is the driver's (:mod:`sgs_flower.driver.evaluation`, which says what it
releases and how it fails); this runs one over a ``Grid``, outside ``start`` (tests and
tools that evaluate a model on its own)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from sgs_flower.driver.evaluation import EVAL_EXCHANGES
from strategies.grid_transport import GridTransport

if TYPE_CHECKING:  # only for annotations: the strategy is passed in, so no import cycle
    from strategies.secagg_strategy import SecAggStrategy

__all__ = ["EVAL_EXCHANGES", "secure_evaluate"]


def secure_evaluate(
    strategy: SecAggStrategy, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
) -> MetricRecord | None:
    """Round ``server_round``'s federated evaluation as a secure round; returns what the
    wrapped strategy's ``aggregate_evaluate`` returns (None when nothing was released).
    Its :class:`RoundReport` is appended to ``strategy.eval_reports``."""
    transport = GridTransport(grid, strategy.config.max_poll_interval)
    out: MetricRecord | None = strategy.driver.evaluate_round(transport, server_round, arrays, config)
    return out
