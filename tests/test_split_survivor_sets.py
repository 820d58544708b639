"""The split-survivor-set attack at n = 1,000 on the default sparse graph (issue 21).

A malicious server, written here, drives 1,000 real :class:`SecAggClient` objects. The
stages up to the masked input are honest (the project's server routes them); then it
lies at the consistency check: it tells every neighbour z of a victim W that W survived
and that W's *other* neighbours dropped, and tells everyone else that all of W's
neighbours dropped. If that worked it would get W's self-mask seed (from W's neighbours)
and the masking key of every neighbour of W (from those neighbours' own neighbours),
which remove every mask from W's input. At the unmask stage it forwards to each client
every signature it holds from that client's neighbourhood on the client's own set.

The round runs in the opt-in neighbourhood mode (``RoundParams(consistency=
"neighbourhood")``, sites with ``sgs-consistency=neighbourhood``): the global mode, the
default, is tested against the split in tests/test_active_server.py (and a site without
the opt-in refuses this round at its setup: tests/test_consistency_mode.py).

With the per-neighbourhood consistency quorum each neighbour of W refuses (typed
:class:`InconsistentRequestError`: too few of its neighbourhood signed its set), and the
shares the server does collect rebuild neither W's seed nor the neighbours' keys. The
second test adds colluding clients (10 of W's 30 neighbours, the most the design
tolerates in a neighbourhood: docs/protocol.md, "The consistency check") that sign
every set the server asks for and hand over every share they hold.
"""

from __future__ import annotations

import numpy as np
import pytest

from sgs_flower.secagg import identity, keys
from sgs_flower.secagg.client import AwaitingConsistency, SecAggClient
from sgs_flower.secagg.errors import InconsistentRequestError, ProtocolError
from sgs_flower.secagg.graph import neighbourhood_quorum
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import ConsistencyRequest, UnmaskRequest, UnmaskResponse

N = 1000
M = 8


@pytest.fixture(scope="module")
def masked_round():
    """Stages 1-3 run honestly for 1,000 real clients: the server, the clients (waiting
    for the consistency request) and the requests the honest server would send."""
    ids = tuple(range(1, N + 1))
    params = RoundParams(run_id=5, round_id=2, cohort=ids, vector_length=M, consistency="neighbourhood")
    server = SecAggServer(params)
    opted_in = ClientPolicy(consistency="neighbourhood")
    clients = {u: SecAggClient(u, policy=opted_in) for u in ids}
    rng = np.random.default_rng(21)
    inputs = {u: rng.integers(0, 1 << 32, M, dtype=np.uint64).astype(np.uint32) for u in ids}
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(r) for u, r in rosters.items()})
    requests = server.collect_masked({u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()})
    return server, clients, requests


