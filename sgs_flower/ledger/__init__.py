"""Hash-chained privacy ledger: written before every release, verified on open.

Plain records only; the accounting view of a ledger (resume an accountant, replay the
epsilons) is :mod:`sgs_flower.dp.ledger_accounting`.
"""

from sgs_flower.ledger.ledger import (
    Ledger,
    LedgerConflictError,
    LedgerCorruptError,
    LedgerError,
    RoundEntry,
    Spent,
)
from sgs_flower.ledger.verify import RecordCheck, VerifyResult, verify_chain

__all__ = [
    "Ledger",
    "LedgerConflictError",
    "LedgerCorruptError",
    "LedgerError",
    "RecordCheck",
    "RoundEntry",
    "Spent",
    "VerifyResult",
    "verify_chain",
]
