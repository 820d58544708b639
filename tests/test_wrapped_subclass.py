"""Issue 28, part D: the wrapper behaves like the strategy it wraps.

Flower's examples ship FedAvg subclasses with their own methods and attributes, a
``configure_train`` that steps a learning-rate schedule or picks its own nodes, and
sometimes their own ``start`` (checkpoints, a results file). Wrapped as the README says,
``SecAggStrategy(LRScheduleFedAvg(...))``:

- the subclass's own methods and attributes are reached through the wrapper;
- its configure_train's config (the stepped lr) reaches every site, every round;
- the nodes its configure_train picks are the round's cohort (pipelined when it picks as
  it did the round before, set up in full otherwise);
- a subclass overriding ``start`` is refused at construction, naming the class and the fix;
  the fix, a ``SecAggStrategy`` subclass overriding ``start`` around ``super().start``, runs.

Simulations (marked slow): 5 SuperNodes, 3 rounds through ``flower_harness.run``, the
client built by ``test_dropin_examples.drop_in`` (``ClientApp(mods=[secagg_mod])``).
The rest runs in process (``test_pipelined_rounds``: the real mod, an in-process Grid).
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from collections.abc import Iterable
from pathlib import Path
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
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from test_dropin_examples import N, drop_in, initial, numpy_train
from test_pipelined_rounds import HOOK_MODEL, HookSite, _local_grid, task_identity  # noqa: F401 - fixture by name

from sgs_flower.secagg.errors import ConfigurationError
from strategies import SecAggConfig, SecAggStrategy

cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROUNDS = 3


def lr_of(server_round: int) -> float:
    return 0.1 * 0.5 ** (server_round - 1)


class LRScheduleFedAvg(FedAvg):
    """A FedAvg subclass as Flower's examples write them: its own method
    (``current_lr``), its own attributes, and a configure_train that steps a learning
    rate schedule in the train config."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.schedule = "halving"
        self.lrs: list[float] = []  # the lr each configure_train call sent

    def current_lr(self, server_round: int) -> float:
        return lr_of(server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["lr"] = self.current_lr(server_round)
        self.lrs.append(float(config["lr"]))  # type: ignore[arg-type]
        return super().configure_train(server_round, arrays, config, grid)


class PickingFedAvg(LRScheduleFedAvg):
    """The schedule, and a configure_train that picks its own nodes: ``pick(round, ids)``
    of the sorted connected node ids (every other one by default: the positions 0, 2, 4,
    so three of five, whatever the simulation's random node ids are)."""

    def __init__(self, pick: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.pick = pick or (lambda rnd, ids: ids[::2])
        self.picked: dict[int, list[int]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["lr"] = self.current_lr(server_round)
        config["server-round"] = server_round
        nodes = self.pick(server_round, sorted(grid.get_node_ids()))
        self.picked[server_round] = sorted(nodes)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(record, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


def lr_recording_train(dump: Path) -> Any:
    """quickstart-numpy's train (``numpy_train``), which also writes the round, lr and node
    id its train config reached it with to ``dump`` (the sites' view, out of band)."""

    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        rnd, pid = int(cfg["server-round"]), int(context.node_config["partition-id"])  # type: ignore[arg-type]
        seen = {"round": rnd, "lr": float(cfg["lr"]), "node": int(context.node_id)}  # type: ignore[arg-type]
        (dump / f"r{rnd}_p{pid}.json").write_text(json.dumps(seen))
        return numpy_train(msg, context)

    return train


def seen_by_sites(dump: Path, rnd: int) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(dump.glob(f"r{rnd}_p*.json"))]


def simulate(dump: Path, inner: FedAvg, config: SecAggConfig | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def main(grid: Grid, context: Context) -> None:
        strategy = SecAggStrategy(inner, config)  # the server half of the drop-in, as the README writes it
        out["strategy"] = strategy
        out["lr_2"] = strategy.current_lr(2)  # the subclass's own method, through the wrapper
        out["result"] = strategy.start(grid=grid, initial_arrays=initial("numpy"), num_rounds=ROUNDS)

    run(main, drop_in(lr_recording_train(dump)), N)
    return out


def _inner(cls: type, **kw: Any) -> Any:
    return cls(fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N, **kw)


@pytest.mark.slow
def test_the_wrapper_forwards_the_subclass_and_its_lr_schedule_reaches_every_site(tmp_path):
    out = simulate(tmp_path, _inner(LRScheduleFedAvg))
    strategy = out["strategy"]
    assert out["lr_2"] == 0.05
    assert strategy.schedule == "halving" and strategy.lrs == [lr_of(r) for r in range(1, ROUNDS + 1)]
    assert strategy.lrs is strategy.inner.lrs
    reports = strategy.reports
    assert [r.status for r in reports] == ["ok"] * ROUNDS
    assert [r.exchanges for r in reports] == [5, 3, 3]  # it samples every node each round: still pipelined
    for rnd in range(1, ROUNDS + 1):
        seen = seen_by_sites(tmp_path, rnd)
        assert [s["lr"] for s in seen] == [lr_of(rnd)] * N, (rnd, seen)
        assert sorted(s["node"] for s in seen) == sorted(reports[rnd - 1].survivors)


@pytest.mark.slow
def test_the_nodes_configure_train_picks_are_the_rounds_cohort(tmp_path, monkeypatch):
    # a pick used as it is: whole-group participation off on both sides (with it, a pick is
    # rounded up to whole groups: test_a_pick_is_rounded_up_to_whole_groups_under_the_default)
    monkeypatch.setenv("SGS_NODE_CONFIG", "sgs-min-group=0")
    out = simulate(tmp_path, _inner(PickingFedAvg), SecAggConfig(min_group=0))
    strategy = out["strategy"]
    picked = strategy.picked  # forwarded: the subclass's own attribute
    reports = strategy.reports
    assert [r.status for r in reports] == ["ok"] * ROUNDS
    for rnd in range(1, ROUNDS + 1):
        r = reports[rnd - 1]
        assert len(picked[rnd]) == 3
        assert r.cohort == picked[rnd] and sorted(r.survivors) == picked[rnd]
        seen = seen_by_sites(tmp_path, rnd)  # only the picked nodes trained, with the round's lr
        assert sorted(s["node"] for s in seen) == picked[rnd]
        assert {s["lr"] for s in seen} == {lr_of(rnd)}
    # it picks the same nodes each round: rounds 2 and 3 were set up ahead for them
    assert [r.exchanges for r in reports] == [5, 3, 3] and [r.pipelined for r in reports] == [False, True, True]


def test_a_pick_that_changes_every_round_is_honoured_by_full_setups(task_identity, caplog):  # noqa: F811
    """A configure_train picking a window of three of five nodes that moves every round:
    no cohort set up ahead fits, so each round sets up in full from the picked nodes (said
    once), every round aggregates exactly them, and each site trains only in the rounds
    it was picked for, with the round's lr."""
    sites = {u: HookSite(u, secure=True) for u in range(1, 6)}
    for site in sites.values():  # a pick used as it is: groups off on both sides (the test below has them)
        site.context.node_config["sgs-min-group"] = "0"
    inner = PickingFedAvg(pick=lambda rnd, ids: [ids[(rnd - 1 + k) % len(ids)] for k in range(3)],
                          fraction_evaluate=0.0, min_available_nodes=5)
    strategy = SecAggStrategy(inner, SecAggConfig(node_wait_timeout=1, min_group=0))
    with caplog.at_level(logging.INFO):
        strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({k: Array(v) for k, v in HOOK_MODEL.items()}),
                       num_rounds=4, train_config=ConfigRecord({"lr": 1.0}))
    want = {1: [1, 2, 3], 2: [2, 3, 4], 3: [3, 4, 5], 4: [1, 4, 5]}
    assert inner.picked == want
    reports = strategy.reports
    assert [r.status for r in reports] == ["ok"] * 4
    assert [r.cohort for r in reports] == [want[r] for r in range(1, 5)]
    assert [sorted(r.survivors) for r in reports] == [want[r] for r in range(1, 5)]
    assert [r.exchanges for r in reports] == [5, 5, 5, 5] and not any(r.pipelined for r in reports)
    for u, site in sites.items():
        assert [(rnd, lr) for rnd, lr, _ in site.received] == [(r, lr_of(r)) for r in range(1, 5) if u in want[r]]
    said = [r.getMessage() for r in caplog.records if "chose other nodes than the cohort set up ahead" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("secure round 2: PickingFedAvg.configure_train")


def test_a_pick_is_rounded_up_to_whole_groups_under_the_default(task_identity, caplog):  # noqa: F811
    """At the defaults (groups of 3 learnt at round 1), a configure_train that picks one
    node each round: round 1 takes every node (the federation is learnt there), later
    rounds the picked node's whole group (said once), the same group each round, so round
    3 was set up ahead for it; every site of the group, and only those, trains."""
    sites = {u: HookSite(u, secure=True) for u in range(1, 10)}
    inner = PickingFedAvg(pick=lambda rnd, ids: [ids[0]], fraction_evaluate=0.0, min_available_nodes=9)
    strategy = SecAggStrategy(inner, SecAggConfig(node_wait_timeout=1))
    with caplog.at_level(logging.INFO):
        strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({k: Array(v) for k, v in HOOK_MODEL.items()}),
                       num_rounds=3, train_config=ConfigRecord({"lr": 1.0}))
    rule, ident = strategy.groups, strategy.driver.cohorts.identities
    assert rule is not None
    group = sorted(u for u in sites if rule.group_of[ident[u]] == rule.group_of[ident[1]])
    reports = strategy.reports
    assert [r.status for r in reports] == ["ok"] * 3
    assert [r.cohort for r in reports] == [list(range(1, 10)), group, group]
    assert [r.pipelined for r in reports] == [False, False, True]
    for u, site in sites.items():
        assert [rnd for rnd, _, _ in site.received] == ([1, 2, 3] if u in group else [1])
    said = [r.getMessage() for r in caplog.records if "rounds that up to the whole groups" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("secure round 2: PickingFedAvg.configure_train picked 1 nodes")


class CheckpointFedAvg(LRScheduleFedAvg):
    """An example-style strategy with its own start: a results file after the run."""

    def start(self, *args: Any, **kwargs: Any) -> Result:  # pragma: no cover - must never run
        result = super().start(*args, **kwargs)
        Path("results.json").write_text("{}")
        return result


def test_a_wrapped_strategy_overriding_start_is_refused_naming_the_class_and_the_fix():
    with pytest.raises(ConfigurationError) as info:
        SecAggStrategy(CheckpointFedAvg())
    text = str(info.value)
    assert text.startswith("CheckpointFedAvg overrides start(); SecAggStrategy runs the rounds itself")
    assert "CheckpointFedAvg.start would never run" in text
    assert "evaluate_fn / configure_train / aggregate_evaluate" in text
    assert "subclass SecAggStrategy and override start there to wrap super().start(...)" in text
    SecAggStrategy(LRScheduleFedAvg())  # no start of its own: accepted


class CheckpointingSecAgg(SecAggStrategy):
    """The fix the refusal names: the run's own work around ``super().start``."""

    def __init__(self, *args: Any, results: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results = results

    def start(self, *args: Any, **kwargs: Any) -> Result:
        result = super().start(*args, **kwargs)
        rounds = {r.server_round: r.status for r in self.reports}
        self.results.write_text(json.dumps({"rounds": rounds, "lrs": self.lrs}))
        return result


def test_a_secagg_strategy_subclass_overriding_start_around_super_runs(task_identity, tmp_path):  # noqa: F811
    sites = {u: HookSite(u, secure=True) for u in range(1, 6)}
    strategy = CheckpointingSecAgg(LRScheduleFedAvg(fraction_evaluate=0.0, min_available_nodes=5),
                                   SecAggConfig(node_wait_timeout=1), results=tmp_path / "results.json")
    result = strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({k: Array(v) for k, v in HOOK_MODEL.items()}),
                            num_rounds=2, train_config=ConfigRecord({"lr": 1.0}))
    assert json.loads((tmp_path / "results.json").read_text()) == {"rounds": {"1": "ok", "2": "ok"},
                                                                    "lrs": [0.1, 0.05]}
    assert [r.exchanges for r in strategy.reports] == [5, 3]
    assert not np.array_equal(result.arrays["w"].numpy(), HOOK_MODEL["w"])  # it trained
    assert [(rnd, lr) for rnd, lr, _ in sites[1].received] == [(1, 0.1), (2, 0.05)]


def test_forwarding_reads_only_what_the_wrapper_lacks_and_survives_pickling():
    """The wrapper's own names stay its own; unknown names are read from the wrapped
    strategy; a name neither has raises AttributeError naming both; the wrapper pickles
    (pickle and cloudpickle) with its forwarding intact."""
    strategy = SecAggStrategy(LRScheduleFedAvg(fraction_train=0.5))
    assert strategy.current_lr(3) == 0.025 and strategy.schedule == "halving" and strategy.fraction_train == 0.5
    assert isinstance(strategy.config, SecAggConfig)  # its own, not forwarded
    with pytest.raises(AttributeError, match="neither SecAggStrategy nor the wrapped LRScheduleFedAvg has an "
                                             "attribute 'no_such_thing'"):
        strategy.no_such_thing  # noqa: B018
    assert not hasattr(strategy, "__no_dunder__")
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(strategy))
        assert type(copy.inner) is LRScheduleFedAvg and copy.current_lr(2) == 0.05 and copy.schedule == "halving"
    bare = SecAggStrategy.__new__(SecAggStrategy)  # as unpickling makes it: no inner yet, no recursion
    with pytest.raises(AttributeError):
        bare.current_lr  # noqa: B018
