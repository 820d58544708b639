"""What a site reads from a request and hands back, in plain types (no framework).

A framework adapter (``clients.secagg_mod`` for Flower) turns its message into a
:class:`Request` (the records by name, the models unread), and the site's answer back
into its own reply: an :class:`Answer` (one protocol exchange), a :class:`KeyAnswer`
(a model-key request) or :data:`PASS` (not the site's business: the user's own code
answers, untouched). The user's train and evaluate functions are called through
:data:`TrainStep` and :data:`EvaluateStep`, which the adapter builds around them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from sgs_flower.pipeline import EncodedUpdate, UpdateSpec
from sgs_flower.secagg import wire
from sgs_flower.secagg.wire import Stage

Fields = dict[str, Any]
Names = tuple[list[str], list[str]]  # metric names in slot order, and those left out


@dataclass(frozen=True)
class ModelRecord:
    """A model a request carries (or the site unmasked): its entry names in order, a
    reader of its arrays (each call parses them again; the adapter's reader raises
    :class:`~sgs_flower.secagg.errors.MalformedMessageError` naming an entry it cannot
    read), and the framework's own record when the model is exactly what was sent: the
    user's code is then handed that record untouched."""

    keys: tuple[str, ...]
    read: Callable[[], list[tuple[str, np.ndarray]]]
    native: object = None


def model_of(named: list[tuple[str, np.ndarray]]) -> ModelRecord:
    """A model the site made itself (an unmasked one): no framework record."""
    arrays = [(k, np.ascontiguousarray(a)) for k, a in named]
    return ModelRecord(tuple(k for k, _ in arrays), lambda: list(arrays))


@dataclass(frozen=True)
class Request:
    """One train or evaluate request: its run, its config records (plain mappings, the
    protocol record among them) and its models, by record name."""

    run_id: int
    configs: Mapping[str, Fields]
    models: Mapping[str, ModelRecord]


@dataclass(frozen=True)
class TrainReply:
    """What the user's train step returned: the names of its one model's entries, a
    reader of their arrays, and its one metric record."""

    keys: list[str]
    arrays: Callable[[], list[np.ndarray]]
    metrics: Mapping[str, Any]


class Unusable(Exception):
    """The site's update (or evaluation) cannot be used; carried inside the masked vector,
    never as an error reply (``reason`` is one of ``pipeline.FAILURE_REASONS``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# (arrays key, config key, plaintext model) -> the user's reply; raises Unusable when the
# user's code raised or replied with something that is not one model and one metric record
TrainStep = Callable[[str, str, ModelRecord], TrainReply]
# (arrays key, config key, plaintext model) -> the one metric record of the user's evaluate
EvaluateStep = Callable[[str, str, ModelRecord], Mapping[str, Any]]
# (delta, metrics, weight, spec) -> encoded words; the DP mixin swaps its own in
Encoder = Callable[[np.ndarray, dict[str, float], int, UpdateSpec], EncodedUpdate]


@dataclass(frozen=True)
class Answer:
    """The site's reply to one protocol exchange: its stage and payload, the metric names
    of a masked input (names only, never values), and the reply to the next round's
    part riding on the request (its payload, or the refusal's text)."""

    stage: Stage
    reply: wire.Message
    names: Names | None = None
    ahead: tuple[Stage, wire.Message] | str | None = None


@dataclass(frozen=True)
class KeyAnswer:
    """The site's reply to a model-key request (the fields of its one record)."""

    fields: Fields


class Pass:
    """The type of :data:`PASS`."""

    def __repr__(self) -> str:
        return "PASS"


PASS: Final = Pass()  # the request is not the site's business: the user's code answers it untouched
