"""Server-side Flower glue: strategy wrappers over ``flwr.serverapp.strategy``."""

from strategies.config import SecAggConfig
from strategies.report import RoundReport, SecureAggregationFailed, SecureEvaluationUnavailable
from strategies.secagg_strategy import SecAggStrategy, check_wrappable

__all__ = [
    "RoundReport",
    "SecAggConfig",
    "SecAggStrategy",
    "SecureAggregationFailed",
    "SecureEvaluationUnavailable",
    "check_wrappable",
]
