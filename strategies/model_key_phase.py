"""Server side of the model-key phase (model-confidential mode): relay only.

The server asks sites for their signed key-exchange announcements (``status``), asks
one site that holds the model key (or, when none does, any site) to wrap it for those
that lack it (``wrap``), and delivers each envelope (``install``). It never sees the
key: see :mod:`sgs_flower.confidential.model_key` for what each site checks. Three
exchanges when some site lacks the key, one otherwise; run once before the first
confidential round and again only for SuperNodes not seen before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from sgs_flower.confidential.model_key import Announcement
from sgs_flower.secagg.errors import ConfigurationError, MalformedMessageError
from strategies import exchange

KEY_RECORD = "sgs.model-key"  # the same name as the client mod's (clients.confidential_site)
_FIELDS = ("node", "identity", "kx-pk", "roster", "key-id", "sig")


@dataclass
class KeyPhaseResult:
    key_id: str
    holders: set[int]
    errors: dict[int, str] = field(default_factory=dict)
    exchanges: int = 0


def _messages(nodes: Iterable[int], fields: dict[int, dict[str, object]], group: str) -> list[Message]:
    return [Message(RecordDict({KEY_RECORD: ConfigRecord(fields[n])}), dst_node_id=n,  # type: ignore[arg-type]
                    message_type=MessageType.TRAIN, group_id=group) for n in nodes]


def _exchange(grid: Grid, messages: list[Message], timeout: float, max_poll: float,
              result: KeyPhaseResult) -> dict[int, ConfigRecord]:
    replies, _ = exchange.send_and_receive(grid, messages, timeout, max_poll)
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
    result.exchanges += 1
    out: dict[int, ConfigRecord] = {}
    for r in replies:
        node = dst.get(r.metadata.reply_to_message_id)
        if node is None:
            continue
        if r.has_error():
            result.errors[node] = str(r.error.reason)
            log(WARNING, "model key: node %s refused: %s", node, r.error.reason)
            continue
        rec = r.content.config_records.get(KEY_RECORD)
        if rec is None or r.metadata.src_node_id != node:
            result.errors[node] = "reply without the model-key record"
            continue
        out[node] = rec
    return out


def ensure_model_key(grid: Grid, nodes: Iterable[int], run_id: int, timeout: float, max_poll: float,
                     want: str = "") -> KeyPhaseResult:
    """Make every node in ``nodes`` hold the sites' model key (``want``: the key id the
    run already uses, if any); returns the key id and the nodes known to hold it."""
    nodes = sorted(set(nodes))
    result = KeyPhaseResult(key_id=want, holders=set())
    status = _exchange(grid, _messages(nodes, {n: {"op": "status"} for n in nodes}, "model-key"), timeout,
                       max_poll, result)
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
    wrapped = _exchange(grid, _messages([leader], {leader: wrap_fields}, "model-key"), timeout, max_poll, result)
    if leader not in wrapped:
        raise ConfigurationError(f"the model-key leader (node {leader}) did not wrap the key: "
                                 f"{result.errors.get(leader, 'no reply')}")
    rec = wrapped[leader]
    kid = str(rec["key-id"])
    if want and kid != want:
        raise ConfigurationError(f"the leader holds model key {kid}, the run uses {want}")
    result.key_id = kid
    result.holders.add(leader)
    envelopes, signatures = list(rec["envelopes"]), list(rec["signatures"])  # type: ignore[arg-type]
    refused = list(rec["refused"])  # type: ignore[arg-type]
    if recipients and not len(envelopes) == len(signatures) == len(refused) == len(recipients):
        raise ConfigurationError("the model-key leader returned the wrong number of envelopes")
    for n, why in zip(recipients, refused, strict=True):
        if why:
            result.errors[n] = f"leader node {leader} refused: {why}"
            log(WARNING, "model key: leader node %s refused node %s: %s", leader, n, why)
    if recipients:
        fields = {n: {"op": "install", "key-id": kid, "leader": rec["leader"], "envelope": e, "signature": s}
                  for n, e, s, why in zip(recipients, envelopes, signatures, refused, strict=True) if not why}
        installed = _exchange(grid, _messages(sorted(fields), fields, "model-key"), timeout, max_poll, result)
        result.holders.update(n for n, r in installed.items() if r.get("key-id") == kid)
    log(INFO, "model key %s: held by %d of %d nodes asked (%d exchanges)", kid, len(result.holders), len(nodes),
        result.exchanges)
    return result
