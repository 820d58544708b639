"""Hash-chained privacy ledger: written before every release, verified on open."""

from sgs_flower.ledger.ledger import (
    Ledger,
    LedgerConflictError,
    LedgerCorruptError,
    LedgerError,
    RoundEntry,
)
from sgs_flower.ledger.verify import VerifyResult, verify

__all__ = [
    "Ledger",
    "LedgerConflictError",
    "LedgerCorruptError",
    "LedgerError",
    "RoundEntry",
    "VerifyResult",
    "verify",
]
