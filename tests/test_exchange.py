"""The finely polled exchange (strategies/exchange.py): replies are seen soon after
they arrive, missing ones are left to the caller after the timeout, and the number of
pulls stays bounded. The grid here is a stand-in for Flower's that answers each pushed
message after a set delay; the real grids are exercised by every simulation and
deployment test, which all go through this function."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from strategies import SecAggConfig
from strategies.exchange import FIRST_POLL, GROWTH, poll_schedule, send_and_receive


@dataclass
class _Meta:
    reply_to_message_id: str


@dataclass
class _Reply:
    metadata: _Meta


class DelayedGrid:
    """Answers message i after ``delays[i]`` seconds (never, for ``None``)."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.pushed_at = 0.0
        self.pulls = 0
        self.ids: list[str] = []

    def push_messages(self, messages: Iterable[object]) -> list[str]:
        self.pushed_at = time.monotonic()
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, message_ids: Iterable[str]) -> list[_Reply]:
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        wanted = set(message_ids)
        return [_Reply(_Meta(mid)) for mid, d in zip(self.ids, self.delays, strict=True)
                if mid in wanted and d is not None and d <= now]


def test_schedule_grows_geometrically_then_stays_at_the_cap():
    waits = list(itertools.islice(poll_schedule(0.01, 2.0, 0.08), 6))
    assert waits == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]


def test_schedule_rejects_impossible_parameters():
    with pytest.raises(ValueError, match="first_poll <= max_poll"):
        next(poll_schedule(1.0, 1.5, 0.5))


def test_replies_are_seen_soon_after_they_arrive():
    grid = DelayedGrid([0.05, 0.3, 0.31])
    t0 = time.monotonic()
    replies, pulls = send_and_receive(grid, [object()] * 3, timeout=5.0)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # Flower's deployment grid would have slept 3 s before its second pull; the last
    # reply arrives at 0.31 s and the wait that covers it is at most GROWTH x the last one.
    assert 0.31 <= took < 0.31 * GROWTH + 0.1
    assert pulls == grid.pulls <= math.ceil(math.log(0.31 / FIRST_POLL) / math.log(GROWTH)) + 3


def test_a_missing_reply_ends_the_exchange_at_the_timeout_with_bounded_pulls():
    grid = DelayedGrid([0.01, None])
    t0 = time.monotonic()
    replies, pulls = send_and_receive(grid, [object()] * 2, timeout=1.5, max_poll=0.5)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 1.5 <= took < 1.8
    # 5 ms growing GROWTH x reaches 0.5 s in ceil(log(100)/log(GROWTH)) waits, then flat
    short = math.ceil(math.log(0.5 / FIRST_POLL) / math.log(GROWTH))
    assert pulls <= short + math.ceil(1.5 / 0.5) + 1


def test_config_rejects_a_poll_interval_out_of_range():
    with pytest.raises(ValueError, match=r"SecAggConfig.max_poll_interval: must be in 0.005..10 seconds, got 0"):
        SecAggConfig(max_poll_interval=0)


def test_flowers_in_memory_grid_is_polled_at_the_first_interval_throughout():
    """In a simulation a pull is a local call and the engine looks for messages every
    0.1 s: a reply seen late can cost a further 0.1 s, so the waits stay at 5 ms there;
    any other grid keeps the configured cap."""
    from flwr.superlink.grid import InMemoryGrid

    from strategies.exchange import IN_MEMORY_MAX_POLL, max_poll_for

    class FastInMemoryGrid(DelayedGrid, InMemoryGrid):  # Flower's class, this test's replies
        pass

    in_memory = FastInMemoryGrid([0.3])
    assert max_poll_for(in_memory, 0.5) == IN_MEMORY_MAX_POLL == FIRST_POLL
    assert max_poll_for(DelayedGrid([0.3]), 0.5) == 0.5
    t0 = time.monotonic()
    replies, pulls = send_and_receive(in_memory, [object()], timeout=5.0)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    assert len(replies) == 1
    assert 0.3 <= took < 0.3 + 0.03  # geometric polling would see it up to 0.06 s late
    assert pulls >= 0.3 / (2 * FIRST_POLL)  # many short pulls, not ~20 growing ones
