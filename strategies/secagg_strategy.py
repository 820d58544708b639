"""A drop-in strategy wrapper: any weighted-mean Flower strategy, aggregated securely.

``SecAggStrategy(FedAvg(...))`` runs each round as the five SecAgg+ exchanges (keys, shares, masked input,
consistency check, unmask) through
the ``Grid`` (overriding ``start()``), decodes the one aggregate the protocol releases
(the weighted-mean model delta, plus the cohort's weighted-mean train metrics), and
hands it to the wrapped strategy as a single reply, so the wrapped strategy's own
aggregation and server optimizer (FedAdam, FedAvgM, ...) still apply unchanged.

The server never sees an individual update, ``num-examples`` or train metric: they all
travel inside the masked vector. Strategies that need individual updates (Krum,
median, trimmed mean, Bulyan, q-FedAvg) are refused at construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    QFedAvg,
    Result,
    Strategy,
)

from sgs_flower.dp.aggregator import DPAggregator, RoundPlan
from sgs_flower.dp.budget import BudgetExhaustedError
from sgs_flower.dp.config import DPConfig
from sgs_flower.pipeline import (
    UpdateSpec,
    binding_digest,
    decode_update,
    flatten,
    unflatten,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentAggregateError,
    MalformedMessageError,
    ProtocolError,
    ReconstructionError,
    SecAggError,
    ThresholdError,
)
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import Stage
from strategies.config import SecAggConfig

_NEEDS_INDIVIDUAL_UPDATES = (Krum, MultiKrum, FedMedian, FedTrimmedAvg, Bulyan, QFedAvg)


def check_wrappable(strategy: Strategy) -> FedAvg:
    """Accept only strategies whose aggregation is a weighted mean of the updates."""
    if isinstance(strategy, _NEEDS_INDIVIDUAL_UPDATES):
        raise TypeError(
            f"{type(strategy).__name__} needs each client's individual update (robust or "
            "fairness-weighted aggregation), but secure aggregation reveals only their sum. "
            "Wrap a weighted-mean strategy instead (FedAvg, FedAdam, FedAdagrad, FedYogi, FedAvgM, FedProx)."
        )
    if not isinstance(strategy, FedAvg):
        raise TypeError(
            f"{type(strategy).__name__} is not a FedAvg-family strategy; SecAggStrategy can only "
            "replace a weighted-mean aggregation (FedAvg and its server optimizers)."
        )
    return strategy


@dataclass
class RoundReport:
    """What happened in one secure round (also logged)."""

    server_round: int
    status: str  # "ok", "aborted", "inconsistent", "budget-exhausted"
    cohort: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    client_errors: dict[int, str] = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0
    total_weight: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # per exchange, server side included


class SecAggStrategy(Strategy):
    """Secure aggregation around a weighted-mean strategy (see module docstring)."""

    def __init__(
        self,
        strategy: Strategy,
        config: SecAggConfig | None = None,
        *,
        dp: DPConfig | None = None,
        ledger: str | None = None,
        **overrides: Any,
    ) -> None:
        self.inner = check_wrappable(strategy)
        if config is not None and overrides:
            raise TypeError("pass either a SecAggConfig or keyword overrides, not both")
        self.config = config if config is not None else SecAggConfig(**overrides)
        self.reports: list[RoundReport] = []
        self.stopped: str = ""  # why training stopped early (the privacy budget), if it did
        self.privacy: DPAggregator | None = None
        if dp is not None and dp.mode in ("central-dp", "distributed-dp"):
            self.privacy = DPAggregator(dp, field_bits=self.config.field_bits, ledger_path=ledger,
                                        config={"secagg": repr(self.config), "inner": type(self.inner).__name__})
            spent = self.privacy.spent()
            if self.privacy.round_offset:
                log(INFO, "privacy ledger %s: resuming after %d rounds, spent epsilon %.4g (consumers) / %.4g (server)",
                    ledger, self.privacy.round_offset, spent.consumer, spent.server)
        elif ledger is not None:
            raise ValueError("a privacy ledger needs dp= with mode central-dp or distributed-dp")

    # ------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise RuntimeError(
            "SecAggStrategy never aggregates plaintext replies: its rounds run in start(), "
            "which only ever sees the secure sum"
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├── SecAggStrategy around %s: %s", type(self.inner).__name__, self.config)
        self.inner.summary()

    # ------------------------------------------------------------ rounds
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        log(INFO, "Starting %s with secure aggregation (SecAgg+)", type(self.inner).__name__)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        if evaluate_fn is not None and (res := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        for server_round in range(1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            train_config["server-round"] = server_round
            try:
                new_arrays, metrics = self.secure_round(grid, server_round, arrays, train_config)
            except BudgetExhaustedError as exc:
                self.stopped = str(exc)
                log(WARNING, "%s", exc)
                break
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            evaluate_config["server-round"] = server_round
            messages = list(self.inner.configure_evaluate(server_round, arrays, evaluate_config, grid))
            if messages:
                replies = grid.send_and_receive(messages, timeout=timeout)
                if (agg := self.inner.aggregate_evaluate(server_round, replies)) is not None:
                    result.evaluate_metrics_clientapp[server_round] = agg
            if evaluate_fn is not None and (res := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = res
                if self.privacy is not None:
                    self.privacy.record_evaluation(
                        server_round, {k: float(v) for k, v in res.items() if isinstance(v, int | float)}
                    )
        if self.privacy is not None:
            spent = self.privacy.spent()
            log(INFO, "privacy spent: epsilon %.4g against model consumers, %.4g against the server (delta %g)",
                spent.consumer, spent.server, self.privacy.dp.delta)
        return result

    def make_spec(self, cohort_size: int, plan: RoundPlan | None) -> UpdateSpec:
        c = self.config
        if plan is None:
            return UpdateSpec(
                clip_range=c.clip_range, max_cohort=cohort_size, max_weight=c.max_weight, field_bits=c.field_bits,
                metric_keys=c.secure_metrics, metric_range=c.metric_range,
            )
        # Under DP: unweighted, no released metrics, the DP plan's clip and fixed point.
        return UpdateSpec(max_cohort=cohort_size, max_weight=1, field_bits=c.field_bits, metric_keys=(),
                          **plan.spec_fields)

    def _wait_for_nodes(self, grid: Grid, need: int) -> None:
        deadline = time.monotonic() + self.config.node_wait_timeout
        while (have := len(list(grid.get_node_ids()))) < need:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {have} SuperNodes connected after {self.config.node_wait_timeout:.0f} s, but secure "
                    f"aggregation needs at least {need} per round. Start more SuperNodes (simulation: "
                    "flwr run . --federation-config 'num-supernodes=10')."
                )
            time.sleep(1.0)

    def secure_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, train_config: ConfigRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.monotonic()
        inner = self.inner
        self._wait_for_nodes(grid, max(inner.min_available_nodes, inner.min_train_nodes, self.config.min_clients or 3))
        instructions = list(inner.configure_train(server_round, arrays, train_config, grid))
        cohort = [m.metadata.dst_node_id for m in instructions]
        report = RoundReport(server_round, "aborted", cohort=sorted(cohort))
        self.reports.append(report)
        a_key, c_key = inner.arrayrecord_key, inner.configrecord_key
        model = instructions[0].content.array_records[a_key] if instructions else arrays
        cfg = instructions[0].content.config_records.get(c_key, ConfigRecord()) if instructions else ConfigRecord()
        named = [(k, v.numpy()) for k, v in model.items()]
        like = [a for _, a in named]
        model_size = int(sum(a.size for a in like))
        plan = None
        if len(cohort) < 2:
            return self._abort(report, f"round {server_round} not run: {len(cohort)} clients sampled", t0, None)
        if self.privacy is not None:  # refuses (BudgetExhaustedError) before anything is sent
            try:
                plan = self.privacy.plan(server_round, len(cohort), len(list(grid.get_node_ids())), model_size)
            except BudgetExhaustedError as exc:
                report.status, report.reason = "budget-exhausted", str(exc)
                raise
        try:
            spec = self.make_spec(len(cohort), plan)
            min_clients = self.config.min_clients
            if plan is not None:  # fewer survivors would carry less noise than promised
                min_clients = max(min_clients or 3, plan.min_survivors)
            params = RoundParams(
                run_id=grid.run.run_id, round_id=server_round, cohort=tuple(cohort),
                vector_length=spec.vector_length(model_size), field_bits=spec.field_bits,
                degree=self.config.degree, threshold=self.config.threshold, min_clients=min_clients,
            )
            digest = binding_digest(named, dict(cfg), spec.to_config())
            for m in instructions[1:]:
                if m.content.array_records[a_key] is model and m.content.config_records.get(c_key) is cfg:
                    continue  # the same objects (what FedAvg sends): nothing to re-hash
                other = binding_digest(
                    [(k, v.numpy()) for k, v in m.content.array_records[a_key].items()],
                    dict(m.content.config_records.get(c_key, ConfigRecord())), spec.to_config(),
                )
                if other != digest:
                    raise ConfigurationError(
                        f"{type(inner).__name__}.configure_train sent different models or configs to "
                        "different clients; secure aggregation needs one global model per round"
                    )
        except ConfigurationError as exc:
            return self._abort(report, f"round {server_round} not run: {exc}", t0, plan)

        server = SecAggServer(params, bound_digest=digest)
        # The model travels once, with the masked-input request (where training happens);
        # its digest keys the masks, so a client given another model cannot unmask.
        train_extra: dict[str, ArrayRecord | ConfigRecord] = {
            a_key: model,
            c_key: cfg,
            wire.SPEC_KEY: ConfigRecord(spec.to_config()),
        }
        keys_fields = {"arrays-key": a_key, "config-key": c_key, "weight-key": inner.weighted_by_key}
        try:
            replies = self._exchange(grid, server_round, Stage.ADVERTISE_KEYS, server.setup_messages(), report)
            rosters = server.collect_keys(replies)
            bundles = server.collect_shares(self._exchange(grid, server_round, Stage.SHARE_KEYS, rosters, report))
            requests = server.collect_masked(
                self._exchange(grid, server_round, Stage.MASKED_INPUT, bundles, report, train_extra, keys_fields)
            )
            unmask = server.collect_consistency(
                self._exchange(grid, server_round, Stage.CONSISTENCY, requests, report)
            )
            outcome = server.collect_unmask(self._exchange(grid, server_round, Stage.UNMASK, unmask, report))
            report.survivors = list(outcome.survivors)
            decoded = decode_update(outcome.total, spec, len(outcome.survivors), model_size)
        except InconsistentAggregateError as exc:
            self._fill(report, server)
            return self._abort(report, str(exc), t0, plan, status="inconsistent")
        except (ThresholdError, ReconstructionError) as exc:
            self._fill(report, server)
            return self._abort(report, str(exc), t0, plan)
        except SecAggError as exc:  # anything else a client could provoke ends the round, not the server
            self._fill(report, server)
            return self._abort(report, f"{type(exc).__name__}: {exc}", t0, plan)
        self._fill(report, server)
        report.total_weight = decoded.total_weight
        if plan is not None and self.privacy is not None:
            # noise (central), account and write the ledger BEFORE the aggregate is used
            mean_delta = self.privacy.release(plan, decoded.weighted_delta_sum, decoded.count,
                                              len(cohort) - decoded.count)
        else:
            mean_delta = decoded.mean_delta
        new_named = unflatten(flatten(like) + mean_delta, like)
        aggregate = ArrayRecord({k: Array(a) for (k, _), a in zip(named, new_named, strict=True)})
        metrics = MetricRecord({inner.weighted_by_key: decoded.total_weight, **decoded.metrics})
        reply = Message(RecordDict({a_key: aggregate, "metrics": metrics}), reply_to=instructions[0])
        new_arrays, new_metrics = inner.aggregate_train(server_round, [reply])
        if new_arrays is not None:  # keep the model's dtypes (FedAvg's weighted sum may upcast)
            new_arrays = ArrayRecord(
                {k: Array(np.asarray(new_arrays[k].numpy()).astype(a.dtype, copy=False)) for k, a in named}
            )
        report.status = "ok"
        report.seconds = time.monotonic() - t0
        log(
            INFO, "secure round %s: %d/%d clients aggregated (total weight %d) in %.2f s",
            server_round, len(report.survivors), len(cohort), decoded.total_weight, report.seconds,
        )
        if report.dropped:
            log(INFO, "secure round %s: dropped %s", server_round, report.dropped)
        return new_arrays, new_metrics

    def _fill(self, report: RoundReport, server: SecAggServer) -> None:
        report.dropped = {n: s.name for n, s in server.dropped.items()}
        report.rejected.update({n: f"{type(e).__name__}: {e}" for n, e in server.rejected.items()})

    def _abort(
        self, report: RoundReport, reason: str, t0: float, plan: RoundPlan | None, status: str = "aborted"
    ) -> tuple[None, None]:
        report.status = status
        report.reason = reason
        report.seconds = time.monotonic() - t0
        log(WARNING, "secure round %s %s, global model unchanged: %s", report.server_round, status, reason)
        if self.privacy is not None:
            self.privacy.abort(plan, report.server_round, len(report.cohort), len(report.survivors), f"{status}: {reason}")
        return None, None

    def _exchange(
        self,
        grid: Grid,
        server_round: int,
        stage: Stage,
        outgoing: Mapping[int, wire.Message],
        report: RoundReport,
        extra: Mapping[str, ArrayRecord | ConfigRecord] | None = None,
        extra_fields: Mapping[str, str] | None = None,
    ) -> dict[int, wire.Message | bytes]:
        """One server -> clients -> server exchange; returns the valid replies by node."""
        messages = []
        for node, msg in outgoing.items():
            rec = ConfigRecord({wire.FIELD_STAGE: int(stage), wire.FIELD_PAYLOAD: wire.encode(msg), **(extra_fields or {})})
            content = RecordDict({wire.RECORD_KEY: rec, **(extra or {})})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round)))
        t0 = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=self.config.stage_timeout))
        report.stage_seconds[stage.name] = time.monotonic() - t0
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        out: dict[int, wire.Message | bytes] = {}
        for reply in replies:
            dst = sent_to.get(reply.metadata.reply_to_message_id)
            if dst is None:
                continue
            node = int(dst)
            if reply.has_error():
                report.client_errors[node] = f"stage {stage.name}: {reply.error.reason}"
                log(WARNING, "node %s failed at stage %s: %s", node, stage.name, reply.error.reason)
                continue
            if reply.metadata.src_node_id != node:
                report.rejected[node] = f"reply for node {node} came from node {reply.metadata.src_node_id}"
                continue
            try:
                out[node] = parse_reply(reply)
            except ProtocolError as exc:
                report.rejected[node] = f"{type(exc).__name__}: {exc}"
                log(WARNING, "node %s sent an invalid %s reply: %s", node, stage.name, exc)
        return out


def parse_reply(reply: Message) -> wire.Message:
    """Decode a client's protocol reply (payload bytes, plus the vector at stage 3)."""
    rec = reply.content.config_records.get(wire.RECORD_KEY)
    payload = rec.get(wire.FIELD_PAYLOAD) if rec is not None else None
    if not isinstance(payload, bytes):
        raise MalformedMessageError(f"reply lacks the {wire.RECORD_KEY}.{wire.FIELD_PAYLOAD} bytes")
    vec_rec = reply.content.array_records.get(wire.VECTOR_KEY)
    vector = None
    if vec_rec is not None:
        arr = vec_rec.get(wire.FIELD_VECTOR)
        if arr is None or arr.stype != wire.RAW_STYPE or arr.dtype not in ("<u4", "<u8") or len(arr.shape) != 1:
            raise MalformedMessageError("masked vector must be raw little-endian uint32/uint64 words")
        if len(arr.data) != arr.shape[0] * np.dtype(arr.dtype).itemsize:
            raise MalformedMessageError(f"masked vector declares {arr.shape[0]} words but carries {len(arr.data)} bytes")
        vector = np.frombuffer(arr.data, dtype=np.dtype(arr.dtype))  # zero-copy view
    return wire.decode(payload, vector)
