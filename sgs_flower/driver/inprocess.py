"""Whole secure rounds in one process: the round driver over sites driven as objects, no Flower.

Why: every round, Flower or not, runs the same code (issue 30). A benchmark or a test
that drives bare protocol clients (:mod:`sgs_flower.secagg.simulate`) times a path no
user runs: no retries, no model-key phase, no evaluation rounds, no pipelining, no site
policy or state. Here the product path runs unchanged: the :class:`RoundDriver` owns the
rounds and the sites answer through :mod:`sgs_flower.site` (``on_train`` /
``on_evaluate``, each with its own :class:`MemoryStore`), as they do under Flower through
``clients.secagg_mod``. Only the two adapters are swapped:

- :class:`InProcessTransport` (a :class:`~sgs_flower.driver.transport.Transport`) hands
  each outgoing message to its site's object instead of Flower's ``Grid``, through the
  same byte encoding (payloads and packed masked vectors), and turns a site's refusal
  into an error reply, as the Flower mod does. A site told to drop (:class:`Drop`) gets
  no message at that stage and sends no reply: the driver sees a dropout.
- :class:`MeanLearner` (a :class:`~sgs_flower.driver.learner.Learner`) is FedAvg's rule
  in numpy: uniform sampling as ``FedAvg.configure_train`` does, and the released
  weighted mean as the new model (the driver already applied the mean delta).

:func:`run_rounds` runs R rounds of the driver over them, as ``SecAggStrategy.start``
does over Flower, and returns the reports, the models and what each round cost (the
sites' CPU, measured around their calls, and the server's: the rest of this process).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sgs_flower.dp.budget import BudgetExhaustedError
from sgs_flower.dp.config import DPConfig
from sgs_flower.driver.config import SecAggConfig
from sgs_flower.driver.learner import Instructions, Named, Released, Sampling
from sgs_flower.driver.report import RoundReport
from sgs_flower.driver.rounds import LOGGER as DRIVER_LOGGER
from sgs_flower.driver.rounds import RoundDriver
from sgs_flower.driver.transport import EVALUATE, TRAIN, Outgoing, Reply, ReplyError, Transport
from sgs_flower.pipeline import EncodedUpdate, UpdateSpec, encode_update
from sgs_flower.secagg import bls, wire
from sgs_flower.secagg.errors import EncodingError, ProtocolError
from sgs_flower.secagg.wire import Stage
from sgs_flower.site import (
    PASS,
    Answer,
    KeyAnswer,
    MemoryStore,
    ModelRecord,
    Refused,
    Request,
    TrainReply,
    Unusable,
    on_evaluate,
    on_train,
)
from sgs_flower.site.model_key import KEY_RECORD
from sgs_flower.site.request import Pass, model_of

LOGGER = logging.getLogger("sgs_flower.driver.inprocess")

#: The error codes a Flower site's replies carry (``flwr.common.constant.ErrorCode``),
#: kept so the driver reads an in-process error reply as it reads a Flower one.
REFUSED_CODE = 6  # MOD_FAILED_PRECONDITION: the protocol layer refused the message
APP_RAISED_CODE = 2  # CLIENT_APP_RAISED_EXCEPTION: the site's own code raised

#: The weight a train step's example count travels under (FedAvg's ``weighted_by_key``).
WEIGHT_KEY = "num-examples"
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"

#: The user's train step: (the global model's arrays, the round's config) -> (new arrays in
#: the same order, num-examples, numeric metrics). A raise makes the site's update
#: unusable (counted inside the masked vector), as under Flower.
TrainFn = Callable[[list[np.ndarray], Mapping[str, Any]], tuple[list[np.ndarray], int, Mapping[str, float]]]
#: The user's evaluate step: (model arrays, config) -> (num-examples, numeric metrics).
EvaluateFn = Callable[[list[np.ndarray], Mapping[str, Any]], tuple[int, Mapping[str, float]]]
Encoder = Callable[[np.ndarray, dict[str, float], int, UpdateSpec], EncodedUpdate]


def _default_node_config() -> dict[str, Any]:
    # "memory": the site's state (signed survivor sets, DP spend) lives in its store for
    # the run, so an in-process run writes no state file into the user's home
    return {"sgs-state-file": "memory"}


@dataclass(frozen=True)
class Drop:
    """A site that goes silent: it gets no message at ``stage`` (so sends no reply) in
    the rounds ``rounds`` (None: every round) of kind ``kind``. A message that also
    carries the next round's part (pipelining) is one message: dropping it drops both,
    and a drop at round r + 1's ``ADVERTISE_KEYS`` or ``SHARE_KEYS`` matches the message
    of round r that carries that part."""

    stage: Stage
    rounds: frozenset[int] | None = None
    kind: str = TRAIN

    def matches(self, message: Outgoing) -> bool:
        if message.kind != self.kind:
            return False
        rec = message.records.get(wire.RECORD_KEY, {})
        round_ = int(message.group)
        parts = [(round_, rec.get(wire.FIELD_STAGE))]
        if wire.FIELD_NEXT_STAGE in rec:
            parts.append((round_ + 1, rec[wire.FIELD_NEXT_STAGE]))
        return any(s == int(self.stage) and (self.rounds is None or r in self.rounds) for r, s in parts)


@dataclass
class InProcessSite:
    """One site: its user steps, its own node config (its policy: never the server's)
    and its run-scoped store. ``encoder``: how its update is encoded (the DP mixin's
    analogue; default :func:`sgs_flower.pipeline.encode_update`)."""

    train: TrainFn
    evaluate: EvaluateFn | None = None
    node_config: Mapping[str, Any] = field(default_factory=_default_node_config)
    store: MemoryStore = field(default_factory=MemoryStore)
    encoder: Encoder = encode_update


def _train_step(fn: TrainFn, request: Request) -> Callable[[str, str, ModelRecord], TrainReply]:
    """The site's :data:`~sgs_flower.site.request.TrainStep` around the user's numpy step."""
    def step(a_key: str, c_key: str, model: ModelRecord) -> TrainReply:
        named = model.read()
        try:
            new, weight, metrics = fn([a for _, a in named], dict(request.configs.get(c_key, {})))
        except Exception as exc:  # the user's code failed: this site sends an unusable vector
            raise Unusable("train step raised", repr(exc)) from exc
        arrays = [np.asarray(a) for a in new]
        return TrainReply([k for k, _ in named], lambda: arrays, {WEIGHT_KEY: weight, **metrics})
    return step


def _evaluate_step(fn: EvaluateFn | None, request: Request) -> Callable[[str, str, ModelRecord], Mapping[str, Any]]:
    def step(a_key: str, c_key: str, model: ModelRecord) -> Mapping[str, Any]:
        if fn is None:
            raise Unusable("train step raised", "this site has no evaluate step")
        try:
            weight, metrics = fn([a for _, a in model.read()], dict(request.configs.get(c_key, {})))
        except Exception as exc:
            raise Unusable("train step raised", f"the evaluate function raised: {exc!r}") from exc
        return {WEIGHT_KEY: weight, **metrics}
    return step


def _request(run_id: int, message: Outgoing) -> Request:
    """A driver message as the site reads it: models (handed through by the learner as
    :class:`ModelRecord`) apart from config records (copied, as a wire would)."""
    configs: dict[str, dict[str, Any]] = {}
    models: dict[str, ModelRecord] = {}
    for name, value in message.records.items():
        if isinstance(value, ModelRecord):
            models[name] = value
        else:
            configs[name] = dict(value)
    return Request(run_id, configs, models)


def _public_reason(exc: BaseException) -> str:
    """An error reply's text: a protocol refusal names what the server sent; anything
    else (the site's data, training, budget) only its type, as the Flower mod says it."""
    if isinstance(exc, ProtocolError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EncodingError):
        return "EncodingError: this site's update could not be encoded under the round's spec (details in its log)"
    return f"{type(exc).__name__}: the site's train step failed (details in its log)"


def _reply_of(node: int, answer: Answer | KeyAnswer) -> Reply:
    """A site's answer as the driver reads a reply: the payload bytes and, for a masked
    vector, its words packed at the round's width (the form Flower carries)."""
    if isinstance(answer, KeyAnswer):
        return Reply(node, node, records={KEY_RECORD: dict(answer.fields)})
    rec: dict[str, Any] = {wire.FIELD_STAGE: int(answer.stage),
                           wire.FIELD_PAYLOAD: wire.encode(answer.reply, detach_vector=True)}
    if isinstance(answer.ahead, str):
        rec[wire.FIELD_NEXT_ERROR] = answer.ahead
    elif answer.ahead is not None:
        rec[wire.FIELD_NEXT_STAGE] = int(answer.ahead[0])
        rec[wire.FIELD_NEXT_PAYLOAD] = wire.encode(answer.ahead[1])
    if answer.names is not None:
        rec[wire.FIELD_METRIC_NAMES] = list(answer.names[0])
        rec[wire.FIELD_METRICS_LEFT_OUT] = list(answer.names[1])
    vector = None
    if isinstance(answer.reply, wire.MaskedInput | wire.RetryInput):
        vector = wire.pack_words(answer.reply.vector, answer.reply.field_bits)
    return Reply(node, node, records={wire.RECORD_KEY: rec}, vector=vector)


class InProcessTransport:
    """A :class:`~sgs_flower.driver.transport.Transport` over in-process sites (node id ->
    :class:`InProcessSite`). Each message is answered at once, in node order; ``timeout``
    is not needed (a dropout is a :class:`Drop`, not a late reply). With ``separate``
    (the default) each answer runs as in a process of its own, as a deployed site's
    does: the process's caches of checked BLS keys are the site's own (what its store
    hands back), not the server's or another site's (:func:`sgs_flower.secagg.bls.separate_caches`).

    ``site_cpu``: each site's CPU seconds (``time.process_time``) spent in its calls,
    cumulated over the run; ``calls``: how many messages each site answered."""

    #: the sites answer in this process: their CPU is part of this process's
    in_process = True

    def __init__(self, sites: Mapping[int, InProcessSite], *, run_id: int = 1,
                 drops: Mapping[int, Sequence[Drop]] | None = None, separate: bool = True) -> None:
        if any(int(n) < 1 for n in sites):
            raise ValueError("node ids must be positive integers (as Flower's)")
        self.sites = dict(sites)
        self.drops = {int(n): list(d) for n, d in (drops or {}).items()}
        self._run_id, self.separate = run_id, separate
        self.site_cpu: dict[int, float] = dict.fromkeys(self.sites, 0.0)
        self.calls: dict[int, int] = dict.fromkeys(self.sites, 0)
        self.dropped: list[tuple[int, str, int]] = []  # (node, group, stage) of each message not delivered

    @property
    def run_id(self) -> int:
        return self._run_id

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def exchange(self, messages: Sequence[Outgoing], timeout: float) -> list[Reply]:
        replies: list[Reply] = []
        for message in messages:
            site = self.sites.get(message.node)
            if site is None:
                continue  # no such node: no reply, as on a network
            if any(d.matches(message) for d in self.drops.get(message.node, ())):
                stage = message.records.get(wire.RECORD_KEY, {}).get(wire.FIELD_STAGE, -1)
                self.dropped.append((message.node, message.group, int(stage)))
                continue
            t0 = time.process_time()
            with bls.separate_caches() if self.separate else nullcontext():
                replies.append(self._answer(message.node, site, message))
            self.site_cpu[message.node] += time.process_time() - t0
            self.calls[message.node] += 1
        return replies

    def _answer(self, node: int, site: InProcessSite, message: Outgoing) -> Reply:
        """One site's answer to one message, as the Flower mod would make it."""
        request = _request(self.run_id, message)
        arrived = time.monotonic()
        out: Answer | KeyAnswer | Pass
        try:
            if message.kind == EVALUATE:
                out = on_evaluate(node, site.node_config, site.store, request,
                                  _evaluate_step(site.evaluate, request), arrived)
            else:
                out = on_train(node, site.node_config, site.store, request, _train_step(site.train, request),
                               site.encoder, arrived)
        except Refused as refused:
            return Reply(node, node, error=ReplyError(REFUSED_CODE, _public_reason(refused.cause)))
        except Exception as exc:  # a fault of the site's own: the framework's error reply
            LOGGER.exception("site %s raised on a %s message", node, message.kind)
            return Reply(node, node, error=ReplyError(APP_RAISED_CODE, f"{type(exc).__name__}: {exc}",
                                                      app_raised=True))
        if out is PASS:  # the driver never sends a plain message
            return Reply(node, node, error=ReplyError(APP_RAISED_CODE, "a plain message has no in-process answer",
                                                      app_raised=True))
        assert isinstance(out, Answer | KeyAnswer)
        return _reply_of(node, out)


class MeanLearner:
    """FedAvg's learning side in numpy (a :class:`~sgs_flower.driver.learner.Learner`).

    ``configure_train`` samples ``max(int(fraction_train * connected), min_train_nodes)``
    nodes uniformly, as ``FedAvg.configure_train`` does, and sends every one the same
    model and config; the new model is the released weighted mean (FedAvg's rule with
    no server learning rate). Evaluation rounds run when ``fraction_evaluate`` > 0.
    A pipelined round's cohort comes from the driver's default :meth:`RoundDriver.sample_cohort`
    (bound by :func:`run_rounds`)."""

    name = "MeanLearner"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 fraction_evaluate: float = 0.0, min_evaluate_nodes: int = 2) -> None:
        self._sampling = Sampling(fraction_train, min_train_nodes, min_available_nodes, fraction_evaluate,
                                  min_evaluate_nodes)
        self.sampler: Callable[[int, Transport], list[int]] | None = None

    def sampling(self) -> Sampling:
        return self._sampling

    def sample_cohort(self, server_round: int, transport: Transport) -> list[int]:
        if self.sampler is None:
            raise RuntimeError("MeanLearner.sampler is unset: bind it to the driver's sample_cohort (run_rounds does)")
        return self.sampler(server_round, transport)

    def _instructions(self, nodes: list[int], model: Named, config: Mapping[str, Any]) -> Instructions:
        return Instructions(nodes, list(model), dict(config),
                            records={ARRAYS_KEY: model_of(list(model)), CONFIG_KEY: dict(config)},
                            fields={"arrays-key": ARRAYS_KEY, "config-key": CONFIG_KEY, "weight-key": WEIGHT_KEY})

    @staticmethod
    def _sample(transport: Transport, fraction: float, least: int) -> list[int]:
        nodes = transport.node_ids()
        size = max(int(len(nodes) * fraction), least)
        return random.sample(nodes, size) if fraction > 0 and size <= len(nodes) else []

    def configure_train(self, server_round: int, model: Any, config: Any, transport: Transport) -> Instructions:
        s = self._sampling
        return self._instructions(self._sample(transport, s.fraction_train, s.min_train_nodes), model, config)

    def aggregate_train(self, server_round: int, released: Released | None) -> tuple[Any, Any]:
        if released is None or released.model is None:
            return None, None
        names = [k for k, _ in released.instructions.model or []]
        return (list(zip(names, released.model, strict=True)),
                {WEIGHT_KEY: released.total_weight, **released.metrics})

    def release_masked(self, arrays: Mapping[str, np.ndarray], total_weight: int) -> tuple[Any, Any]:
        return list(arrays.items()), {WEIGHT_KEY: total_weight}

    def configure_evaluate(self, server_round: int, model: Any, config: Any, transport: Transport) -> Instructions:
        s = self._sampling
        nodes = self._sample(transport, s.fraction_evaluate, s.min_evaluate_nodes)
        return self._instructions(nodes, model, config) if nodes else Instructions([], None, {})

    def aggregate_evaluate(self, server_round: int, released: Released | None) -> Any:
        if released is None:
            return None
        return {WEIGHT_KEY: released.total_weight, **released.metrics}


class MeasuredTransport(Transport, Protocol):
    """A transport to simulated sites that measures them (:class:`InProcessTransport`,
    :class:`sgs_flower.driver.shards.ShardedTransport`): each site's CPU seconds in its
    calls and how many messages it answered, cumulated over the run. :func:`run_rounds`
    reads them around each round; a site's CPU is measured where it runs (in a worker
    process for the sharded one), so the rest of this process's CPU is the server's."""

    site_cpu: dict[int, float]
    calls: dict[int, int]
    dropped: list[tuple[int, str, int]]  # (node, group, stage) of each message a Drop held back
    #: True when the sites answer in this process (their CPU is then part of its CPU,
    #: and taken out of the server's); False when they answer in worker processes
    in_process: bool


@dataclass(frozen=True)
class RoundCost:
    """What one training round cost: its wall time, the sites' CPU (summed over the
    sites' calls, wherever they ran) and the server's (this process's CPU, less the
    sites' where they ran in it: the driver, the protocol server, decoding, and with
    the sites in worker processes, sending them their messages and reading replies)."""

    wall_seconds: float
    sites_cpu_seconds: float
    server_cpu_seconds: float
    site_calls: int


@dataclass
class RunResult:
    """A run of :func:`run_rounds`: the driver's reports (training, evaluation), the
    global model after each round (``models[0]`` the initial one), each round's released
    train metrics (None when it aborted), evaluation aggregates and costs, and the
    driver and transport themselves (for what else a caller inspects)."""

    reports: list[RoundReport]
    eval_reports: list[RoundReport]
    models: list[Named]
    metrics: list[Mapping[str, Any] | None]
    evaluations: list[Any]
    costs: list[RoundCost]
    driver: RoundDriver
    transport: MeasuredTransport
    stopped: str = ""


def run_rounds(
    sites: Mapping[int, InProcessSite] | MeasuredTransport, initial: Named | Mapping[str, np.ndarray],
    num_rounds: int, config: SecAggConfig | None = None, *, learner: MeanLearner | None = None,
    drops: Mapping[int, Sequence[Drop]] | None = None, train_config: Mapping[str, Any] | None = None,
    evaluate_config: Mapping[str, Any] | None = None, dp: DPConfig | None = None, ledger: str | None = None,
    first_round: int = 1, logger: logging.Logger | None = None,
    on_round: Callable[[int, RoundDriver], None] | None = None,
) -> RunResult:
    """Run rounds ``first_round`` .. ``first_round + num_rounds - 1`` of the round driver
    over in-process sites, as ``SecAggStrategy.start`` runs them over Flower: each a
    secure training round (pipelined from the second on), then a secure evaluation round
    when the learner's ``fraction_evaluate`` > 0. Every default of ``config`` applies
    (``SecAggConfig()``: whole groups, the global quorum, adaptive ranges and width).

    ``sites``: the sites, driven in this process (``drops`` applies), or a transport
    that measures them (:class:`MeasuredTransport`: an :class:`InProcessTransport`, or a
    :class:`~sgs_flower.driver.shards.ShardedTransport` with the sites in worker
    processes; its own drops apply). ``on_round(server_round, driver)`` is called after
    each training round, before its evaluation round (benchmarks read
    ``driver.last_server`` there, while it is that round's).

    Raises :class:`~sgs_flower.driver.SecureAggregationFailed` as the strategy does (too
    many rounds in a row aborted); a privacy budget that refuses a round ends the run
    there (``RunResult.stopped`` says why)."""
    config = config or SecAggConfig()
    learner = learner or MeanLearner()
    transport: MeasuredTransport = InProcessTransport(sites, drops=drops) if isinstance(sites, Mapping) else sites
    driver = RoundDriver(config, learner, dp=dp, ledger=ledger, logger=logger or DRIVER_LOGGER)
    learner.sampler = driver.sample_cohort
    model: Named = list(initial.items()) if isinstance(initial, Mapping) else list(initial)
    last = first_round + num_rounds - 1
    driver.begin(last, dict(model) if config.confidential else None)
    result = RunResult([], [], [list(model)], [], [], [], driver, transport)
    for server_round in range(first_round, last + 1):
        cpu0, wall0, sites0 = time.process_time(), time.monotonic(), sum(transport.site_cpu.values())
        calls0 = sum(transport.calls.values())
        try:
            new, metrics = driver.train_round(transport, server_round, model,
                                              {**(train_config or {}), "server-round": server_round})
        except BudgetExhaustedError as exc:
            driver.stop_for_budget(exc)
            result.stopped = driver.stopped
            break
        sites_cpu = sum(transport.site_cpu.values()) - sites0
        server_cpu = time.process_time() - cpu0 - (sites_cpu if transport.in_process else 0.0)
        result.costs.append(RoundCost(time.monotonic() - wall0, sites_cpu, server_cpu,
                                      sum(transport.calls.values()) - calls0))
        result.reports = driver.reports
        driver.count_round(num_rounds)  # raises SecureAggregationFailed after too many aborts
        if new is not None:
            model = list(new)
        result.models.append(list(model))
        result.metrics.append(metrics)
        if on_round is not None:
            on_round(server_round, driver)
        if learner.sampling().fraction_evaluate > 0:
            result.evaluations.append(driver.evaluate_round(
                transport, server_round, model, {**(evaluate_config or {}), "server-round": server_round}))
    result.reports, result.eval_reports, result.stopped = driver.reports, driver.eval_reports, driver.stopped
    return result
