"""One server -> clients -> server exchange through Flower's ``Grid``, polled finely.

Why not ``grid.send_and_receive``: Flower 1.41's deployment grid sleeps a fixed 3 s
between pulls (``flwr/superlink/grid/http_grid.py``) and the simulation grid 0.1 s, so
every exchange is rounded up to the next multiple of that interval. A secure round has
several exchanges, so the rounding is paid several times per round. Here the server
pushes once and pulls with a geometric back-off: the first pull after ``first_poll``
seconds, each later wait ``growth`` times the last, never more than ``max_poll``. A
reply is therefore seen within ``growth - 1`` (20 %) of the exchange's elapsed time
(at most ``max_poll`` late), while the number of
pulls stays bounded: at most ``log(max_poll / first_poll) / log(growth)`` short ones,
then one per ``max_poll`` seconds until ``timeout`` (see :func:`poll_schedule`).

Only ``Grid.push_messages`` and ``Grid.pull_messages`` are used, the two calls every
Flower ``Grid`` (in-memory simulation and gRPC/HTTP deployment) implements.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

#: first wait after the push, growth per wait, longest wait (seconds)
FIRST_POLL = 0.005
GROWTH = 1.2
MAX_POLL = 0.5


def poll_schedule(first_poll: float = FIRST_POLL, growth: float = GROWTH, max_poll: float = MAX_POLL) -> Iterator[float]:
    """The waits between pulls: geometric from ``first_poll`` up to ``max_poll``, then flat."""
    if not (0 < first_poll <= max_poll and growth >= 1.0):
        raise ValueError(f"poll schedule needs 0 < first_poll <= max_poll and growth >= 1, "
                         f"got {first_poll}, {max_poll}, {growth}")
    wait = first_poll
    while True:
        yield wait
        wait = min(max_poll, wait * growth)


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     max_poll: float = MAX_POLL) -> tuple[list[Message], int]:
    """Push ``messages``, pull their replies until all arrived or ``timeout`` passed.

    Returns the replies (those that came in time; a missing one is a dropout to the
    caller) and the number of pulls made, so a caller can report what polling cost.
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    pulls = 0
    deadline = time.monotonic() + timeout
    for wait in poll_schedule(max_poll=max(max_poll, FIRST_POLL)):
        if not pending:
            break
        pulled = list(grid.pull_messages(list(pending)))
        pulls += 1
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
    return replies, pulls
