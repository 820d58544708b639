"""Secure federated evaluation (issue 20, point 2): ``fraction_evaluate > 0`` through
SecAggStrategy and secagg_mod releases only the weighted means of the evaluation metrics
and the total num-examples, computed by SecAgg+ as training's are.

In-process sites (no Ray): the real strategy, the real mod, a Grid that calls each
site's mod directly (``test_pipelined_rounds._local_grid``), wrapped where a test needs
to see every reply the server receives (``flower_harness.RecordingGrid``)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from test_pipelined_rounds import _local_grid, task_identity  # noqa: F401 - the fixture is used by name

from clients.secagg_mod import secagg_mod
from sgs_flower.evaluation import EVAL_ROUND_FLAG, eval_round_id, eval_spec
from sgs_flower.secagg import wire
from sgs_flower.secagg.wire import Setup, Stage
from strategies import SecAggConfig, SecAggStrategy

MODEL = {"w": np.linspace(-0.5, 0.5, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, dtype=np.float32)}


class EvalSite:
    """One SuperNode in process, every message through ``secagg_mod`` (train and
    evaluate, as ``ClientApp(mods=[secagg_mod])`` does). Its evaluation depends on the
    model and on the site, and it records every evaluate reply it made in plaintext
    (what plain Flower's server would have received)."""

    def __init__(self, node: int, fail_eval: tuple[int, ...] = (), crash_eval: tuple[int, ...] = ()) -> None:
        self.node, self.fail_eval, self.crash_eval = node, fail_eval, crash_eval
        self.context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        self.eval_replies: dict[int, Message] = {}
        self.trained: list[int] = []

    def train(self, msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        self.trained.append(int(cfg["server-round"]))
        arrays = msg.content["arrays"]
        target = 0.2 * self.node - 0.6
        new = ArrayRecord({k: Array((a.numpy() + 0.5 * (target - a.numpy())).astype(np.float32))
                           for k, a in arrays.items()})
        return Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 10 + self.node})}),
                       reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        if rnd in self.fail_eval:
            raise RuntimeError(f"site {self.node} cannot evaluate in round {rnd}")
        w = msg.content["arrays"]["w"].numpy()
        loss = float(np.mean((w - 0.1 * self.node) ** 2)) + 0.01 * self.node
        metrics = MetricRecord({"num-examples": 7 * self.node + 3, "eval_loss": loss,
                                "eval_acc": 1.0 / (1.0 + self.node + rnd)})
        reply = Message(RecordDict({"metrics": metrics}), reply_to=msg)
        self.eval_replies[rnd] = reply
        return reply

    def handle(self, msg: Message) -> Message:
        rec = msg.content.config_records.get(wire.RECORD_KEY)
        if (msg.metadata.message_type == MessageType.EVALUATE and rec is not None
                and rec.get(wire.FIELD_STAGE) == int(Stage.MASKED_INPUT)
                and int(msg.content["config"]["server-round"]) in self.crash_eval):
            from flwr.app import Error
            from flwr.common.constant import ErrorCode

            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="simulated crash"), reply_to=msg)
        user = self.evaluate if msg.metadata.message_type == MessageType.EVALUATE else self.train
        return secagg_mod(msg, self.context, user)


def _run(n=5, rounds=2, grid_wrap=None, fail=None, crash=None, **kw):
    sites = {u: EvalSite(u, fail(u) if fail else (), crash(u) if crash else ()) for u in range(1, n + 1)}
    inner = FedAvg(fraction_evaluate=1.0, min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n)
    strategy = SecAggStrategy(inner, SecAggConfig(**kw))
    grid = _local_grid(sites)
    if grid_wrap is not None:
        grid = grid_wrap(grid)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
                            num_rounds=rounds, train_config=ConfigRecord({"lr": 1.0}))
    return result, strategy, sites, grid


