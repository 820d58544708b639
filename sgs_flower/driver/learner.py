"""What the round driver asks of the learning side: the wrapped strategy's hooks, in
plain values.

Why: the driver owns the secure round, but which nodes train, on which model and config,
and what is done with the released aggregate belong to the user's strategy (Flower's
``configure_train`` / ``aggregate_train`` and their evaluation twins, in
``strategies``). The driver calls these hooks once per round, as Flower's own loop
does; the models and records they hand over travel untouched (``records``, ``handle``)
except for the named arrays the driver hashes and decodes into.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sgs_flower.driver.transport import Transport

#: A model as the driver reads it: its entries' names and arrays, in order.
Named = list[tuple[str, np.ndarray]]


@dataclass
class Instructions:
    """What a ``configure_*`` hook chose for one round.

    - ``nodes``: the nodes its messages go to, in its order (empty: none).
    - ``model`` / ``config``: the first message's model (None: it sent none) and config
      (what the masks are bound to); a training round with no message has the round's
      model and an empty config.
    - ``others``: the model and config of each other message whose objects are not the
      first's (a strategy that sends one model to all, as FedAvg does, has none); the
      driver refuses a round whose messages differ.
    - ``records``: the model and config records the masked-input request carries, made by
      the learning side (opaque here).
    - ``fields``: the record names a site reads them from (``arrays-key``, ``config-key``,
      ``weight-key``).
    - ``handle``: what the learning side needs back to release the aggregate (opaque)."""

    nodes: list[int]
    model: Named | None
    config: Mapping[str, Any]
    records: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)
    others: list[tuple[Named | None, Mapping[str, Any]]] = field(default_factory=list)
    handle: Any = None


@dataclass
class Released:
    """The one aggregate a secure round releases, for the learning side: the new model's
    entries (training; in the order of ``instructions.model``), the cohort's total
    weight and the weighted means of its numeric metrics."""

    instructions: Instructions
    total_weight: int
    metrics: Mapping[str, float]
    model: list[np.ndarray] | None = None


@dataclass(frozen=True)
class Sampling:
    """The wrapped strategy's sampling parameters, read when a cohort is drawn."""

    fraction_train: float
    min_train_nodes: int
    min_available_nodes: int
    fraction_evaluate: float
    min_evaluate_nodes: int


class Learner(Protocol):
    """The learning side of a run (the wrapped strategy, adapted)."""

    @property
    def name(self) -> str:
        """The strategy's name, for log lines and errors."""
        ...

    def sampling(self) -> Sampling: ...

    def configure_train(self, server_round: int, model: Any, config: Any, transport: Transport) -> Instructions:
        """The round's one ``configure_train`` call, made when its model exists."""
        ...

    def aggregate_train(self, server_round: int, released: Released | None) -> tuple[Any, Any]:
        """The round's one ``aggregate_train`` call: with the aggregate, or with none
        (the round aborted; what it returns is then not used)."""
        ...

    def release_masked(self, arrays: Mapping[str, np.ndarray], total_weight: int) -> tuple[Any, Any]:
        """The model-confidential mode's new global model: the masked sum itself."""
        ...

    def configure_evaluate(self, server_round: int, model: Any, config: Any, transport: Transport) -> Instructions:
        ...

    def aggregate_evaluate(self, server_round: int, released: Released | None) -> Any: ...

    def sample_cohort(self, server_round: int, transport: Transport) -> list[int]:
        """The cohort of a round set up ahead (see :meth:`RoundDriver.sample_cohort`,
        the default, which a learner may replace)."""
        ...
