"""The round driver over sites in worker processes (:class:`ShardedTransport`, issue 30):
the same rounds as in one process (the same site code answers, through an
:class:`InProcessTransport` over each worker's shard), the sites' CPU and calls counted
in the workers, dropouts through shards, and a worker that raises or dies named in a
clear error, never a hang."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from sgs_flower.driver.inprocess import Drop, InProcessSite, RunResult, run_rounds
from sgs_flower.driver.shards import MESSAGE_BATCH_BYTES, ShardedTransport, WorkerFailed
from sgs_flower.secagg.wire import Stage

N = 12
M = 30
SILENT = 5  # silent at round 2's masked input: its whole group is out of that round's sum


def _weight(node: int) -> int:
    return 10 + 3 * node


def _delta(node: int, server_round: int) -> np.ndarray:
    return (0.2 * np.sin(node * (np.arange(M) + 1.0) + server_round)).astype(np.float32)


def _site(node: int) -> InProcessSite:
    def train(arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
        return [arrays[0] + _delta(node, int(config["server-round"]))], _weight(node), {"loss": node / 10}

    return InProcessSite(train)


class _Crash(BaseException):
    """Not an Exception: neither the site's nor the transport's handlers catch it, so it
    reaches the worker's loop (a fault of the simulation, not a site's refusal)."""


def _failing_site(node: int, how: str) -> InProcessSite:
    def train(arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
        if how == "die":
            os._exit(3)
        raise _Crash(f"site {node} broke the worker")

    return InProcessSite(train)


def _drops() -> dict[int, list[Drop]]:
    return {SILENT: [Drop(Stage.MASKED_INPUT, frozenset({2}))]}


def _initial() -> list[tuple[str, np.ndarray]]:
    return [("w", np.linspace(-0.5, 0.5, M).astype(np.float32))]


def _check_mean(res: RunResult, i: int) -> None:
    """Round i released the plaintext weighted mean of its survivors within its bound."""
    report = res.reports[i]
    w = np.array([_weight(u) for u in report.survivors], dtype=np.float64)
    expected = sum(wu * _delta(u, report.server_round).astype(np.float64)
                   for u, wu in zip(report.survivors, w, strict=True)) / w.sum()
    got = res.models[i + 1][0][1].astype(np.float64) - res.models[i][0][1].astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=report.error_bound + 1e-6)


@pytest.mark.parametrize("batch_bytes", [MESSAGE_BATCH_BYTES, 1])  # 1: every message a batch of its own
def test_sharded_rounds_release_what_in_process_rounds_release(batch_bytes: int) -> None:
    local = run_rounds({u: _site(u) for u in range(1, N + 1)}, _initial(), 2, drops=_drops())
    with ShardedTransport({u: _site(u) for u in range(1, N + 1)}, workers=2, drops=_drops(),
                          batch_bytes=batch_bytes) as transport:
        procs = transport.processes
        assert transport.workers == 2 and all(p.is_alive() for p in procs)
        sharded = run_rounds(transport, _initial(), 2)
    assert [r.status for r in sharded.reports] == [r.status for r in local.reports] == ["ok", "ok"]
    assert [r.exchanges for r in sharded.reports] == [r.exchanges for r in local.reports] == [5, 3]
    assert [r.pipelined for r in sharded.reports] == [False, True]
    for i in range(2):
        _check_mean(sharded, i)
        _check_mean(local, i)
    # round 1 (no dropout): the same survivors, so the same mean; both within their bounds
    # of it, so within the two bounds of each other
    assert sharded.reports[0].survivors == local.reports[0].survivors == list(range(1, N + 1))
    bound = sharded.reports[0].error_bound + local.reports[0].error_bound + 1e-6
    np.testing.assert_allclose(sharded.models[1][0][1], local.models[1][0][1], rtol=0, atol=bound)
    # round 2: the dropout went through its worker: the silent site and its group (drawn
    # from the run's fresh identity keys, so not the same mates in both runs) are out
    for res in (sharded, local):
        r2 = res.reports[1]
        assert SILENT not in r2.survivors and r2.dropped.get(SILENT) == "MASKED_INPUT"
        assert len(r2.survivors) == N - 3 and r2.group_excluded == 2
    assert transport.dropped == [(SILENT, "2", int(Stage.MASKED_INPUT))]
    # each site's calls and CPU, counted in its worker, as in process
    assert transport.calls == local.transport.calls
    assert all(transport.site_cpu[u] > 0 for u in range(1, N + 1))
    assert all(c.sites_cpu_seconds > 0 and c.site_calls > 0 for c in sharded.costs)
    assert [c.site_calls for c in sharded.costs] == [c.site_calls for c in local.costs]
    # the workers are gone after close, and said what they used
    assert transport.workers == 0 and not any(p.is_alive() for p in procs)
    assert len(transport.stats) == 2
    assert all(s.peak_rss_bytes > 0 and s.own_peak_bytes >= 0 and s.handle_cpu_seconds["sites"] > 0
               for s in transport.stats)


@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_failing_worker_is_named_and_every_worker_stopped(how: str) -> None:
    sites = {u: _site(u) for u in range(1, 7)}
    sites[4] = _failing_site(4, how)
    transport = ShardedTransport(sites, workers=2, poll_seconds=0.2)
    procs = transport.processes
    worker = sorted(sites).index(4) % 2  # round-robin over the sorted ids
    with pytest.raises(WorkerFailed) as info:
        run_rounds(transport, _initial(), 1)
    assert info.value.worker == worker and info.value.pid == procs[worker].pid
    text = str(info.value)
    assert f"worker {worker}" in text
    if how == "raise":
        assert "_Crash" in text and "site 4 broke the worker" in text and "Traceback" in text
    else:
        assert "died" in text and "exit code 3" in text
    assert transport.workers == 0 and not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        transport.exchange([], 1.0)
