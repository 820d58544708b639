"""The wrapped Flower strategy as the round driver's learner
(:class:`sgs_flower.driver.learner.Learner`): its ``configure_*`` messages to plain
instructions, the released aggregate to the one reply its ``aggregate_*`` is fed.

Why: the driver runs the round and never sees a Flower type; what the user's strategy
chooses (nodes, model, config) and how it steps the global model from the secure
aggregate (FedAvg's mean, FedAdam's server optimizer ...) stays the user's strategy's,
called once per round as in Flower's own loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from sgs_flower.driver.learner import Instructions, Named, Released, Sampling
from sgs_flower.driver.transport import Transport
from strategies.grid_transport import GridTransport
from strategies.report import quiet_single_reply_log


def _named(model: ArrayRecord) -> Named:
    return [(k, v.numpy()) for k, v in model.items()]


def _grid(transport: Transport) -> Grid:
    assert isinstance(transport, GridTransport), "the Flower strategy runs over a GridTransport"
    return transport.grid


class FlowerLearner:
    """The learner over a wrapped FedAvg-family strategy. ``sample`` is the strategy's
    ``sample_cohort`` (a subclass of ``SecAggStrategy`` may override it)."""

    def __init__(self, inner: FedAvg, sample: Callable[[int, Grid], list[int]]) -> None:
        self.inner, self.sample = inner, sample

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    def sampling(self) -> Sampling:
        i = self.inner
        return Sampling(i.fraction_train, i.min_train_nodes, i.min_available_nodes, i.fraction_evaluate,
                        i.min_evaluate_nodes)

    def sample_cohort(self, server_round: int, transport: Transport) -> list[int]:
        return self.sample(server_round, _grid(transport))

    def _instructions(self, messages: list[Message], train: bool) -> Instructions:
        """The instructions of ``messages``: the first one's model and config, and those of
        the others whose records are not the first's objects (what FedAvg sends to all)."""
        inner = self.inner
        a_key, c_key = inner.arrayrecord_key, inner.configrecord_key
        fields = {"arrays-key": a_key, "config-key": c_key, "weight-key": inner.weighted_by_key}
        first = messages[0]
        model = first.content.array_records[a_key] if train else first.content.array_records.get(a_key)
        cfg = first.content.config_records.get(c_key, ConfigRecord())
        others: list[tuple[Named | None, Mapping[str, Any]]] = []
        for m in messages[1:]:
            other = m.content.array_records[a_key] if train else m.content.array_records.get(a_key)
            other_cfg = m.content.config_records.get(c_key, ConfigRecord())
            if other is model and other_cfg is cfg:
                continue  # the same objects (what FedAvg sends): nothing to re-hash
            others.append((_named(other) if other is not None else None, other_cfg))
        return Instructions([m.metadata.dst_node_id for m in messages], _named(model) if model is not None else None,
                            cfg, {a_key: model, c_key: cfg}, fields, others, handle=first)

    def configure_train(self, server_round: int, model: Any, config: Any, transport: Transport) -> Instructions:
        messages = list(self.inner.configure_train(server_round, model, config, _grid(transport)))
        if messages:
            return self._instructions(messages, train=True)
        return Instructions([], _named(model), ConfigRecord(), {})  # no round: the driver aborts it

    def aggregate_train(self, server_round: int, released: Released | None) -> tuple[Any, Any]:
        if released is None:
            return self.inner.aggregate_train(server_round, [])
        inner, ins = self.inner, released.instructions
        named = ins.model or []
        new_model = released.model if released.model is not None else []
        aggregate = ArrayRecord({k: Array(a) for (k, _), a in zip(named, new_model, strict=True)})
        metrics = MetricRecord({inner.weighted_by_key: released.total_weight, **released.metrics})
        reply = Message(RecordDict({inner.arrayrecord_key: aggregate, "metrics": metrics}), reply_to=ins.handle)
        with quiet_single_reply_log():
            new_arrays, new_metrics = inner.aggregate_train(server_round, [reply])
        if new_arrays is not None:  # keep the model's dtypes and shapes (FedAvg's weighted sum may upcast)
            new_arrays = ArrayRecord({
                k: Array(np.asarray(np.rint(v) if np.issubdtype(a.dtype, np.integer) else v).astype(a.dtype, copy=False)
                         .reshape(a.shape))
                for (k, a), v in zip(named, (np.asarray(new_arrays[k].numpy()) for k, _ in named), strict=True)
            })
        return new_arrays, new_metrics

    def release_masked(self, arrays: Mapping[str, np.ndarray], total_weight: int) -> tuple[Any, Any]:
        return (ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                MetricRecord({self.inner.weighted_by_key: total_weight}))

    def configure_evaluate(self, server_round: int, model: Any, config: Any, transport: Transport) -> Instructions:
        messages = list(self.inner.configure_evaluate(server_round, model, config, _grid(transport)))
        return self._instructions(messages, train=False) if messages else Instructions([], None, {})

    def aggregate_evaluate(self, server_round: int, released: Released | None) -> Any:
        if released is None:
            return self.inner.aggregate_evaluate(server_round, [])
        metrics = MetricRecord({self.inner.weighted_by_key: released.total_weight, **released.metrics})
        reply = Message(RecordDict({"metrics": metrics}), reply_to=released.instructions.handle)
        with quiet_single_reply_log():
            return self.inner.aggregate_evaluate(server_round, [reply])
