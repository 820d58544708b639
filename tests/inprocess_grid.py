"""A Flower ``Grid`` whose SuperNodes are in this process: each pushed message is
answered at once by the real client mod in front of a small train function.

Why: the strategy's whole round loop (``SecAggStrategy.start``: key phase, five or three
exchanges, retries) with the real ``secagg_mod`` on each site, in milliseconds and
without Ray, so attacks can be written as a Grid that changes what sites receive.
Flower-simulation and deployment tests elsewhere show the same paths under Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients import secagg_mod

TaskIdentity.run_id = 1  # Flower messages built outside a running app need a task identity
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1

TrainFn = Callable[[Message, Context], Message]


class Site:
    """One SuperNode: its Context and a deterministic 'training' step (the model moves
    toward a site-specific target), recording the plaintext model it was given."""

    def __init__(self, node: int, node_config: dict[str, Any] | None = None, run_id: int = 1) -> None:
        self.context = Context(run_id=run_id, node_id=node, node_config=node_config or {}, state=RecordDict(),
                               run_config={})
        self.seen: list[dict[str, np.ndarray]] = []  # plaintext models the user's code received
        self.evaluated: list[dict[str, np.ndarray]] = []  # ... and those it evaluated
        self.weight = 10 + node

    def train(self, msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        if msg.metadata.message_type == "evaluate":  # a metric of the plaintext model this site was given
            self.evaluated.append({k: v.numpy().copy() for k, v in arrays.items()})
            mean = float(np.mean(np.concatenate([v.numpy().ravel() for v in arrays.values()])))
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": self.weight, "mean_w": mean})}),
                           reply_to=msg)
        self.seen.append({k: v.numpy().copy() for k, v in arrays.items()})
        rng = np.random.default_rng(context.node_id)
        new = ArrayRecord({k: Array((0.5 * v.numpy() + 0.5 * rng.normal(0.2, 0.3, v.numpy().shape)).astype(
            v.numpy().dtype)) for k, v in arrays.items()})
        metrics = MetricRecord({"num-examples": self.weight, "train_loss": float(context.node_id)})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)


class DirectGrid(Grid):
    """In-process grid over :class:`Site` objects; subclasses may change the traffic."""

    def __init__(self, sites: dict[int, Site], run_id: int = 1) -> None:
        self.sites = sites
        self._run = SimpleNamespace(run_id=run_id)
        self._replies: dict[str, Message] = {}
        self.received: list[Message] = []  # every reply the server got
        self.sent: list[Message] = []

    @property
    def run(self):  # type: ignore[override]
        return self._run

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        self._run = SimpleNamespace(run_id=run_id)

    def create_message(self, *a: Any, **k: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.sites)

    def get_nodes(self):  # type: ignore[no-untyped-def]  # pragma: no cover
        raise NotImplementedError

    def outgoing(self, messages: list[Message]) -> list[Message]:
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in self.outgoing(list(messages)):
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id  # as a real grid stamps its run
            self.sent.append(msg)
            site = self.sites.get(msg.metadata.dst_node_id)
            ids.append(msg.metadata.message_id)
            if site is None:
                continue
            reply = secagg_mod(msg, site.context, site.train)
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        self.received.extend(out)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
