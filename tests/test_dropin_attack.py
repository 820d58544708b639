"""Issue 29's attack on the app's real ClientApp, at default settings: two rounds whose
cohorts differ by one site (or two), over models an honest FedAvg step apart.

The sites are the app's own ``ClientApp(mods=[secagg_mod])`` (digits CNN, real torch
training), each with nothing in its node config but its partition: no roster, no
identity key, no ``sgs-min-group``. The server is a lying one: ``SecAggStrategy`` with
its own groups off (``SecAggConfig(min_group=0)``) and a wrapped strategy whose
``configure_train`` / ``configure_evaluate`` pick the cohorts an attacker wants. Round 1
is over every site; the model then moves by one honest step (round 1's aggregate). The
issue measured that a later sum over all sites but ``v`` gave ``v``'s update at cosine
0.81 with the truth at half that distance; here the sites refuse to sign such a sum, so
it is never released and the global model does not move.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from test_pipelined_rounds import _local_grid, task_identity  # noqa: F401 - the fixture is used by name

from strategies import SecAggConfig, SecAggStrategy

N = 6  # two learnt groups of three (the default sgs-min-group)


def _with_evaluate():
    """The app's ClientApp line and train function, plus the evaluate a user would add
    (the app itself evaluates on the server): loss and accuracy on the site's partition."""
    from flwr.app import MetricRecord
    from flwr.clientapp import ClientApp

    from clients import secagg_mod
    from sgs_flower.app.client_train import train_digits
    from sgs_flower.app.settings import resolve
    from sgs_flower.digits import evaluate, load_partition, make_model, set_weights

    app = ClientApp(mods=[secagg_mod])
    app.train()(train_digits)

    @app.evaluate()
    def local_evaluate(msg: Message, context: Context) -> Message:
        s = resolve({})
        pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        data = load_partition(pid, n, s["partitioning"], float(s["dirichlet-alpha"]), int(s["seed"]))
        net = make_model(s["model"])
        set_weights(net, [a.numpy() for a in msg.content.array_records["arrays"].values()])
        loss, acc = evaluate(net, data)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(data.y), "loss": loss,
                                                            "accuracy": acc})}), reply_to=msg)

    return app


class _AppSite:
    """A SuperNode running the app's real ClientApp (as `flwr run .` loads it), with only
    its partition configured; an app exception is Flower's error reply. ``evaluate``:
    the same app with a local evaluate added."""

    def __init__(self, node: int, evaluate: bool = False) -> None:
        from sgs_flower.app.client_app import app

        self.app = _with_evaluate() if evaluate else app
        self.context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": N},
                               state=RecordDict(), run_config={})

    def handle(self, msg: Message) -> Message:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        try:
            return self.app(msg, self.context)
        except Exception as exc:  # pragma: no cover - the app does not raise in these rounds
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=msg)


class _Chooser(FedAvg):
    """The lying server's choice of cohorts: ``train[r]`` / ``evaluate[r]`` name round r's
    nodes (every node when a round is not named)."""

    def __init__(self, train: dict[int, list[int]], evaluate: dict[int, list[int]]) -> None:
        super().__init__(fraction_evaluate=1.0 if evaluate else 0.0, min_available_nodes=N, min_train_nodes=2,
                         min_evaluate_nodes=2)
        self.train_cohorts, self.eval_cohorts = train, evaluate

    def configure_train(self, server_round, arrays, config, grid):
        keep = self.train_cohorts.get(server_round)
        keep = keep() if callable(keep) else keep
        return [m for m in super().configure_train(server_round, arrays, config, grid)
                if keep is None or m.metadata.dst_node_id in keep]

    def configure_evaluate(self, server_round, arrays, config, grid):
        keep = self.eval_cohorts.get(server_round)
        return [m for m in super().configure_evaluate(server_round, arrays, config, grid)
                if keep is None or m.metadata.dst_node_id in keep]


