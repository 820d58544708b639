"""One whole secure training round, and the run's rounds around it, without Flower.

Each round runs as SecAgg+ exchanges over a :class:`~sgs_flower.driver.transport.Transport`:
five (keys, shares, masked input, consistency check, unmask) for the first round and after
an aborted one, three (masked input, consistency, unmask) once pipelined, the next round's
keys and shares riding on the consistency and unmask exchanges (docs/protocol.md,
"Pipelined rounds", :mod:`sgs_flower.driver.pipelining`), plus one exchange per retry of
the masked input when the unmasked sum counts values beyond the range or weights beyond
the weight scale (nothing is released before every value fits: docs/protocol.md,
"Retry"). It decodes the one aggregate the protocol releases (the weighted-mean model
delta, plus the cohort's weighted-mean train metrics) and hands it to the learning side
(:class:`~sgs_flower.driver.learner.Learner`: the wrapped strategy's hooks, called once
per round as in Flower's own loop; with no aggregate when the round aborted).

The model-confidential mode runs the model-key phase first (:mod:`sgs_flower.driver.model_key`);
DP plans each round before it trains and accounts it before anything is used
(:class:`~sgs_flower.dp.aggregator.DPAggregator`); participation in whole groups shapes
the cohorts (:mod:`sgs_flower.driver.cohorts`); the ranges, weight scale and word width
adapt from round to round (:mod:`sgs_flower.driver.sizing`). Federated evaluation is a
secure round of its own (:mod:`sgs_flower.driver.evaluation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np

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
from sgs_flower.driver import evaluation
from sgs_flower.driver.cohorts import Cohorts
from sgs_flower.driver.config import SecAggConfig
from sgs_flower.driver.exchange import Names, StageExchange, agreed_names
from sgs_flower.driver.learner import Instructions, Learner, Released
from sgs_flower.driver.model_key import ensure_model_key
from sgs_flower.driver.pipelining import Ahead, ahead_failed, prepare_ahead
from sgs_flower.driver.report import RoundReport, SecureAggregationFailed, group_client_errors
from sgs_flower.driver.sizing import Sizing
from sgs_flower.driver.transport import Transport
from sgs_flower.pipeline import (
    DecodedUpdate,
    UpdateSpec,
    apply_delta,
    binding_digest,
    decode_update,
    retry_spec,
    spec_digest,
    validation_layout,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentAggregateError,
    ReconstructionError,
    SecAggError,
    ThresholdError,
)
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.stages import Replies, mask_and_unmask, share_keys
from sgs_flower.secagg.wire import Stage

LOGGER = logging.getLogger("sgs_flower.driver")


def _same_setup(ahead: RoundParams, now: RoundParams) -> bool:
    """Whether a round set up ahead fits the round's parameters. The validation layout
    (issue 31) may differ: its bound follows the round's range, which adapts after the
    setup, and it is first used at the masked input (sites derive it from the spec there);
    only the masked vector's length, which the keys and shares do not fix either but the
    setup's sizing does, must stay."""
    return replace(ahead, validation=now.validation) == now and ahead.masked_length == now.masked_length


class _StillOutOfRange(SecAggError):
    """Values still lay beyond the range after the last retry: nothing is released."""

    def __init__(self, text: str, spec: UpdateSpec, decoded: DecodedUpdate) -> None:
        super().__init__(text)
        self.spec, self.decoded = spec, decoded


@dataclass
class _Round:
    """One training round as it runs: what configure_train chose, its cohort and report,
    the model's shape, its DP plan and spec, and the time it started."""

    server_round: int
    instructions: Instructions
    cohort: list[int]
    report: RoundReport
    like: list[np.ndarray]
    model_size: int
    t0: float
    plan: RoundPlan | None = None


