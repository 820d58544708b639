"""Canonical JSON and the hash chain rule, shared by the writer and the verifier.

Each record is one JSON object on one line. ``hash`` = SHA-256 over the canonical
JSON (sorted keys, no spaces, ASCII, no NaN/inf) of the record *without* its
``hash`` field; ``prev_hash`` is the previous record's ``hash`` (64 zeros for the
first). Records are numbered by ``seq`` starting at 1, equal to the line number,
so "record N" in an error is line N of the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

GENESIS_HASH = "0" * 64
LEDGER_SCHEMA = 1


def jsonable(value: Any) -> Any:
    """Make ``value`` strict-JSON-able: non-finite floats become "inf"/"-inf"/"nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def as_float(value: Any) -> float:
    """Inverse of :func:`jsonable` for one number (reads "inf" back as infinity)."""
    if isinstance(value, str):
        return float(value)
    return float(value)


def canonical(obj: dict[str, Any]) -> bytes:
    """The exact bytes that are hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 hex of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(body: dict[str, Any], seq: int, prev_hash: str) -> dict[str, Any]:
    """A complete record: body plus schema, seq, prev_hash and its own hash."""
    record = dict(jsonable(body))
    record.update({"schema": LEDGER_SCHEMA, "seq": seq, "prev_hash": prev_hash})
    record["hash"] = record_hash(record)
    return record
