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

The server never sees an individual update, ``num-examples``, train or evaluation metric:
they all travel inside masked vectors. Federated evaluation (``fraction_evaluate > 0``) is
a secure round of its own after each train round (``strategies/secure_eval.py``, five
exchanges): ``aggregate_evaluate`` gets one reply with the weighted means. Strategies
that need individual updates (Krum, median, trimmed mean, Bulyan, q-FedAvg) are refused
at construction.
"""

from __future__ import annotations

import io
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
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

from sgs_flower.confidential.masked_model import (
    WORDS_KEY,
    Layout,
    MaskedModel,
    layout_of,
    zeros_like_layout,
)
from sgs_flower.dp.aggregator import DPAggregator, RoundPlan
from sgs_flower.dp.budget import BudgetExhaustedError
from sgs_flower.dp.config import DPConfig
from sgs_flower.pipeline import (
    DEFAULT_WEIGHT_SCALE,
    DecodedUpdate,
    UpdateSpec,
    adapted_range,
    apply_delta,
    binding_digest,
    covering_range,
    covering_weight_scale,
    decode_update,
    int_size_of,
    narrowest_field_bits,
    retry_spec,
    spec_digest,
    width_error_for,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentAggregateError,
    MalformedMessageError,
    OverflowRiskError,
    ProtocolError,
    ReconstructionError,
    SecAggError,
    ThresholdError,
)
from sgs_flower.secagg.groups import GroupRule
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import ShareBundle, Stage
from strategies import exchange
from strategies.config import SecAggConfig
from strategies.model_key_phase import ensure_model_key
from strategies.report import (
    RoundReport,
    SecureAggregationFailed,
    group_client_errors,
    quiet_single_reply_log,
)
from strategies.secure_eval import secure_evaluate

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


@dataclass
class _Ahead:
    """The next round, set up during the current one: its cohort (drawn by
    :meth:`SecAggStrategy.sample_cohort`, not by the wrapped strategy's
    ``configure_train``, which runs once, when that round starts), its protocol server
    (no model bound yet), and once its keys are shared, the share bundles that go out
    with its masked-input request."""

    server_round: int
    cohort: list[int]
    params: RoundParams
    server: SecAggServer
    report: RoundReport
    bundles: dict[int, ShareBundle] | None = None


class _StillOutOfRange(SecAggError):
    """Values still lay beyond the range after the last retry: nothing is released."""

    def __init__(self, text: str, spec: UpdateSpec, decoded: DecodedUpdate) -> None:
        super().__init__(text)
        self.spec, self.decoded = spec, decoded


#: Bits a round set up ahead may lack at its actual range before it sets up in full
#: (see :meth:`SecAggStrategy._ahead_width`).
AHEAD_SLACK_BITS = 2
#: How much wider than round 1's configured range (times range_margin) round 2's width
#: is sized for (it is set up during round 1, before any range was measured): 4 bits,
#: once per run, so a round 1 whose retries widened the range up to 16x still pipelines
#: round 2 (3 exchanges) at the model_error bound.
UNMEASURED_RANGE_GROWTH = 16.0


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
        self._own_nodes = _chooses_own_nodes(self.inner)  # then a round uses configure_train's nodes
        self._last_chosen: list[int] = []  # the nodes configure_train chose last round
        self._said_full_setup = False  # the INFO line on rounds set up in full for that reason, said once
        self._unwrapped_eval: set[int] = set()  # nodes named in the ERROR on an unwrapped evaluate
        if config is not None and overrides:
            raise TypeError("pass either a SecAggConfig or keyword overrides, not both")
        self.config = config if config is not None else SecAggConfig(**overrides)
        self.reports: list[RoundReport] = []
        self.eval_reports: list[RoundReport] = []  # the secure evaluation rounds (strategies/secure_eval.py)
        self.stopped: str = ""  # why training stopped early (the privacy budget), if it did
        self._ahead: _Ahead | None = None  # the next round, when set up during the current one
        self._num_rounds = 0
        c = self.config
        self.ranges = (c.clip_range, c.int_clip_range)  # the next round's; adapted after each round
        # the next round's weight scale; from the weight histogram after each round
        self.weight_scale = c.weight_scale or min(DEFAULT_WEIGHT_SCALE, c.max_weight)
        self._needed: list[tuple[float, float]] = []  # the ranges each recent round needed (covering ranges)
        self._weights_needed: list[int] = []  # the covering weight scale of each recent round
        self._warn_about_metrics()
        self.model_key = ""  # model-confidential mode: the sites' model key id, once agreed
        self._keyed: set[int] = set()  # nodes known to hold it
        self._layout: Layout = ()  # the plaintext model's entries (names, shapes, dtypes)
        self._said_rounded_up = False  # a pick of configure_train rounded up to whole groups: said once
        # participation in whole groups (issue 29): the sites' partition of the roster, or
        # of the federation learnt at the first round (None until then)
        self.grouped = bool(self.config.min_group)
        self.groups = (GroupRule.of(Roster.load(self.config.roster), self.config.min_group)
                       if self.config.min_group and self.config.roster else None)
        self._identities: dict[int, bytes] = {}  # node id -> identity key, as advertised (to sample by group)
        if self.config.confidential:
            _check_confidential(self.inner, dp)
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
        round a secure round, and each federated evaluation one too (``secure_eval``).
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
        if self.config.confidential:
            if evaluate_fn is not None:
                raise ConfigurationError(
                    "evaluate_fn (server-side evaluation) needs the plaintext global model, which the server never "
                    "holds in the model-confidential mode; evaluate on the sites (fraction_evaluate > 0)")
            if initial_arrays.get(WORDS_KEY) is None:
                self._layout = layout_of([(k, v.numpy()) for k, v in initial_arrays.items()])
            else:
                self._layout = MaskedModel.from_arrays({k: v.numpy() for k, v in initial_arrays.items()}).layout
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        t_start = time.time()
        if evaluate_fn is not None:
            res = evaluate_fn(0, arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        aborted_in_a_row = 0
        if first_round < 1:
            raise ValueError(f"first_round must be >= 1, got {first_round}")
        last = first_round + num_rounds - 1
        self._num_rounds, self._ahead = last, None
        for server_round in range(first_round, last + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, last)
            train_config["server-round"] = server_round
            try:
                new_arrays, metrics = self.secure_round(grid, server_round, arrays, train_config)
            except BudgetExhaustedError as exc:
                self._ahead = None  # a round set up ahead is discarded: nobody trains for it
                self.stopped = str(exc)
                log(WARNING, "%s", exc)
                break
            report = self.reports[-1]
            if report.status == "ok":
                aborted_in_a_row = 0
            else:
                aborted_in_a_row += 1
                limit = self.config.max_consecutive_aborts
                if aborted_in_a_row >= limit or aborted_in_a_row == num_rounds:
                    why = (f"{aborted_in_a_row} secure rounds in a row aborted (max_consecutive_aborts={limit})"
                           if aborted_in_a_row >= limit else f"all {num_rounds} secure rounds aborted")
                    self.stopped = f"{why}; last cause: {report.reason}"
                    log(WARNING, "Stopping: %s", self.stopped)
                    raise SecureAggregationFailed(self.stopped)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
                result.train_metrics_clientapp[server_round] = metrics
            evaluate_config["server-round"] = server_round
            # a secure round of its own (strategies/secure_eval.py); aggregate_evaluate is
            # asked every round, with no reply when nothing was sent or released
            if (agg := secure_evaluate(self, grid, server_round, arrays, evaluate_config)) is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg)
                result.evaluate_metrics_clientapp[server_round] = agg
            if evaluate_fn is not None:
                log(INFO, "Global evaluation")
                res = evaluate_fn(server_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
                    if self.privacy is not None:
                        self.privacy.record_evaluation(
                            server_round, {k: float(v) for k, v in res.items() if isinstance(v, int | float)}
                        )
        if self.privacy is not None:
            spent = self.privacy.spent()
            log(INFO, "privacy spent: epsilon %.4g against model consumers, %.4g against the server (delta %g)",
                spent.consumer, spent.server, self.privacy.dp.delta)
        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        ok = sum(r.status == "ok" for r in self.reports)
        log(INFO, "Secure rounds: %d ok, %d not ok%s", ok, len(self.reports) - ok,
            "".join(f"; round {r.server_round} {r.status}: {r.reason}" for r in self.reports if r.status != "ok"))
        if self.eval_reports:
            ok = sum(r.status == "ok" for r in self.eval_reports)
            log(INFO, "Secure evaluations: %d ok, %d not ok%s", ok, len(self.eval_reports) - ok, "".join(
                f"; round {r.server_round} {r.status}: {r.reason}" for r in self.eval_reports if r.status != "ok"))
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    @property
    def retry_error(self) -> float:
        """The quantization bound (fraction of the range) above which a round retries at a
        finer weight scale: ``target_error``, or with a width chosen per round the
        ``width_error`` it was chosen for (a finer bound than the width holds would
        retry every round for nothing)."""
        c = self.config
        return c.target_error if c.field_bits else max(c.target_error, c.width_error)

    def field_bits_for(self, cohort_size: int, ahead: bool = False) -> int:
        """The word width of a round outside DP (``field_bits``, else chosen).

        Before any round has measured the weights (no weight histogram yet, no
        configured ``weight_scale``), the sites' weights may lie far below the initial
        weight scale S, and the bound grows as S / weight: that round is sized for
        weight 1 (``width_error / S``), so it needs no retry at a finer scale; later
        rounds know S within a factor 2 of the largest weight. A round set up ahead
        (``ahead``) is used only if the current round succeeds, which measures them.
        The bound is also at most ``model_error`` in the model's units at the next
        round's range (:func:`~sgs_flower.pipeline.width_error_for`)."""
        c = self.config
        if c.field_bits:
            return c.field_bits
        # a round set up ahead takes its width before this round's range adapts. Once a
        # round has measured the range it is sized for this range (in the steady state the
        # range stays; a doubling costs that one round a bound of 2x model_error, within
        # AHEAD_SLACK_BITS, rather than a bit in every round); while none has (round 1's
        # range is a guess, which a retry may widen many times over) for
        # UNMEASURED_RANGE_GROWTH times range_margin times it
        grow = 1.0
        if ahead and c.adaptive_range and not self._needed:
            grow = c.range_margin * UNMEASURED_RANGE_GROWTH
        scale = 1.0
        if c.max_weight > 1 and not self._weights_needed and c.weight_scale is None and not ahead:
            scale = float(min(self.weight_scale, c.max_weight))
        try:
            return narrowest_field_bits(
                cohort_size, c.max_weight, width_error_for(grow * self.ranges[0], c.width_error, c.model_error) / scale)
        except OverflowRiskError:
            # a range so wide (a huge outlier widened it) that model_error needs more than
            # 64-bit words: the round keeps width_error of the range, and says so
            log(WARNING, "a range of +-%g needs more than 64-bit words to hold model_error=%g; this round is "
                "sized for width_error=%g of the range instead", grow * self.ranges[0], c.model_error, c.width_error)
            return narrowest_field_bits(cohort_size, c.max_weight, c.width_error / scale)

    def _ahead_width(self, ahead: _Ahead | None, cohort_size: int, plan: RoundPlan | None) -> int | None:
        """The width of a round set up ahead, kept while it holds this round's bound within
        :data:`AHEAD_SLACK_BITS` bits at the range this round now has; None: the width is
        chosen afresh (the round then sets up in full if that changes its parameters).

        Why a slack: the setup fixed the width one round early, before that round's range
        adapted (and before any retry widened it), and setting up again costs two more
        exchanges, which a deployment feels far more than one round's bound at up to 4x
        the target (reported as it is; the next round is sized from the new range)."""
        if ahead is None or plan is not None or self.config.field_bits:
            return None
        bits = ahead.params.field_bits
        return bits if bits + AHEAD_SLACK_BITS >= self.field_bits_for(cohort_size) else None

    def make_spec(
        self, cohort_size: int, plan: RoundPlan | None, like: list[np.ndarray] | None = None, ahead: bool = False,
        field_bits: int | None = None,
    ) -> UpdateSpec:
        """The round's spec. Outside DP its word width is the narrowest that holds the
        cohort's sum at ``width_error`` times the range (unless ``field_bits`` fixes it):
        the cohort size is known here, before the round's setup carries the width. Under
        DP the width is the plan's (:class:`~sgs_flower.dp.aggregator.DPAggregator`: the
        narrowest that holds the sum and its noise, unless ``field_bits`` fixes it)."""
        c = self.config
        if plan is None:
            return UpdateSpec(
                clip_range=self.ranges[0], int_clip_range=self.ranges[1], max_cohort=cohort_size,
                max_weight=c.max_weight, weight_scale=min(self.weight_scale, c.max_weight),
                field_bits=field_bits or self.field_bits_for(cohort_size, ahead),
                metric_slots=0 if c.confidential else c.metric_slots,
                metric_range=c.metric_range, metric_ranges=tuple(sorted(c.metric_ranges.items())),
                int_size=int_size_of(like) if like is not None else 0, model_key=self.model_key,
            )
        # Under DP: unweighted, no released metrics or counters, the DP plan's clip and fixed point.
        return UpdateSpec(max_cohort=cohort_size, max_weight=1, field_bits=plan.field_bits, metric_slots=0,
                          **plan.spec_fields)

    def _nodes_needed(self) -> int:
        """SuperNodes that must be connected before a round is sampled: the wrapped
        strategy's minimums, and never fewer than a secure sum needs."""
        inner = self.inner
        return max(inner.min_available_nodes, inner.min_train_nodes, self.config.min_clients or 3)

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
        """One secure round. Its keys and shares were exchanged during the previous round
        when that round set it up ahead (three exchanges: masked input, consistency,
        unmask); otherwise (the first round, after an aborted round, or when the advance
        setup failed) it sets up in full first (five exchanges). While it runs, it sets
        the next round up ahead, on its own consistency and unmask exchanges."""
        t0 = time.monotonic()
        inner = self.inner
        self._wait_for_nodes(grid, self._nodes_needed())
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.server_round != server_round:
            ahead = None
        # The round's one configure_train call, made now that its model exists: for the
        # model and config it sends and the strategy's own bookkeeping (FedOpt keeps the
        # arrays it is given as the model its aggregate_train steps from; a subclass may
        # step a learning-rate schedule: its config goes out with the masked-input request,
        # pipelined or not). Which nodes train: :meth:`_round_cohort`.
        instructions = list(inner.configure_train(server_round, arrays, train_config, grid))
        cohort, report, ahead = self._round_cohort(server_round, instructions, ahead, grid)
        self.reports.append(report)
        a_key, c_key = inner.arrayrecord_key, inner.configrecord_key
        model = instructions[0].content.array_records[a_key] if instructions else arrays
        cfg = instructions[0].content.config_records.get(c_key, ConfigRecord()) if instructions else ConfigRecord()
        named = [(k, v.numpy()) for k, v in model.items()]
        # in the model-confidential mode ``model`` is the masked model (or round 1's initial
        # model); the vector's layout follows the plaintext model's entries
        like = zeros_like_layout(self._layout) if self.config.confidential else [a for _, a in named]
        model_size = int(sum(a.size for a in like))
        plan = None
        if len(cohort) < 2:
            return self._abort(report, f"round {server_round} not run: {len(cohort)} clients sampled", t0, None)
        if self.config.confidential:
            self._key_cohort(grid, cohort)
        if self.privacy is not None:  # refuses (BudgetExhaustedError) before this round's training
            try:
                plan = self.privacy.plan(server_round, len(cohort), len(list(grid.get_node_ids())), model_size)
            except BudgetExhaustedError as exc:
                report.status, report.reason = "budget-exhausted", str(exc)
                raise
        try:
            spec = self.make_spec(len(cohort), plan, like, field_bits=self._ahead_width(ahead, len(cohort), plan))
            params = self._round_params(grid, server_round, cohort, spec, model_size, plan)
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

        if ahead is not None and (ahead.params != params or ahead.bundles is None):
            log(WARNING, "secure round %s: the setup made during the previous round no longer fits its "
                "parameters; setting it up in full", server_round)
            ahead = None
        if ahead is not None:
            server = ahead.server
            server.groups = server.groups or self.groups  # learnt during the round it was set up in
            server.bind_model(digest)  # masks are keyed with the model this request carries
            report.pipelined = True
        else:
            server = SecAggServer(params, bound_digest=digest, groups=self.groups, min_group=self.config.min_group)
        # The model travels once, with the masked-input request (where training happens);
        # its digest keys the masks, so a client given another model cannot unmask.
        train_extra: dict[str, ArrayRecord | ConfigRecord] = {
            a_key: model,
            c_key: cfg,
            wire.SPEC_KEY: ConfigRecord(spec.to_config()),
        }
        keys_fields = {"arrays-key": a_key, "config-key": c_key, "weight-key": inner.weighted_by_key}
        names: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        report.clip_range, report.int_clip_range = spec.clip_range, spec.int_clip_range
        nxt: _Ahead | None = None
        try:
            if ahead is not None and ahead.bundles is not None:
                bundles = ahead.bundles
            else:
                replies, _ = self._exchange(grid, server_round, Stage.ADVERTISE_KEYS, server.setup_messages(), report)
                rosters = server.collect_keys(replies)
                bundles = server.collect_shares(self._exchange(grid, server_round, Stage.SHARE_KEYS, rosters, report)[0])
            requests = server.collect_masked(
                self._exchange(grid, server_round, Stage.MASKED_INPUT, bundles, report, train_extra, keys_fields, names)[0]
            )
            # the next round is set up on this round's consistency and unmask exchanges
            nxt = self._prepare_ahead(grid, server_round + 1, like, model_size)
            replies, advertised = self._exchange(
                grid, server_round, Stage.CONSISTENCY, requests, report,
                ahead=nxt, ahead_parts=nxt.server.setup_messages() if nxt else None,
            )
            unmask = server.collect_consistency(replies)
            next_rosters = self._ahead_step(nxt, lambda a: a.server.collect_keys(advertised))
            if next_rosters is None:
                nxt = None
            replies, shared = self._exchange(grid, server_round, Stage.UNMASK, unmask, report, ahead=nxt,
                                             ahead_parts=next_rosters)
            outcome = server.collect_unmask(replies)
            if nxt is not None:
                nxt.bundles = self._ahead_step(nxt, lambda a: a.server.collect_shares(shared))
            report.survivors = list(outcome.survivors)
            metric_names = self._metric_names(names, report.survivors, report) if spec.metric_slots else None
            decoded = decode_update(outcome.total, spec, len(outcome.survivors), model_size, metric_names)
            total = outcome.total
            if plan is None:
                spec, decoded, total = self._retry(grid, server_round, server, spec, decoded, report, model_size,
                                                   metric_names, total)
        except _StillOutOfRange as exc:
            self._fill(report, server)
            self._range_report(report, exc.spec, exc.decoded, like)
            return self._abort(report, str(exc), t0, plan, status="out-of-range")
        except InconsistentAggregateError as exc:
            self._fill(report, server)
            return self._abort(report, str(exc), t0, plan, status="inconsistent")
        except (ThresholdError, ReconstructionError) as exc:
            self._fill(report, server)
            return self._abort(report, str(exc), t0, plan)
        except SecAggError as exc:  # anything else a client could provoke ends the round, not the server
            self._fill(report, server)
            return self._abort(report, f"{type(exc).__name__}: {exc}", t0, plan)
        if nxt is not None and nxt.bundles is not None:
            self._ahead = nxt  # used by the next round only if this one succeeds
            report.next_round_set_up = True
        self._fill(report, server)
        report.total_weight = decoded.total_weight
        unusable = self._unusable(report, decoded, plan)
        if plan is not None and self.privacy is not None:
            report.field_bits = spec.field_bits  # the plan's width (_range_report fills it outside DP)
            # noise (central), account and write the ledger BEFORE the aggregate is used
            # (also when it is then not applied: the server has computed the sum)
            groups = ({"groups": list(report.groups), "group_excluded": report.group_excluded,
                       "min_group": self.config.min_group} if self.groups is not None else None)
            mean_delta = self.privacy.release(plan, decoded.weighted_delta_sum, decoded.count,
                                              len(cohort) - decoded.count, groups=groups)
        else:
            mean_delta = decoded.mean_delta
            if not unusable:
                self._range_report(report, spec, decoded, like)
        if unusable:
            return self._abort(report, unusable, t0, plan, record=plan is None)
        if self.config.confidential:
            return self._masked_result(report, server_round, grid, spec, total, t0, len(cohort))
        # each entry in its own dtype and shape (integer counters rounded, 0-d kept 0-d)
        new_named = apply_delta(like, mean_delta)
        aggregate = ArrayRecord({k: Array(a) for (k, _), a in zip(named, new_named, strict=True)})
        metrics = MetricRecord({inner.weighted_by_key: decoded.total_weight, **decoded.metrics})
        reply = Message(RecordDict({a_key: aggregate, "metrics": metrics}), reply_to=instructions[0])
        with quiet_single_reply_log():
            new_arrays, new_metrics = inner.aggregate_train(server_round, [reply])
        if new_arrays is not None:  # keep the model's dtypes and shapes (FedAvg's weighted sum may upcast)
            new_arrays = ArrayRecord({
                k: Array(np.asarray(np.rint(v) if np.issubdtype(a.dtype, np.integer) else v).astype(a.dtype, copy=False)
                         .reshape(a.shape))
                for (k, a), v in zip(named, (np.asarray(new_arrays[k].numpy()) for k, _ in named), strict=True)
            })
        report.status = "ok"
        report.seconds = time.monotonic() - t0
        log(
            INFO, "secure round %s: %d/%d clients aggregated (total weight %d) in %.2f s",
            server_round, len(report.survivors), len(cohort), decoded.total_weight, report.seconds,
        )
        if report.dropped:
            log(INFO, "secure round %s: dropped %s; client errors: %s", server_round, report.dropped,
                group_client_errors(report.client_errors) or "none")
        return new_arrays, new_metrics

    def _round_cohort(
        self, server_round: int, instructions: list[Message], ahead: _Ahead | None, grid: Grid,
    ) -> tuple[list[int], RoundReport, _Ahead | None]:
        """The round's cohort, its report, and the advance setup it uses (None: it sets up
        in full).

        A strategy that samples as FedAvg does keeps the cohort drawn for the round during
        the previous one (configure_train's draw is just another uniform sample of the
        same size). One whose ``configure_train`` may choose its nodes itself (an override
        outside Flower's FedAvg family) has its choice honoured: the advance setup is used
        only when it was made for exactly those nodes, else the round sets up in full from
        configure_train's nodes (five exchanges instead of three; said once per run)."""
        chosen = sorted({m.metadata.dst_node_id for m in instructions})
        self._last_chosen = chosen
        if self.grouped and instructions and self._own_nodes and self.groups is not None:
            # a pick of its own, under participation in whole groups: rounded up to the
            # whole groups of the picked nodes (a part of a group could never be summed)
            cohort = self._whole_groups_of(chosen, list(grid.get_node_ids()))
            if set(cohort) != set(chosen) and not self._said_rounded_up:
                self._said_rounded_up = True
                log(INFO, "secure round %s: %s.configure_train picked %d nodes; participation in whole groups "
                    "(SecAggConfig.min_group=%d) rounds that up to the whole groups they are in: %d nodes (set "
                    "min_group=0, and the sites' sgs-min-group=0, to use a pick as it is and give up the "
                    "protection across rounds). Said once.", server_round, type(self.inner).__name__, len(chosen),
                    self.config.min_group, len(cohort))
            if ahead is not None and set(ahead.cohort) == set(cohort):
                return list(ahead.cohort), ahead.report, ahead
            return cohort, RoundReport(server_round, "aborted", cohort=cohort), None
        if self.grouped and instructions:
            # participation in whole groups: the cohort is whole groups (the advance setup
            # drew it the same way), never configure_train's uniform draw of single nodes;
            # while the groups are not learnt yet, every connected node
            if ahead is not None:
                return list(ahead.cohort), ahead.report, ahead
            cohort = self._group_cohort(list(grid.get_node_ids())) or chosen
            return cohort, RoundReport(server_round, "aborted", cohort=sorted(cohort)), None
        if ahead is not None and instructions:
            if set(ahead.cohort) == set(chosen):
                return list(ahead.cohort), ahead.report, ahead
            if not self._own_nodes:
                log(INFO, "secure round %s: its cohort of %d was sampled during round %s (set up ahead); "
                    "configure_train's own (uniform) sample is not used", server_round, len(ahead.cohort),
                    server_round - 1)
                return list(ahead.cohort), ahead.report, ahead
            if not self._said_full_setup:
                self._said_full_setup = True
                log(INFO, "secure round %s: %s.configure_train chose other nodes than the cohort set up ahead during "
                    "round %s; its choice is honoured: such a round is set up in full from configure_train's nodes "
                    "(5 exchanges instead of 3; a round whose nodes it chose as in the round before stays "
                    "pipelined). Said once.", server_round, type(self.inner).__name__, server_round - 1)
        cohort = [m.metadata.dst_node_id for m in instructions]
        return cohort, RoundReport(server_round, "aborted", cohort=sorted(cohort)), None

    def _round_params(
        self, grid: Grid, server_round: int, cohort: list[int], spec: UpdateSpec, model_size: int,
        plan: RoundPlan | None,
    ) -> RoundParams:
        min_clients = self.config.min_clients
        if plan is not None:  # fewer survivors would carry less noise than promised
            min_clients = max(min_clients or 3, plan.min_survivors)
        return RoundParams(
            run_id=grid.run.run_id, round_id=server_round, cohort=tuple(cohort),
            vector_length=spec.vector_length(model_size), field_bits=spec.field_bits,
            degree=self.config.degree, threshold=self.config.threshold, min_clients=min_clients,
            consistency=self.config.consistency,
        )

    def sample_cohort(self, server_round: int, grid: Grid) -> list[int]:
        """The cohort of round ``server_round`` when it is set up ahead, during the
        previous round (after that round's masked inputs are summed); [] sets it up in
        full instead.

        Drawn as ``FedAvg.configure_train`` samples, with the wrapped strategy's own
        parameters: ``max(int(fraction_train * connected), min_train_nodes)`` of the
        connected nodes, uniformly without replacement (Python's ``random``, as Flower's
        ``sample_nodes``), and none below ``min_available_nodes``, but without calling
        ``configure_train``. That call needs the round's model, which exists only after
        the previous round's aggregate; calling it early (with the previous model) would
        run its side effects twice per round, or, kept as the round's only call, hand
        FedOpt the wrong model to step from. So ``configure_train`` runs once, when the
        round starts, and a pipelined round ignores the nodes it sampled.

        A strategy whose ``configure_train`` may choose its nodes itself (an override
        outside Flower's FedAvg family) is taken to choose as it did last round (the
        same nodes, all still connected; else []): a round it then chooses that way
        stays pipelined, any other choice is honoured by a full setup
        (:meth:`_round_cohort`). To pipeline a choice that changes every round, override
        this method (a subclass of ``SecAggStrategy``) with the same choice."""
        inner = self.inner
        nodes = list(grid.get_node_ids())  # one snapshot: never waits mid-round
        if inner.fraction_train == 0.0 or len(nodes) < self._nodes_needed():
            return []
        if self.grouped and self._own_nodes and self.groups is not None:  # its last pick, up to whole groups
            return self._whole_groups_of(self._last_chosen, nodes) if set(self._last_chosen) <= set(nodes) else []
        if self.grouped:
            return self._group_cohort(nodes)
        if self._own_nodes:
            return list(self._last_chosen) if set(self._last_chosen) <= set(nodes) else []
        size = max(int(len(nodes) * inner.fraction_train), inner.min_train_nodes)
        return sorted(random.sample(nodes, size)) if size <= len(nodes) else []

    def _whole_groups_of(self, picked: list[int], nodes: list[int]) -> list[int]:
        """``picked`` with the other connected members of each group a picked node is in
        (nodes of unknown identity kept as picked: a partial group is left out by the
        server)."""
        rule, known = self.groups, self._identities
        assert rule is not None
        by_key = {known[v]: v for v in nodes if v in known}
        touched = {rule.group_of[known[v]] for v in picked if known.get(v) in rule.group_of}
        return sorted(set(picked) | {by_key[k] for g in touched for k in rule.groups[g] if k in by_key})

    def _group_cohort(self, nodes: list[int], evaluate: bool = False) -> list[int]:
        """Participation in whole groups (``SecAggConfig.min_group``): a cohort of whole
        groups, ``fraction_train`` (``fraction_evaluate`` for an evaluation round) of the
        groups whose every roster member is a connected node of known identity (at least
        ``min_train_nodes`` / ``min_evaluate_nodes`` nodes' worth), drawn
        uniformly; plus every connected node whose identity is not known yet (learnt at
        its first advertisement; a partial group is left out by the server). While no
        identity is known, every connected node."""
        rule, known = self.groups, self._identities
        if rule is None:  # the federation is learnt at the first round: all of it takes part
            return sorted(nodes)
        by_key = {known[v]: v for v in nodes if v in known}
        unknown = sorted(v for v in nodes if v not in known)
        complete = [sorted(by_key[k] for k in g) for g in rule.groups if g <= by_key.keys()]
        if not complete:
            return sorted(nodes)
        inner = self.inner
        fraction, least = ((inner.fraction_evaluate, inner.min_evaluate_nodes) if evaluate
                           else (inner.fraction_train, inner.min_train_nodes))
        want = max(int(len(complete) * fraction), -(-least // rule.min_group), 1)
        picked = random.sample(complete, min(want, len(complete)))
        return sorted({v for g in picked for v in g} | set(unknown))

    def _prepare_ahead(
        self, grid: Grid, server_round: int, like: list[np.ndarray], model_size: int,
    ) -> _Ahead | None:
        """Set round ``server_round`` up during the previous one, or say why not (None).

        Its cohort comes from :meth:`sample_cohort` (no hook of the wrapped strategy is
        called; its model and config go out with its masked-input request, from its one
        ``configure_train`` call when it starts). Under DP its budget plan is checked
        here, and again before it trains."""
        if server_round > self._num_rounds:
            return None
        cohort = sorted(set(self.sample_cohort(server_round, grid)))
        if len(cohort) < 2:
            return None
        log(INFO, "round %s: cohort of %d nodes drawn for its setup ahead", server_round, len(cohort))
        plan = None
        try:
            if self.privacy is not None:
                plan = self.privacy.plan(server_round, len(cohort), len(list(grid.get_node_ids())), model_size)
            spec = self.make_spec(len(cohort), plan, like, ahead=True)
            params = self._round_params(grid, server_round, cohort, spec, model_size, plan)
        except (BudgetExhaustedError, ValueError) as exc:  # ConfigurationError is a ValueError
            log(INFO, "round %s is not set up ahead: %s", server_round, exc)
            return None
        return _Ahead(server_round, cohort, params, SecAggServer(params, bound_digest=None, groups=self.groups,
                                                                  min_group=self.config.min_group),
                      RoundReport(server_round, "aborted", cohort=cohort))

    def _ahead_step(self, ahead: _Ahead | None, step: Callable[[_Ahead], Any]) -> Any:
        """One stage of the round set up ahead; a failure (too few keys or shares) only
        means that round will set up in full (None)."""
        if ahead is None:
            return None
        try:
            return step(ahead)
        except SecAggError as exc:
            log(INFO, "round %s could not be set up ahead (it will be in full): %s", ahead.server_round, exc)
            self._fill(ahead.report, ahead.server)
            return None

    def _metric_names(
        self, names: Mapping[int, tuple[tuple[str, ...], tuple[str, ...]]], survivors: list[int], report: RoundReport
    ) -> list[str] | None:
        """The slot names every survivor reported, or None (metrics dropped, with a warning)."""
        seen = Counter(names.get(u, ((), ()))[0] for u in survivors)
        left_out = sorted({n for u in survivors for n in names.get(u, ((), ()))[1]})
        if left_out:
            log(WARNING, "secure round %s: train metrics %s not aggregated (more than metric_slots=%d numeric "
                "metrics, or not numbers); raise SecAggConfig.metric_slots", report.server_round, left_out,
                self.config.metric_slots)
        if len(seen) == 1:
            return list(next(iter(seen)))
        report.metrics_dropped = "survivors reported different train metric names: " + "; ".join(
            f"{n} x {list(k)}" for k, n in seen.most_common())
        log(WARNING, "secure round %s: no train metrics released: %s", report.server_round, report.metrics_dropped)
        return None

    def _retry(
        self, grid: Grid, server_round: int, server: SecAggServer, spec: UpdateSpec, decoded: DecodedUpdate,
        report: RoundReport, model_size: int, metric_names: list[str] | None, total: np.ndarray,
    ) -> tuple[UpdateSpec, DecodedUpdate, np.ndarray]:
        """Retry the masked input (at most ``wire.MAX_RETRIES`` times) while the unmasked sum
        holds values beyond the range or weights above the weight scale, or the scale is
        too coarse for the cohort's weights; one exchange each, with the same survivors,
        their kept updates re-encoded (never retrained). Returns the spec and the decoded
        sum to release; raises :class:`_StillOutOfRange` if values still lay beyond the
        range after the last retry (nothing is released)."""
        while True:
            new, why = retry_spec(spec, decoded, self.retry_error)
            if new is None:
                return spec, decoded, total
            if server.retries >= wire.MAX_RETRIES:
                if decoded.clipped[0] or decoded.clipped[1] or decoded.weights_over_scale:
                    raise _StillOutOfRange(
                        f"after {server.retries} retries the unmasked sum still holds values beyond the range "
                        f"({'; '.join(why)}): nothing is released; the next round starts at the wider range",
                        spec, decoded,
                    )
                return spec, decoded, total  # only precision left: the reported bound holds
            report.retries += 1
            report.retry_reasons.append("; ".join(why))
            log(WARNING if decoded.clipped[0] or decoded.clipped[1] or decoded.weights_over_scale else INFO,
                "secure round %s: retry %d of the masked input (%s) at range +-%g (integer entries +-%g), weight "
                "scale %d: nothing is released before every value fits", server_round, report.retries,
                "; ".join(why), new.clip_range, new.int_clip_range, new.weight_unit)
            requests = server.retry_messages()
            replies, _ = self._exchange(grid, server_round, Stage.RETRY, requests, report,
                                        {wire.SPEC_KEY: ConfigRecord(new.to_config())})
            outcome = server.collect_retry(replies, spec_digest(new))
            spec = new
            report.clip_range, report.int_clip_range = spec.clip_range, spec.int_clip_range
            total = outcome.total
            decoded = decode_update(total, spec, len(outcome.survivors), model_size, metric_names)

    def _key_cohort(self, grid: Grid, cohort: list[int]) -> None:
        """Model-confidential mode: make sure the cohort holds the sites' model key (the
        key phase, :mod:`strategies.model_key_phase`; no exchange when it already does).
        The first time every connected node is asked, so later cohorts need none."""
        missing = set(cohort) - self._keyed
        if not missing:
            return
        ask = set(grid.get_node_ids()) | missing if not self.model_key else missing
        res = ensure_model_key(grid, ask, grid.run.run_id, self.config.stage_timeout, self.config.max_poll_interval,
                               want=self.model_key)
        self.model_key = res.key_id
        self._keyed |= res.holders
        if not self.model_key:
            raise ConfigurationError(f"no site could make the model key: {res.errors}")

    def _masked_result(
        self, report: RoundReport, server_round: int, grid: Grid, spec: UpdateSpec, total: np.ndarray,
        t0: float, cohort_size: int,
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Model-confidential mode: the new global model is the masked sum itself (FedAvg's
        rule, the weighted mean, is taken at the sites when they unmask it)."""
        masked = MaskedModel(words=np.asarray(total), run_id=grid.run.run_id, round_id=server_round,
                             attempt=report.retries, survivors=tuple(sorted(report.survivors)),
                             key_id=self.model_key, spec=spec, layout=self._layout)
        report.status = "ok"
        report.seconds = time.monotonic() - t0
        log(INFO, "secure round %s: %d/%d clients aggregated (total weight %d) in %.2f s; the new global model is "
            "held masked under model key %s", server_round, len(report.survivors), cohort_size, report.total_weight,
            report.seconds, self.model_key)
        arrays = ArrayRecord({k: Array(v) for k, v in masked.to_arrays().items()})
        return arrays, MetricRecord({self.inner.weighted_by_key: report.total_weight})

    def _range_report(self, report: RoundReport, spec: UpdateSpec, decoded: DecodedUpdate, like: list[np.ndarray]) -> None:
        """Log what clipping did this round and adapt the ranges for the next one."""
        n = len(report.survivors)
        int_size = spec.int_size
        float_size = int(sum(a.size for a in like)) - int_size
        report.clipped = sum(decoded.clipped)
        report.clipped_fraction = report.clipped / max(1, n * (float_size + int_size))
        report.error_bound = decoded.error_bound
        report.metric_clipped = {
            name: decoded.metric_clipped[i] for i, name in enumerate(decoded.metrics) if decoded.metric_clipped[i]
        }
        # the bound next to the scale of what it bounds: the released mean update's RMS
        # (the server holds it anyway), so a user reads how coarse the round really was
        rms = float(np.sqrt(np.mean(np.square(decoded.mean_delta[:float_size])))) if float_size else 0.0
        report.update_rms = rms
        log(INFO, "secure round %s: %d of %d coordinates beyond the range +-%g (integer entries +-%g), weight "
            "scale %d, %d retries, %d-bit words; quantization error <= %.3g per coordinate (%.2g of the mean "
            "update's RMS %.3g)", report.server_round, report.clipped, n * (float_size + int_size), spec.clip_range,
            spec.int_clip_range, spec.weight_unit, report.retries, spec.field_bits, decoded.error_bound,
            decoded.error_bound / rms if rms > 0 else float("inf"), rms)
        if report.clipped:
            log(WARNING, "secure round %s: %d coordinates lay beyond the range even after %d retries: nothing is "
                "released this round", report.server_round, report.clipped, report.retries)
        for name, k in report.metric_clipped.items():
            log(WARNING, "secure round %s: train metric %r of %d clients lay beyond +-%g and was clipped; set "
                "SecAggConfig(metric_ranges={%r: ...})", report.server_round, name, k, spec.range_of(name), name)
        report.weight_scale = spec.weight_unit
        report.field_bits = spec.field_bits
        if decoded.total_weight > 0:  # the weight histogram counts only usable updates
            self._weights_needed.append(covering_weight_scale(spec.max_weight, decoded.weight_histogram))
            self.weight_scale = max(self._weights_needed[-self.config.range_memory:])
        if self.config.adaptive_range:
            # what this round needed (every summed value below it), then the next round's range:
            # a margin over the largest need of the last ``range_memory`` rounds, so one quiet
            # round never narrows the range below what the rounds before it needed
            self._needed.append((
                covering_range(spec.clip_range, decoded.histograms[0]) if float_size else spec.clip_range,
                covering_range(spec.int_clip_range, decoded.histograms[1]) if int_size else spec.int_clip_range,
            ))
            recent = self._needed[-self.config.range_memory:]
            # model-confidential: the in-range bins are masked, so a need is never below the
            # range: the range only widens (no margin, else it would double every round)
            margin = 1.0 if self.config.confidential else self.config.range_margin
            # a part the model does not have keeps its range: its "need" is the range itself,
            # which the margin would otherwise double every round (+-1024 became +-524288
            # over the app's 10 rounds, which has no integer entries)
            self.ranges = (
                adapted_range([f for f, _ in recent], spec.clip_range, margin) if float_size else spec.clip_range,
                adapted_range([i for _, i in recent], spec.int_clip_range, margin) if int_size else spec.int_clip_range,
            )
            log(INFO, "secure round %s: next round's range +-%g (integer entries +-%g), weight scale %d",
                report.server_round, *self.ranges, self.weight_scale or spec.max_weight)

    def _unusable(self, report: RoundReport, decoded: DecodedUpdate, plan: RoundPlan | None) -> str:
        """Why this round's aggregate must not be applied (empty: it can be): no
        survivor's update could be used, or under DP most could not (a noisy count).
        Survivors that failed are counted inside the masked vector by reason, so the
        server learns how many failed and why, never which site."""
        n = len(report.survivors)
        report.failures = dict(decoded.failures)
        report.failed_estimate = decoded.failed_estimate
        if plan is None:
            if not report.failures:
                return ""
            reasons = ", ".join(f"{k} x {r}" for r, k in report.failures.items())
            if decoded.total_weight == 0:
                return f"no survivor's update could be used ({reasons}; the sites' logs say more)"
            log(WARNING, "secure round %s: %d of %d survivors' updates could not be used and count with weight 0 "
                "(%s; the sites' logs say more)", report.server_round, sum(report.failures.values()), n, reasons)
            return ""
        # Under distributed DP the count carries the round's noise (std ``failed_std``): only
        # a count beyond half the survivors by 4 std is taken as most sites having failed.
        est, std = decoded.failed_estimate, decoded.failed_std
        if est - 4 * std > n / 2:
            return (f"about {est:.1f} (noise std {std:.2g}) of {n} survivors' updates could not be used (a "
                    "noisy count under DP; the sites' logs say why): the aggregate is not applied")
        if est - 3 * std >= 1:
            log(WARNING, "secure round %s: about %.1f (noise std %.2g) of %d survivors' updates could not be used "
                "(a noisy count under DP); they count as zero updates", report.server_round, est, std, n)
        return ""

    def _fill(self, report: RoundReport, server: SecAggServer) -> None:
        self._identities.update((v, a.identity_key) for v, a in server.advertised.items())
        if self.groups is None and server.groups is not None:  # learnt at the first round, as the sites learn it
            self.groups = server.groups
            log(INFO, "round %s: no roster, so the federation is the %d sites of this round's cohort (learnt on "
                "first use, as each site learns it): %d groups of at least %d (SecAggConfig.min_group); later "
                "sites are never in a whole group (pin a roster to add sites)", report.server_round,
                len(server.groups.roster), len(server.groups.groups), server.groups.min_group)
        if self.groups is not None and report.survivors and not report.groups:
            report.groups = sorted({self.groups.group_of[k] for v in report.survivors
                                    if (k := self._identities.get(v)) in self.groups.group_of})
            total = len(self.groups.groups)
            missing = sorted(set(range(total)) - set(report.groups))
            shown = ("every group" if not missing else "not in it: groups " + ", ".join(map(str, missing[:10]))
                     + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
            log(INFO, "round %s: a sum over %d whole groups of the federation's %d (%s; SecAggConfig.min_group=%d)",
                report.server_round, len(report.groups), total, shown, self.groups.min_group)
        report.dropped = {n: s.name for n, s in server.dropped.items()}
        report.rejected.update({n: f"{type(e).__name__}: {e}" for n, e in server.rejected.items()})
        if server.group_excluded and not report.group_excluded:
            report.group_excluded = len(server.group_excluded)
            log(WARNING, "round %s: %d updates left out of the sum with their group, a member of which sent no "
                "masked input (SecAggConfig.min_group=%d: a sum is over whole groups only)", report.server_round,
                report.group_excluded, self.config.min_group)

    def _abort(
        self, report: RoundReport, reason: str, t0: float, plan: RoundPlan | None, status: str = "aborted",
        record: bool = True,
    ) -> tuple[None, None]:
        report.status = status
        if report.client_errors:
            reason = f"{reason} (client errors: {group_client_errors(report.client_errors)})"
            if "survivor set splits" in reason:  # the sites' groups are not the server's
                reason += (f" (the sites hold another partition into groups than this server, min_group="
                           f"{self.config.min_group}, roster={self.config.roster!r}: give the server the roster file "
                           "the sites pin, SecAggConfig(roster=...) or run-config roster=..., and the sites' "
                           "sgs-min-group as min_group)")
        report.reason = reason
        report.seconds = time.monotonic() - t0
        log(WARNING, "secure round %s %s, global model unchanged: %s", report.server_round, status, reason)
        if self.privacy is not None and record:
            self.privacy.abort(plan, report.server_round, len(report.cohort), len(report.survivors), f"{status}: {reason}")
        # Asked once per round as in Flower's loop, here with no reply: nothing was
        # released (FedAvg and its optimizers return None and change no state). Whatever
        # it returns is not used: an aborted round leaves the global model unchanged.
        self.inner.aggregate_train(report.server_round, [])
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
        names: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
        *,
        ahead: _Ahead | None = None,
        ahead_parts: Mapping[int, wire.Message] | None = None,
        message_type: str = MessageType.TRAIN,
        error_replies: dict[int, Error] | None = None,
    ) -> tuple[dict[int, wire.Message | bytes], dict[int, wire.Message | bytes]]:
        """One server -> clients -> server exchange of this round, which may also carry
        the next round's parts (``ahead``): a node in both gets one message of two parts,
        a node only in the next round's cohort a message of that round's part alone.
        Returns the valid replies to each round (the second empty without ``ahead``).
        ``message_type`` is ``EVALUATE`` for a secure evaluation round (never with ``ahead``).
        With ``error_replies``, this round's error replies are collected there (node ->
        the Error) for the caller to sort, instead of recorded and logged one per node."""
        parts = dict(ahead_parts or {}) if ahead is not None else {}
        messages, kinds = self._stage_messages(server_round, stage, outgoing, extra, extra_fields, ahead, parts,
                                               message_type)
        t0 = time.monotonic()
        replies, _ = exchange.send_and_receive(grid, messages, self.config.stage_timeout, self.config.max_poll_interval)
        report.stage_seconds[stage.name] = report.stage_seconds.get(stage.name, 0.0) + time.monotonic() - t0
        report.exchanges += 1
        # message ids are set when the messages are pushed
        role = {m.metadata.message_id: kind for m, kind in zip(messages, kinds, strict=True)}
        out: dict[int, wire.Message | bytes] = {}
        out_next: dict[int, wire.Message | bytes] = {}
        for reply in replies:
            found = role.get(reply.metadata.reply_to_message_id)
            if found is None:
                continue
            node, next_stage = found
            mine = node in outgoing
            target = report if mine else ahead.report  # type: ignore[union-attr]
            own_stage = stage if mine else parts[node].stage
            if reply.has_error():
                if error_replies is not None and mine:
                    error_replies[node] = reply.error
                else:
                    self._client_error(target, node, own_stage, reply.error.reason)
                continue
            if reply.metadata.src_node_id != node:
                target.rejected[node] = f"reply for node {node} came from node {reply.metadata.src_node_id}"
                continue
            try:
                (out if mine else out_next)[node] = parse_reply(reply)
                if names is not None and mine:
                    names[node] = metric_names_of(reply)
            except ProtocolError as exc:
                target.rejected[node] = f"{type(exc).__name__}: {exc}"
                log(WARNING, "node %s sent an invalid %s reply: %s", node, own_stage.name, exc)
                continue
            if next_stage is not None and ahead is not None:
                try:
                    part = parse_next_reply(reply)
                except ProtocolError as exc:
                    ahead.report.rejected[node] = f"{type(exc).__name__}: {exc}"
                    continue
                if isinstance(part, str):
                    ahead.report.client_errors[node] = f"stage {next_stage.name}: {part}"
                    log(WARNING, "node %s refused round %s's %s part: %s", node, ahead.server_round,
                        next_stage.name, part)
                elif part is not None:
                    out_next[node] = part
        return out, out_next

    @staticmethod
    def _stage_messages(
        server_round: int, stage: Stage, outgoing: Mapping[int, wire.Message],
        extra: Mapping[str, ArrayRecord | ConfigRecord] | None, extra_fields: Mapping[str, str] | None,
        ahead: _Ahead | None, parts: Mapping[int, wire.Message], message_type: str,
    ) -> tuple[list[Message], list[tuple[int, Stage | None]]]:
        """The messages of one exchange (see :meth:`_exchange`), and per message its node
        and the stage of the next round's part it carries (None: none)."""
        messages: list[Message] = []
        kinds: list[tuple[int, Stage | None]] = []
        for node in sorted(set(outgoing) | set(parts)):
            if node in outgoing:
                rec = ConfigRecord({wire.FIELD_STAGE: int(stage), wire.FIELD_PAYLOAD: wire.encode(outgoing[node]),
                                    **(extra_fields or {})})
                nm = parts.get(node)
                if nm is not None:
                    rec[wire.FIELD_NEXT_STAGE] = int(nm.stage)
                    rec[wire.FIELD_NEXT_PAYLOAD] = wire.encode(nm)
                content = RecordDict({wire.RECORD_KEY: rec, **(extra or {})})
                m = Message(content, dst_node_id=node, message_type=message_type, group_id=str(server_round))
                kinds.append((node, nm.stage if nm is not None else None))
            else:  # a setup-only message for the next round
                assert ahead is not None
                nm = parts[node]
                rec = ConfigRecord({wire.FIELD_STAGE: int(nm.stage), wire.FIELD_PAYLOAD: wire.encode(nm)})
                m = Message(RecordDict({wire.RECORD_KEY: rec}), dst_node_id=node, message_type=MessageType.TRAIN,
                            group_id=str(ahead.server_round))
                kinds.append((node, None))
            messages.append(m)
        return messages, kinds

    @staticmethod
    def _client_error(report: RoundReport, node: int, stage: Stage, reason: str | None) -> None:
        """A client's error reply: recorded in its round's report and logged, one WARNING per node."""
        report.client_errors[node] = f"stage {stage.name}: {reason}"
        log(WARNING, "node %s failed at stage %s of round %s: %s", node, stage.name, report.server_round, reason)


def metric_names_of(reply: Message) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The train metric names a masked-input reply declares (slot order) and left out."""
    rec = reply.content.config_records.get(wire.RECORD_KEY)
    out: list[tuple[str, ...]] = []
    for key in (wire.FIELD_METRIC_NAMES, wire.FIELD_METRICS_LEFT_OUT):
        value = rec.get(key, []) if rec is not None else []
        if not isinstance(value, list) or len(value) > 1024 or not all(
            isinstance(v, str) and 0 < len(v) <= 256 for v in value
        ):
            raise MalformedMessageError(f"reply field {key!r} must be a list of short metric names")
        out.append(tuple(str(v) for v in value))
    return out[0], out[1]


def parse_next_reply(reply: Message) -> bytes | str | None:
    """The answer to a message's pipelined part: its payload bytes (decoded and checked
    by the protocol server), the site's refusal text, or None when it sent neither."""
    rec = reply.content.config_records.get(wire.RECORD_KEY)
    if rec is None:
        return None
    error = rec.get(wire.FIELD_NEXT_ERROR)
    payload = rec.get(wire.FIELD_NEXT_PAYLOAD)
    if error is not None:
        if not isinstance(error, str) or payload is not None:
            raise MalformedMessageError(f"reply field {wire.FIELD_NEXT_ERROR!r} must be a short text, alone")
        return error[: wire.MAX_ERROR_TEXT]
    if payload is None:
        return None
    if not isinstance(payload, bytes):
        raise MalformedMessageError(f"reply lacks the {wire.RECORD_KEY}.{wire.FIELD_NEXT_PAYLOAD} bytes")
    return payload


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
        if arr is None or arr.stype != wire.PACKED_STYPE or arr.dtype != "|u1" or len(arr.shape) != 1:
            raise MalformedMessageError("masked vector must be the packed bytes of its words (wire.pack_words)")
        if len(arr.data) != arr.shape[0]:
            raise MalformedMessageError(f"masked vector declares {arr.shape[0]} bytes but carries {len(arr.data)}")
        vector = arr.data  # unpacked by wire.decode at the width its header declares
    return wire.decode(payload, vector)