def test_secure_evaluation_equals_plain_fedavg_aggregate_evaluate(task_identity):  # noqa: F811
    """Acceptance 1: each round's released evaluation metrics equal plain Flower's
    FedAvg.aggregate_evaluate over the replies the same clients made (recorded on the
    sites), within the reported quantization bound; and training stays pipelined."""
    result, strategy, sites, _ = _run()
    assert [r.status for r in strategy.reports] == ["ok", "ok"]
    assert [r.exchanges for r in strategy.reports] == [5, 3]  # evaluation does not break pipelining
    assert [r.status for r in strategy.eval_reports] == ["ok", "ok"]
    assert [r.exchanges for r in strategy.eval_reports] == [5, 5]
    for rnd in (1, 2):
        plain = FedAvg().aggregate_evaluate(rnd, [s.eval_replies[rnd] for s in sites.values()])
        secure = result.evaluate_metrics_clientapp[rnd]
        assert plain is not None and set(secure) == set(plain) == {"eval_loss", "eval_acc"}
        bound = strategy.eval_reports[rnd - 1].error_bound
        assert 0 < bound < 1e-6
        for k in plain:
            assert abs(float(secure[k]) - float(plain[k])) <= bound, (rnd, k, secure[k], plain[k])  # type: ignore[arg-type]
        assert strategy.eval_reports[rnd - 1].total_weight == sum(7 * u + 3 for u in sites)


def _floats_in(blob: bytes, value: float) -> bool:
    return any(struct.pack(fmt, value) in blob for fmt in ("<d", ">d", "<f", ">f"))


def test_the_server_never_receives_one_clients_evaluation_metric(task_identity):  # noqa: F811
    """Acceptance 2: a Grid that records every reply the server receives: no reply of an
    evaluation round carries a MetricRecord, an ArrayRecord other than the masked vector,
    or any site's metric value (as float32/float64 bytes) anywhere in its content."""
    from flower_harness import RecordingGrid

    _, strategy, sites, grid = _run(grid_wrap=RecordingGrid)
    assert [r.status for r in strategy.eval_reports] == ["ok", "ok"]
    evals = [m for m in grid.received if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evals) == 2 * 5 * len(sites)  # 2 rounds, 5 exchanges, every site answered each
    values = [float(v) for s in sites.values() for r in s.eval_replies.values()  # type: ignore[arg-type]
              for k, v in r.content["metrics"].items() if k != "num-examples"]
    for m in evals:
        assert not m.has_error()
        assert dict(m.content.metric_records) == {}
        assert set(m.content.array_records) <= {wire.VECTOR_KEY}
        assert set(m.content.config_records) == {wire.RECORD_KEY}
        rec = m.content.config_records[wire.RECORD_KEY]
        assert set(rec) <= {wire.FIELD_STAGE, wire.FIELD_PAYLOAD, wire.FIELD_METRIC_NAMES, wire.FIELD_METRICS_LEFT_OUT}
        blob = bytes(rec[wire.FIELD_PAYLOAD])  # type: ignore[arg-type]
        if wire.VECTOR_KEY in m.content.array_records:
            blob += m.content.array_records[wire.VECTOR_KEY][wire.FIELD_VECTOR].data
        assert not any(_floats_in(blob, v) for v in values)
    names = [m.content.config_records[wire.RECORD_KEY].get(wire.FIELD_METRIC_NAMES) for m in evals]
    assert ["eval_acc", "eval_loss"] in names  # the names travel in plaintext, the values never


def test_plain_evaluate_from_a_lying_server_is_refused(task_identity):  # noqa: F811
    """Acceptance 3: a plain evaluate message (no protocol record) is refused by the real
    mod with a typed error naming the cause; the user's evaluate never runs. A site that
    opts out (sgs-require-secagg=false) evaluates it as plain Flower does."""
    called: list[int] = []

    def evaluate(msg: Message, context: Context) -> Message:
        called.append(1)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "eval_loss": 0.25})}), reply_to=msg)

    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
                          "config": ConfigRecord({"server-round": 1})})
    msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = secagg_mod(msg, ctx, evaluate)
    assert reply.has_error() and not called
    assert reply.error.reason.startswith("PolicyError: this site requires secure aggregation and refuses a plain "
                                         "evaluate message")
    assert "in the clear" in reply.error.reason and "sgs-require-secagg=false" in reply.error.reason
    open_ctx = Context(run_id=1, node_id=1, node_config={"sgs-require-secagg": False}, state=RecordDict(),
                       run_config={})
    ok = secagg_mod(msg, open_ctx, evaluate)
    assert not ok.has_error() and called == [1]


