"""Issue 19: no silent clipping (a retry of the masked input) and a weight scale from the
cohort's weights; a lying server against the retry.

- Out-of-range values are encoded linearly (wrapping), counted inside the masked vector,
  and a round whose sum counts any retries its masked input at a range that covers them:
  one exchange, the same survivors, the kept update re-encoded, masks from the round's
  secrets under a domain-separated context (``keys.retry_context``).
- A lying server that asks for a retry gets, from every vector, only functions of the
  cohort's linear sum; a site's retry vector, its (revealed) self mask removed, is still
  masked by pairwise masks independent of the round's; a retry outside the rules (before
  unmask, another survivor set, a narrower range, another field, too many, a repeat,
  under DP, out of order) is a typed error, the same for every site, before anything is
  encoded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from test_active_server import (
    MODEL,
    N_MOD,
    ModSite,
    _reply,
    _spec,
    mod_round_to_consistency,
)

from sgs_flower.pipeline import (
    MAX_RETRIES,
    UpdateSpec,
    adapted_range,
    check_retry_spec,
    covering_weight_scale,
    decode_update,
    encode_update,
    retry_spec,
)
from sgs_flower.secagg import keys, wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    InconsistentAggregateError,
    InconsistentRequestError,
    PolicyError,
    StaleMessageError,
    ThresholdError,
)
from sgs_flower.secagg.prg import get_expander, reduce_mod
from sgs_flower.secagg.quantize import from_field, to_field
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import RetryInput, RetryRequest, Stage

MODEL_SIZE = sum(v.size for v in MODEL.values())
BIG = 5.0  # site 1's first coordinate moves this far: beyond the default range of 1


class OutlierSite(ModSite):
    """ModSite whose node 1 moves one coordinate by ``BIG`` (the rest by 0.01 * node)."""

    def train(self, msg: Message, context: Context) -> Message:
        self.trained += 1
        arrays = msg.content.array_records["arrays"]
        new = {}
        for i, (k, v) in enumerate(arrays.items()):
            a = v.numpy() + np.float32(0.01 * context.node_id)
            if i == 0 and context.node_id == 1:
                a = a.copy()
                a.flat[0] += np.float32(BIG)
            new[k] = Array(a)
        metrics = MetricRecord({"num-examples": 10 + context.node_id, "train_loss": self.loss})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)


def _true_mean(sites) -> np.ndarray:
    w = np.array([10 + u for u in sites], dtype=np.float64)
    deltas = []
    for u in sites:
        d = np.full(MODEL_SIZE, np.float32(0.01 * u), dtype=np.float64)
        if u == 1:
            d[0] += BIG
        deltas.append(d)
    return np.sum(w[:, None] * np.array(deltas), axis=0) / w.sum()


def _unmasked_round(sites, spec):
    server, reqs = mod_round_to_consistency(sites, spec)
    unmask = server.collect_consistency({u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()})
    out = server.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in unmask.items()})
    return server, out


def _send_retry(sites, server, spec, nodes=None, attempt=None, survivors=None):
    reqs = server.retry_messages()
    out = {}
    for u, r in reqs.items():
        if nodes is not None and u not in nodes:
            continue
        r = dataclasses.replace(r, attempt=attempt or r.attempt, survivors=survivors or r.survivors)
        out[u] = sites[u].send(Stage.RETRY, r, {wire.SPEC_KEY: ConfigRecord(spec.to_config())})
    return out


# ---------------------------------------------------------------- honest retry through the mod
def test_a_clipped_round_is_retried_once_and_released_exact():
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)  # weights 11..15: the covering scale
    server, out = _unmasked_round(sites, spec)
    first = decode_update(out.total, spec, N_MOD, MODEL_SIZE, ["train_loss"])
    assert first.clipped == (1, 0)  # counted inside the masked vector
    new, why = retry_spec(spec, first)
    assert new is not None and why == ["1 coordinates beyond +-1"]
    assert new.clip_range == 8.0 and new.weight_unit == 16  # the histogram's covering threshold (5 < 8)
    replies = _send_retry(sites, server, new)
    assert all(not r.has_error() for r in replies.values())
    retried = server.collect_retry({u: _reply(r) for u, r in replies.items()}, _spec_digest(new))
    dec = decode_update(retried.total, new, N_MOD, MODEL_SIZE, ["train_loss"])
    assert dec.clipped == (0, 0) and retry_spec(new, dec) == (None, [])
    np.testing.assert_allclose(dec.mean_delta, _true_mean(sites), atol=dec.error_bound + 1e-6)
    assert dec.metrics["train_loss"] == pytest.approx(np.average([s.loss for s in sites.values()],
                                                                 weights=[10 + u for u in sites]), abs=1e-5)
    assert all(s.trained == 1 for s in sites.values())  # re-encoded, never retrained


def _spec_digest(spec: UpdateSpec) -> bytes:
    from sgs_flower.pipeline import spec_digest

    return spec_digest(spec)


def test_the_first_sum_is_a_function_of_the_linear_sum_not_of_clipped_values():
    """What makes a retry safe: out-of-range values wrap instead of clipping, so the first
    (rejected) sum is the cohort's linear fixed-point sum mod 2^b up to one rounding per
    site. With clipping, the first and the retried sum together would give the clipped
    excess of the one site beyond the range: here 4.0 of site 1's 5.0."""
    spec = _spec(weight_scale=16, metric_slots=0)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.5, 0.5, 64) for _ in range(N_MOD)]
    xs[0][0] = BIG
    ws = [11, 12, 13, 14, 15]
    total = sum(encode_update(x, {}, w, spec).vector.astype(np.uint64) for x, w in zip(xs, ws, strict=True))
    body = from_field(reduce_mod(np.asarray(total), 32).astype(np.uint32)[:64], 32)
    s = spec.quantization.scale
    linear = np.rint(sum(w / 16 * x * s for x, w in zip(xs, ws, strict=True))).astype(np.int64)
    diff = from_field(to_field(body - linear, 32), 32)  # the difference mod 2^32, signed
    assert np.all(np.abs(diff) <= N_MOD)  # at most one level of rounding per site
    clipped = np.rint(sum(w / 16 * np.clip(x, -1, 1) * s for x, w in zip(xs, ws, strict=True))).astype(np.int64)
    assert abs(int(body[0]) - int(clipped[0])) > 1000  # what the old encoder released


