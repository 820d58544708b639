"""The privacy ledger: append-only, hash-chained JSON lines, fsynced before release.

The server writes one record per round *before* it releases the aggregate, so a
crash can lose an aggregate but never spend budget silently. A restarted server
opens the same file, which is verified first (a corrupt ledger is refused, naming
the record), and ``sgs_flower.dp.ledger_accounting.resume_accountant`` replays the
recorded DP events: spent budget never goes back to zero.

The ledger stores plain data (JSON-ready dicts and floats) and knows nothing of
accountants: ``sgs_flower.dp`` depends on it, never the other way round. The one place
where records and accountants meet is :mod:`sgs_flower.dp.ledger_accounting`.

Only one process may append: appends take an exclusive ``flock`` and refuse if the
file grew behind this process's back (:class:`LedgerConflictError`).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sgs_flower.ledger.chain import GENESIS_HASH, as_float, canonical, seal
from sgs_flower.ledger.verify import VerifyResult, check_chain


class LedgerError(RuntimeError):
    """Base class of ledger errors."""


class LedgerCorruptError(LedgerError):
    """The ledger failed verification; ``record`` is the first bad record (1-based)."""

    def __init__(self, path: Path, result: VerifyResult) -> None:
        super().__init__(f"ledger {path} is corrupt at record {result.bad_record}: {result.reason}")
        self.record = result.bad_record
        self.reason = result.reason


class LedgerConflictError(LedgerError):
    """Another process appended to the ledger since this one opened it."""


class Spent(NamedTuple):
    """Cumulative epsilons a record states: against consumers and against the server."""

    consumer: float
    server: float


@dataclass(frozen=True)
class RoundEntry:
    """What the server knows about one round when it is about to release (or abort) it.

    ``noise`` describes the noise actually present (e.g. for Skellam: survivors'
    total mu and variance), never the target. ``events`` is the round's DP events in
    their dict form (``RoundEvents.to_dict()``), stored as given.
    """

    round: int
    config_hash: str
    protocol_version: str
    crypto_suite: str
    mode: str
    cohort: int
    survivors: int
    dropouts: int
    clip_norm: float | None
    noise: Mapping[str, Any]
    delta: float
    events: Mapping[str, Any] | None = None
    aborted: bool = False
    abort_reason: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Ledger:
    """An open ledger file. Use :meth:`open`; it verifies the chain first."""

    def __init__(self, path: Path, records: list[dict[str, Any]], size: int) -> None:
        self.path = path
        self._records = records
        self._size = size

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """Open (creating if missing) and verify; raises :class:`LedgerCorruptError`."""
        p = Path(path)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.fsync(fd)
            os.close(fd)
            _fsync_dir(p.parent)
        data = p.read_bytes()
        text = data.decode("utf-8", errors="replace")
        if text and not text.endswith("\n"):
            n = text.count("\n") + 1
            raise LedgerCorruptError(p, VerifyResult(False, n - 1, "", n, "last line is incomplete"))
        records, result = check_chain(text.splitlines())
        if not result.ok:
            raise LedgerCorruptError(p, result)
        return cls(p, records, len(data))

    # ------------------------------------------------------------------ reading

    @property
    def records(self) -> list[dict[str, Any]]:
        """All records (copies), oldest first."""
        return [dict(r) for r in self._records]

    @property
    def head_hash(self) -> str:
        """Hash of the last record (keep it elsewhere to detect truncation)."""
        return self._records[-1]["hash"] if self._records else GENESIS_HASH

    def round_records(self) -> list[dict[str, Any]]:
        """Records of released rounds (not aborts, not evaluations)."""
        return [dict(r) for r in self._records if r["kind"] == "round"]

    @property
    def last_round(self) -> int:
        """Highest round number recorded (released or aborted), 0 if none."""
        rounds = [int(r["round"]) for r in self._records if "round" in r]
        return max(rounds, default=0)

    def spent(self) -> Spent:
        """The epsilons stated by the last released round (0, 0 if none)."""
        rounds = [r for r in self._records if r["kind"] == "round"]
        if not rounds:
            return Spent(0.0, 0.0)
        return Spent(
            as_float(rounds[-1]["epsilon_consumer"]), as_float(rounds[-1]["epsilon_server"])
        )

    # ------------------------------------------------------------------ writing

    def append_round(
        self, entry: RoundEntry, *, spent: Spent, accounting: Mapping[str, str]
    ) -> dict[str, Any]:
        """Record a released round (call BEFORE releasing the aggregate).

        ``spent`` is the cumulative epsilons after this round and ``accounting`` how
        they were computed (``kind``, ``sampling``); use
        ``sgs_flower.dp.ledger_accounting.record_round`` to take both from the
        accountant that composed ``entry.events``, so record and accountant agree.
        """
        if entry.aborted or entry.events is None:
            raise ValueError("append_round needs the round's events and aborted=False")
        body = self._entry_body(entry)
        body.update(
            {
                "kind": "round",
                "events": dict(entry.events),
                "accounting": dict(accounting),
                "epsilon_consumer": float(spent.consumer),
                "epsilon_server": float(spent.server),
            }
        )
        return self._append(body)

    def append_abort(self, entry: RoundEntry, spent: Spent | None = None) -> dict[str, Any]:
        """Record an aborted round: nothing released, nothing spent (default: as before)."""
        body = self._entry_body(entry)
        spent = spent if spent is not None else self.spent()
        body.update(
            {
                "kind": "abort",
                "aborted": True,
                "abort_reason": entry.abort_reason or "unspecified",
                "epsilon_consumer": spent.consumer,
                "epsilon_server": spent.server,
            }
        )
        return self._append(body)

    def append_evaluation(self, round: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Record evaluation metrics (e.g. accuracy) of the model released at ``round``."""
        return self._append({"kind": "evaluation", "round": round, "metrics": dict(metrics)})

    @staticmethod
    def _entry_body(entry: RoundEntry) -> dict[str, Any]:
        return {
            "time": time.time(),
            "round": entry.round,
            "config_hash": entry.config_hash,
            "protocol_version": entry.protocol_version,
            "crypto_suite": entry.crypto_suite,
            "mode": entry.mode,
            "cohort": entry.cohort,
            "survivors": entry.survivors,
            "dropouts": entry.dropouts,
            "clip_norm": entry.clip_norm,
            "noise": dict(entry.noise),
            "delta": entry.delta,
            "aborted": entry.aborted,
            "abort_reason": entry.abort_reason,
            "extra": dict(entry.extra),
        }

    def _append(self, body: dict[str, Any]) -> dict[str, Any]:
        record = seal(body, len(self._records) + 1, self.head_hash)
        line = canonical(record) + b"\n"
        with open(self.path, "ab") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                size = os.fstat(fh.fileno()).st_size
                if size != self._size:
                    raise LedgerConflictError(
                        f"ledger {self.path} changed since it was opened ({self._size} -> {size} "
                        "bytes): another process is writing it; reopen before appending"
                    )
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        self._size += len(line)
        self._records.append(record)
        return dict(record)


def _fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
