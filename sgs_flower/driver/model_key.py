"""Server side of the model-key phase (model-confidential mode): relay only.

The server asks sites for their signed key-exchange announcements (``status``), asks
one site that holds the model key (or, when none does, any site) to wrap it for those
that lack it (``wrap``), and delivers each envelope (``install``). It never sees the
key: see :mod:`sgs_flower.confidential.model_key` for what each site checks. Three
exchanges when some site lacks the key, one otherwise; run once before the first
confidential round and again only for SuperNodes not seen before. It runs over the
driver's :class:`~sgs_flower.driver.transport.Transport`, Flower's ``Grid`` or not.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from sgs_flower.confidential.model_key import Announcement
from sgs_flower.driver.transport import TRAIN, Outgoing, Transport
from sgs_flower.secagg.errors import ConfigurationError, MalformedMessageError

KEY_RECORD = "sgs.model-key"  # the same name as the client mod's (clients.confidential_site)
_FIELDS = ("node", "identity", "kx-pk", "roster", "key-id", "sig")
LOGGER = logging.getLogger("sgs_flower.driver")


@dataclass
class KeyPhaseResult:
    key_id: str
    holders: set[int]
    errors: dict[int, str] = field(default_factory=dict)
    exchanges: int = 0


def _messages(nodes: Iterable[int], fields: Mapping[int, Mapping[str, object]], group: str) -> list[Outgoing]:
    return [Outgoing(n, {KEY_RECORD: fields[n]}, group, TRAIN) for n in nodes]


def _exchange(transport: Transport, messages: list[Outgoing], timeout: float, result: KeyPhaseResult,
              logger: logging.Logger) -> dict[int, Mapping[str, Any]]:
    replies = transport.exchange(messages, timeout)
    result.exchanges += 1
    out: dict[int, Mapping[str, Any]] = {}
    for r in replies:
        node = r.node
        if r.error is not None:
            result.errors[node] = str(r.error.reason)
            logger.log(WARNING, "model key: node %s refused: %s", node, r.error.reason)
            continue
        rec = r.records.get(KEY_RECORD)
        if rec is None or r.src != node:
            result.errors[node] = "reply without the model-key record"
            continue
        out[node] = rec
    return out


def ensure_model_key(transport: Transport, nodes: Iterable[int], run_id: int, timeout: float, want: str = "",
                     logger: logging.Logger = LOGGER) -> KeyPhaseResult:
    """Make every node in ``nodes`` hold the sites' model key (``want``: the key id the
    run already uses, if any); returns the key id and the nodes known to hold it."""
    nodes = sorted(set(nodes))
    result = KeyPhaseResult(key_id=want, holders=set())
    status = _exchange(transport, _messages(nodes, {n: {"op": "status"} for n in nodes}, "model-key"), timeout,
                       result, logger)
    ann: dict[int, Announcement] = {}
    for node, rec in status.items():
        try:
            a = Announcement.from_record(dict(rec))
        except MalformedMessageError as exc:
            result.errors[node] = str(exc)
            continue
        if a.node != node or not a.verify(run_id):
            result.errors[node] = "announcement not signed for this node and run"
            continue
        ann[node] = a
    held = Counter(a.key_id for a in ann.values() if a.key_id)
    if not want and len(held) > 1:
        raise ConfigurationError(
            f"the sites hold different model keys {dict(held)}: they pin different rosters or were given keys in "
            "separate federations; one run needs one roster")
    kid = want or (held.most_common(1)[0][0] if held else "")
    result.holders = {n for n, a in ann.items() if kid and a.key_id == kid}
    lacking = sorted(n for n in ann if n not in result.holders)
    if not lacking:
        result.key_id = kid
        return result
    leader = min(result.holders) if result.holders else lacking[0]
    recipients = [n for n in lacking if n != leader]
    wrap_fields: dict[str, object] = {"op": "wrap"}
    for f in _FIELDS:
        wrap_fields[f"recipients.{f}"] = [ann[n].to_record()[f] for n in recipients]
    if not recipients:  # the only site: it makes the key for itself
        wrap_fields = {"op": "wrap", **{f"recipients.{f}": [ann[leader].to_record()[f]] for f in _FIELDS}}
    wrapped = _exchange(transport, _messages([leader], {leader: wrap_fields}, "model-key"), timeout, result, logger)
    if leader not in wrapped:
        raise ConfigurationError(f"the model-key leader (node {leader}) did not wrap the key: "
                                 f"{result.errors.get(leader, 'no reply')}")
    rec = wrapped[leader]
    kid = str(rec["key-id"])
    if want and kid != want:
        raise ConfigurationError(f"the leader holds model key {kid}, the run uses {want}")
    result.key_id = kid
    result.holders.add(leader)
    envelopes, signatures = list(rec["envelopes"]), list(rec["signatures"])
    refused = list(rec["refused"])
    if recipients and not len(envelopes) == len(signatures) == len(refused) == len(recipients):
        raise ConfigurationError("the model-key leader returned the wrong number of envelopes")
    for n, why in zip(recipients, refused, strict=True):
        if why:
            result.errors[n] = f"leader node {leader} refused: {why}"
            logger.log(WARNING, "model key: leader node %s refused node %s: %s", leader, n, why)
    if recipients:
        fields = {n: {"op": "install", "key-id": kid, "leader": rec["leader"], "envelope": e, "signature": s}
                  for n, e, s, why in zip(recipients, envelopes, signatures, refused, strict=True) if not why}
        installed = _exchange(transport, _messages(sorted(fields), fields, "model-key"), timeout, result, logger)
        result.holders.update(n for n, r in installed.items() if r.get("key-id") == kid)
    logger.log(INFO, "model key %s: held by %d of %d nodes asked (%d exchanges)", kid, len(result.holders),
               len(nodes), result.exchanges)
    return result