# ---------------------------------------------------------------- the lying server, protocol level
def _core_round(n=5, m=64):
    ids = tuple(range(1, n + 1))
    server = SecAggServer(RoundParams(run_id=1, round_id=1, cohort=ids, vector_length=m), bound_digest=b"model")
    clients = {u: SecAggClient(u) for u in ids}
    rng = np.random.default_rng(7)
    x = {u: rng.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32) for u in ids}
    out = run_protocol(server, clients, x, bound_digests={u: b"model" for u in ids})
    assert np.array_equal(out.total, reduce_mod(sum(v.astype(np.uint64) for v in x.values()), 32).astype(np.uint32))
    return server, clients, x


def test_a_lying_server_gets_a_retry_vector_it_cannot_unmask_alone():
    """The server claims a non-zero clip count and asks for a retry. It holds every
    survivor's self-mask seed (revealed at unmask), so it can remove site 1's self mask
    from the retry vector; what remains is site 1's input plus pairwise masks that are
    uniform and independent of the round's pairwise masks: neither vector alone, nor
    their difference, gives site 1's input (or the change between its two inputs)."""
    server, clients, x = _core_round()
    ids = sorted(clients)
    m = x[1].size
    x2 = {u: (x[u].astype(np.uint64) + 12345).astype(np.uint32) for u in ids}
    reqs = server.retry_messages()
    replies = {u: clients[u].handle(reqs[u], vector=x2[u], bound_digest=b"spec") for u in ids}
    y2 = replies[1].vector
    exp = get_expander(m, np.uint32)
    ctx2 = keys.retry_context(server.context, 1, b"spec")
    seeds = server._seeds
    assert seeds is not None
    residual2 = np.empty(m, dtype=np.uint32)
    exp.accumulate(residual2, [(keys.self_mask_key(seeds[1], ctx2, 1), -1)], base=y2)
    pairwise2 = reduce_mod((residual2.astype(np.uint64) - x2[1] + (1 << 32)), 32).astype(np.uint32)
    # the pairwise masks of the round itself, from the clients' own secrets (the test's view)
    st = clients[1].state
    s_sk = keys.load_private_key(st.secrets.s_sk)
    pairwise1 = np.zeros(m, dtype=np.uint32)
    streams = [(keys.pairwise_mask_key(keys.agree(s_sk, nk.s_pk, v), server.context, 1, v), +1 if v > 1 else -1)
               for v, nk in st.roster.items()]
    exp.accumulate(pairwise1, streams)
    assert np.count_nonzero(pairwise2) >= m - 1  # still masked: not the input
    assert np.count_nonzero(pairwise2 != pairwise1) >= m - 1  # new masks, not the round's
    diff = (pairwise2.astype(np.int64) - pairwise1.astype(np.int64)) % (1 << 32)
    assert np.count_nonzero(diff) >= m - 1  # differencing the two vectors leaves masks
    # uniform: the top bit of the words is set about half the time (64 words: 14..50)
    assert 14 <= int(np.count_nonzero(pairwise2 >> 31)) <= 50
    # and the retried sum is just the cohort's sum of the new inputs
    total = server.collect_retry(replies, b"spec").total
    assert np.array_equal(total, reduce_mod(sum(v.astype(np.uint64) for v in x2.values()), 32).astype(np.uint32))