def _setup_message(kind: str, round_id: int) -> Message:
    setup = Setup(run_id=1, round_id=round_id, recipient=1, cohort=(1, 2, 3), degree=2, threshold=2,
                  vector_length=8, field_bits=64)
    rec = ConfigRecord({wire.FIELD_STAGE: int(Stage.ADVERTISE_KEYS), wire.FIELD_PAYLOAD: wire.encode(setup)})
    return Message(RecordDict({wire.RECORD_KEY: rec}), dst_node_id=1, message_type=kind)


@pytest.mark.parametrize(("kind", "round_id", "why"), [
    (MessageType.EVALUATE, 4, "an evaluate message carries a train round's id"),
    (MessageType.TRAIN, eval_round_id(4), "a train message carries an evaluation round's id"),
])
def test_train_and_evaluation_rounds_never_mix(task_identity, kind, round_id, why):  # noqa: F811
    """A server cannot run an evaluation under a train round's id (its signatures and
    masks would then be a train round's) nor the reverse: StaleMessageError, by name."""
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = secagg_mod(_setup_message(kind, round_id), ctx, lambda m, c: pytest.fail("user code ran"))
    assert reply.has_error()
    assert reply.error.reason.startswith("StaleMessageError: " + why)
    fine = secagg_mod(_setup_message(MessageType.EVALUATE, eval_round_id(4)), ctx, lambda m, c: m)
    assert not fine.has_error()
    assert eval_round_id(4) & EVAL_ROUND_FLAG and not 4 & EVAL_ROUND_FLAG


def test_a_failing_evaluate_sends_an_unusable_vector_not_an_error(task_identity):  # noqa: F811
    """A site whose evaluate raises answers like the others (no error reply: the server
    cannot tell which site failed); it counts with weight 0, the failure is counted
    inside the sum, and the released means are over the other sites."""
    from flower_harness import RecordingGrid

    result, strategy, sites, grid = _run(grid_wrap=RecordingGrid, fail=lambda u: (2,) if u == 3 else ())
    assert not any(m.has_error() for m in grid.received)
    r2 = strategy.eval_reports[1]
    assert r2.status == "ok" and r2.failures == {"train step raised": 1} and len(r2.survivors) == 5
    others = [s.eval_replies[2] for u, s in sites.items() if u != 3]
    plain = FedAvg().aggregate_evaluate(2, others)
    assert plain is not None
    assert r2.total_weight == sum(7 * u + 3 for u in sites if u != 3)
    for k in plain:
        assert abs(float(result.evaluate_metrics_clientapp[2][k]) - float(plain[k])) <= r2.error_bound  # type: ignore[arg-type]


def test_an_aborted_evaluation_releases_nothing_and_the_run_goes_on(task_identity, caplog):  # noqa: F811
    """Three of five sites crash at round 1's evaluation (below the threshold): that
    evaluation aborts with its reason logged, nothing is released for it, and training
    and round 2's evaluation proceed as usual."""
    result, strategy, sites, _ = _run(crash=lambda u: (1,) if u <= 3 else ())
    assert [r.status for r in strategy.reports] == ["ok", "ok"]
    assert [r.status for r in strategy.eval_reports] == ["aborted", "ok"]
    assert "simulated crash" in strategy.eval_reports[0].reason
    assert 1 not in result.evaluate_metrics_clientapp and 2 in result.evaluate_metrics_clientapp
    assert "secure evaluation of round 1 aborted, no evaluation metrics released" in caplog.text
    assert all(s.trained == [1, 2] for s in sites.values())


