"""Server-side Flower glue: strategy wrappers over ``flwr.serverapp.strategy``."""

from strategies.config import SecAggConfig
from strategies.secagg_strategy import RoundReport, SecAggStrategy, check_wrappable

__all__ = ["RoundReport", "SecAggConfig", "SecAggStrategy", "check_wrappable"]