def test_different_retry_specs_for_different_sites_give_garbage():
    """A server that sends one site another retry spec (e.g. to single it out): that
    site's masks are keyed with another context, the pairwise masks do not cancel, and the
    count coordinate says so; nothing is released."""
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)
    server, _ = _unmasked_round(sites, spec)
    new = dataclasses.replace(spec, clip_range=8.0)
    other = dataclasses.replace(spec, clip_range=16.0)
    reqs = server.retry_messages()
    replies = {u: _reply(sites[u].send(Stage.RETRY, r, {wire.SPEC_KEY: ConfigRecord((other if u == 2 else new)
                                                                                     .to_config())}))
               for u, r in reqs.items()}
    total = server.collect_retry(replies, _spec_digest(new)).total
    with pytest.raises(InconsistentAggregateError):
        decode_update(total, new, N_MOD, MODEL_SIZE, ["train_loss"])


def test_a_retry_needs_every_survivor():
    server, clients, x = _core_round()
    reqs = server.retry_messages()
    replies = {u: clients[u].handle(reqs[u], vector=x[u], bound_digest=b"spec") for u in sorted(clients) if u != 3}
    with pytest.raises(ThresholdError, match=r"survivors \[3\] did not answer retry 1"):
        server.collect_retry(replies, b"spec")


# ---------------------------------------------------------------- site-side refusals through the mod
def _refusals(replies) -> set[str]:
    assert all(r.has_error() for r in replies.values())
    return {r.error.reason for r in replies.values()}


@pytest.mark.parametrize("change, error", [
    (dict(clip_range=0.5), "PolicyError: a retry's range may only widen"),
    (dict(int_clip_range=10.0), "PolicyError: a retry's range may only widen"),
    (dict(metric_range=1000.0), "InconsistentRequestError: a retry may change only clip_range, int_clip_range, "
                                "weight_scale; its spec changes 'metric_range'"),
    (dict(max_weight=2048), "InconsistentRequestError: a retry may change only"),
    ({}, "StaleMessageError: a retry repeats the ranges and weight scale of an earlier attempt"),
])
def test_a_retry_outside_the_rules_is_refused_by_every_site_alike(change, error):
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)
    server, _ = _unmasked_round(sites, spec)
    reasons = _refusals(_send_retry(sites, server, dataclasses.replace(spec, **change)))
    assert len(reasons) == 1 and next(iter(reasons)).startswith(error)  # the same reply from every site