def test_custom_evaluate_metrics_aggregation_is_warned_about():
    with pytest.warns(UserWarning, match="evaluate_metrics_aggr_fn=.*will receive ONE reply"):
        SecAggStrategy(FedAvg(fraction_evaluate=1.0, evaluate_metrics_aggr_fn=lambda recs, key: MetricRecord()))


def test_eval_spec_is_exact_enough_and_never_needs_a_retry():
    spec = eval_spec(max_cohort=1000, max_weight=1_000_000, metric_slots=8, metric_range=100.0)
    assert spec.field_bits == 64 and spec.weight_unit == spec.max_weight
    # issue 28: each metric slot carries its exact weighted value in limbs, positive and
    # negative part apart (2 limbs each at 64 bits), so 8 slots take 32 words, not 8
    assert spec.metric_limbs == 2 and spec.metric_words == 32
    assert spec.vector_length(0) == spec.metric_words + spec.counters + spec.quantization.extra_coordinates < 128


@pytest.mark.parametrize("mode", ["central-dp", "distributed-dp"])
def test_secure_evaluation_under_dp_presets(task_identity, mode):  # noqa: F811
    """Under the DP presets training releases no metric, but federated evaluation still
    releases the secure weighted means (no DP noise on them: docs/threat_model.md),
    equal to plain FedAvg.aggregate_evaluate within the bound."""
    from sgs_flower.dp.config import DPConfig

    n = 5
    sites = {u: EvalSite(u) for u in range(1, n + 1)}
    inner = FedAvg(fraction_evaluate=1.0, min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n)
    strategy = SecAggStrategy(inner, SecAggConfig(), dp=DPConfig(mode, clip_norm=1.0, noise_multiplier=1.0))
    result = strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
                            num_rounds=1, train_config=ConfigRecord({"lr": 1.0}))
    assert [r.status for r in strategy.reports] == ["ok"] and [r.status for r in strategy.eval_reports] == ["ok"]
    assert 1 not in result.train_metrics_clientapp or "eval_loss" not in result.train_metrics_clientapp[1]
    plain = FedAvg().aggregate_evaluate(1, [s.eval_replies[1] for s in sites.values()])
    assert plain is not None
    for k in plain:
        assert abs(float(result.evaluate_metrics_clientapp[1][k]) - float(plain[k])) <= strategy.eval_reports[0].error_bound  # type: ignore[arg-type]


@pytest.mark.parametrize("site_groups", [False, True])
def test_one_model_is_not_evaluated_over_two_survivor_sets_but_still_trains(task_identity, site_groups):  # noqa: F811
    """A lying server evaluates the same model twice (two server rounds) over cohorts
    differing by one site, to difference out that site's metrics: the sites refuse to
    sign a second survivor set for that evaluated model (nothing is released). Training
    from that very model is not blocked (the evaluation's memory is its own). The server
    claims no groups (``min_group=0``: it follows its Sneaky pick); sites with groups off
    refuse by their memory of the model, sites at the default (groups of 3) by the group
    check first."""
    from strategies.secure_eval import secure_evaluate

    class Sneaky(FedAvg):
        def configure_evaluate(self, server_round, arrays, config, grid):
            out = list(super().configure_evaluate(server_round, arrays, config, grid))
            return out if server_round == 1 else [m for m in out if m.metadata.dst_node_id != 5]

    n = 5
    sites = {u: EvalSite(u) for u in range(1, n + 1)}
    for site in sites.values():
        site.context.node_config.update({} if site_groups else {"sgs-min-group": "0"})
    strategy = SecAggStrategy(Sneaky(fraction_evaluate=1.0, min_train_nodes=n, min_available_nodes=n,
                                     min_evaluate_nodes=4), SecAggConfig(min_group=0))
    grid = _local_grid(sites)
    model = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    first = secure_evaluate(strategy, grid, 1, model, ConfigRecord({"server-round": 1}))
    assert first is not None and strategy.eval_reports[0].status == "ok"
    second = secure_evaluate(strategy, grid, 2, model, ConfigRecord({"server-round": 1}))
    assert second is None and strategy.eval_reports[1].status == "aborted"
    why = "splits 1 of the federation's 1 groups" if site_groups else "already aggregated over another survivor set"
    assert why in strategy.eval_reports[1].reason
    strategy.inner.fraction_evaluate = 0.0
    strategy.start(grid=grid, initial_arrays=model, num_rounds=1, train_config=ConfigRecord({"lr": 1.0}))
    assert [r.status for r in strategy.reports] == ["ok"]


