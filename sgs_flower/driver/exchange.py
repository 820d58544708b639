"""One server -> sites -> server exchange of a secure round, over a :class:`Transport`.

An exchange carries one stage of a round and, once pipelined, the next round's part
(its keys or shares) on the same messages: a node in both cohorts gets one message of
two parts, a node only in the next round's cohort a message of that part alone. The
replies are sorted here into each round's valid replies, its client errors (recorded
and logged, one WARNING per node) and its rejected replies (forged sender, malformed
payload), which the protocol server never sees.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from sgs_flower.driver.pipelining import Ahead
from sgs_flower.driver.report import RoundReport
from sgs_flower.driver.transport import TRAIN, Outgoing, Reply, ReplyError, Transport
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import MalformedMessageError, ProtocolError
from sgs_flower.secagg.wire import Stage

#: Each survivor's train (or evaluation) metric names: (slot order, left out).
Names = dict[int, tuple[tuple[str, ...], tuple[str, ...]]]


def agreed_names(names: Names, survivors: Iterable[int]) -> tuple[list[str] | None, list[str], str]:
    """The metric slot names every survivor reported (None if they differ), the names any
    survivor left out of its slots, and, when they differ, each set of names with how
    many survivors reported it (for the report). Only names travel, never values: a
    round's metrics are released only when every survivor summed the same slots."""
    survivors = list(survivors)
    seen = Counter(names.get(u, ((), ()))[0] for u in survivors)
    left_out = sorted({n for u in survivors for n in names.get(u, ((), ()))[1]})
    if len(seen) == 1:
        return list(next(iter(seen))), left_out, ""
    return None, left_out, "; ".join(f"{n} x {list(k)}" for k, n in seen.most_common())


def parse_reply(reply: Reply) -> wire.Message:
    """Decode a client's protocol reply (payload bytes, plus the vector at stage 3)."""
    rec = reply.records.get(wire.RECORD_KEY)
    payload = rec.get(wire.FIELD_PAYLOAD) if rec is not None else None
    if not isinstance(payload, bytes):
        raise MalformedMessageError(f"reply lacks the {wire.RECORD_KEY}.{wire.FIELD_PAYLOAD} bytes")
    if reply.vector_error:
        raise MalformedMessageError(reply.vector_error)
    return wire.decode(payload, reply.vector)  # unpacked at the width its header declares


def parse_next_reply(reply: Reply) -> bytes | str | None:
    """The answer to a message's pipelined part: its payload bytes (decoded and checked
    by the protocol server), the site's refusal text, or None when it sent neither."""
    rec = reply.records.get(wire.RECORD_KEY)
    if rec is None:
        return None
    error = rec.get(wire.FIELD_NEXT_ERROR)
    payload = rec.get(wire.FIELD_NEXT_PAYLOAD)
    if error is not None:
        if not isinstance(error, str) or payload is not None:
            raise MalformedMessageError(f"reply field {wire.FIELD_NEXT_ERROR!r} must be a short text, alone")
        return error[: wire.MAX_ERROR_TEXT]
    if payload is None:
        return None
    if not isinstance(payload, bytes):
        raise MalformedMessageError(f"reply lacks the {wire.RECORD_KEY}.{wire.FIELD_NEXT_PAYLOAD} bytes")
    return payload


def metric_names_of(reply: Reply) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The train metric names a masked-input reply declares (slot order) and left out."""
    rec = reply.records.get(wire.RECORD_KEY)
    out: list[tuple[str, ...]] = []
    for key in (wire.FIELD_METRIC_NAMES, wire.FIELD_METRICS_LEFT_OUT):
        value = rec.get(key, []) if rec is not None else []
        if not isinstance(value, list) or len(value) > 1024 or not all(
            isinstance(v, str) and 0 < len(v) <= 256 for v in value
        ):
            raise MalformedMessageError(f"reply field {key!r} must be a list of short metric names")
        out.append(tuple(str(v) for v in value))
    return out[0], out[1]


def _payload(msg: wire.Message, second: bool) -> dict[str, bytes]:
    """A part's record fields: the recipient's own bytes and, for a message with shared
    fields, the stage's shared part (one bytes object for every recipient:
    :func:`wire.encode_parts`)."""
    own, shared = wire.encode_parts(msg)
    keys = (wire.FIELD_NEXT_PAYLOAD, wire.FIELD_NEXT_SHARED) if second else (wire.FIELD_PAYLOAD, wire.FIELD_SHARED)
    return {keys[0]: own} if shared is None else {keys[0]: own, keys[1]: shared}


def stage_messages(
    server_round: int, stage: Stage, outgoing: Mapping[int, wire.Message], extra: Mapping[str, Any] | None,
    extra_fields: Mapping[str, str] | None, ahead: Ahead | None, parts: Mapping[int, wire.Message], kind: str,
) -> list[tuple[Outgoing, Stage | None]]:
    """The messages of one exchange (see :meth:`StageExchange.__call__`), each with the
    stage of the next round's part it carries (None: none)."""
    out: list[tuple[Outgoing, Stage | None]] = []
    for node in sorted(set(outgoing) | set(parts)):
        if node in outgoing:
            rec: dict[str, Any] = {wire.FIELD_STAGE: int(stage), **_payload(outgoing[node], False),
                                   **(extra_fields or {})}
            nm = parts.get(node)
            if nm is not None:
                rec[wire.FIELD_NEXT_STAGE] = int(nm.stage)
                rec.update(_payload(nm, True))
            out.append((Outgoing(node, {wire.RECORD_KEY: rec, **(extra or {})}, str(server_round), kind),
                        nm.stage if nm is not None else None))
        else:  # a setup-only message for the next round
            assert ahead is not None
            nm = parts[node]
            rec = {wire.FIELD_STAGE: int(nm.stage), **_payload(nm, False)}
            out.append((Outgoing(node, {wire.RECORD_KEY: rec}, str(ahead.server_round), TRAIN), None))
    return out


