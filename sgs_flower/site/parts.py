"""Reading a protocol request's record: its stage and payload, the next round's part
riding on it, and the names of the records it points to. Every reader is size-limited
(:func:`wire.decode`) and raises :class:`MalformedMessageError` naming what was wrong."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sgs_flower.evaluation import is_eval_round
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import MalformedMessageError, StaleMessageError
from sgs_flower.secagg.wire import Stage
from sgs_flower.site.request import Request

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/+-]{0,63}")
_PROTOCOL_RECORDS = {wire.RECORD_KEY, wire.SPEC_KEY, wire.VECTOR_KEY}


def stage_of(rec: Mapping[str, Any]) -> Stage:
    raw = rec.get(wire.FIELD_STAGE)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw not in {int(s) for s in Stage}:
        raise MalformedMessageError("protocol record names no valid stage")
    return Stage(raw)


def protocol_part(request: Request) -> tuple[Mapping[str, Any], Stage, wire.Message]:
    """The request's protocol record, its stage and its decoded payload; the record's
    stage must be the payload's."""
    rec = request.configs[wire.RECORD_KEY]
    stage = stage_of(rec)
    payload = rec.get(wire.FIELD_PAYLOAD)
    if not isinstance(payload, bytes):
        raise MalformedMessageError("protocol payload is not bytes")
    server_msg = wire.decode(payload, shared=_shared(rec, wire.FIELD_SHARED))
    if server_msg.stage != stage:
        raise MalformedMessageError("protocol record's stage differs from its payload's")
    return rec, stage, server_msg


def _shared(rec: Mapping[str, Any], key: str) -> bytes | None:
    """A part's shared part (:func:`wire.encode_parts`), when the record carries one."""
    shared = rec.get(key)
    if shared is not None and not isinstance(shared, bytes):
        raise MalformedMessageError(f"protocol record field {key!r} is not bytes")
    return shared


def has_next_part(rec: Mapping[str, Any]) -> bool:
    return wire.FIELD_NEXT_PAYLOAD in rec or wire.FIELD_NEXT_STAGE in rec


def next_part(rec: Mapping[str, Any]) -> tuple[Stage, wire.Message]:
    """The pipelined second part of a message: the next round's setup, size-limited like
    any part, and only of a pipelined stage."""
    raw = rec.get(wire.FIELD_NEXT_STAGE)
    payload = rec.get(wire.FIELD_NEXT_PAYLOAD)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw not in {int(s) for s in wire.PIPELINED_STAGES}:
        raise MalformedMessageError("protocol record's next part names no pipelined stage")
    if not isinstance(payload, bytes):
        raise MalformedMessageError("protocol record's next part is not bytes")
    next_msg = wire.decode(payload, shared=_shared(rec, wire.FIELD_NEXT_SHARED))
    if int(next_msg.stage) != raw:
        raise MalformedMessageError("protocol record's next stage differs from its payload's")
    if is_eval_round(next_msg.round_id):
        raise StaleMessageError("the next round's part carries an evaluation round's id; refused")
    return Stage(raw), next_msg


def record_names(rec: Mapping[str, Any], request: Request) -> tuple[str, str, str]:
    """The server-chosen names of the model's record, the train config record and the
    weight metric, checked before training: each a plain name; the two records present
    in the request, distinct, and not protocol records (a name the user's train step
    does not expect would make it fail, and a failure must not depend on the site)."""
    names = []
    for field in ("arrays-key", "config-key", "weight-key"):
        value = rec.get(field)
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise MalformedMessageError(
                f"protocol record field {field!r} must be a name of 1..64 letters, digits or ' ._:/+-'"
            )
        names.append(value)
    a_key, c_key, w_key = names
    if {a_key, c_key} & _PROTOCOL_RECORDS or a_key == c_key:
        raise MalformedMessageError("arrays-key and config-key must name two different records, not protocol records")
    if a_key not in request.models:
        raise MalformedMessageError(f"arrays-key {a_key!r} names no ArrayRecord of the masked-input request")
    if c_key not in request.configs:
        raise MalformedMessageError(f"config-key {c_key!r} names no ConfigRecord of the masked-input request")
    return a_key, c_key, w_key