def test_a_retry_for_another_survivor_set_or_out_of_order_is_refused():
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)
    wide = dataclasses.replace(spec, clip_range=8.0)
    server, _ = _unmasked_round(sites, spec)
    reasons = _refusals(_send_retry(sites, server, wide, survivors=(1, 2, 3, 4)))
    assert reasons == {"InconsistentRequestError: retry request names another survivor set than the one node "
                       f"{u} signed and unmasked for; refused" for u in sites}
    sites2 = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    server2, _ = _unmasked_round(sites2, spec)
    reasons = _refusals(_send_retry(sites2, server2, wide, attempt=2))
    assert all(r.startswith("StaleMessageError: retry attempt 2 arrived") for r in reasons)


def test_a_retry_before_unmask_is_a_stale_message():
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)
    _server, reqs = mod_round_to_consistency(sites, spec)  # masked inputs summed, nothing unmasked
    retry = RetryRequest(run_id=1, round_id=3, recipient=1, survivors=tuple(sorted(sites)), attempt=1)
    out = sites[1].send(Stage.RETRY, retry, {wire.SPEC_KEY: ConfigRecord(dataclasses.replace(spec, clip_range=8.0)
                                                                         .to_config())})
    assert out.has_error() and out.error.reason.startswith("StaleMessageError")
    assert "a retry comes only after this site unmasked" in out.error.reason
    # the site left the round: it does not sign a survivor set any more
    assert sites[1].send(Stage.CONSISTENCY, reqs[1]).has_error()


def test_at_most_max_retries_then_refused():
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)
    server, _ = _unmasked_round(sites, spec)
    c = spec.clip_range
    for _ in range(MAX_RETRIES):
        c *= 2
        nxt = dataclasses.replace(spec, clip_range=c)
        replies = _send_retry(sites, server, nxt)
        server.collect_retry({u: _reply(r) for u, r in replies.items()}, _spec_digest(nxt))
    # a third: the server side refuses to build it, and a site refuses it when forced
    with pytest.raises(Exception, match="at most 2 retries"):
        server.retry_messages()
    server.retries = 0  # a lying server that ignores its own bound
    forced = {u: dataclasses.replace(r, attempt=MAX_RETRIES + 1) for u, r in server.retry_messages().items()}
    replies = {u: sites[u].send(Stage.RETRY, r, {wire.SPEC_KEY: ConfigRecord(
        dataclasses.replace(spec, clip_range=c * 2).to_config())}) for u, r in forced.items()}
    assert all(r.startswith("PolicyError") and "at most 2" in r for r in _refusals(replies))


def test_no_retry_under_dp_and_spec_rules():
    dp = UpdateSpec(clip_range=1.0, max_cohort=5, max_weight=1, dp_mode="central", l2_clip=1.0)
    with pytest.raises(PolicyError, match="refused under DP"):
        check_retry_spec(dp, [], dataclasses.replace(dp, clip_range=2.0))
    base = _spec()
    check_retry_spec(base, [], dataclasses.replace(base, weight_scale=16))  # a precision retry: scale only
    with pytest.raises(StaleMessageError):
        check_retry_spec(base, [dataclasses.replace(base, weight_scale=16)], dataclasses.replace(base, weight_scale=16))
    with pytest.raises(InconsistentRequestError):
        check_retry_spec(base, [], dataclasses.replace(base, field_bits=64))


