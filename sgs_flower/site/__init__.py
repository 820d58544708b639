"""The site without Flower: what a federated-learning client must do to take part in a
secure round, whatever framework carries its messages.

It holds the site's policy and its refusals, its identity, its state file (survivor
sets signed, model memory, DP spend), the update kept for a retry, the model key of the
model-confidential mode, the evaluation round and the protocol instances
(:class:`~sgs_flower.secagg.client.SecAggClient`) between messages. A framework adapter
hands it requests in plain types (:mod:`sgs_flower.site.request`), a run-scoped
:class:`~sgs_flower.site.store.Store` and the user's train and evaluate steps, and maps
its answers and :class:`Refused` back to its own messages (``clients.secagg_mod`` for
Flower). Nothing here imports ``flwr``.
"""

from sgs_flower.site.exchange import answer_at_quantum, on_evaluate, on_train
from sgs_flower.site.request import (
    PASS,
    Answer,
    Encoder,
    EvaluateStep,
    KeyAnswer,
    ModelRecord,
    Request,
    TrainReply,
    TrainStep,
    Unusable,
)
from sgs_flower.site.state import Refused, Site
from sgs_flower.site.store import MemoryStore, Store

__all__ = [
    "PASS",
    "Answer",
    "Encoder",
    "EvaluateStep",
    "KeyAnswer",
    "MemoryStore",
    "ModelRecord",
    "Refused",
    "Request",
    "Site",
    "Store",
    "TrainReply",
    "TrainStep",
    "Unusable",
    "answer_at_quantum",
    "on_evaluate",
    "on_train",
]