def _learnt_groups(sites: dict[int, _AppSite]) -> dict[int, int]:
    """Node -> its group, as the sites learnt them (read from their own state, as a
    server colluding with no one could not; the attacker here is given them)."""
    from clients.secagg_mod import FEDERATION_KEY, IDENTITY_KEY
    from sgs_flower.secagg.groups import GroupRule
    from sgs_flower.secagg.identity import identity_public
    from sgs_flower.site.state import federation_of

    first = sites[1].context.state.config_records[FEDERATION_KEY]
    rule = GroupRule(federation_of(first), 3)
    keys = {u: identity_public(bytes(s.context.state.config_records[IDENTITY_KEY]["key"])) for u, s in sites.items()}
    return {u: rule.group_of[k] for u, k in keys.items()}


def _attack(train: dict, evaluate: dict[int, list[int]] | None = None, rounds: int = 2,
            sites: dict[int, _AppSite] | None = None):
    from sgs_flower.digits import make_model

    sites = sites if sites is not None else {u: _AppSite(u, evaluate=bool(evaluate)) for u in range(1, N + 1)}
    strategy = SecAggStrategy(_Chooser(train, evaluate or {}), SecAggConfig(min_group=0, node_wait_timeout=5))
    models: dict[int, list[np.ndarray]] = {}

    def keep(rnd: int, arrays: ArrayRecord):
        models[rnd] = [a.numpy().copy() for a in arrays.values()]
        return None

    strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord(make_model("cnn").state_dict()),
                   num_rounds=rounds, evaluate_fn=keep,
                   train_config=ConfigRecord({"lr": 0.05, "local-epochs": 1, "batch-size": 32}))
    return strategy, models


def test_the_issues_attack_on_the_real_app_at_defaults_is_refused(task_identity):  # noqa: F811
    """Round 1 over all six sites; round 2, an honest step later, over all but site 6.
    Every site of round 2 trains (its update stays masked) and refuses to sign: round 2
    aborts naming the group check, and the global model stays round 1's."""
    strategy, models = _attack({2: [1, 2, 3, 4, 5]})
    r1, r2 = strategy.reports
    assert r1.status == "ok" and sorted(r1.survivors) == list(range(1, N + 1))
    assert r2.status == "aborted" and not r2.survivors
    assert "splits 1 of the federation's 2 groups" in r2.reason
    assert sum(float(np.abs(a - b).sum()) for a, b in zip(models[1], models[0], strict=True)) > 0  # it did move
    for a, b in zip(models[2], models[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cohort_that_differs_by_two_sites_of_two_groups_is_refused(task_identity):  # noqa: F811
    """Two sites out, one from each learnt group (node 1 and a node of the other group,
    picked from what the sites learnt at round 1): both groups are split, and no site
    signs."""
    sites = {u: _AppSite(u) for u in range(1, N + 1)}

    def two_out() -> list[int]:
        group = _learnt_groups(sites)
        assert sorted(list(group.values()).count(g) for g in set(group.values())) == [3, 3]
        other = next(v for v in range(2, N + 1) if group[v] != group[1])
        return [v for v in range(1, N + 1) if v not in (1, other)]

    strategy, _ = _attack({2: two_out}, sites=sites)
    r2 = strategy.reports[1]
    assert r2.status == "aborted" and "splits 2 of the federation's 2 groups" in r2.reason


@pytest.mark.parametrize("drop", [6])
def test_evaluation_rounds_cannot_be_differenced_either(task_identity, drop):  # noqa: F811
    """Secure evaluation rounds at defaults: round 1's over all six sites, round 2's over
    all but one. The second is refused by every site (no num-examples or loss of the
    missing site from the difference of two evaluations)."""
    strategy, _ = _attack({}, {2: [v for v in range(1, N + 1) if v != drop]})
    e1, e2 = strategy.eval_reports
    assert e1.status == "ok" and sorted(e1.survivors) == list(range(1, N + 1))
    assert e2.status != "ok" and not e2.survivors
    assert "splits 1 of the federation's 2 groups" in e2.reason