# ---------------------------------------------------------------- the weight scale (point 2)
@pytest.mark.parametrize("weights", [[1] * 5, [163] * 5, [8000] * 5, [10**6] * 5, [1, 163, 8000, 10**6, 2]])
def test_precision_does_not_depend_on_num_examples(weights):
    """max_weight = 10^6 no longer costs a site with few examples: round 1 (at the initial
    scale, 10^6) is released only with a bound below 2^-14 of the range, else retried at
    the covering scale; the next round starts at the covering scale, whose bound is within
    2 n c / L of every weighting (1, 163, 8,000, 10^6 alike)."""
    n = len(weights)
    spec = UpdateSpec(clip_range=1.0, max_cohort=n, metric_slots=0)
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-1, 1, 20_000) for _ in weights]
    truth = np.average(np.array(xs), axis=0, weights=weights)

    def round_at(sp):
        total = sum(encode_update(x, {}, w, sp).vector.astype(np.uint64) for x, w in zip(xs, weights, strict=True))
        return decode_update(reduce_mod(np.asarray(total), 32).astype(np.uint32), sp, n, 20_000)

    first = round_at(spec)
    scale = covering_weight_scale(spec.max_weight, first.weight_histogram)
    assert max(weights) <= scale < 2 * max(weights) or scale == spec.max_weight
    new, _ = retry_spec(spec, first)
    assert (new is not None) == (first.error_bound > 2.0**-14)
    released = round_at(new) if new is not None else first
    assert released.error_bound <= 2.0**-14
    assert float(np.max(np.abs(released.mean_delta - truth))) <= released.error_bound
    steady = round_at(dataclasses.replace(spec, weight_scale=scale))  # round 2 on
    c_over_l = 1.0 / spec.quantization.levels
    assert steady.error_bound <= 2 * n * c_over_l * max(weights) / sum(weights) + 1e-15 <= 2 * n * c_over_l + 1e-15
    assert float(np.max(np.abs(steady.mean_delta - truth))) <= steady.error_bound


def test_a_weight_above_the_scale_is_counted_and_retried_never_clipped():
    spec = _spec(weight_scale=8)
    xs = [np.full(10, 0.1 * u) for u in range(1, 6)]
    ws = [3, 4, 5, 6, 100]
    total = sum(encode_update(x, {"train_loss": 1.0}, w, spec).vector.astype(np.uint64)
                for x, w in zip(xs, ws, strict=True))
    dec = decode_update(reduce_mod(np.asarray(total), 32).astype(np.uint32), spec, 5, 10, ["train_loss"])
    assert dec.weights_over_scale == 1 and dec.total_weight == sum(ws)
    new, why = retry_spec(spec, dec)
    assert new is not None and new.weight_unit == 128 and "1 weights above the weight scale 8" in why[0]


def test_the_adapted_range_never_narrows_below_recent_needs():
    assert adapted_range([1.0, 0.25, 0.125], 0.125) == 2.0  # the largest need of the last rounds, x2
    assert adapted_range([], 0.5) == 0.5


def test_retry_request_round_trips_and_a_retry_input_carries_its_vector():
    r = RetryRequest(run_id=1, round_id=2, recipient=3, survivors=(1, 2, 3), attempt=1)
    assert wire.decode(wire.encode(r)) == r
    v = RetryInput(run_id=1, round_id=2, sender=3, vector=np.arange(4, dtype=np.uint32))
    back = wire.decode(wire.encode(v))
    assert isinstance(back, RetryInput) and np.array_equal(back.vector, v.vector)


def test_the_mod_keeps_only_one_update_and_drops_it_after_the_last_retry():
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(weight_scale=16)
    server, _ = _unmasked_round(sites, spec)
    files = [Path(str(s.context.state.config_records["sgs.secagg.kept"]["delta-file"])) for s in sites.values()]
    assert all(f.exists() for f in files)
    assert not any(s.context.state.array_records for s in sites.values())  # the delta never travels in the context
    c = spec.clip_range
    for _ in range(MAX_RETRIES):
        c *= 2
        nxt = dataclasses.replace(spec, clip_range=c)
        server.collect_retry({u: _reply(r) for u, r in _send_retry(sites, server, nxt).items()}, _spec_digest(nxt))
    assert not any(f.exists() for f in files)
    assert all(s.context.state.config_records["sgs.secagg.kept"]["delta-file"] == "" for s in sites.values())


