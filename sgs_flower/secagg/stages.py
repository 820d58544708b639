"""The stage sequence of one SecAgg+ round, and the next round's setup riding on it.

One round is: keys (ADVERTISE_KEYS), shares (SHARE_KEYS), masked input, consistency
check, unmask. A round set up during the previous one skips the first two: its keys
ride on that round's consistency exchange and its shares on its unmask exchange
(docs/protocol.md, "Pipelined rounds"), so a steady-state round makes three exchanges.

Why a module of its own: every round runs this one sequence, whoever carries its
messages: the round driver over Flower's ``Grid`` or any other transport
(:mod:`sgs_flower.driver`), and the in-process rounds of
:mod:`sgs_flower.secagg.simulate` (sites as objects in this process, or in worker
processes). What differs is only the exchange (how a stage's messages reach the sites
and their replies come back) and what the caller does when the next round's setup
fails (it then sets up in full). It sits with the protocol, below the driver, so the
simulation can use it without depending on the layers above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from sgs_flower.secagg.errors import SecAggError
from sgs_flower.secagg.server import RoundOutcome, SecAggServer
from sgs_flower.secagg.wire import Message, ShareBundle, Stage

Replies = dict[int, "Message | bytes"]


class NextRound(Protocol):
    """The next round being set up during this one: its protocol server (no model bound
    yet) and, once its shares are collected, the bundles its masked-input request carries."""

    server: SecAggServer
    bundles: dict[int, ShareBundle] | None


N = TypeVar("N", bound=NextRound)


class Exchange(Protocol):
    """One server -> sites -> server exchange: this round's ``outgoing`` messages of
    ``stage`` and, with ``nxt`` (the :class:`NextRound` being set up), the next round's
    ``parts`` riding on them (a node in both gets one message of two parts). Returns the
    replies to each round, by node."""

    def __call__(self, stage: Stage, outgoing: Mapping[int, Message], nxt: Any = None,
                 parts: Mapping[int, Message] | None = None) -> tuple[Replies, Replies]: ...


#: Runs one of the protocol server's calls for a stage: ``call(stage, fn, *args)``. The
#: default just calls it; a benchmark measures the server's time by stage with its own.
ServerCall = Callable[..., Any]


def _direct(stage: Stage, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def share_keys(server: SecAggServer, exchange: Exchange, call: ServerCall = _direct) -> dict[int, ShareBundle]:
    """The round's full setup (keys, then shares): the share bundles its masked-input
    request carries."""
    setup = call(Stage.ADVERTISE_KEYS, server.setup_messages)
    rosters = call(Stage.ADVERTISE_KEYS, server.collect_keys, exchange(Stage.ADVERTISE_KEYS, setup)[0])
    bundles: dict[int, ShareBundle] = call(Stage.SHARE_KEYS, server.collect_shares,
                                           exchange(Stage.SHARE_KEYS, rosters)[0])
    return bundles


def mask_and_unmask(
    server: SecAggServer, exchange: Exchange, bundles: Mapping[int, ShareBundle],
    next_round: Callable[[], N | None] | None = None, failed: Callable[[N, SecAggError], None] | None = None,
    call: ServerCall = _direct,
) -> tuple[RoundOutcome, N | None]:
    """Masked input, consistency check and unmask; the next round (from ``next_round``,
    asked once the masked inputs are summed; None: none) is set up on the last two.
    A failure of that setup (too few keys or shares) is handed to ``failed`` and only
    means that round sets up in full: the returned next round is then None. A failure
    of this round raises (a :class:`SecAggError`: nothing is released)."""
    requests = call(Stage.MASKED_INPUT, server.collect_masked, exchange(Stage.MASKED_INPUT, bundles)[0])
    nxt = next_round() if next_round is not None else None
    replies, advertised = exchange(Stage.CONSISTENCY, requests, nxt, nxt.server.setup_messages() if nxt else None)
    unmask = call(Stage.CONSISTENCY, server.collect_consistency, replies)
    next_rosters = _step(nxt, failed, lambda n: n.server.collect_keys(advertised))
    if next_rosters is None:
        nxt = None
    replies, shared = exchange(Stage.UNMASK, unmask, nxt, next_rosters)
    outcome: RoundOutcome = call(Stage.UNMASK, server.collect_unmask, replies)
    if nxt is not None:
        nxt.bundles = _step(nxt, failed, lambda n: n.server.collect_shares(shared))
        if nxt.bundles is None:
            nxt = None
    return outcome, nxt


def _step(nxt: N | None, failed: Callable[[N, SecAggError], None] | None, step: Callable[[N], Any]) -> Any:
    """One stage of the round being set up; None when there is none or it failed."""
    if nxt is None:
        return None
    try:
        return step(nxt)
    except SecAggError as exc:
        if failed is not None:
            failed(nxt, exc)
        return None
