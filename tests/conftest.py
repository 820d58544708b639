"""Shared fixtures: helpers that build a cohort of real protocol endpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.prg import dtype_for_bits
from sgs_flower.secagg.server import RoundParams, SecAggServer


class Cohort:
    """A server and n clients (node ids 1..n) for one round, driven stage by stage."""

    def __init__(self, n: int, m: int = 16, field_bits: int = 32, **kw: object) -> None:
        self.ids = list(range(1, n + 1))
        self.params = RoundParams(run_id=7, round_id=3, cohort=tuple(self.ids), vector_length=m,
                                  field_bits=field_bits, **kw)  # type: ignore[arg-type]
        self.server = SecAggServer(self.params)
        self.clients = {u: SecAggClient(u) for u in self.ids}
        rng = np.random.default_rng(0)
        dtype = dtype_for_bits(field_bits)
        self.inputs = {u: rng.integers(0, 1 << min(field_bits, 63), m, dtype=np.uint64).astype(dtype) for u in self.ids}

    def advertise(self):
        return {u: self.clients[u].handle(msg) for u, msg in self.server.setup_messages().items()}

    def to_rosters(self):
        return self.server.collect_keys(self.advertise())

    def to_bundles(self):
        rosters = self.to_rosters()
        return self.server.collect_shares({u: self.clients[u].handle(r) for u, r in rosters.items()})

    def to_requests(self, skip=()):
        bundles = self.to_bundles()
        replies = {u: self.clients[u].handle(b, vector=self.inputs[u]) for u, b in bundles.items() if u not in skip}
        return self.server.collect_masked(replies)

    def to_unmask_requests(self, skip=()):
        """Through the consistency check: the survivors' signed unmask requests."""
        reqs = self.to_requests(skip)
        return self.server.collect_consistency({u: self.clients[u].handle(r) for u, r in reqs.items()})

    def finish(self, consistency_requests, skip=()):
        """Run the consistency check and the unmask stage from the server's requests."""
        sigs = {u: self.clients[u].handle(r) for u, r in consistency_requests.items() if u not in skip}
        unmask = self.server.collect_consistency(sigs)
        return self.server.collect_unmask({u: self.clients[u].handle(r) for u, r in unmask.items()})


@pytest.fixture
def cohort_factory():
    return Cohort


@pytest.fixture
def random_key() -> bytes:
    return os.urandom(32)


@pytest.fixture(autouse=True)
def _site_state_dir(tmp_path_factory, monkeypatch):
    """Each test's sites keep their default state files (sgs_flower.dp.site.default_state_file)
    in a folder of their own, never in the user's FLWR_HOME: a site remembers the models it
    signed for across runs, and two tests must not see each other's memory."""
    monkeypatch.setenv("SGS_STATE_DIR", str(tmp_path_factory.mktemp("sgs-sites")))


def pytest_configure(config):
    """The validation generators' disk cache (sgs_flower.validation.group.cache_file) goes to
    a folder of this test session, never the user's ~/.cache: shared by the session's tests
    and the processes they start (Flower simulation, deployments) for speed."""
    if "SGS_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["SGS_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgs-cache-")