# ---------------------------------------------------------------- the strategy, in process
@pytest.fixture
def task_identity(monkeypatch):
    """Flower messages built outside a running app need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class StrategySite:
    """One in-process SuperNode behind the real mod: ``x -> x + step(node, round)``;
    ``crash_retry`` makes the node crash (an error reply) at the retry stage,
    ``crash_masked`` at the masked input of those rounds (a dropout there)."""

    def __init__(self, node: int, step, crash_retry: bool = False, crash_masked: tuple[int, ...] = ()) -> None:
        self.node, self.step, self.crash_retry, self.crash_masked = node, step, crash_retry, crash_masked
        self.context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

    def train(self, msg, context):
        rnd = int(msg.content["config"]["server-round"])
        new = ArrayRecord({k: Array((a.numpy() + self.step(self.node, rnd, a.numpy().shape)).astype(np.float32))
                           for k, a in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 10 + self.node})}),
                       reply_to=msg)

    def handle(self, msg):
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        from clients.secagg_mod import secagg_mod

        rec = msg.content.config_records.get(wire.RECORD_KEY)
        stage = rec.get(wire.FIELD_STAGE) if rec is not None else None
        if ((self.crash_retry and stage == int(Stage.RETRY))
                or (stage == int(Stage.MASKED_INPUT) and int(msg.metadata.group_id) in self.crash_masked)):
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="simulated crash"), reply_to=msg)
        return secagg_mod(msg, self.context, self.train)


def _strategy_run(step, rounds=2, crash_retry=()):
    from flwr.serverapp.strategy import FedAvg
    from test_pipelined_rounds import _local_grid

    from strategies import SecAggStrategy

    sites = {u: StrategySite(u, step, u in crash_retry) for u in range(1, 6)}
    strategy = SecAggStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=5, min_available_nodes=5))
    models = {}

    def keep(rnd, arrays):
        models[rnd] = {k: v.numpy().copy() for k, v in arrays.items()}
        return MetricRecord({"round": rnd})

    init = ArrayRecord({"w": Array(np.zeros((4, 5), dtype=np.float32))})
    try:
        strategy.start(grid=_local_grid(sites), initial_arrays=init, num_rounds=rounds,
                       train_config=ConfigRecord({"lr": 1.0}), evaluate_fn=keep)
    except Exception as exc:  # SecureAggregationFailed when every round aborts
        models["error"] = exc
    return strategy.reports, models


def _outlier(value):
    def step(node, rnd, shape):
        d = np.full(shape, 0.01 * node, dtype=np.float32)
        if node == 1 and rnd == 1:
            d.flat[0] = value
        return d
    return step


def test_the_strategy_retries_and_releases_fedavgs_model(task_identity, caplog):
    reports, models = _strategy_run(_outlier(5.0))
    assert [r.status for r in reports] == ["ok", "ok"]
    assert [r.retries for r in reports] == [1, 0] and [r.exchanges for r in reports] == [6, 3]
    assert reports[0].retry_reasons == ["1 coordinates beyond +-1"] and reports[0].clip_range == 8.0
    assert reports[0].weight_scale == 16 and reports[1].weight_scale == 16  # weights 11..15
    w = np.arange(11, 16, dtype=np.float64)
    expect = np.full(20, float(np.sum(w * 0.01 * np.arange(1, 6)) / w.sum()))
    expect[0] += 11 * (5.0 - 0.01) / w.sum()
    np.testing.assert_allclose(models[1]["w"].ravel(), expect, atol=reports[0].error_bound + 1e-6)
    assert "retry 1 of the masked input (1 coordinates beyond +-1) at range +-8" in caplog.text
    assert reports[1].clip_range >= 8.0  # the next range covers what round 1 needed


def test_a_round_still_out_of_range_after_the_retries_is_not_released(task_identity):
    reports, models = _strategy_run(_outlier(1e12))
    r1 = reports[0]
    assert r1.status == "out-of-range" and r1.retries == MAX_RETRIES and r1.exchanges == 5 + MAX_RETRIES
    assert "still holds values beyond the range" in r1.reason
    assert np.array_equal(models[1]["w"], np.zeros((4, 5), np.float32))  # nothing was released
    assert reports[1].status == "ok"  # the next round starts at the wider range


def test_a_survivor_missing_at_the_retry_aborts_the_round(task_identity):
    reports, models = _strategy_run(_outlier(5.0), crash_retry=(3,))
    assert reports[0].status == "aborted" and "survivors [3] did not answer retry 1" in reports[0].reason
    assert np.array_equal(models[1]["w"], np.zeros((4, 5), np.float32))


def test_a_site_whose_update_was_unusable_sends_its_unusable_vector_again(task_identity):
    """Site 2's train step raises in round 1 (it sends the unusable vector, issue 18);
    the round retries for site 1's outlier: site 2 answers the retry like every site,
    with its unusable vector re-made under the retry spec, and the released mean is over
    the four others."""
    def step(node, rnd, shape):
        if node == 2 and rnd == 1:
            raise RuntimeError("site 2's training fails")
        return _outlier(5.0)(node, rnd, shape)

    reports, models = _strategy_run(step, rounds=1)
    r1 = reports[0]
    assert r1.status == "ok" and r1.retries == 1 and r1.failures == {"train step raised": 1}
    w = np.array([11, 13, 14, 15], dtype=np.float64)
    nodes = np.array([1, 3, 4, 5])
    expect = np.full(20, float(np.sum(w * 0.01 * nodes) / w.sum()))
    expect[0] += 11 * (5.0 - 0.01) / w.sum()
    np.testing.assert_allclose(models[1]["w"].ravel(), expect, atol=r1.error_bound + 1e-6)


def test_kept_deltas_left_by_an_earlier_run_are_collected_after_an_hour():
    """A run's last round leaves each site's kept delta (no message says no retry will
    come); the next masked input in that folder deletes those older than an hour, and
    never a fresh one (another site's of the round in progress)."""
    import os
    import time

    from sgs_flower.dp.site import default_state_file

    folder = default_state_file("x").parent
    folder.mkdir(parents=True, exist_ok=True)
    stale, fresh = folder / "node-99.kept-delta.npy", folder / "node-98.kept-delta.npy"
    for f in (stale, fresh):
        f.write_bytes(b"left over")
    hours_ago = time.time() - 7200
    os.utime(stale, (hours_ago, hours_ago))
    sites = {u: OutlierSite(u) for u in range(1, N_MOD + 1)}
    _unmasked_round(sites, _spec(weight_scale=16))
    assert not stale.exists() and fresh.exists()


def test_a_retry_in_a_round_with_a_group_left_out_goes_to_the_whole_groups_only(task_identity):
    """Whole-group participation at its default (three groups of 3 learnt at round 1 from
    the nine sites): site 1 crashes at round 2's masked input, so its two group-mates are
    left out with it; every update of round 2 is out of range, so the round is retried,
    and the retry goes to the two other groups alone (a left-out site would refuse it).
    The released model is FedAvg's over those six sites."""
    from flwr.serverapp.strategy import FedAvg
    from test_pipelined_rounds import _local_grid

    from strategies import SecAggStrategy

    def step(node, rnd, shape):
        d = np.full(shape, 0.01 * node, dtype=np.float32)
        if rnd == 2:
            d.flat[0] = 5.0
        return d

    sites = {u: StrategySite(u, step, crash_masked=(2,) if u == 1 else ()) for u in range(1, 10)}
    strategy = SecAggStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=9, min_available_nodes=9))
    models = {}

    def keep(rnd, arrays):
        models[rnd] = arrays["w"].numpy().copy()
        return MetricRecord({"round": rnd})

    strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({"w": Array(np.zeros((4, 5), np.float32))}),
                   num_rounds=2, train_config=ConfigRecord({"lr": 1.0}), evaluate_fn=keep)
    r1, r2 = strategy.reports
    assert r1.status == "ok" and r2.status == "ok" and r2.retries == 1
    assert r2.group_excluded == 2 and len(r2.survivors) == 6 and 1 not in r2.survivors
    w = {u: 10 + u for u in r2.survivors}
    expect = np.full(20, sum(w[u] * 0.01 * u for u in w) / sum(w.values()))
    expect[0] = 5.0
    np.testing.assert_allclose((models[2] - models[1]).ravel(), expect, atol=r2.error_bound + 1e-6)
