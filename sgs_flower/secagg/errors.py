"""The protocol's typed errors, kept at :mod:`sgs_flower.errors`.

They live in a leaf module outside the package so that ``secagg`` and ``validation``
(which ``secagg`` uses for input validation) both import them without an import cycle
between the two packages; this module keeps the ``sgs_flower.secagg.errors`` imports working.
"""

from __future__ import annotations

from sgs_flower.errors import (
    ConfigurationError,
    EncodingError,
    FailedProofError,
    InconsistentAggregateError,
    InconsistentRequestError,
    MalformedMessageError,
    ModelIntegrityError,
    ModelKeyError,
    OverflowRiskError,
    PolicyError,
    ProtocolError,
    ReconstructionError,
    SecAggError,
    ShareDecryptionError,
    SignatureError,
    StaleMessageError,
    ThresholdError,
    UnknownSenderError,
    UnprovenInputError,
)

__all__ = [
    "ConfigurationError",
    "EncodingError",
    "FailedProofError",
    "InconsistentAggregateError",
    "InconsistentRequestError",
    "MalformedMessageError",
    "ModelIntegrityError",
    "ModelKeyError",
    "OverflowRiskError",
    "PolicyError",
    "ProtocolError",
    "ReconstructionError",
    "SecAggError",
    "ShareDecryptionError",
    "SignatureError",
    "StaleMessageError",
    "ThresholdError",
    "UnknownSenderError",
    "UnprovenInputError",
]
