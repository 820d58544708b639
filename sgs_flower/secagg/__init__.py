"""SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020) as plain Python, with no Flower.

The protocol is a set of per-stage state machines exchanging the versioned messages of
:mod:`sgs_flower.secagg.wire`; :func:`sgs_flower.secagg.simulate.simulate_round` runs a
whole cohort in-process.
"""

from sgs_flower.secagg.errors import (
    ConfigurationError,
    EncodingError,
    InconsistentAggregateError,
    InconsistentRequestError,
    MalformedMessageError,
    OverflowRiskError,
    ProtocolError,
    ReconstructionError,
    SecAggError,
    ShareDecryptionError,
    StaleMessageError,
    ThresholdError,
    UnknownSenderError,
)

__all__ = [
    "ConfigurationError",
    "EncodingError",
    "InconsistentAggregateError",
    "InconsistentRequestError",
    "MalformedMessageError",
    "OverflowRiskError",
    "ProtocolError",
    "ReconstructionError",
    "SecAggError",
    "ShareDecryptionError",
    "StaleMessageError",
    "ThresholdError",
    "UnknownSenderError",
]
