"""Where a site keeps its run-scoped memory between messages, without Flower.

Why an interface of its own: a deployed site answers each message of a round in a new
process, so whatever it must remember from one message to the next (its protocol
instance, a run-scoped identity, the update kept for a retry, ...) travels in a store
its framework keeps for it. Under Flower that is ``Context.state`` (the client adapter
maps each name onto one ``ConfigRecord``: ``clients.records.ContextStore``); in
process it is :class:`MemoryStore`. The site's own file (its state file, its model key,
its kept delta) does not go here: it outlasts the run.

A record is a flat mapping of a name to a value a ``ConfigRecord`` can hold (bool, int,
float, str, bytes, or a list of one of these).
"""

from __future__ import annotations

from typing import Any, Protocol

Fields = dict[str, Any]

STATE_KEY = "sgs.secagg.client"  # the train rounds' protocol instance (a few hundred bytes)
EVAL_STATE_KEY = "sgs.secagg.eval-client"  # the evaluation rounds' own protocol instance
PENDING_KEY = "sgs.secagg.pending-model"  # sketch of the model trained on, until the survivor set is signed
NAMES_KEY = "sgs.secagg.metric-names"  # the metric names of the last usable train reply
EVAL_NAMES_KEY = "sgs.secagg.eval-metric-names"  # the metric names of the last usable evaluate reply
KEPT_KEY = "sgs.secagg.kept"  # the round's update (metrics, weight, spec), kept for a retry of its masked input
IDENTITY_KEY = "sgs.secagg.identity"  # a run-scoped identity, when the site configured none
FEDERATION_KEY = "sgs.secagg.federation"  # identity keys learnt at the run's first round (no roster)
BLS_VERIFIED_KEY = "sgs.secagg.bls-verified"  # digests of the peers' BLS keys this site checked (bls.py)
SITE_KEY = "sgs.secagg.site"  # SiteState, when the site configured no state file
KEY_STATE = "sgs.model-key.state"  # the model-key state of a site whose state is run-scoped


class Store(Protocol):
    """A run-scoped mapping of record names to records (see the module docstring)."""

    def get(self, name: str) -> Fields | None:
        """The record named ``name`` (a copy: change it, then :meth:`put` it), or None."""
        ...

    def put(self, name: str, fields: Fields) -> None:
        """Replace the record named ``name``."""
        ...


class MemoryStore:
    """A :class:`Store` in a dict: for a site driven in process, and for tests."""

    def __init__(self) -> None:
        self.records: dict[str, Fields] = {}

    def get(self, name: str) -> Fields | None:
        rec = self.records.get(name)
        return None if rec is None else dict(rec)

    def put(self, name: str, fields: Fields) -> None:
        self.records[name] = dict(fields)
