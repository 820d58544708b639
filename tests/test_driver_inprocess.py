"""In-process rounds through the round driver and the Flower-free site (issue 30): the
same code as a Flower run (``RoundDriver`` + ``sgs_flower.site``), with every default of
``SecAggConfig`` on (whole groups, the global BLS quorum, adaptive range and width),
over :class:`InProcessTransport` and :class:`MeanLearner` instead of Flower's Grid and
strategy. The driver is the server here, so a lying server is out of scope (those tests
drive the sites directly: tests/test_active_server.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from sgs_flower.driver import RoundReport
from sgs_flower.driver.inprocess import Drop, InProcessSite, MeanLearner, RunResult, run_rounds
from sgs_flower.secagg.wire import Stage

SHAPES = {"w": (4, 5), "b": (5,)}


def _weight(node: int) -> int:
    return 10 + 7 * node


def _delta(node: int, server_round: int, like: np.ndarray) -> np.ndarray:
    """Each site's own update, different per coordinate, site and round."""
    idx = np.arange(like.size, dtype=np.float64).reshape(like.shape)
    return (0.1 * np.sin(node * (idx + 1) + server_round)).astype(like.dtype)


def _site(node: int) -> InProcessSite:
    def train(arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
        r = int(config["server-round"])
        return [a + _delta(node, r, a) for a in arrays], _weight(node), {"loss": 0.25 * node + r}

    def evaluate(arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
        return 5 + node, {"accuracy": node / 10}

    return InProcessSite(train, evaluate)


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def _check_round(res: RunResult, i: int) -> None:
    """Round i's released model is the plaintext weighted mean of its survivors'
    updates, within the report's quantization bound, and so are its metrics."""
    report: RoundReport = res.reports[i]
    r = report.server_round
    before, after = dict(res.models[i]), dict(res.models[i + 1])
    w = np.array([_weight(u) for u in report.survivors], dtype=np.float64)
    assert report.total_weight == int(w.sum())
    for k, old in before.items():
        expected = old + sum(wu * _delta(u, r, old).astype(np.float64) for u, wu in zip(report.survivors, w,
                                                                                        strict=True)) / w.sum()
        np.testing.assert_allclose(after[k], expected, rtol=0, atol=report.error_bound + 1e-6)
    metrics = res.metrics[i]
    assert metrics is not None
    assert metrics["loss"] == pytest.approx(float(np.sum(w * (0.25 * np.array(report.survivors) + r)) / w.sum()),
                                            abs=1e-6)


def test_three_rounds_release_the_weighted_mean_pipelined_from_the_second() -> None:
    sites = {u: _site(u) for u in range(1, 7)}
    res = run_rounds(sites, _initial(), 3, learner=MeanLearner(fraction_evaluate=1.0))
    assert [r.status for r in res.reports] == ["ok", "ok", "ok"]
    assert [r.exchanges for r in res.reports] == [5, 3, 3]
    assert [r.pipelined for r in res.reports] == [False, True, True]
    for i, report in enumerate(res.reports):
        assert report.survivors == list(range(1, 7)) and report.error_bound > 0
        assert report.groups  # whole groups, the default, learnt at the first round
        _check_round(res, i)
    # each round's secure evaluation: the weighted mean of the sites' metrics
    w = np.array([5 + u for u in range(1, 7)], dtype=np.float64)
    assert [r.status for r in res.eval_reports] == ["ok", "ok", "ok"]
    for agg in res.evaluations:
        assert agg["num-examples"] == int(w.sum())
        assert agg["accuracy"] == pytest.approx(float(np.sum(w * np.arange(1, 7) / 10) / w.sum()), abs=1e-6)
    # the sites kept their state in their own stores; the driver's report says what each round cost
    assert all(s.store.records for s in sites.values())
    assert len(res.costs) == 3 and all(c.sites_cpu_seconds > 0 and c.site_calls > 0 for c in res.costs)


def test_a_dropout_at_the_masked_input_takes_its_group_out() -> None:
    """Whole groups at their default: a site silent at round 2's masked input takes its
    group out of that round's sum (the others of its group sent inputs that are not
    summed); the round still releases the mean of the rest, and round 3 is pipelined."""
    sites = {u: _site(u) for u in range(1, 10)}
    silent = 2
    res = run_rounds(sites, _initial(), 3, drops={silent: [Drop(Stage.MASKED_INPUT, frozenset({2}))]})
    assert [r.status for r in res.reports] == ["ok", "ok", "ok"]
    assert [r.pipelined for r in res.reports] == [False, True, True]
    cohorts = res.driver.cohorts
    assert cohorts.groups is not None
    group_of = {u: cohorts.groups.group_of[cohorts.identities[u]] for u in sites}
    mates = {u for u in sites if group_of[u] == group_of[silent]}
    assert silent in mates and len(mates) >= 3
    r2 = res.reports[1]
    assert r2.dropped == dict.fromkeys(mates, "MASKED_INPUT")  # the server counts the group's others out there
    assert r2.group_excluded == len(mates) - 1
    assert sorted(r2.survivors) == sorted(set(sites) - mates)
    assert group_of[silent] not in r2.groups
    assert res.transport.dropped == [(silent, "2", int(Stage.MASKED_INPUT))]
    for i in range(3):
        _check_round(res, i)
    assert res.reports[2].survivors == sorted(sites)


def test_the_cohort_sized_fields_travel_once_per_stage_as_one_shared_part() -> None:
    """sgs-secagg+/8 through the product path: every recipient of a stage gets the same
    shared part object (the cohort, the key tables, the survivor set: encoded once,
    not n times), the rounds are still exact, and the sites' saved states hold one
    object per shared part, not a copy each (saved and parsed once per process)."""
    from sgs_flower.driver.inprocess import InProcessTransport
    from sgs_flower.secagg import wire
    from sgs_flower.site.store import STATE_KEY

    seen: dict[tuple[str, int], list[bytes]] = {}

    class Recording(InProcessTransport):
        def exchange(self, messages, timeout):  # type: ignore[no-untyped-def]
            for m in messages:
                rec = m.records[wire.RECORD_KEY]
                for key in (wire.FIELD_SHARED, wire.FIELD_NEXT_SHARED):
                    if key in rec:
                        seen.setdefault((m.group + key, rec[wire.FIELD_STAGE]), []).append(rec[key])
            return super().exchange(messages, timeout)

    sites = {u: _site(u) for u in range(1, 8)}
    res = run_rounds(Recording(sites), _initial(), 2)
    assert [r.status for r in res.reports] == ["ok", "ok"]
    for i in range(2):
        _check_round(res, i)
    stages = {stage for (_, stage) in seen}
    assert {int(Stage.ADVERTISE_KEYS), int(Stage.SHARE_KEYS), int(Stage.CONSISTENCY), int(Stage.UNMASK)} <= stages
    for parts in seen.values():
        assert len(parts) >= 6 and all(p is parts[0] for p in parts)  # one object for every recipient
    saved = [v for s in sites.values() for k, v in s.store.records[STATE_KEY].items() if k.endswith(".shared")]
    by_content: dict[bytes, set[int]] = {}
    for v in saved:
        by_content.setdefault(v, set()).add(id(v))
    assert len(saved) >= len(sites) and all(len(ids) == 1 for ids in by_content.values())  # n states, one object
