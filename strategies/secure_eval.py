"""Secure federated evaluation for :class:`~strategies.secagg_strategy.SecAggStrategy`.

Each server round's federated evaluation (``fraction_evaluate > 0``) is one SecAgg+ round
of its own (``sgs_flower.evaluation``): the wrapped strategy's ``configure_evaluate``
chooses the cohort, model and config as in plain Flower; the five protocol exchanges
(keys, shares, masked input with the model, consistency check, unmask) run as
``EVALUATE`` messages; the server decodes the weighted means of the numeric evaluation
metrics and the total ``num-examples``, and hands the wrapped strategy's
``aggregate_evaluate`` ONE reply carrying them, as training hands ``aggregate_train``
one. A site's metrics never reach the server unmasked (their names do).

An evaluation round that fails (too few survivors, an inconsistent sum, a cohort that
sent different models) is logged with its reason and releases nothing; the run goes
on, the global model and the privacy ledger untouched. A round set up ahead for
training (pipelining) is not affected: the evaluation round has its own protocol server
here and its own protocol instance on each site.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from sgs_flower.evaluation import eval_binding_digest, eval_round_id, eval_spec
from sgs_flower.pipeline import UpdateSpec, _canonical, decode_update, model_digest
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import ConfigurationError, InconsistentAggregateError, SecAggError
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import Stage
from strategies.report import (
    RoundReport,
    SecureEvaluationUnavailable,
    group_client_errors,
    quiet_single_reply_log,
)

if TYPE_CHECKING:  # only for annotations: the strategy passes itself in, so no import cycle
    from strategies.secagg_strategy import SecAggStrategy

#: Server -> clients -> server exchanges of one secure evaluation round (no retry: its
#: weight scale is max_weight, and the model part is empty).
EVAL_EXCHANGES = 5


def secure_evaluate(
    strategy: SecAggStrategy, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
) -> MetricRecord | None:
    """Round ``server_round``'s federated evaluation as a secure round; returns what the
    wrapped strategy's ``aggregate_evaluate`` returns (None when nothing was released).
    Its :class:`RoundReport` is appended to ``strategy.eval_reports``."""
    inner = strategy.inner
    messages = list(inner.configure_evaluate(server_round, arrays, config, grid))
    if not messages:  # asked every round, with no reply when nothing was sent, as Flower's loop does
        return inner.aggregate_evaluate(server_round, [])
    t0 = time.monotonic()
    cohort = sorted({m.metadata.dst_node_id for m in messages})
    if strategy.grouped:  # whole groups, as training's cohorts (issue 29)
        cohort = strategy._group_cohort(list(grid.get_node_ids()), evaluate=True) or cohort
    report = RoundReport(server_round, "aborted", cohort=cohort)
    strategy.eval_reports.append(report)
    try:
        spec, params, digest, extra, fields = _prepare(strategy, grid, server_round, messages, cohort)
    except ConfigurationError as exc:
        return _abort(strategy, report, f"not run: {exc}", t0)
    server = SecAggServer(params, bound_digest=digest, groups=strategy.groups, min_group=strategy.config.min_group)
    names: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def exchange(
        stage: Stage, outgoing: Mapping[int, wire.Message], extra: Mapping[str, ArrayRecord | ConfigRecord] | None = None,
        extra_fields: Mapping[str, str] | None = None,
        names: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
    ) -> dict[int, wire.Message | bytes]:
        return strategy._exchange(grid, server_round, stage, outgoing, report, extra, extra_fields, names,
                                  message_type=MessageType.EVALUATE)[0]

    try:
        rosters = server.collect_keys(_advertise(strategy, grid, server_round, server, report))
        bundles = server.collect_shares(exchange(Stage.SHARE_KEYS, rosters))
        requests = server.collect_masked(exchange(Stage.MASKED_INPUT, bundles, extra=extra, extra_fields=fields,
                                                  names=names))
        unmask = server.collect_consistency(exchange(Stage.CONSISTENCY, requests))
        outcome = server.collect_unmask(exchange(Stage.UNMASK, unmask))
        report.survivors = list(outcome.survivors)
        metric_names = _metric_names(names, report) if spec.metric_slots else None
        decoded = decode_update(outcome.total, spec, len(outcome.survivors), 0, metric_names)
    except InconsistentAggregateError as exc:
        strategy._fill(report, server)
        return _abort(strategy, report, str(exc), t0, "inconsistent")
    except SecAggError as exc:  # anything a client could provoke ends the evaluation, not the run
        strategy._fill(report, server)
        return _abort(strategy, report, f"{type(exc).__name__}: {exc}", t0)
    strategy._fill(report, server)
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
            return _abort(strategy, report, f"no survivor's evaluation could be used ({reasons}; the sites' logs "
                          "say more)", t0)
        log(WARNING, "secure evaluation %s: %d of %d survivors' evaluations could not be used and count with "
            "weight 0 (%s; the sites' logs say more)", server_round, sum(report.failures.values()),
            len(report.survivors), reasons)
    metrics = MetricRecord({inner.weighted_by_key: decoded.total_weight, **decoded.metrics})
    reply = Message(RecordDict({"metrics": metrics}), reply_to=messages[0])
    with quiet_single_reply_log():
        agg = inner.aggregate_evaluate(server_round, [reply])
    report.status = "ok"
    report.seconds = time.monotonic() - t0
    log(INFO, "secure evaluation %s: %d/%d clients aggregated (total num-examples %d) in %d exchanges, %.2f s; "
        "metrics exact to %.3g", server_round, len(report.survivors), len(cohort),
        decoded.total_weight, report.exchanges, report.seconds, report.error_bound)
    return agg


#: What an evaluate function the mod does not wrap looks like at the first stage: the
#: ClientApp raised (on a protocol message it cannot read), where the mod would have
#: answered, or refused with its own code (``MOD_FAILED_PRECONDITION``).
_UNWRAPPED_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_FIX = ("secagg_mod must wrap evaluate as well as train: write the client as `app = ClientApp(mods=[secagg_mod])` "
        "(every handler) or `@app.evaluate(mods=[secagg_mod])`, or evaluate on the server only "
        "(fraction_evaluate=0.0, evaluate_fn)")


def _advertise(
    strategy: SecAggStrategy, grid: Grid, server_round: int, server: SecAggServer, report: RoundReport,
) -> dict[int, wire.Message | bytes]:
    """The evaluation round's first exchange (keys). A site whose ClientApp raised on it
    runs the user's evaluate without the mod: it is named in one ERROR per run (not one
    warning per node and round) and counts as dropped; if no site answered for that
    reason, the run stops (:func:`_unwrapped`). Other error replies are logged as usual."""
    errors: dict[int, Error] = {}
    replies = strategy._exchange(grid, server_round, Stage.ADVERTISE_KEYS, server.setup_messages(), report,
                                 message_type=MessageType.EVALUATE, error_replies=errors)[0]
    unwrapped: dict[int, str] = {}
    for node, error in sorted(errors.items()):
        if error.code == _UNWRAPPED_CODE:
            unwrapped[node] = error.reason or ""
            report.client_errors[node] = (f"stage {Stage.ADVERTISE_KEYS.name}: the ClientApp raised (evaluate not "
                                          "wrapped by secagg_mod)")
        else:
            strategy._client_error(report, node, Stage.ADVERTISE_KEYS, error.reason)
    if unwrapped:
        _unwrapped(strategy, report, unwrapped, alone=not replies and len(unwrapped) == len(errors))
    return replies


def _unwrapped(strategy: SecAggStrategy, report: RoundReport, unwrapped: Mapping[int, str], alone: bool) -> None:
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
        strategy.stopped = text
        log(ERROR, "%s", text)
        raise SecureEvaluationUnavailable(text)
    if set(nodes) <= strategy._unwrapped_eval:
        return  # already named this run: they count as dropped, as in the round they were named
    strategy._unwrapped_eval |= set(nodes)
    log(ERROR, "secure evaluation of round %s: %d of %d sites (nodes %s) cannot take part and count as dropped: %s",
        report.server_round, len(nodes), len(report.cohort), shown, cause)


def _prepare(
    strategy: SecAggStrategy, grid: Grid, server_round: int, messages: list[Message], cohort: list[int],
) -> tuple[UpdateSpec, RoundParams, bytes, dict[str, ArrayRecord | ConfigRecord], dict[str, str]]:
    """The round's spec, protocol parameters, mask binding and request records, from the
    wrapped strategy's evaluate messages (one model and config for all: a server that
    evaluated sites on different models could not sum their metrics meaningfully)."""
    inner, c = strategy.inner, strategy.config
    a_key, c_key = inner.arrayrecord_key, inner.configrecord_key
    first = messages[0]
    model = first.content.array_records.get(a_key)
    if model is None:
        raise ConfigurationError(f"{type(inner).__name__}.configure_evaluate sent no ArrayRecord {a_key!r}")
    cfg = first.content.config_records.get(c_key, ConfigRecord())
    m_digest = model_digest([(k, v.numpy()) for k, v in model.items()])
    for m in messages[1:]:
        other_model = m.content.array_records.get(a_key)
        other_cfg = m.content.config_records.get(c_key, ConfigRecord())
        if other_model is model and other_cfg is cfg:
            continue  # the same objects (what FedAvg sends): nothing to re-hash
        if other_model is None or model_digest([(k, v.numpy()) for k, v in other_model.items()]) != m_digest or (
                _canonical(dict(other_cfg)) != _canonical(dict(cfg))):
            raise ConfigurationError(f"{type(inner).__name__}.configure_evaluate sent different models or configs "
                                     "to different clients; secure evaluation needs one model per round")
    spec = eval_spec(len(cohort), c.max_weight, c.metric_slots, c.metric_range, tuple(sorted(c.metric_ranges.items())))
    params = RoundParams(
        run_id=grid.run.run_id, round_id=eval_round_id(server_round), cohort=tuple(cohort),
        vector_length=spec.vector_length(0), field_bits=spec.field_bits, degree=c.degree, threshold=c.threshold,
        min_clients=c.min_clients,
    )
    extra: dict[str, ArrayRecord | ConfigRecord] = {a_key: model, c_key: cfg,
                                                    wire.SPEC_KEY: ConfigRecord(spec.to_config())}
    fields = {"arrays-key": a_key, "config-key": c_key, "weight-key": inner.weighted_by_key}
    return spec, params, eval_binding_digest(m_digest, dict(cfg), spec), extra, fields


def _metric_names(names: Mapping[int, tuple[tuple[str, ...], tuple[str, ...]]], report: RoundReport) -> list[str] | None:
    """The slot names every survivor reported, or None (no metric released, a warning)."""
    seen = Counter(names.get(u, ((), ()))[0] for u in report.survivors)
    left_out = sorted({n for u in report.survivors for n in names.get(u, ((), ()))[1]})
    if left_out:
        log(WARNING, "secure evaluation %s: metrics %s not aggregated (more than metric_slots numeric metrics, or "
            "not numbers); raise SecAggConfig.metric_slots", report.server_round, left_out)
    if len(seen) == 1:
        return list(next(iter(seen)))
    report.metrics_dropped = "survivors reported different evaluation metric names: " + "; ".join(
        f"{n} x {list(k)}" for k, n in seen.most_common())
    log(WARNING, "secure evaluation %s: no metrics released: %s", report.server_round, report.metrics_dropped)
    return None


def _abort(
    strategy: SecAggStrategy, report: RoundReport, reason: str, t0: float, status: str = "aborted",
) -> MetricRecord | None:
    """Nothing is released; the wrapped strategy's ``aggregate_evaluate`` is asked with no
    reply (as Flower's loop does when every evaluation failed); model and ledger untouched."""
    report.status = status
    if report.client_errors:
        reason = f"{reason} (client errors: {group_client_errors(report.client_errors)})"
    if any(e.startswith(f"stage {Stage.ADVERTISE_KEYS.name}:") for e in report.client_errors.values()):
        reason += ("; a site answers secure evaluation only with secagg_mod on its evaluate function "
                   "(@app.evaluate(mods=[secagg_mod]) or ClientApp(mods=[secagg_mod]))")
    report.reason = reason
    report.seconds = time.monotonic() - t0
    log(WARNING, "secure evaluation of round %s %s, no evaluation metrics released (the global model and the "
        "privacy ledger are unaffected): %s", report.server_round, status, reason)
    strategy.inner.aggregate_evaluate(report.server_round, [])
    return None