@pytest.mark.slow
def test_flower_simulation_evaluates_securely(tmp_path):
    """Acceptances 1 and 2 in a real Flower simulation (Ray): ``fraction_evaluate=1.0``
    with ``secagg_mod`` on evaluate gives plain FedAvg's evaluation aggregate (its
    ``evaluate_metrics_aggr_fn`` over the replies the sites made, recorded out of band)
    within the bound, and no reply the real Grid delivers to the server carries a
    MetricRecord or a site's metric value."""
    from flower_harness import RecordingGrid, evaluating_client, load_eval_dump, run
    from flwr.serverapp import Grid

    n, rounds = 4, 2
    out: dict = {}

    def main(grid: Grid, context: Context) -> None:
        inner = FedAvg(fraction_evaluate=1.0, min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n)
        strategy = SecAggStrategy(inner, SecAggConfig())
        g = RecordingGrid(grid)
        out["result"] = strategy.start(grid=g, initial_arrays=ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
                                       num_rounds=rounds, train_config=ConfigRecord({"lr": 1.0}))
        out["strategy"], out["grid"] = strategy, g

    run(main, evaluating_client(tmp_path), n)
    strategy, grid, result = out["strategy"], out["grid"], out["result"]
    assert [r.status for r in strategy.reports] == ["ok"] * rounds
    assert [(r.status, r.exchanges) for r in strategy.eval_reports] == [("ok", 5)] * rounds
    values = []
    for rnd in range(1, rounds + 1):
        replies = load_eval_dump(tmp_path, rnd)
        assert len(replies) == n
        values += [v for m in replies for k, v in m.items() if k != "num-examples"]
        plain = FedAvg().evaluate_metrics_aggr_fn([RecordDict({"metrics": MetricRecord(m)}) for m in replies],
                                                  "num-examples")
        secure = result.evaluate_metrics_clientapp[rnd]
        assert set(secure) == set(plain) == {"eval_loss", "eval_acc"}
        for k in plain:
            assert abs(float(secure[k]) - float(plain[k])) <= strategy.eval_reports[rnd - 1].error_bound  # type: ignore[arg-type]
    evals = [m for m in grid.received if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evals) == rounds * 5 * n
    for m in evals:
        assert not m.has_error() and dict(m.content.metric_records) == {}
        blob = bytes(m.content.config_records[wire.RECORD_KEY][wire.FIELD_PAYLOAD])  # type: ignore[arg-type]
        if wire.VECTOR_KEY in m.content.array_records:
            blob += m.content.array_records[wire.VECTOR_KEY][wire.FIELD_VECTOR].data
        assert not any(_floats_in(blob, v) for v in values)


def test_the_mixin_evaluates_through_the_same_path(task_identity):  # noqa: F811
    """SecAggClientMixin.secure_evaluate wraps the class's own evaluate like the mod:
    a plain evaluate message is refused there too, by name, before evaluate runs."""
    from clients import SecAggClientMixin

    class Client(SecAggClientMixin):
        calls = 0

        def evaluate(self, msg: Message, context: Context) -> Message:
            Client.calls += 1
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = Client().secure_evaluate(msg, ctx)
    assert reply.has_error() and "refuses a plain evaluate message" in reply.error.reason and Client.calls == 0