class RoundDriver:
    """The secure rounds of one run (see the module docstring). ``own_nodes``: the
    wrapped strategy may choose its nodes itself (a round it chose otherwise than
    foreseen is set up in full from its nodes). ``logger`` receives every line (the
    Flower strategy passes Flower's, where its users read)."""

    def __init__(
        self, config: SecAggConfig, learner: Learner, *, own_nodes: bool = False, dp: DPConfig | None = None,
        ledger: str | None = None, logger: logging.Logger = LOGGER,
    ) -> None:
        self.config, self.learner, self.logger = config, learner, logger
        self.sizing = Sizing(config, logger)
        self.cohorts = Cohorts(config, own_nodes, learner.name, logger)
        self.reports: list[RoundReport] = []
        self.eval_reports: list[RoundReport] = []  # the secure evaluation rounds (driver/evaluation.py)
        self.stopped: str = ""  # why training stopped early (the privacy budget), if it did
        self.ahead: Ahead | None = None  # the next round, when set up during the current one
        self.num_rounds = 0
        self.aborted_in_a_row = 0
        self.model_key = ""  # model-confidential mode: the sites' model key id, once agreed
        self.keyed: set[int] = set()  # nodes known to hold it
        self.layout: Layout = ()  # the plaintext model's entries (names, shapes, dtypes)
        self.unwrapped_eval: set[int] = set()  # nodes named in the ERROR on an unwrapped evaluate
        # For benchmarks (scripts/bench_secagg.py counts a round's public-key work from its
        # graph and sets U1..U4): the protocol server of the last training round that ran
        # its exchanges, finished or aborted. Read it, never drive it: the driver is done
        # with it. Its keys and shares may have been exchanged during the round before
        # (RoundReport.pipelined).
        self.last_server: SecAggServer | None = None
        self.privacy: DPAggregator | None = None
        if dp is not None and dp.mode in ("central-dp", "distributed-dp"):
            self.privacy = DPAggregator(dp, field_bits=config.field_bits, ledger_path=ledger,
                                        config={"secagg": repr(config), "inner": learner.name})
            spent = self.privacy.spent()
            if self.privacy.round_offset:
                logger.log(INFO, "privacy ledger %s: resuming after %d rounds, spent epsilon %.4g (consumers) / "
                           "%.4g (server)", ledger, self.privacy.round_offset, spent.consumer, spent.server)
        elif ledger is not None:
            raise ValueError("a privacy ledger needs dp= with mode central-dp or distributed-dp")
        if config.validate and self.privacy is None and config.validation_norm is None:
            raise ValueError("SecAggConfig.validate='l2' proves the update's L2 norm: without central or distributed DP "
                             "(whose clip norm is the bound) set SecAggConfig.validation_norm, the norm honest sites "
                             "clip their update to")
        if config.validation_norm is not None and self.privacy is not None:
            raise ValueError("SecAggConfig.validation_norm is for rounds outside DP: under DP the clip norm is the "
                             "validated bound (leave validation_norm unset)")
        if config.validate and config.confidential:
            raise ValueError("SecAggConfig.validate is not available in the model-confidential mode (its sites sum "
                             "whole models, not bounded updates); turn one of them off")

    # ------------------------------------------------------------ the run
    def begin(self, last_round: int, initial: Mapping[str, np.ndarray] | None = None) -> None:
        """A run of rounds up to ``last_round`` starts (nothing set up ahead yet). In the
        model-confidential mode, ``initial`` is the initial model (plaintext, or already
        masked): the vector's layout follows the plaintext model's entries."""
        self.num_rounds, self.ahead, self.aborted_in_a_row = last_round, None, 0
        if self.config.confidential and initial is not None:
            if initial.get(WORDS_KEY) is None:
                self.layout = layout_of(list(initial.items()))
            else:
                self.layout = MaskedModel.from_arrays(dict(initial)).layout

    def stop_for_budget(self, exc: BudgetExhaustedError) -> None:
        """The privacy budget refused a round: training stops here (not an abort)."""
        self.ahead = None  # a round set up ahead is discarded: nobody trains for it
        self.stopped = str(exc)
        self.logger.log(WARNING, "%s", exc)

    def count_round(self, num_rounds: int) -> None:
        """Count the last round towards ``max_consecutive_aborts``; raises
        :class:`SecureAggregationFailed` when that many rounds in a row aborted, or all
        ``num_rounds`` did."""
        report = self.reports[-1]
        if report.status == "ok":
            self.aborted_in_a_row = 0
            return
        self.aborted_in_a_row += 1
        limit = self.config.max_consecutive_aborts
        if self.aborted_in_a_row >= limit or self.aborted_in_a_row == num_rounds:
            why = (f"{self.aborted_in_a_row} secure rounds in a row aborted (max_consecutive_aborts={limit})"
                   if self.aborted_in_a_row >= limit else f"all {num_rounds} secure rounds aborted")
            self.stopped = f"{why}; last cause: {report.reason}"
            self.logger.log(WARNING, "Stopping: %s", self.stopped)
            raise SecureAggregationFailed(self.stopped)

    def evaluate_round(self, transport: Transport, server_round: int, model: Any, config: Any) -> Any:
        """Round ``server_round``'s federated evaluation, a secure round of its own."""
        return evaluation.secure_evaluate(self, transport, server_round, model, config)

    def log_privacy_spent(self) -> None:
        if self.privacy is not None:
            spent = self.privacy.spent()
            self.logger.log(INFO, "privacy spent: epsilon %.4g against model consumers, %.4g against the server "
                            "(delta %g)", spent.consumer, spent.server, self.privacy.dp.delta)

    def log_summary(self) -> None:
        """One line on the run's secure rounds, and one on its secure evaluations."""
        log = self.logger.log
        ok = sum(r.status == "ok" for r in self.reports)
        log(INFO, "Secure rounds: %d ok, %d not ok%s", ok, len(self.reports) - ok,
            "".join(f"; round {r.server_round} {r.status}: {r.reason}" for r in self.reports if r.status != "ok"))
        if self.eval_reports:
            ok = sum(r.status == "ok" for r in self.eval_reports)
            log(INFO, "Secure evaluations: %d ok, %d not ok%s", ok, len(self.eval_reports) - ok, "".join(
                f"; round {r.server_round} {r.status}: {r.reason}" for r in self.eval_reports if r.status != "ok"))

    # ------------------------------------------------------------ cohorts
    def nodes_needed(self) -> int:
        """Nodes that must be connected before a round is sampled: the wrapped strategy's
        minimums, and never fewer than a secure sum needs."""
        s = self.learner.sampling()
        return max(s.min_available_nodes, s.min_train_nodes, self.config.min_clients or 3)

    def wait_for_nodes(self, transport: Transport, need: int) -> None:
        deadline = time.monotonic() + self.config.node_wait_timeout
        while (have := len(transport.node_ids())) < need:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {have} SuperNodes connected after {self.config.node_wait_timeout:.0f} s, but secure "
                    f"aggregation needs at least {need} per round. Start more SuperNodes (simulation: "
                    "flwr run . --federation-config 'num-supernodes=10')."
                )
            time.sleep(1.0)

    def sample_cohort(self, server_round: int, transport: Transport) -> list[int]:
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
        stays pipelined, any other choice is honoured by a full setup. To pipeline a
        choice that changes every round, replace this (the learner's ``sample_cohort``)
        with the same choice."""
        nodes = transport.node_ids()  # one snapshot: never waits mid-round
        return self.cohorts.sample(nodes, self.learner.sampling(), self.nodes_needed())

    def round_params(
        self, transport: Transport, server_round: int, cohort: list[int], spec: UpdateSpec, model_size: int,
        plan: RoundPlan | None,
    ) -> RoundParams:
        min_clients = self.config.min_clients
        if plan is not None:  # fewer survivors would carry less noise than promised
            min_clients = max(min_clients or 3, plan.min_survivors)
        return RoundParams(
            run_id=transport.run_id, round_id=server_round, cohort=tuple(cohort),
            vector_length=spec.vector_length(model_size), field_bits=spec.field_bits,
            degree=self.config.degree, threshold=self.config.threshold, min_clients=min_clients,
            consistency=self.config.consistency, validation=validation_layout(spec, model_size),
        )

    # ------------------------------------------------------------ one training round
    def train_round(self, transport: Transport, server_round: int, model: Any, config: Any) -> tuple[Any, Any]:
        """One secure round. Its keys and shares were exchanged during the previous round
        when that round set it up ahead (three exchanges: masked input, consistency,
        unmask); otherwise (the first round, after an aborted round, or when the advance
        setup failed) it sets up in full first (five exchanges). While it runs, it sets
        the next round up ahead, on its own consistency and unmask exchanges. Returns what
        the learner's ``aggregate_train`` returned ((None, None) when the round aborted);
        raises :class:`BudgetExhaustedError` when the privacy budget refuses it."""
        t0 = time.monotonic()
        self.wait_for_nodes(transport, self.nodes_needed())
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.server_round != server_round:
            ahead = None
        # The round's one configure_train call, made now that its model exists: for the
        # model and config it sends and the strategy's own bookkeeping (FedOpt keeps the
        # arrays it is given as the model its aggregate_train steps from; a subclass may
        # step a learning-rate schedule: its config goes out with the masked-input request,
        # pipelined or not). Which nodes train: :meth:`Cohorts.for_round`.
        ins = self.learner.configure_train(server_round, model, config, transport)
        cohort, report, ahead = self.cohorts.for_round(server_round, ins.nodes, ahead, transport.node_ids,
                                                       self.learner.sampling())
        self.reports.append(report)
        named = ins.model or []
        # in the model-confidential mode ``named`` is the masked model (or round 1's initial
        # model); the vector's layout follows the plaintext model's entries
        like = zeros_like_layout(self.layout) if self.config.confidential else [a for _, a in named]
        rnd = _Round(server_round, ins, cohort, report, like, int(sum(a.size for a in like)), t0)
        if len(cohort) < 2:
            return self._abort(rnd, f"round {server_round} not run: {len(cohort)} clients sampled")
        if self.config.confidential:
            self._key_cohort(transport, cohort)
        if self.privacy is not None:  # refuses (BudgetExhaustedError) before this round's training
            try:
                rnd.plan = self.privacy.plan(server_round, len(cohort), len(transport.node_ids()), rnd.model_size)
            except BudgetExhaustedError as exc:
                report.status, report.reason = "budget-exhausted", str(exc)
                raise
        try:
            spec, params, digest = self._setup(transport, rnd, ahead)
        except ConfigurationError as exc:
            return self._abort(rnd, f"round {server_round} not run: {exc}")
        if ahead is not None and (not _same_setup(ahead.params, params) or ahead.bundles is None):
            self.logger.log(WARNING, "secure round %s: the setup made during the previous round no longer fits its "
                            "parameters; setting it up in full", server_round)
            ahead = None
        if ahead is not None:
            server = ahead.server
            server.groups = server.groups or self.cohorts.groups  # learnt during the round it was set up in
            server.bind_model(digest)  # masks are keyed with the model this request carries
            server.params = params  # its validated bound may follow this round's range (see _same_setup)
            report.pipelined = True
        else:
            server = SecAggServer(params, bound_digest=digest, groups=self.cohorts.groups,
                                  min_group=self.config.min_group)
        return self._run(transport, rnd, server, spec, ahead)

    def _setup(self, transport: Transport, rnd: _Round, ahead: Ahead | None) -> tuple[UpdateSpec, RoundParams, bytes]:
        """The round's spec, protocol parameters and mask binding (the model and config
        the masks are keyed with); refuses a round whose messages carry different models
        or configs (:class:`ConfigurationError`)."""
        ins, n = rnd.instructions, len(rnd.cohort)
        width = self.sizing.ahead_width(ahead.params.field_bits if ahead is not None else None, n, rnd.plan)
        spec = self.sizing.make_spec(n, rnd.plan, rnd.like, field_bits=width, model_key=self.model_key)
        params = self.round_params(transport, rnd.server_round, rnd.cohort, spec, rnd.model_size, rnd.plan)
        digest = binding_digest(ins.model or [], dict(ins.config), spec.to_config())
        for other_model, other_config in ins.others:
            if binding_digest(other_model or [], dict(other_config), spec.to_config()) != digest:
                raise ConfigurationError(
                    f"{self.learner.name}.configure_train sent different models or configs to "
                    "different clients; secure aggregation needs one global model per round"
                )
        return spec, params, digest

    def _run(
        self, transport: Transport, rnd: _Round, server: SecAggServer, spec: UpdateSpec, ahead: Ahead | None,
    ) -> tuple[Any, Any]:
        """The round's exchanges (setting the next round up on them), then its release."""
        report = rnd.report
        report.clip_range, report.int_clip_range = spec.clip_range, spec.int_clip_range
        self.last_server = server
        exchange = StageExchange(transport, self.config.stage_timeout, self.logger)
        try:
            spec, decoded, total, nxt = self._stages(transport, exchange, rnd, server, spec, ahead)
        except _StillOutOfRange as exc:
            self.fill(report, server)
            self.sizing.range_report(report, exc.spec, exc.decoded, rnd.like)
            return self._abort(rnd, str(exc), status="out-of-range")
        except InconsistentAggregateError as exc:
            self.fill(report, server)
            return self._abort(rnd, str(exc), status="inconsistent")
        except (ThresholdError, ReconstructionError) as exc:
            self.fill(report, server)
            return self._abort(rnd, str(exc))
        except SecAggError as exc:  # anything else a client could provoke ends the round, not the server
            self.fill(report, server)
            return self._abort(rnd, f"{type(exc).__name__}: {exc}")
        if nxt is not None:
            self.ahead = nxt  # used by the next round only if this one succeeds
            report.next_round_set_up = True
        self.fill(report, server)
        return self._release(transport, rnd, spec, decoded, total)

    def _stages(
        self, transport: Transport, exchange: StageExchange, rnd: _Round, server: SecAggServer, spec: UpdateSpec,
        ahead: Ahead | None,
    ) -> tuple[UpdateSpec, DecodedUpdate, np.ndarray, Ahead | None]:
        """Keys and shares (unless set up ahead), masked input, consistency and unmask,
        the next round's keys and shares riding on the last two (the protocol's stage
        sequence, :mod:`sgs_flower.secagg.stages`, over this transport); then the retries."""
        r, report, ins = rnd.server_round, rnd.report, rnd.instructions
        # The model travels once, with the masked-input request (where training happens);
        # its digest keys the masks, so a client given another model cannot unmask.
        train_extra = {**ins.records, wire.SPEC_KEY: spec.to_config()}
        names: Names = {}

        def channel(stage: Stage, outgoing: Mapping[int, wire.Message], nxt: Any = None,
                    parts: Mapping[int, wire.Message] | None = None) -> tuple[Replies, Replies]:
            if stage == Stage.MASKED_INPUT:
                return exchange(r, stage, outgoing, report, train_extra, ins.fields, names)
            return exchange(r, stage, outgoing, report, ahead=nxt, ahead_parts=parts)

        def next_round() -> Ahead | None:  # set up on this round's consistency and unmask exchanges
            return prepare_ahead(self, transport, r + 1, rnd.like, rnd.model_size)

        def failed(nxt: Ahead, exc: SecAggError) -> None:
            ahead_failed(self, nxt, exc)

        bundles = ahead.bundles if ahead is not None and ahead.bundles is not None else share_keys(server, channel)
        outcome, nxt = mask_and_unmask(server, channel, bundles, next_round, failed)
        report.survivors = list(outcome.survivors)
        report.cheaters = list(outcome.cheaters)
        if report.cheaters:
            self.logger.log(WARNING, "secure round %s: left out of the sum, their bound proof failed (evidence shown to "
                            "every site): %s", r, report.cheaters)
        metric_names = self._metric_names(names, report.survivors, report) if spec.metric_slots else None
        decoded = decode_update(outcome.total, spec, len(outcome.survivors), rnd.model_size, metric_names)
        total = outcome.total
        if rnd.plan is None:
            spec, decoded, total = self._retry(exchange, r, server, spec, decoded, report, rnd.model_size,
                                               metric_names, total)
        return spec, decoded, total, nxt

    def _release(
        self, transport: Transport, rnd: _Round, spec: UpdateSpec, decoded: DecodedUpdate, total: np.ndarray,
    ) -> tuple[Any, Any]:
        """DP noise and accounting, then the one aggregate, to the learner."""
        report, plan = rnd.report, rnd.plan
        report.total_weight = decoded.total_weight
        unusable = self._unusable(report, decoded, plan)
        if plan is not None and self.privacy is not None:
            report.field_bits = spec.field_bits  # the plan's width (range_report fills it outside DP)
            # noise (central), account and write the ledger BEFORE the aggregate is used
            # (also when it is then not applied: the server has computed the sum)
            groups = ({"groups": list(report.groups), "group_excluded": report.group_excluded,
                       "min_group": self.config.min_group} if self.cohorts.groups is not None else None)
            mean_delta = self.privacy.release(plan, decoded.weighted_delta_sum, decoded.count,
                                              len(rnd.cohort) - decoded.count, groups=groups)
        else:
            mean_delta = decoded.mean_delta
            if not unusable:
                self.sizing.range_report(report, spec, decoded, rnd.like)
        if unusable:
            return self._abort(rnd, unusable, record=plan is None)
        if self.config.confidential:
            return self._masked_result(transport, rnd, spec, total)
        # each entry in its own dtype and shape (integer counters rounded, 0-d kept 0-d)
        released = Released(rnd.instructions, decoded.total_weight, dict(decoded.metrics),
                            model=apply_delta(rnd.like, mean_delta))
        out = self.learner.aggregate_train(rnd.server_round, released)
        report.status = "ok"
        report.seconds = time.monotonic() - rnd.t0
        self.logger.log(INFO, "secure round %s: %d/%d clients aggregated (total weight %d) in %.2f s",
                        rnd.server_round, len(report.survivors), len(rnd.cohort), decoded.total_weight,
                        report.seconds)
        if report.dropped:
            self.logger.log(INFO, "secure round %s: dropped %s; client errors: %s", rnd.server_round, report.dropped,
                            group_client_errors(report.client_errors) or "none")
        return out

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
            self.logger.log(WARNING, "secure round %s: %d of %d survivors' updates could not be used and count with "
                            "weight 0 (%s; the sites' logs say more)", report.server_round,
                            sum(report.failures.values()), n, reasons)
            return ""
        # Under distributed DP the count carries the round's noise (std ``failed_std``): only
        # a count beyond half the survivors by 4 std is taken as most sites having failed.
        est, std = decoded.failed_estimate, decoded.failed_std
        if est - 4 * std > n / 2:
            return (f"about {est:.1f} (noise std {std:.2g}) of {n} survivors' updates could not be used (a "
                    "noisy count under DP; the sites' logs say why): the aggregate is not applied")
        if est - 3 * std >= 1:
            self.logger.log(WARNING, "secure round %s: about %.1f (noise std %.2g) of %d survivors' updates could not "
                            "be used (a noisy count under DP); they count as zero updates", report.server_round,
                            est, std, n)
        return ""

    def fill(self, report: RoundReport, server: SecAggServer) -> None:
        """The report's dropouts, rejections and groups, from the round's protocol server."""
        self.cohorts.learn(report, server)
        report.dropped = {n: s.name for n, s in server.dropped.items()}
        report.rejected.update({n: f"{type(e).__name__}: {e}" for n, e in server.rejected.items()})

    def _abort(self, rnd: _Round, reason: str, status: str = "aborted", record: bool = True) -> tuple[None, None]:
        report, plan = rnd.report, rnd.plan
        report.status = status
        if report.client_errors:
            reason = f"{reason} (client errors: {group_client_errors(report.client_errors)})"
            if "survivor set splits" in reason:  # the sites' groups are not the server's
                reason += (f" (the sites hold another partition into groups than this server, min_group="
                           f"{self.config.min_group}, roster={self.config.roster!r}: give the server the roster file "
                           "the sites pin, SecAggConfig(roster=...) or run-config roster=..., and the sites' "
                           "sgs-min-group as min_group)")
        report.reason = reason
        report.seconds = time.monotonic() - rnd.t0
        self.logger.log(WARNING, "secure round %s %s, global model unchanged: %s", report.server_round, status, reason)
        if self.privacy is not None and record:
            self.privacy.abort(plan, report.server_round, len(report.cohort), len(report.survivors),
                               f"{status}: {reason}")
        # Asked once per round as in Flower's loop, here with no aggregate: nothing was
        # released (FedAvg and its optimizers return None and change no state). Whatever
        # it returns is not used: an aborted round leaves the global model unchanged.
        self.learner.aggregate_train(report.server_round, None)
        return None, None

    def _metric_names(self, names: Names, survivors: list[int], report: RoundReport) -> list[str] | None:
        """The slot names every survivor reported, or None (metrics dropped, with a warning)."""
        agreed, left_out, differ = agreed_names(names, survivors)
        if left_out:
            self.logger.log(WARNING, "secure round %s: train metrics %s not aggregated (more than metric_slots=%d "
                            "numeric metrics, or not numbers); raise SecAggConfig.metric_slots", report.server_round,
                            left_out, self.config.metric_slots)
        if agreed is not None:
            return agreed
        report.metrics_dropped = "survivors reported different train metric names: " + differ
        self.logger.log(WARNING, "secure round %s: no train metrics released: %s", report.server_round,
                        report.metrics_dropped)
        return None

    def _retry(
        self, exchange: StageExchange, server_round: int, server: SecAggServer, spec: UpdateSpec,
        decoded: DecodedUpdate, report: RoundReport, model_size: int, metric_names: list[str] | None,
        total: np.ndarray,
    ) -> tuple[UpdateSpec, DecodedUpdate, np.ndarray]:
        """Retry the masked input (at most ``wire.MAX_RETRIES`` times) while the unmasked sum
        holds values beyond the range or weights above the weight scale, or the scale is
        too coarse for the cohort's weights; one exchange each, with the same survivors,
        their kept updates re-encoded (never retrained). Returns the spec and the decoded
        sum to release; raises :class:`_StillOutOfRange` if values still lay beyond the
        range after the last retry (nothing is released)."""
        while True:
            new, why = retry_spec(spec, decoded, self.sizing.retry_error)
            if new is None:
                return spec, decoded, total
            beyond = bool(decoded.clipped[0] or decoded.clipped[1] or decoded.weights_over_scale)
            if spec.validation:  # a retry's input would enter the sum without a proof (docs/validation.md)
                if beyond:
                    raise _StillOutOfRange(
                        f"the unmasked sum holds values beyond the range ({'; '.join(why)}) and a validated round is "
                        "never retried: nothing is released; the next round starts at the wider range", spec, decoded)
                return spec, decoded, total
            if server.retries >= wire.MAX_RETRIES:
                if beyond:
                    raise _StillOutOfRange(
                        f"after {server.retries} retries the unmasked sum still holds values beyond the range "
                        f"({'; '.join(why)}): nothing is released; the next round starts at the wider range",
                        spec, decoded,
                    )
                return spec, decoded, total  # only precision left: the reported bound holds
            report.retries += 1
            report.retry_reasons.append("; ".join(why))
            self.logger.log(WARNING if beyond else INFO, "secure round %s: retry %d of the masked input (%s) at range "
                            "+-%g (integer entries +-%g), weight scale %d: nothing is released before every value "
                            "fits", server_round, report.retries, "; ".join(why), new.clip_range, new.int_clip_range,
                            new.weight_unit)
            replies, _ = exchange(server_round, Stage.RETRY, server.retry_messages(), report,
                                  {wire.SPEC_KEY: new.to_config()})
            outcome = server.collect_retry(replies, spec_digest(new))
            spec = new
            report.clip_range, report.int_clip_range = spec.clip_range, spec.int_clip_range
            total = outcome.total
            decoded = decode_update(total, spec, len(outcome.survivors), model_size, metric_names)

    def _key_cohort(self, transport: Transport, cohort: list[int]) -> None:
        """Model-confidential mode: make sure the cohort holds the sites' model key (the
        key phase, :mod:`sgs_flower.driver.model_key`; no exchange when it already does).
        The first time every connected node is asked, so later cohorts need none."""
        missing = set(cohort) - self.keyed
        if not missing:
            return
        ask = set(transport.node_ids()) | missing if not self.model_key else missing
        res = ensure_model_key(transport, ask, transport.run_id, self.config.stage_timeout, want=self.model_key,
                               logger=self.logger)
        self.model_key = res.key_id
        self.keyed |= res.holders
        if not self.model_key:
            raise ConfigurationError(f"no site could make the model key: {res.errors}")

    def _masked_result(self, transport: Transport, rnd: _Round, spec: UpdateSpec, total: np.ndarray) -> tuple[Any, Any]:
        """Model-confidential mode: the new global model is the masked sum itself (FedAvg's
        rule, the weighted mean, is taken at the sites when they unmask it)."""
        report = rnd.report
        masked = MaskedModel(words=np.asarray(total), run_id=transport.run_id, round_id=rnd.server_round,
                             attempt=report.retries, survivors=tuple(sorted(report.survivors)),
                             key_id=self.model_key, spec=spec, layout=self.layout)
        report.status = "ok"
        report.seconds = time.monotonic() - rnd.t0
        self.logger.log(INFO, "secure round %s: %d/%d clients aggregated (total weight %d) in %.2f s; the new global "
                        "model is held masked under model key %s", rnd.server_round, len(report.survivors),
                        len(rnd.cohort), report.total_weight, report.seconds, self.model_key)
        return self.learner.release_masked(masked.to_arrays(), report.total_weight)
