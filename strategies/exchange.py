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

In a simulation the grid is Flower's ``InMemoryGrid``: a pull is a function call on the
in-process LinkState (tens of microseconds), not a network round trip, so there the
pulls stay at ``first_poll`` (:data:`IN_MEMORY_MAX_POLL`) whatever ``max_poll`` says.
Why it matters there: the simulation engine looks for new messages every 0.1 s, so an
exchange whose last reply is seen even 20 ms late can miss the engine's next look and
cost the round a further 0.1 s (measured: a sample-dp round at 10 SuperNodes, 0.45 ->
0.40 s).

Only ``Grid.push_messages`` and ``Grid.pull_messages`` are used, the two calls every
Flower ``Grid`` (in-memory simulation and gRPC/HTTP deployment) implements.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

#: first wait after the push, growth per wait, longest wait (seconds)
FIRST_POLL = 0.005
GROWTH = 1.2
MAX_POLL = 0.5
#: longest wait between pulls on Flower's in-memory (simulation) grid
IN_MEMORY_MAX_POLL = FIRST_POLL


def max_poll_for(grid: Grid, max_poll: float) -> float:
    """``max_poll``, or :data:`IN_MEMORY_MAX_POLL` when ``grid`` is Flower's simulation grid.

    Looked up in ``sys.modules``, not imported: importing Flower's SuperLink package costs
    a deployment's ServerApp half a second, and a grid of a class never loaded cannot
    be one.
    """
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    in_memory = getattr(module, "InMemoryGrid", None)
    if isinstance(in_memory, type) and isinstance(grid, in_memory):
        return min(max_poll, IN_MEMORY_MAX_POLL)
    return max_poll


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
    On Flower's in-memory grid the waits stay at :data:`IN_MEMORY_MAX_POLL`
    (:func:`max_poll_for`).
    """
    max_poll = max_poll_for(grid, max_poll)
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
