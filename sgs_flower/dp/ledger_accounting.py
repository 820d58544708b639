"""Where the privacy ledger and the accountants meet (the only such place).

The layers point one way: :mod:`sgs_flower.ledger` stores hash-chained records of
plain data and imports nothing from :mod:`sgs_flower.dp`; this module turns
accountants into records (:func:`record_round`, :func:`record_abort`) and records back
into accountants (:func:`resume_accountant`, :func:`check_accounting`). Keeping it in
one module means the record format of DP events and epsilons is read and written in
one place, so a record and the accountant that produced it cannot drift apart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sgs_flower.dp.accounting import PrivacyAccountant, RoundEvents
from sgs_flower.ledger.chain import as_float
from sgs_flower.ledger.ledger import Ledger, LedgerError, RoundEntry, Spent
from sgs_flower.ledger.verify import VerifyResult, verify_chain

# Relative (and absolute) slack when comparing stated and replayed epsilons.
EPS_TOLERANCE = 1e-6


def record_round(ledger: Ledger, entry: RoundEntry, accountant: PrivacyAccountant) -> dict[str, Any]:
    """Append a released round with the epsilons ``accountant`` states after composing it.

    ``accountant`` must already have composed the round whose events are
    ``entry.events`` (the dict form of :class:`RoundEvents`).
    """
    eps = accountant.epsilons(entry.delta)
    return ledger.append_round(
        entry,
        spent=Spent(eps.consumer, eps.server),
        accounting={"kind": accountant.kind, "sampling": accountant.sampling},
    )


def record_abort(
    ledger: Ledger, entry: RoundEntry, accountant: PrivacyAccountant | None = None
) -> dict[str, Any]:
    """Append an aborted round; the spent epsilons are the accountant's (else unchanged)."""
    if accountant is None:
        return ledger.append_abort(entry)
    eps = accountant.epsilons(entry.delta)
    return ledger.append_abort(entry, Spent(eps.consumer, eps.server))


def resume_accountant(
    ledger: Ledger, kind: str | None = None, sampling: str | None = None
) -> PrivacyAccountant:
    """A :class:`PrivacyAccountant` that has replayed every released round's events.

    ``kind``/``sampling`` default to what the ledger recorded; asking for a
    different sampling than recorded is refused (the consumer view's
    neighbouring relation depends on it).
    """
    rounds = ledger.round_records()
    recorded = rounds[-1]["accounting"] if rounds else {}
    if sampling is not None and recorded and sampling != recorded["sampling"]:
        raise LedgerError(
            f"ledger was accounted with sampling={recorded['sampling']!r}, not {sampling!r}"
        )
    acct = PrivacyAccountant(
        kind or recorded.get("kind", "rdp"),  # type: ignore[arg-type]
        sampling or recorded.get("sampling", "fixed"),  # type: ignore[arg-type]
    )
    for rec in rounds:
        acct.compose_round(RoundEvents.from_dict(rec["events"]))
    return acct


def check_accounting(records: list[dict[str, Any]]) -> VerifyResult | None:
    """Replay every round's events; the first record claiming less epsilon than replay fails."""
    acct: PrivacyAccountant | None = None
    for rec in records:
        if rec.get("kind") != "round":
            continue
        try:
            accounting = rec["accounting"]
            if acct is None:
                acct = PrivacyAccountant(accounting["kind"], accounting["sampling"])
            elif (accounting["kind"], accounting["sampling"]) != (acct.kind, acct.sampling):
                raise ValueError("accounting kind/sampling changed within the run")
            acct.compose_round(RoundEvents.from_dict(rec["events"]))
            eps = acct.epsilons(float(rec["delta"]))
            stated = (as_float(rec["epsilon_consumer"]), as_float(rec["epsilon_server"]))
        except (KeyError, TypeError, ValueError) as exc:
            return VerifyResult(False, 0, "", rec.get("seq"), f"cannot replay DP events: {exc}")
        for name, replayed, claim in (
            ("epsilon_consumer", eps.consumer, stated[0]),
            ("epsilon_server", eps.server, stated[1]),
        ):
            if math.isinf(replayed) and math.isinf(claim):
                continue
            if not claim >= replayed * (1 - EPS_TOLERANCE) - EPS_TOLERANCE:
                return VerifyResult(
                    False, 0, "", rec.get("seq"),
                    f"{name}={claim:.6g} is below {replayed:.6g} obtained by replaying the DP events",
                )
    return None


def verify(path: str | Path, replay: bool = True) -> VerifyResult:
    """``sgs-flower ledger verify``: the hash chain and (``replay``) the stated epsilons."""
    return verify_chain(path, check_accounting if replay else None)
