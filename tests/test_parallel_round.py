"""Sites in worker processes (``simulate_round(workers=...)``) give the serial round's
results: the same aggregate, survivors and outcome for the same seed, and the same typed
error when the round cannot complete. Keys are fresh per run either way; what must not
differ is everything the server learns and decodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import ThresholdError
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import SiteShards, run_protocol, simulate_round
from sgs_flower.secagg.wire import Stage

N, M = 30, 64


def _inputs(seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, M) for _ in range(N)]


@pytest.mark.parametrize("wire", [False, True])
@pytest.mark.parametrize("consistency", ["global", "neighbourhood"])
def test_workers_give_the_serial_result(wire: bool, consistency: str) -> None:
    xs = _inputs()
    drops = {Stage.SHARE_KEYS: [4], Stage.MASKED_INPUT: [0, 17], Stage.UNMASK: [9]}
    kw = dict(dropouts=drops, seed=11, wire=wire, consistency=consistency)
    serial = simulate_round(xs, **kw)
    par = simulate_round(xs, workers=2, **kw)
    assert par.workers == 2 and len(par.worker_stats) == 2 and serial.workers == 1
    assert np.array_equal(par.aggregate, serial.aggregate)
    assert par.survivors == serial.survivors
    assert par.clipped == serial.clipped
    a, b = serial.outcome, par.outcome
    assert np.array_equal(a.total, b.total)
    assert a.survivors == b.survivors and a.dropped == b.dropped
    assert {u: type(e) for u, e in a.rejected.items()} == {u: type(e) for u, e in b.rejected.items()}
    assert set(par.seconds) == set(serial.seconds)
    assert par.upload_bytes == serial.upload_bytes if wire else par.upload_bytes == {}
    for st in par.worker_stats:
        assert st.cpu_seconds > 0 and st.peak_rss_bytes >= st.own_peak_bytes >= 0
    survivors = [xs[i] for i in par.survivors]
    assert np.max(np.abs(par.aggregate - np.mean(survivors, axis=0))) <= par.config.error_bound


def test_workers_raise_the_serial_error() -> None:
    """Too many sites drop before the masked input: the server raises ThresholdError in
    the parent, as in the serial round, and the workers are stopped."""
    xs = _inputs()
    drops = {Stage.MASKED_INPUT: list(range(20))}
    with pytest.raises(ThresholdError):
        simulate_round(xs, dropouts=drops, seed=1)
    with pytest.raises(ThresholdError):
        simulate_round(xs, dropouts=drops, seed=1, workers=2)


def test_more_workers_than_sites() -> None:
    xs = _inputs()[:5]
    serial = simulate_round(xs, seed=2)
    par = simulate_round(xs, seed=2, workers=8)
    assert par.workers == 5
    assert np.array_equal(par.aggregate, serial.aggregate) and par.survivors == serial.survivors


class _TamperingServer(SecAggServer):
    """Routes the rosters honestly but for one node, whose roster gets another site's
    identity table entry swapped for a stranger's key: that site refuses (a typed
    protocol error), which the round records as its dropout."""

    victim = 7

    def collect_keys(self, replies):  # type: ignore[no-untyped-def]
        rosters = super().collect_keys(replies)
        r = rosters[self.victim]
        table = tuple((v, bytes(32) if v == self.victim else k) for v, k in r.identities)
        rosters[self.victim] = dataclasses.replace(r, identities=table)
        return rosters


def _tampered_round(workers: int):
    ids = list(range(1, N + 1))
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=M)
    rng = np.random.default_rng(5)
    vectors = {u: rng.integers(0, 1 << 32, M, dtype=np.uint64).astype(np.uint32) for u in ids}
    server = _TamperingServer(params)
    policy = ClientPolicy()
    if workers == 1:
        return run_protocol(server, {u: SecAggClient(u, policy=policy) for u in ids}, vectors), vectors
    with SiteShards(ids, policy, workers) as shards:
        return run_protocol(server, shards, vectors), vectors


def test_a_refusal_in_a_worker_is_a_dropout_as_in_the_serial_round() -> None:
    (serial, vectors), (par, _) = _tampered_round(1), _tampered_round(2)
    assert _TamperingServer.victim not in serial.survivors
    assert serial.survivors == par.survivors and serial.dropped == par.dropped
    expect = np.zeros(M, dtype=np.uint32)
    for u in serial.survivors:
        expect += vectors[u]
    assert np.array_equal(par.total, expect) and np.array_equal(serial.total, expect)


@pytest.mark.parametrize("wire", [False, True])
def test_small_batches_give_the_same_round(wire: bool) -> None:
    """Shards fed one site at a time (every vector, and with ``wire`` every encoded
    message, is over the batch limit) answer exactly as the serial sites do."""
    ids = list(range(1, N + 1))
    rng = np.random.default_rng(8)
    vectors = {u: rng.integers(0, 1 << 32, M, dtype=np.uint64).astype(np.uint32) for u in ids}
    drops = {Stage.MASKED_INPUT: {3, 12}, Stage.UNMASK: {20}}
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=M)
    policy = ClientPolicy()
    serial_up: dict[int, int] = {}
    serial = run_protocol(SecAggServer(params), {u: SecAggClient(u, policy=policy) for u in ids}, vectors, drops,
                          wire, upload_bytes=serial_up)
    par_up: dict[int, int] = {}
    with SiteShards(ids, policy, 3, max_batch_bytes=1) as shards:
        par = run_protocol(SecAggServer(params), shards, vectors, drops, wire, upload_bytes=par_up)
    assert np.array_equal(serial.total, par.total)
    assert serial.survivors == par.survivors and serial.dropped == par.dropped
    assert serial_up == par_up


@pytest.mark.parametrize("workers", [1, 2])
def test_cpu_by_stage_and_whole_groups(workers: int) -> None:
    """``cpu_seconds`` holds the sites' handling CPU (summed over sites, wherever they
    ran) and the server's own, for each of the five stages; ``min_group`` turns on
    participation in whole groups on both sides: the survivors are the sites that sent
    their masked input less the members of groups left out whole."""
    xs = _inputs()
    res = simulate_round(xs, dropouts={Stage.MASKED_INPUT: [0, 17]}, seed=4, workers=workers, min_group=3)
    stages = {f"{side}_stage{s}" for side in ("sites", "server") for s in range(1, 6)}
    assert set(res.cpu_seconds) == stages and all(v >= 0 for v in res.cpu_seconds.values())
    assert sum(v for k, v in res.cpu_seconds.items() if k.startswith("sites_")) > 0
    assert res.server is not None
    left_out = res.server.group_excluded
    assert left_out and not left_out & {1, 18}
    assert len(res.survivors) == N - 2 - len(left_out)
    survivors = [xs[i] for i in res.survivors]
    assert np.max(np.abs(res.aggregate - np.mean(survivors, axis=0))) <= res.config.error_bound
