"""A memo for pure functions of one round's large, immutable lists.

In one process (simulations, benchmarks, tests) every client of a round receives the
same tuple objects (the cohort, the survivor set, the identity table) and derives the
same public values from them (graph seed, ring, share x-coordinates, statements).
``functools.lru_cache`` would hash a 10,000-entry tuple on every call, which is itself
O(n) per call and made the round O(n^2); this memo matches tuples by identity (``is``,
O(1)) and everything else (ints, text, bytes, None) by equality. An equal tuple that is
another object (a message decoded from bytes) is simply computed again: the memo never
changes a result, only skips recomputing one. It holds strong references to the
arguments of its few entries, so an ``id`` is never reused while it is in the memo.
Containers passed to a memoised function must not be mutated afterwards (the protocol's
are tuples, frozensets, and identity tables no one writes to after they are checked).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if isinstance(a, tuple | list | dict | set | frozenset) or type(a) is not type(b):
        return False  # large containers match by identity only (comparing them is O(n))
    return bool(a == b)


def memo_by_identity(size: int = 8) -> Callable[[F], F]:
    """Remember the ``size`` latest results of a pure function of positional arguments."""

    def decorate(fn: F) -> F:
        entries: list[tuple[tuple[Any, ...], Any]] = []

        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            for key, value in entries:
                if len(key) == len(args) and all(_same(a, b) for a, b in zip(key, args, strict=True)):
                    return value
            value = fn(*args)
            entries.insert(0, (args, value))
            del entries[size:]
            return value

        wrapper.cache_clear = entries.clear  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
