"""Issue 28, part A: federated evaluation survives the two-line drop-in.

The README's client line is ``app = ClientApp(mods=[secagg_mod])``: the mod wraps every
handler, so a quickstart-numpy-shaped app with a train AND an evaluate function gets
FedAvg's federated evaluation, computed securely. The former line,
``@app.train(mods=[secagg_mod])``, leaves evaluate unwrapped: the secure evaluation's
protocol messages reach the user's evaluate, which raises; the server must then stop at
the first evaluation with one ERROR naming the fix, not log one warning per node and
stage and end "successfully" with no evaluation. Messages the mod does not handle
(query) pass through it untouched.

The apps come from ``test_dropin_examples`` (``drop_in``, ``numpy_train``, ``initial``);
plain FedAvg's evaluation is Flower's own ``FedAvg.aggregate_evaluate`` over the same
evaluate function's plaintext replies on the models the secure run released (in
process, as ``test_dropin_examples.plain_fedavg_round1`` does).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import cloudpickle
import numpy as np
import pytest
from flower_harness import run
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
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from test_dropin_examples import BNNet, N, bn_train, drop_in, initial, numpy_train, opacus_train
from test_pipelined_rounds import _local_grid, task_identity  # noqa: F401 - the fixture is used by name

from clients import secagg_mod
from strategies import SecAggConfig, SecAggStrategy, SecureEvaluationUnavailable

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slow
ROUNDS = 3


def numpy_evaluate(msg: Message, context: Context) -> Message:
    """quickstart-numpy style evaluate: a loss and an accuracy that depend on the model it
    is given and on the site's partition, and the partition's size as ``num-examples``."""
    pid = int(context.node_config["partition-id"])
    w = msg.content["arrays"]["w"].numpy().astype(np.float64)
    b = msg.content["arrays"]["b"].numpy().astype(np.float64)
    loss = float(np.mean((w - 0.05 * pid) ** 2)) + float(np.mean(np.abs(b))) + 0.01 * pid
    acc = 1.0 / (1.0 + pid + float(np.mean(np.abs(w))))
    metrics = MetricRecord({"num-examples": 100 + 37 * pid, "eval_loss": loss, "eval_acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def torch_evaluate(msg: Message, context: Context) -> Message:
    """quickstart-pytorch style evaluate of the BatchNorm CNN (eval mode, its running
    statistics used): cross-entropy and accuracy on the partition's stand-in test set."""
    import torch

    pid = int(context.node_config["partition-id"])
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1000 + pid)
    n = 200 + 50 * pid
    x, y = torch.randn(n, 3, 8, 8, generator=gen) * (1 + pid), torch.randint(0, 10, (n,), generator=gen)
    net = BNNet()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    net.eval()
    return _loss_and_accuracy_reply(msg, net, x, y)


def linear_evaluate(msg: Message, context: Context) -> Message:
    """The opacus example's evaluate of its linear model: loss and accuracy on a stand-in
    test set of the partition."""
    import torch

    pid = int(context.node_config["partition-id"])
    gen = torch.Generator().manual_seed(2000 + pid)
    n = 120 + 30 * pid
    x, y = torch.randn(n, 20, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    net = torch.nn.Linear(20, 4)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return _loss_and_accuracy_reply(msg, net, x, y)


def _loss_and_accuracy_reply(msg: Message, net: Any, x: Any, y: Any) -> Message:
    """The evaluate reply of a torch app: cross-entropy and accuracy of ``net`` on (x, y),
    weighted by the number of examples."""
    import torch

    with torch.no_grad():
        out = net(x)
        loss = float(torch.nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).float().mean())
    metrics = MetricRecord({"num-examples": len(y), "eval_loss": loss, "eval_acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


#: The modelled apps with an evaluate function: (train, evaluate, num-examples of partition pid)
APPS: dict[str, tuple[Any, Any, Any]] = {
    "numpy": (numpy_train, numpy_evaluate, lambda pid: 100 + 37 * pid),
    "torch": (bn_train, torch_evaluate, lambda pid: 200 + 50 * pid),
    "opacus": (opacus_train, linear_evaluate, lambda pid: 120 + 30 * pid),
}


def _inner() -> FedAvg:
    return FedAvg(fraction_evaluate=1.0, min_train_nodes=N, min_available_nodes=N, min_evaluate_nodes=N)


def _simulate(app: ClientApp, kind: str = "numpy") -> dict[str, Any]:
    """``ROUNDS`` secure rounds with federated evaluation on N SuperNodes; the released
    model of each round is kept (``evaluate_fn``), and a SecureAggregationFailed is kept
    too (a user's ServerApp would end with it)."""
    out: dict[str, Any] = {"models": {}}

    def main(grid: Grid, context: Context) -> None:
        strategy = SecAggStrategy(_inner())  # the server half of the drop-in

        def keep(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            out["models"][rnd] = {k: v.numpy().copy() for k, v in arrays.items()}
            return MetricRecord({"round": rnd})

        out["strategy"] = strategy
        try:
            out["result"] = strategy.start(grid=grid, initial_arrays=initial(kind), num_rounds=ROUNDS,
                                           evaluate_fn=keep)
        except SecureEvaluationUnavailable as exc:
            out["error"] = exc

    run(main, app, N)
    return out


def _plain_evaluation(rnd: int, model: dict[str, np.ndarray], evaluate: Any = numpy_evaluate) -> MetricRecord:
    """Plain FedAvg's federated evaluation of ``model``: the N evaluate functions' plaintext
    replies, aggregated by Flower's own ``FedAvg.aggregate_evaluate``."""
    replies = []
    for pid in range(N):
        ctx = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": N},
                      state=RecordDict(), run_config={})
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                              "config": ConfigRecord({"server-round": rnd})})
        msg = Message(content, dst_node_id=pid + 1, message_type=MessageType.EVALUATE, group_id=str(rnd))
        replies.append(evaluate(msg, ctx))
    agg = FedAvg().aggregate_evaluate(rnd, replies)
    assert agg is not None
    return agg


