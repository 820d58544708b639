"""Server-side Flower glue: strategy wrappers over ``flwr.serverapp.strategy``."""

from strategies.config import SecAggConfig
from strategies.secagg_strategy import (
    RoundReport,
    SecAggStrategy,
    SecureAggregationFailed,
    SecureEvaluationUnavailable,
    check_wrappable,
)

__all__ = [
    "RoundReport",
    "SecAggConfig",
    "SecAggStrategy",
    "SecureAggregationFailed",
    "SecureEvaluationUnavailable",
    "check_wrappable",
]