class StageExchange:
    """The exchanges of a run over one transport, each waiting up to ``timeout`` seconds."""

    def __init__(self, transport: Transport, timeout: float, logger: logging.Logger) -> None:
        self.transport, self.timeout, self.logger = transport, timeout, logger

    def __call__(
        self, server_round: int, stage: Stage, outgoing: Mapping[int, wire.Message], report: RoundReport,
        extra: Mapping[str, Any] | None = None, extra_fields: Mapping[str, str] | None = None,
        names: Names | None = None, *, ahead: Ahead | None = None, ahead_parts: Mapping[int, wire.Message] | None = None,
        kind: str = TRAIN, error_replies: dict[int, ReplyError] | None = None,
    ) -> tuple[dict[int, wire.Message | bytes], dict[int, wire.Message | bytes]]:
        """One exchange of this round, which may also carry the next round's parts
        (``ahead``). Returns the valid replies to each round (the second empty without
        ``ahead``). ``kind`` is ``EVALUATE`` for a secure evaluation round (never with
        ``ahead``). With ``error_replies``, this round's error replies are collected there
        (node -> the error) for the caller to sort, instead of recorded and logged."""
        parts = dict(ahead_parts or {}) if ahead is not None else {}
        messages = stage_messages(server_round, stage, outgoing, extra, extra_fields, ahead, parts, kind)
        next_stage = {m.node: s for m, s in messages}
        t0 = time.monotonic()
        replies = self.transport.exchange([m for m, _ in messages], self.timeout)
        report.stage_seconds[stage.name] = report.stage_seconds.get(stage.name, 0.0) + time.monotonic() - t0
        report.exchanges += 1
        out: dict[int, wire.Message | bytes] = {}
        out_next: dict[int, wire.Message | bytes] = {}
        for reply in replies:
            node = reply.node
            if node not in next_stage:
                continue
            mine = node in outgoing
            target = report if mine else ahead.report  # type: ignore[union-attr]
            if reply.error is not None:
                if error_replies is not None and mine:
                    error_replies[node] = reply.error
                else:
                    self.client_error(target, node, stage if mine else parts[node].stage, reply.error.reason)
                continue
            if reply.src != node:
                target.rejected[node] = f"reply for node {node} came from node {reply.src}"
                continue
            if self._take(reply, stage if mine else parts[node].stage, (out if mine else out_next), target,
                          names if mine else None):
                self._take_next(reply, next_stage[node], ahead, out_next)
        return out, out_next

    def _take(self, reply: Reply, own_stage: Stage, into: dict[int, wire.Message | bytes], target: RoundReport,
              names: Names | None) -> bool:
        """Decode a reply into ``into`` (with its metric names); False: it was rejected."""
        try:
            into[reply.node] = parse_reply(reply)
            if names is not None:
                names[reply.node] = metric_names_of(reply)
        except ProtocolError as exc:
            target.rejected[reply.node] = f"{type(exc).__name__}: {exc}"
            self.logger.log(WARNING, "node %s sent an invalid %s reply: %s", reply.node, own_stage.name, exc)
            return False
        return True

    def _take_next(self, reply: Reply, next_stage: Stage | None, ahead: Ahead | None,
                   out_next: dict[int, wire.Message | bytes]) -> None:
        """The reply's answer to the next round's part it was sent, if any."""
        if next_stage is None or ahead is None:
            return
        node = reply.node
        try:
            part = parse_next_reply(reply)
        except ProtocolError as exc:
            ahead.report.rejected[node] = f"{type(exc).__name__}: {exc}"
            return
        if isinstance(part, str):
            ahead.report.client_errors[node] = f"stage {next_stage.name}: {part}"
            self.logger.log(WARNING, "node %s refused round %s's %s part: %s", node, ahead.server_round,
                            next_stage.name, part)
        elif part is not None:
            out_next[node] = part

    def client_error(self, report: RoundReport, node: int, stage: Stage, reason: str | None) -> None:
        """A client's error reply: recorded in its round's report and logged, one WARNING per node."""
        report.client_errors[node] = f"stage {stage.name}: {reason}"
        self.logger.log(WARNING, "node %s failed at stage %s of round %s: %s", node, stage.name,
                        report.server_round, reason)
