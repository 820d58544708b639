"""The round driver's transport over Flower's ``Grid``: plain messages to Flower
``Message``/``RecordDict`` and back (:class:`sgs_flower.driver.transport.Transport`).

Each exchange pushes once and polls finely (:func:`strategies.exchange.send_and_receive`).
A record the driver hands through (the wrapped strategy's model and config records)
travels as it is; a plain mapping becomes a ``ConfigRecord``. A reply becomes its config
records as plain mappings and, when it carries a masked vector, the vector's packed bytes
(checked here for the form the protocol needs: the driver rejects the reply otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from sgs_flower.driver import exchange as driver_exchange
from sgs_flower.driver.transport import Outgoing, Reply, ReplyError
from sgs_flower.secagg import wire
from strategies.exchange import MAX_POLL, send_and_receive

#: The code of an error reply whose ClientApp raised (where a protocol layer, the mod,
#: would have answered or refused with its own code).
APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class GridTransport:
    """A :class:`~sgs_flower.driver.transport.Transport` over ``grid``: replies are polled
    at most ``max_poll`` seconds apart (:mod:`strategies.exchange`)."""

    def __init__(self, grid: Grid, max_poll: float = MAX_POLL) -> None:
        self.grid, self.max_poll = grid, max_poll

    @property
    def run_id(self) -> int:
        return int(self.grid.run.run_id)

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def exchange(self, messages: Sequence[Outgoing], timeout: float) -> list[Reply]:
        flower = [to_message(m) for m in messages]
        replies, _ = send_and_receive(self.grid, flower, timeout, self.max_poll)
        # message ids are set when the messages are pushed
        node_of = {m.metadata.message_id: o.node for m, o in zip(flower, messages, strict=True)}
        out: list[Reply] = []
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id)
            if node is not None:
                out.append(reply_of(node, reply))
        return out


def _record(value: Any) -> ArrayRecord | ConfigRecord | MetricRecord:
    if isinstance(value, ArrayRecord | ConfigRecord | MetricRecord):
        return value  # the wrapped strategy's own record, sent as it is
    return ConfigRecord(dict(value))


def to_message(out: Outgoing) -> Message:
    """The Flower message for one outgoing message of the driver."""
    content = RecordDict({name: _record(value) for name, value in out.records.items()})
    return Message(content, dst_node_id=out.node, message_type=out.kind, group_id=out.group)


def reply_of(node: int, reply: Message) -> Reply:
    """The driver's view of a Flower reply to the message sent to ``node``."""
    src = reply.metadata.src_node_id
    if reply.has_error():
        return Reply(node, src, error=ReplyError(int(reply.error.code), reply.error.reason,
                                                 app_raised=reply.error.code == APP_RAISED))
    records: Mapping[str, Mapping[str, Any]] = {k: dict(v) for k, v in reply.content.config_records.items()}
    vector, why = None, ""
    vec_rec = reply.content.array_records.get(wire.VECTOR_KEY)
    if vec_rec is not None:
        arr = vec_rec.get(wire.FIELD_VECTOR)
        if arr is None or arr.stype != wire.PACKED_STYPE or arr.dtype != "|u1" or len(arr.shape) != 1:
            why = "masked vector must be the packed bytes of its words (wire.pack_words)"
        elif len(arr.data) != arr.shape[0]:
            why = f"masked vector declares {arr.shape[0]} bytes but carries {len(arr.data)}"
        else:
            vector = arr.data  # unpacked by wire.decode at the width its header declares
    return Reply(node, src, records=records, vector=vector, vector_error=why)


def parse_reply(reply: Message) -> wire.Message:
    """Decode a client's protocol reply (payload bytes, plus the vector at stage 3)."""
    return driver_exchange.parse_reply(reply_of(reply.metadata.src_node_id, reply))


def parse_next_reply(reply: Message) -> bytes | str | None:
    """The answer to a message's pipelined part: its payload bytes, the site's refusal
    text, or None when it sent neither."""
    return driver_exchange.parse_next_reply(reply_of(reply.metadata.src_node_id, reply))