@pytest.mark.parametrize("kind", sorted(APPS))
def test_the_readme_client_line_keeps_fedavgs_federated_evaluation(caplog, kind):
    """``ClientApp(mods=[secagg_mod])`` with a train and an evaluate function, in every
    modelled app (quickstart-numpy, the BatchNorm CNN, the opacus example's model):
    every round's evaluation is released, in Result and in the log as plain Flower's,
    and equals plain FedAvg's aggregate_evaluate on the same released model within 1e-5
    relative (issue 28: the metrics travel exactly)."""
    train, evaluate, examples = APPS[kind]
    app = drop_in(train)  # ClientApp(mods=[secagg_mod]) + @app.train()
    app.evaluate()(evaluate)
    with caplog.at_level(logging.INFO):
        out = _simulate(app, kind)
    assert "error" not in out, out.get("error")
    strategy, result = out["strategy"], out["result"]
    assert [r.status for r in strategy.reports] == ["ok"] * ROUNDS
    assert [(r.status, len(r.survivors)) for r in strategy.eval_reports] == [("ok", N)] * ROUNDS
    assert sorted(result.evaluate_metrics_clientapp) == list(range(1, ROUNDS + 1))
    for rnd in range(1, ROUNDS + 1):
        secure = result.evaluate_metrics_clientapp[rnd]
        plain = _plain_evaluation(rnd, out["models"][rnd], evaluate)
        assert set(secure) == set(plain) == {"eval_loss", "eval_acc"}
        for name in plain:
            s, p = float(secure[name]), float(plain[name])  # type: ignore[arg-type]
            assert abs(s - p) <= 1e-5 * abs(p), (rnd, name, s, p)
        assert strategy.eval_reports[rnd - 1].total_weight == sum(examples(pid) for pid in range(N))
    logged = [r.getMessage() for r in caplog.records]  # Flower's own start logs each round's aggregate this way
    assert sum("eval_loss" in m and m.startswith("\t└──> Aggregated MetricRecord") for m in logged) == ROUNDS
    assert not any("failed at stage" in m for m in logged)


def test_an_unwrapped_evaluate_stops_the_run_at_its_first_evaluation_naming_the_fix(caplog):
    """The former client line, ``@app.train(mods=[secagg_mod])``, with an evaluate the mod
    does not wrap: ``start()`` raises SecureEvaluationUnavailable at round 1's
    evaluation, naming ``ClientApp(mods=[secagg_mod])``; the server logs it as one ERROR,
    and no per-node "failed at stage ADVERTISE_KEYS" warning."""
    app = ClientApp()
    app.train(mods=[secagg_mod])(numpy_train)
    app.evaluate()(numpy_evaluate)
    with caplog.at_level(logging.INFO):
        out = _simulate(app)
    err = out.get("error")
    assert isinstance(err, SecureEvaluationUnavailable), err
    text = str(err)
    assert text.startswith("secure evaluation of round 1 is unavailable: none of the 5 sites of its cohort answered "
                           "it, and 5 of them (nodes ")
    assert "`app = ClientApp(mods=[secagg_mod])`" in text and "@app.evaluate(mods=[secagg_mod])" in text
    strategy = out["strategy"]
    assert [r.status for r in strategy.reports] == ["ok"]  # round 1 trained, then the run stopped
    assert [r.status for r in strategy.eval_reports] == ["unavailable"]
    assert strategy.stopped == text
    ours = [r for r in caplog.records if r.name == "flwr" and r.levelno >= logging.WARNING
            and "secure evaluation" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in ours] == [(logging.ERROR, text)]
    assert not any("failed at stage ADVERTISE_KEYS" in r.getMessage() for r in caplog.records)


