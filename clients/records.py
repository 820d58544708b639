"""Flower records to the site's plain types and back (``sgs_flower.site``).

Why a module of its own: a Flower ``Array`` holds the bytes the server chose, and
``Array.numpy()`` parses them with NumPy's own reader, which raises whatever it raises
(``ValueError`` "format version", ``EOFError``, ...) on garbage. Every site-side reader
of a server-sent model goes through :func:`read_arrays`, so a malformed payload is a
:class:`~sgs_flower.secagg.errors.MalformedMessageError` naming the entry, answered
before the user's code runs, like every other malformed input (issue 29).

The site's run-scoped memory goes to ``Context.state`` through :class:`ContextStore`:
one ``ConfigRecord`` per record name, so a site's ``Context.state`` reads as it always did.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from sgs_flower.secagg.errors import MalformedMessageError
from sgs_flower.site.request import Fields, ModelRecord, Request


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


def model_record(record: ArrayRecord) -> ModelRecord:
    """A Flower ArrayRecord as the site reads a model (unread until the site asks)."""
    return ModelRecord(tuple(record.keys()), partial(read_arrays, record), record)


def array_record(model: ModelRecord) -> ArrayRecord:
    """The ArrayRecord the user's code is handed: the one the server sent when the site
    did not change the model, else one made from the site's (unmasked) arrays."""
    if isinstance(model.native, ArrayRecord):
        return model.native
    return ArrayRecord({k: Array(a) for k, a in model.read()})


def request_of(msg: Message) -> Request:
    """A train or evaluate message as the site reads it."""
    content = msg.content
    return Request(int(msg.metadata.run_id), {k: dict(v) for k, v in content.config_records.items()},
                   {k: model_record(v) for k, v in content.array_records.items()})


class ContextStore:
    """The site's run-scoped store (:class:`sgs_flower.site.store.Store`) over Flower's
    ``Context.state``."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def get(self, name: str) -> Fields | None:
        rec = self.context.state.config_records.get(name)
        return None if rec is None else dict(rec)

    def put(self, name: str, fields: Fields) -> None:
        self.context.state[name] = ConfigRecord(fields)
