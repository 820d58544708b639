"""Check a ledger file's chain; further checks of the records are passed in.

Detects: an edited record (its hash no longer matches), a deleted or reordered or
inserted record (seq / prev_hash break at the first record after the change), a
truncated or garbled line. A ``check`` callable sees the records of an intact chain:
``sgs_flower.dp.ledger_accounting.verify`` passes the one that replays the DP events
and catches a record whose stated epsilons are below what replay gives (someone
rewrote the numbers and re-hashed). This module knows nothing of accountants.

Not detectable from the file alone: cutting off the *last* records, or rewriting
the whole file consistently. Compare the reported head hash with one kept elsewhere
(server logs, a second copy) to catch those.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgs_flower.ledger.chain import GENESIS_HASH, LEDGER_SCHEMA, record_hash

REQUIRED = ("seq", "prev_hash", "hash", "schema", "kind")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; ``bad_record`` is the 1-based record (= line) number."""

    ok: bool
    records: int
    head_hash: str
    bad_record: int | None = None
    reason: str | None = None

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.records} records, chain intact, head {self.head_hash}"
        return f"BAD record {self.bad_record}: {self.reason}"


def check_chain(lines: list[str]) -> tuple[list[dict[str, Any]], VerifyResult]:
    """Parse and check ``lines``; returns the good prefix and the result."""
    records: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for number, line in enumerate(lines, start=1):
        def bad(
            reason: str, number: int = number, prev: str = prev
        ) -> tuple[list[dict[str, Any]], VerifyResult]:
            return records, VerifyResult(False, len(records), prev, number, reason)

        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            return bad(f"not valid JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(rec, dict):
            return bad("not a JSON object")
        missing = [f for f in REQUIRED if f not in rec]
        if missing:
            return bad(f"missing field(s) {missing}")
        if rec["schema"] != LEDGER_SCHEMA:
            return bad(f"unknown schema {rec['schema']!r}")
        if rec["seq"] != number:
            return bad(f"seq is {rec['seq']!r}, expected {number} (a record was deleted, inserted or moved)")
        if rec["prev_hash"] != prev:
            return bad("prev_hash does not match the previous record (the chain is broken)")
        if record_hash(rec) != rec["hash"]:
            return bad("hash does not match the record's content (the record was edited)")
        records.append(rec)
        prev = rec["hash"]
    return records, VerifyResult(True, len(records), prev)


# Further check of an intact chain's records: None if fine, else a failed result whose
# ``bad_record`` names the record (``records``/``head_hash`` are filled in by the caller).
RecordCheck = Callable[[list[dict[str, Any]]], "VerifyResult | None"]


def verify_chain(path: str | Path, check: RecordCheck | None = None) -> VerifyResult:
    """Verify the ledger at ``path``: the first bad record's number and why, or OK.

    Only the hash chain unless ``check`` is given (see the module docstring); the
    full check, chain and replayed epsilons, is ``sgs_flower.dp.ledger_accounting.verify``.
    """
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    if text and not text.endswith("\n"):
        lines = text.split("\n")
        last = len(lines)
        records, result = check_chain(lines[:-1])
        if not result.ok:
            return result
        return VerifyResult(False, len(records), result.head_hash, last, "last line is incomplete (no newline)")
    records, result = check_chain(text.splitlines())
    if result.ok and check is not None:
        failure = check(records)
        if failure is not None:
            return VerifyResult(False, result.records, result.head_hash, failure.bad_record, failure.reason)
    return result
