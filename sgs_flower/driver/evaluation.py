"""Secure federated evaluation: each server round's evaluation is a secure round of its own.

The wrapped strategy's ``configure_evaluate`` chooses the cohort, model and config as in
plain Flower (``sgs_flower.evaluation`` holds the round's spec and binding); the five
protocol exchanges (keys, shares, masked input with the model, consistency check,
unmask) run as ``evaluate`` messages; the server decodes the weighted means of the
numeric evaluation metrics and the total ``num-examples``, and hands the wrapped
strategy's ``aggregate_evaluate`` ONE aggregate carrying them, as training hands
``aggregate_train`` one. A site's metrics never reach the server unmasked (their names
do).

An evaluation round that fails (too few survivors, an inconsistent sum, a cohort that
sent different models) is logged with its reason and releases nothing; the run goes
on, the global model and the privacy ledger untouched. A round set up ahead for
training (pipelining) is not affected: the evaluation round has its own protocol server
here and its own protocol instance on each site.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING, Any

from sgs_flower.driver.exchange import Names, StageExchange, agreed_names
from sgs_flower.driver.learner import Instructions, Released
from sgs_flower.driver.report import RoundReport, SecureEvaluationUnavailable, group_client_errors
from sgs_flower.driver.transport import EVALUATE, ReplyError, Transport
from sgs_flower.evaluation import eval_binding_digest, eval_round_id, eval_spec
from sgs_flower.pipeline import UpdateSpec, _canonical, decode_update, model_digest
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import ConfigurationError, InconsistentAggregateError, SecAggError
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.stages import Replies, mask_and_unmask, share_keys
from sgs_flower.secagg.wire import Stage

if TYPE_CHECKING:  # only for annotations: the driver passes itself in, so no import cycle
    from sgs_flower.driver.rounds import RoundDriver

#: Server -> clients -> server exchanges of one secure evaluation round (no retry: its
#: weight scale is max_weight, and the model part is empty).
EVAL_EXCHANGES = 5


def secure_evaluate(driver: RoundDriver, transport: Transport, server_round: int, model: Any, config: Any) -> Any:
    """Round ``server_round``'s federated evaluation as a secure round; returns what the
    learner's ``aggregate_evaluate`` returns (None when nothing was released). Its
    :class:`RoundReport` is appended to ``driver.eval_reports``."""
    learner = driver.learner
    ins = learner.configure_evaluate(server_round, model, config, transport)
    if not ins.nodes:  # asked every round, with no aggregate when nothing was sent, as Flower's loop does
        return learner.aggregate_evaluate(server_round, None)
    t0 = time.monotonic()
    cohort = sorted(set(ins.nodes))
    if driver.cohorts.grouped:  # whole groups, as training's cohorts (issue 29)
        cohort = driver.cohorts.group_cohort(transport.node_ids(), learner.sampling(), evaluate=True) or cohort
    report = RoundReport(server_round, "aborted", cohort=cohort)
    driver.eval_reports.append(report)
    try:
        spec, params, digest = _prepare(driver, transport, server_round, ins, cohort)
    except ConfigurationError as exc:
        return _abort(driver, report, f"not run: {exc}", t0)
    server = SecAggServer(params, bound_digest=digest, groups=driver.cohorts.groups, min_group=driver.config.min_group)
    names: Names = {}
    exchange = StageExchange(transport, driver.config.stage_timeout, driver.logger)
    extra = {**ins.records, wire.SPEC_KEY: spec.to_config()}

    def channel(stage: Stage, outgoing: Mapping[int, wire.Message], nxt: Any = None,
                parts: Mapping[int, wire.Message] | None = None) -> tuple[Replies, Replies]:
        if stage == Stage.ADVERTISE_KEYS:
            return _advertise(driver, exchange, server_round, outgoing, report), {}
        if stage == Stage.MASKED_INPUT:
            return exchange(server_round, stage, outgoing, report, extra, ins.fields, names, kind=EVALUATE)
        return exchange(server_round, stage, outgoing, report, kind=EVALUATE)

    try:  # the protocol's stage sequence (sgs_flower.secagg.stages), never pipelined
        outcome, _ = mask_and_unmask(server, channel, share_keys(server, channel))
        report.survivors = list(outcome.survivors)
        metric_names = _metric_names(driver, names, report) if spec.metric_slots else None
        decoded = decode_update(outcome.total, spec, len(outcome.survivors), 0, metric_names)
    except InconsistentAggregateError as exc:
        driver.fill(report, server)
        return _abort(driver, report, str(exc), t0, "inconsistent")
    except SecAggError as exc:  # anything a client could provoke ends the evaluation, not the run
        driver.fill(report, server)
        return _abort(driver, report, f"{type(exc).__name__}: {exc}", t0)
    driver.fill(report, server)
    return _release(driver, ins, report, spec, decoded, t0)


def _release(driver: RoundDriver, ins: Instructions, report: RoundReport, spec: UpdateSpec, decoded: Any,
             t0: float) -> Any:
    """The evaluation's weighted means, to the learner's ``aggregate_evaluate`` (or
    nothing, when no survivor's evaluation could be used)."""
    log, server_round = driver.logger.log, report.server_round
    report.total_weight = decoded.total_weight
    report.failures = dict(decoded.failures)
    report.weight_scale = spec.weight_unit
    report.error_bound = decoded.metric_error_bound  # the metrics are exact (pipeline.METRIC_FRACTION_BITS)
    report.metric_clipped = {n: decoded.metric_clipped[i] for i, n in enumerate(decoded.metrics)
                             if decoded.metric_clipped[i]}
    for name, k in report.metric_clipped.items():
        log(WARNING, "secure evaluation %s: metric %r of %d clients lay beyond +-%g and was clipped; set "
            "SecAggConfig(metric_ranges={%r: ...})", server_round, name, k, spec.range_of(name), name)
    if report.failures:
        reasons = ", ".join(f"{k} x {r}" for r, k in report.failures.items())
        if decoded.total_weight == 0:
            return _abort(driver, report, f"no survivor's evaluation could be used ({reasons}; the sites' logs "
                          "say more)", t0)
        log(WARNING, "secure evaluation %s: %d of %d survivors' evaluations could not be used and count with "
            "weight 0 (%s; the sites' logs say more)", server_round, sum(report.failures.values()),
            len(report.survivors), reasons)
    agg = driver.learner.aggregate_evaluate(server_round, Released(ins, decoded.total_weight, dict(decoded.metrics)))
    report.status = "ok"
    report.seconds = time.monotonic() - t0
    log(INFO, "secure evaluation %s: %d/%d clients aggregated (total num-examples %d) in %d exchanges, %.2f s; "
        "metrics exact to %.3g", server_round, len(report.survivors), len(report.cohort),
        decoded.total_weight, report.exchanges, report.seconds, report.error_bound)
    return agg


_FIX = ("secagg_mod must wrap evaluate as well as train: write the client as `app = ClientApp(mods=[secagg_mod])` "
        "(every handler) or `@app.evaluate(mods=[secagg_mod])`, or evaluate on the server only "
        "(fraction_evaluate=0.0, evaluate_fn)")


def _advertise(
    driver: RoundDriver, stage: StageExchange, server_round: int, setup: Mapping[int, wire.Message],
    report: RoundReport,
) -> dict[int, wire.Message | bytes]:
    """The evaluation round's first exchange (keys). A site whose application raised on
    it (``ReplyError.app_raised``: its evaluate function is not wrapped by the protocol
    layer, where the protocol layer would have answered or refused with its own code)
    runs the user's evaluate without the protocol: it is named in one ERROR per run (not
    one warning per node and round) and counts as dropped; if no site answered for that
    reason, the run stops (:func:`_unwrapped`). Other error replies are logged as usual."""
    errors: dict[int, ReplyError] = {}
    replies = stage(server_round, Stage.ADVERTISE_KEYS, setup, report, kind=EVALUATE, error_replies=errors)[0]
    unwrapped: dict[int, str] = {}
    for node, error in sorted(errors.items()):
        if error.app_raised:
            unwrapped[node] = error.reason or ""
            report.client_errors[node] = (f"stage {Stage.ADVERTISE_KEYS.name}: the ClientApp raised (evaluate not "
                                          "wrapped by secagg_mod)")
        else:
            stage.client_error(report, node, Stage.ADVERTISE_KEYS, error.reason)
    if unwrapped:
        _unwrapped(driver, report, unwrapped, alone=not replies and len(unwrapped) == len(errors))
    return replies


def _unwrapped(driver: RoundDriver, report: RoundReport, unwrapped: Mapping[int, str], alone: bool) -> None:
    """One ERROR naming the sites whose evaluate is not wrapped and the fix (once per run
    for each site). ``alone``: no site of the cohort answered, all for that reason:
    evaluation can never run, so the run stops with :class:`SecureEvaluationUnavailable`
    here, at its first evaluation, rather than train on with no evaluation."""
    nodes = sorted(unwrapped)
    shown = ", ".join(map(str, nodes[:10])) + (f" and {len(nodes) - 10} more" if len(nodes) > 10 else "")
    first = " ".join(next(iter(unwrapped.values())).split())  # Flower's reason spans lines (a traceback)
    first = first if len(first) <= 240 else "..." + first[-240:]  # its cause is at its end
    if "No evaluate function registered" in first:  # Flower's error for an app with no @app.evaluate() at all
        cause = ("their ClientApp has no evaluate function: register one with @app.evaluate() (secagg_mod wraps it "
                 f"when the app is `ClientApp(mods=[secagg_mod])`), or evaluate on the server only "
                 f"(fraction_evaluate=0.0, evaluate_fn). (First error: {first})")
    else:
        cause = (f"their ClientApp raised on the secure evaluation's first message (stage ADVERTISE_KEYS): it "
                 f"reached the user's evaluate function, which secagg_mod does not wrap. {_FIX}. (First error: "
                 f"{first})")
    if alone:
        text = (f"secure evaluation of round {report.server_round} is unavailable: none of the {len(report.cohort)} "
                f"sites of its cohort answered it, and {len(nodes)} of them (nodes {shown}) cannot: {cause}")
        report.status, report.reason = "unavailable", text
        driver.stopped = text
        driver.logger.log(ERROR, "%s", text)
        raise SecureEvaluationUnavailable(text)
    if set(nodes) <= driver.unwrapped_eval:
        return  # already named this run: they count as dropped, as in the round they were named
    driver.unwrapped_eval |= set(nodes)
    driver.logger.log(ERROR, "secure evaluation of round %s: %d of %d sites (nodes %s) cannot take part and count "
                      "as dropped: %s", report.server_round, len(nodes), len(report.cohort), shown, cause)


def _prepare(
    driver: RoundDriver, transport: Transport, server_round: int, ins: Instructions, cohort: list[int],
) -> tuple[UpdateSpec, RoundParams, bytes]:
    """The round's spec, protocol parameters and mask binding, from the wrapped strategy's
    evaluate instructions (one model and config for all: a server that evaluated sites on
    different models could not sum their metrics meaningfully)."""
    c, name = driver.config, driver.learner.name
    if ins.model is None:
        raise ConfigurationError(f"{name}.configure_evaluate sent no ArrayRecord {ins.fields.get('arrays-key')!r}")
    m_digest = model_digest(ins.model)
    for other_model, other_config in ins.others:
        if other_model is None or model_digest(other_model) != m_digest or (
                _canonical(dict(other_config)) != _canonical(dict(ins.config))):
            raise ConfigurationError(f"{name}.configure_evaluate sent different models or configs "
                                     "to different clients; secure evaluation needs one model per round")
    spec = eval_spec(len(cohort), c.max_weight, c.metric_slots, c.metric_range, tuple(sorted(c.metric_ranges.items())))
    params = RoundParams(
        run_id=transport.run_id, round_id=eval_round_id(server_round), cohort=tuple(cohort),
        vector_length=spec.vector_length(0), field_bits=spec.field_bits, degree=c.degree, threshold=c.threshold,
        min_clients=c.min_clients,
    )
    return spec, params, eval_binding_digest(m_digest, dict(ins.config), spec)


def _metric_names(driver: RoundDriver, names: Names, report: RoundReport) -> list[str] | None:
    """The slot names every survivor reported, or None (no metric released, a warning)."""
    agreed, left_out, differ = agreed_names(names, report.survivors)
    if left_out:
        driver.logger.log(WARNING, "secure evaluation %s: metrics %s not aggregated (more than metric_slots numeric "
                          "metrics, or not numbers); raise SecAggConfig.metric_slots", report.server_round, left_out)
    if agreed is not None:
        return agreed
    report.metrics_dropped = "survivors reported different evaluation metric names: " + differ
    driver.logger.log(WARNING, "secure evaluation %s: no metrics released: %s", report.server_round,
                      report.metrics_dropped)
    return None


def _abort(driver: RoundDriver, report: RoundReport, reason: str, t0: float, status: str = "aborted") -> None:
    """Nothing is released; the learner's ``aggregate_evaluate`` is asked with no aggregate
    (as Flower's loop does when every evaluation failed); model and ledger untouched."""
    report.status = status
    if report.client_errors:
        reason = f"{reason} (client errors: {group_client_errors(report.client_errors)})"
    if any(e.startswith(f"stage {Stage.ADVERTISE_KEYS.name}:") for e in report.client_errors.values()):
        reason += ("; a site answers secure evaluation only with secagg_mod on its evaluate function "
                   "(@app.evaluate(mods=[secagg_mod]) or ClientApp(mods=[secagg_mod]))")
    report.reason = reason
    report.seconds = time.monotonic() - t0
    driver.logger.log(WARNING, "secure evaluation of round %s %s, no evaluation metrics released (the global model "
                      "and the privacy ledger are unaffected): %s", report.server_round, status, reason)
    driver.learner.aggregate_evaluate(report.server_round, None)
    return None
