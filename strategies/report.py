"""The round report and the run's stops (:mod:`sgs_flower.driver.report`, re-exported for
the strategy's users), and what only the Flower side needs: hiding the wrapped
strategy's log line about the one synthetic reply it is fed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.common.logger import FLOWER_LOGGER

from sgs_flower.driver.report import (
    RoundReport,
    SecureAggregationFailed,
    SecureEvaluationUnavailable,
    group_client_errors,
)

__all__ = [
    "RoundReport",
    "SecureAggregationFailed",
    "SecureEvaluationUnavailable",
    "group_client_errors",
    "quiet_single_reply_log",
]


@contextmanager
def quiet_single_reply_log() -> Iterator[None]:
    """Hide the wrapped strategy's 'aggregate_train: Received 1 results' line: it is fed
    one synthetic reply (the secure aggregate), and the line would mislead."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("%s: Received %s results")

    f = _Drop()
    FLOWER_LOGGER.addFilter(f)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(f)