class _Site:
    """An in-process SuperNode: its ClientApp is built as a user writes it (``wrapped``:
    the README's line; else the former ``@app.train(mods=[secagg_mod])``)."""

    def __init__(self, node: int, wrapped: bool, node_config: dict | None = None) -> None:
        self.context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, **(node_config or {})},
                               state=RecordDict(), run_config={})
        if wrapped:
            self.app = drop_in(numpy_train)
            self.app.evaluate()(numpy_evaluate)
        else:
            self.app = ClientApp()
            self.app.train(mods=[secagg_mod])(numpy_train)
            self.app.evaluate()(numpy_evaluate)

    def handle(self, msg: Message) -> Message:
        """What a SuperNode answers: the app's reply, or Flower's error reply when the
        app raised (the code a ClientApp exception gets)."""
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        try:
            return self.app(msg, self.context)
        except Exception as exc:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=msg)


def test_sites_with_an_unwrapped_evaluate_are_named_once_and_count_as_dropped(task_identity, caplog):  # noqa: F811
    """Two of eight sites kept the former client line: the evaluations run with the other
    six (each site's threshold, 5 of its 7 neighbours, still holds), and the server names
    the two in one ERROR for the whole run."""
    # whole-group participation off on both sides: an unwrapped site takes its whole group
    # out of every evaluation, and with 8 sites (two learnt groups) nodes 1 and 2 may be in
    # both; this test is about naming them (groups: tests/test_groups.py)
    sites = {u: _Site(u, wrapped=u > 2, node_config={"sgs-min-group": "0"}) for u in range(1, 9)}
    inner = FedAvg(fraction_evaluate=1.0, min_train_nodes=8, min_available_nodes=8, min_evaluate_nodes=8)
    strategy = SecAggStrategy(inner, SecAggConfig(node_wait_timeout=1, min_group=0))
    with caplog.at_level(logging.INFO):
        result = strategy.start(grid=_local_grid(sites), initial_arrays=initial("numpy"), num_rounds=2)
    assert [r.status for r in strategy.reports] == ["ok", "ok"]
    assert [(r.status, sorted(r.survivors)) for r in strategy.eval_reports] == [("ok", [3, 4, 5, 6, 7, 8])] * 2
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    for r in strategy.eval_reports:
        assert sorted(r.client_errors) == [1, 2]
        assert all("evaluate not wrapped by secagg_mod" in e for e in r.client_errors.values())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("secure evaluation of round 1: 2 of 8 sites (nodes 1, 2) cannot take part")
    assert "`app = ClientApp(mods=[secagg_mod])`" in errors[0]
    assert not any("failed at stage ADVERTISE_KEYS" in r.getMessage() for r in caplog.records)


def test_a_query_message_passes_through_the_mod_untouched(task_identity):  # noqa: F811
    """secagg_mod hands a message type it does not handle (query) to the next handler as
    it came, and returns that handler's reply as it came; the site's state is not touched.
    Also through the README's ``ClientApp(mods=[secagg_mod])`` with a query handler."""
    msg = Message(RecordDict({"config": ConfigRecord({"question": "model size?"})}), dst_node_id=1,
                  message_type=MessageType.QUERY, group_id="q")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = Message(RecordDict({"metrics": MetricRecord({"size": 210})}), reply_to=msg)
    seen: list[tuple[Message, Context]] = []

    def call_next(m: Message, c: Context) -> Message:
        seen.append((m, c))
        return reply

    assert secagg_mod(msg, ctx, call_next) is reply
    assert len(seen) == 1 and seen[0][0] is msg and seen[0][1] is ctx
    assert dict(msg.content["config"]) == {"question": "model size?"} and list(msg.content) == ["config"]
    assert len(ctx.state) == 0

    app = ClientApp(mods=[secagg_mod])

    @app.query()
    def query(m: Message, c: Context) -> Message:
        seen.append((m, c))
        return Message(RecordDict({"metrics": MetricRecord({"size": 210})}), reply_to=m)

    out = app(msg, ctx)
    assert seen[-1][0] is msg and dict(out.content["metrics"]) == {"size": 210}
    assert len(ctx.state) == 0
