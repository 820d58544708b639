"""A drop-in strategy wrapper: any weighted-mean Flower strategy, aggregated securely.

``SecAggStrategy(FedAvg(...))`` runs each round as SecAgg+ exchanges through the ``Grid``
(overriding ``start()``): five (keys, shares, masked input, consistency check, unmask) for
the first round and after an aborted one, three (masked input, consistency, unmask) once
pipelined, the next round's keys and shares riding on the consistency and unmask
exchanges (docs/protocol.md, "Pipelined rounds"), plus one exchange per retry of the
masked input when the unmasked sum counts values beyond the range or weights beyond the
weight scale (nothing is released before every value fits: docs/protocol.md, "Retry"). It decodes the one aggregate the protocol releases
(the weighted-mean model delta, plus the cohort's weighted-mean train metrics), and
hands it to the wrapped strategy as a single reply, so the wrapped strategy's own
aggregation and server optimizer (FedAdam, FedAvgM, ...) still apply unchanged.

The wrapped strategy's hooks run once per round, as in Flower's own loop, pipelined or
not: ``configure_train(r, model_r, ...)`` when round r starts (after round r-1's
aggregate exists), ``aggregate_train`` on the secure aggregate (with no reply when the
round aborted), then ``configure_evaluate`` and ``aggregate_evaluate``. A pipelined
round's cohort, which must be known during the previous round, is drawn by
:meth:`SecAggStrategy.sample_cohort` without calling any hook (see its docstring); a
strategy whose ``configure_train`` chooses its own nodes has that choice honoured (a round
it chose otherwise than foreseen is set up in full from its nodes).

The wrapper stands where the user's strategy stood: a name it does not define itself
(a subclass's own method or attribute) is read from the wrapped strategy. A wrapped
strategy that overrides ``start`` is refused at construction (that ``start`` would never
run); a subclass of ``SecAggStrategy`` may override ``start`` around ``super().start``.

The round itself (stages, pipelining, retries, aborts, evaluation rounds, the model-key
phase, groups, DP and the round report) is :class:`sgs_flower.driver.RoundDriver`'s, which
knows nothing of Flower: this module adapts the Strategy API to it, over a transport on
the ``Grid`` (:mod:`strategies.grid_transport`) and the wrapped strategy's hooks
(:mod:`strategies.learner`).

The server never sees an individual update, ``num-examples``, train or evaluation metric:
they all travel inside masked vectors. Federated evaluation (``fraction_evaluate > 0``) is
a secure round of its own after each train round (``sgs_flower/driver/evaluation.py``, five
exchanges): ``aggregate_evaluate`` gets one reply with the weighted means. Strategies
that need individual updates (Krum, median, trimmed mean, Bulyan, q-FedAvg) are refused
at construction.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    Krum,
    MultiKrum,
    QFedAvg,
    Result,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, log_strategy_start_info

from sgs_flower.dp.aggregator import DPAggregator, RoundPlan
from sgs_flower.dp.budget import BudgetExhaustedError
from sgs_flower.dp.config import DPConfig
from sgs_flower.driver.rounds import RoundDriver
from sgs_flower.pipeline import UpdateSpec
from sgs_flower.secagg.errors import ConfigurationError
from sgs_flower.secagg.groups import GroupRule
from strategies.config import SecAggConfig
from strategies.grid_transport import GridTransport, parse_next_reply, parse_reply
from strategies.learner import FlowerLearner
from strategies.report import RoundReport

__all__ = ["SecAggStrategy", "check_wrappable", "parse_next_reply", "parse_reply"]

_NEEDS_INDIVIDUAL_UPDATES = (Krum, MultiKrum, FedMedian, FedTrimmedAvg, Bulyan, QFedAvg)
# Flower's own strategies whose configure_train samples nodes exactly as FedAvg's does
# (they add config keys or keep the arrays they are given, and call FedAvg's)
_SAMPLES_AS_FEDAVG = (FedAvg, FedOpt, FedProx, FedAvgM, FedXgbBagging)


def _check_start(inner: FedAvg) -> None:
    """Refuse a wrapped strategy that overrides ``start``: SecAggStrategy runs the rounds
    itself, so that ``start`` (checkpoints, a results file, early stopping ...) would
    never run, and the run would go on without what it does, silently."""
    if type(inner).start is Strategy.start:
        return
    name = type(inner).__name__
    raise ConfigurationError(
        f"{name} overrides start(); SecAggStrategy runs the rounds itself (each a secure round), so {name}.start "
        f"would never run: move its per-round work into evaluate_fn / configure_train / aggregate_evaluate, or "
        f"subclass SecAggStrategy and override start there to wrap super().start(...) (class "
        f"MyRun(SecAggStrategy): def start(self, **kw): result = super().start(**kw); ...)")


def _chooses_own_nodes(inner: FedAvg) -> bool:
    """Whether the wrapped strategy's ``configure_train`` may choose other nodes than
    FedAvg's uniform sample: any override outside Flower's own FedAvg family (a subclass
    that picks its nodes, or that only steps a schedule: its code cannot be read)."""
    owner = next(c for c in type(inner).__mro__ if "configure_train" in vars(c))
    return owner not in _SAMPLES_AS_FEDAVG


def _check_confidential(inner: FedAvg, dp: DPConfig | None) -> None:
    """Refuse what the model-confidential mode cannot do: any server step that needs the
    plaintext model (the server holds only the masked sum, on which it can only add)."""
    if type(inner).aggregate_train is not FedAvg.aggregate_train:
        raise ConfigurationError(
            f"{type(inner).__name__} applies its own server update (momentum, adaptive steps such as FedAdam's "
            "square roots), which needs the plaintext model; the model-confidential mode can only apply FedAvg's "
            "rule (the new model is the weighted mean of the sites' models). Wrap FedAvg or FedProx.")
    if dp is not None and dp.mode != "none":
        raise ConfigurationError(
            f"DP mode {dp.mode!r} does not combine with the model-confidential mode yet: central DP adds its noise "
            "to the plaintext aggregate, and distributed DP's clip bounds updates while this mode sums whole models")


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
        _check_start(self.inner)
        if config is not None and overrides:
            raise TypeError("pass either a SecAggConfig or keyword overrides, not both")
        self.config = config if config is not None else SecAggConfig(**overrides)
        self._warn_about_metrics()
        if self.config.confidential:
            _check_confidential(self.inner, dp)
        # the rounds themselves: the driver, over the wrapped strategy's hooks (a pipelined
        # round's cohort comes from this class's sample_cohort, which a subclass may override)
        self.driver = RoundDriver(self.config, FlowerLearner(self.inner, self.sample_cohort),
                                  own_nodes=_chooses_own_nodes(self.inner), dp=dp, ledger=ledger,
                                  logger=FLOWER_LOGGER)

    def _warn_about_metrics(self) -> None:
        """Say at construction what the wrapped strategy's metric hooks will receive."""
        fn = self.inner.train_metrics_aggr_fn
        if fn is not aggregate_metricrecords:
            text = (
                f"SecAggStrategy: train_metrics_aggr_fn={getattr(fn, '__name__', fn)!r} will receive ONE reply: "
                "the cohort's securely aggregated weighted means of the numeric train metrics (and "
                f"'{self.inner.weighted_by_key}' = the total weight). Aggregations that need each client's value "
                "(max, min, median, per-client lists) cannot be computed under secure aggregation."
            )
            log(WARNING, "%s", text)
            warnings.warn(text, UserWarning, stacklevel=3)
        fn = self.inner.evaluate_metrics_aggr_fn
        if self.inner.fraction_evaluate > 0 and fn is not aggregate_metricrecords:
            text = (
                f"SecAggStrategy: evaluate_metrics_aggr_fn={getattr(fn, '__name__', fn)!r} will receive ONE reply: "
                "the cohort's securely aggregated weighted means of the numeric evaluation metrics (and "
                f"'{self.inner.weighted_by_key}' = the total num-examples). Aggregations that need each client's "
                "value (max, min, median, per-client lists) cannot be computed under secure aggregation."
            )
            log(WARNING, "%s", text)
            warnings.warn(text, UserWarning, stacklevel=3)

    if not TYPE_CHECKING:  # hidden from mypy, which then still checks this class's own names

        def __getattr__(self, name: str) -> Any:
            """The wrapped strategy's own methods and attributes (``strategy.current_lr()``
            on ``SecAggStrategy(MyFedAvg(...))``), for names this class does not have:
            the wrapper stands where the user's strategy stood. Dunder names and an
            instance without ``inner`` yet (while it is unpickled) are never forwarded."""
            inner = self.__dict__.get("inner")
            if inner is None or name.startswith("__"):
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            try:
                return getattr(inner, name)
            except AttributeError:
                raise AttributeError(f"neither {type(self).__name__} nor the wrapped {type(inner).__name__} has "
                                     f"an attribute {name!r}") from None

    # ------------------------------------------------------------ the driver's state
    @property
    def reports(self) -> list[RoundReport]:
        """The secure training rounds' reports, in order."""
        return self.driver.reports

    @property
    def eval_reports(self) -> list[RoundReport]:
        """The secure evaluation rounds' reports (``sgs_flower/driver/evaluation.py``)."""
        return self.driver.eval_reports

    @property
    def stopped(self) -> str:
        """Why training stopped early (the privacy budget, aborts, no evaluation), if it did."""
        return self.driver.stopped

    @property
    def model_key(self) -> str:
        """Model-confidential mode: the sites' model key id, once agreed."""
        return self.driver.model_key

    @property
    def privacy(self) -> DPAggregator | None:
        return self.driver.privacy

    @property
    def groups(self) -> GroupRule | None:
        """The sites' partition into groups (``SecAggConfig.min_group``), once known."""
        return self.driver.cohorts.groups

    @property
    def ranges(self) -> tuple[float, float]:
        """The next round's ranges (float and integer parts of the delta)."""
        return self.driver.sizing.ranges

    @property
    def weight_scale(self) -> int:
        return self.driver.sizing.weight_scale

    @property
    def retry_error(self) -> float:
        return self.driver.sizing.retry_error

    def field_bits_for(self, cohort_size: int, ahead: bool = False) -> int:
        """The word width of a round outside DP (:meth:`sgs_flower.driver.sizing.Sizing.field_bits_for`)."""
        return self.driver.sizing.field_bits_for(cohort_size, ahead)

    def make_spec(
        self, cohort_size: int, plan: RoundPlan | None, like: list[np.ndarray] | None = None, ahead: bool = False,
        field_bits: int | None = None,
    ) -> UpdateSpec:
        """The round's spec (:meth:`sgs_flower.driver.sizing.Sizing.make_spec`)."""
        return self.driver.sizing.make_spec(cohort_size, plan, like, ahead, field_bits, self.driver.model_key)

    def sample_cohort(self, server_round: int, grid: Grid) -> list[int]:
        """The cohort of round ``server_round`` when it is set up ahead, during the
        previous round; [] sets it up in full instead. Drawn as ``FedAvg.configure_train``
        samples, without calling it (:meth:`sgs_flower.driver.RoundDriver.sample_cohort`
        says why and how). To pipeline a choice of nodes that changes every round,
        override this method (a subclass of ``SecAggStrategy``) with the same choice."""
        return self.driver.sample_cohort(server_round, self._transport(grid))

    def _transport(self, grid: Grid) -> GridTransport:
        return GridTransport(grid, self.config.max_poll_interval)

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
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's ``Strategy.start`` loop (same logs, same ``Result``), each training
        round a secure round, and each federated evaluation one too (the driver's).
        Raises :class:`SecureAggregationFailed` when ``max_consecutive_aborts`` rounds in a
        row abort or all did, :class:`SecureEvaluationUnavailable` when no site's evaluate
        has the mod (no other aborted evaluation stops the run). ``timeout`` is not used:
        each exchange, an evaluation's included, waits up to ``SecAggConfig.stage_timeout``.

        ``first_round`` (ours, not Flower's): the rounds are numbered ``first_round`` ..
        ``first_round + num_rounds - 1``. A site contributes once per (run, round), so a
        second ``start`` in the same run (a benchmark alternating strategies, a training
        continued in the same ServerApp) must number its rounds after the first's."""
        log(INFO, "Starting %s strategy with secure aggregation (SecAgg+):", type(self.inner).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        if self.config.confidential and evaluate_fn is not None:
            raise ConfigurationError(
                "evaluate_fn (server-side evaluation) needs the plaintext global model, which the server never "
                "holds in the model-confidential mode; evaluate on the sites (fraction_evaluate > 0)")
        initial = {k: v.numpy() for k, v in initial_arrays.items()} if self.config.confidential else None
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result(arrays=initial_arrays)
        t_start = time.time()
        if evaluate_fn is not None:
            res = evaluate_fn(0, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        if first_round < 1:
            raise ValueError(f"first_round must be >= 1, got {first_round}")
        last = first_round + num_rounds - 1
        self.driver.begin(last, initial)
        transport = self._transport(grid)
        for server_round in range(first_round, last + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, last)
            if not self._round(transport, server_round, num_rounds, result, train_config, evaluate_config,
                               evaluate_fn):
                break
        self.driver.log_privacy_spent()
        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        self.driver.log_summary()
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    def _round(
        self, transport: GridTransport, server_round: int, num_rounds: int, result: Result,
        train_config: ConfigRecord, evaluate_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> bool:
        """One round of :meth:`start`: the secure training round, then the secure
        evaluation and ``evaluate_fn``, into ``result``; False: training stops here (the
        privacy budget refused the round)."""
        train_config["server-round"] = server_round
        try:
            new_arrays, metrics = self.driver.train_round(transport, server_round, result.arrays, train_config)
        except BudgetExhaustedError as exc:
            self.driver.stop_for_budget(exc)
            return False
        self.driver.count_round(num_rounds)  # raises SecureAggregationFailed after too many aborts
        if new_arrays is not None:
            result.arrays = new_arrays
        if metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            result.train_metrics_clientapp[server_round] = metrics
        evaluate_config["server-round"] = server_round
        # a secure round of its own (sgs_flower/driver/evaluation.py); aggregate_evaluate is
        # asked every round, with no reply when nothing was sent or released
        if (agg := self.driver.evaluate_round(transport, server_round, result.arrays, evaluate_config)) is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", agg)
            result.evaluate_metrics_clientapp[server_round] = agg
        if evaluate_fn is not None:
            log(INFO, "Global evaluation")
            res = evaluate_fn(server_round, result.arrays)
            log(INFO, "\t└──> MetricRecord: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[server_round] = res
                if self.driver.privacy is not None:
                    self.driver.privacy.record_evaluation(
                        server_round, {k: float(v) for k, v in res.items() if isinstance(v, int | float)}
                    )
        return True
