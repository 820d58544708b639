"""Reading the arrays a server sent, as typed errors.

Why a module of its own: a Flower ``Array`` holds the bytes the server chose, and
``Array.numpy()`` parses them with NumPy's own reader, which raises whatever it raises
(``ValueError`` "format version", ``EOFError``, ...) on garbage. Every site-side reader
of a server-sent model goes through :func:`read_arrays`, so a malformed payload is a
:class:`~sgs_flower.secagg.errors.MalformedMessageError` naming the entry, answered
before the user's code runs, like every other malformed input (issue 29).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from sgs_flower.secagg.errors import MalformedMessageError


def read_arrays(record: ArrayRecord) -> list[tuple[str, np.ndarray]]:
    """The record's entries as (name, array), in order; a payload NumPy cannot read is a
    :class:`MalformedMessageError` naming the entry."""
    out = []
    for name, arr in record.items():
        try:
            out.append((name, arr.numpy()))
        except Exception as exc:  # NumPy's reader raises ValueError, EOFError, TypeError, ...
            raise MalformedMessageError(f"array {name!r} from the server is not a valid array "
                                        f"({type(exc).__name__})") from exc
    return out