def _attack(server: SecAggServer, clients: dict[int, SecAggClient], requests: dict[int, ConsistencyRequest],
            victim: int, colluders: frozenset[int]):
    """Play the split; return what the server holds: per secret owner, the shares of its
    self-mask seed and of its masking key, and the honest clients' refusals."""
    g = server.graph
    everyone = tuple(sorted(server.u3))
    around = g[victim]
    told: dict[int, tuple[int, ...]] = {}
    for u in everyone:
        hide = around - {u} if u in around else around
        told[u] = tuple(v for v in everyone if v not in hide)
    # the 2-hop region the attack needs; everyone else is told the same set and ignored
    region = set(around) | {victim}
    for z in list(region):
        region |= g[z]
    share_context = server.share_context
    sigs: dict[int, bytes] = {}
    refusals: dict[int, Exception] = {}
    for u in sorted(region):
        if u in colluders:
            continue
        req = ConsistencyRequest(run_id=5, round_id=2, recipient=u, survivors=told[u])
        sigs[u] = clients[u].handle(req).signature  # type: ignore[attr-defined]
    b_shares: dict[int, set[int]] = {}  # owner -> holders whose share of its seed the server has
    sk_shares: dict[int, set[int]] = {}
    for c in colluders:  # a colluder hands over every share it holds
        st = clients[c].state
        assert isinstance(st, AwaitingConsistency)
        for owner in st.held:
            b_shares.setdefault(owner, set()).add(c)
            sk_shares.setdefault(owner, set()).add(c)
    for u in sorted(region - colluders):
        s = told[u]
        statement = keys.consistency_statement(share_context, s)
        closed = g[u] | {u}
        # every signature the server holds from u's neighbourhood on u's set, colluders
        # signing whatever is asked of them
        fwd = [(v, sigs[v]) for v in sorted(closed) if v in sigs and told[v] == s and v in s]
        fwd += [(c, identity.sign(clients[c].identity, statement)) for c in sorted(colluders & closed) if c in s]
        req = UnmaskRequest(run_id=5, round_id=2, recipient=u, survivors=s, signatures=tuple(sorted(fwd)))
        try:
            reply = clients[u].handle(req)
        except ProtocolError as exc:
            refusals[u] = exc
            continue
        assert isinstance(reply, UnmaskResponse)
        for owner, _ in reply.self_mask_shares:
            b_shares.setdefault(owner, set()).add(u)
        for owner, _ in reply.key_shares:
            sk_shares.setdefault(owner, set()).add(u)
    return b_shares, sk_shares, refusals


def _victim_exposed(server: SecAggServer, victim: int, colluders: frozenset[int],
                    b_shares: dict[int, set[int]], sk_shares: dict[int, set[int]]) -> bool:
    """Whether the server could remove every mask from the victim's masked input: its
    self-mask seed (t shares) and, for each neighbour, the pairwise mask (a colluder's,
    or t shares of the neighbour's or the victim's masking key)."""
    t = server.params.threshold
    assert t is not None
    if len(b_shares.get(victim, ())) < t:
        return False
    if len(sk_shares.get(victim, ())) >= t:
        return True
    return all(v in colluders or len(sk_shares.get(v, ())) >= t for v in server.graph[victim])


def test_split_survivor_sets_at_1000_clients_are_refused(masked_round):
    server, clients, requests = masked_round
    assert server.params.degree == 30 and server.params.threshold == 21  # sparse: 30 of 999
    victim = 17
    b_shares, sk_shares, refusals = _attack(server, clients, requests, victim, frozenset())
    # every neighbour of W refuses, with the typed error naming the missing quorum
    for z in server.graph[victim]:
        assert isinstance(refusals.get(z), InconsistentRequestError), z
        assert "survivors signed the survivor set" in str(refusals[z])
        assert f"{neighbourhood_quorum(30)} are needed" in str(refusals[z])
    assert victim not in b_shares  # no share of W's self-mask seed left any client
    assert not _victim_exposed(server, victim, frozenset(), b_shares, sk_shares)
    # and no neighbour's masking key is recoverable either
    assert all(len(sk_shares.get(v, ())) < server.params.threshold for v in server.graph[victim])


def test_split_with_colluders_within_the_tolerance_is_refused(masked_round):
    """10 colluders among W's 30 neighbours (none elsewhere): q + t - k - 1 = 11 would
    be needed in one honest neighbour's neighbourhood; the victim stays hidden."""
    server, clients, requests = masked_round
    g = server.graph

    def untouched(w: int) -> bool:  # the attack's region around w has not been played yet
        region = set(g[w]) | {w}
        for z in list(region):
            region |= g[z]
        return all(isinstance(clients[u].state, AwaitingConsistency) for u in region)

    victim = next(w for w in sorted(server.u3) if w > 500 and untouched(w))
    colluders = frozenset(sorted(g[victim])[:10])
    b_shares, sk_shares, refusals = _attack(server, clients, requests, victim, colluders)
    assert not _victim_exposed(server, victim, colluders, b_shares, sk_shares)
    honest_neighbours = server.graph[victim] - colluders
    assert all(isinstance(refusals.get(z), InconsistentRequestError) for z in honest_neighbours)
