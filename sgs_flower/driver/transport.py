"""What the round driver needs from a network: send payloads to node ids, collect the
replies by a deadline, and say which nodes are connected.

Why an interface of its own: the same round (stages, pipelining, retries, evaluation,
model key) runs over Flower's ``Grid`` (``strategies``: Message and RecordDict around
these plain values) and in process (:mod:`sgs_flower.driver.inprocess`), so every round,
Flower or not, runs the same code. Nothing here names a framework type: a message is
named records of plain values (ints, strings, bytes, lists of them), plus records the
caller hands through untouched (its own model and config, opaque to the driver).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Message kinds, as the site dispatches them (Flower's ``MessageType`` strings).
TRAIN = "train"
EVALUATE = "evaluate"


@dataclass
class Outgoing:
    """One message to one node.

    ``records`` maps a record name to its content, in the order they are sent: a plain
    mapping of field values (a config record), or an object the caller made and the
    transport passes through as it is (the wrapped strategy's model and config
    records: the driver never looks inside them). ``group`` names the round the
    message belongs to (a site keys its protocol instance on it); ``kind`` is
    :data:`TRAIN` or :data:`EVALUATE`."""

    node: int
    records: Mapping[str, Any]
    group: str
    kind: str = TRAIN


@dataclass(frozen=True)
class ReplyError:
    """A site's error reply: its code and text, and whether the site's application
    raised (rather than the protocol layer refusing): a site whose evaluate function
    is not wrapped by the protocol layer raises on a protocol message."""

    code: int
    reason: str | None
    app_raised: bool = False


@dataclass
class Reply:
    """One node's reply to the message the driver sent it (``node``: the node it was sent
    to; ``src``: the node the reply says it came from, which a lying network may forge).

    ``records``: its config records by name, as plain mappings. ``vector``: the packed
    bytes of a masked vector, when it carried one; ``vector_error``: why a vector it
    carried is not in the packed form the protocol needs (the driver then rejects the
    reply, after checking its payload)."""

    node: int
    src: int
    error: ReplyError | None = None
    records: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    vector: bytes | None = None
    vector_error: str = ""


class Transport(Protocol):
    """The driver's view of the sites: Flower's ``Grid`` in ``strategies``, the sites'
    objects in :mod:`sgs_flower.driver.inprocess`."""

    @property
    def run_id(self) -> int:
        """The run the messages belong to (bound into every round's context)."""
        ...

    def node_ids(self) -> list[int]:
        """The nodes connected now (one snapshot)."""
        ...

    def exchange(self, messages: Sequence[Outgoing], timeout: float) -> list[Reply]:
        """Send ``messages`` (at most one per node) and return the replies that came
        within ``timeout`` seconds, in the order they came; a node with no reply is a
        dropout to the caller. A reply to no message sent here is left out."""
        ...
