"""The consistency quorum as a round parameter: global by default, neighbourhood opt-in.

A round announces its consistency quorum in the setup (``RoundParams.consistency``,
``SecAggConfig.consistency``): ``"global"`` (the default, the guarantee that landed
first: floor(2n/3) + 1 of the cohort signed the identical survivor set, fewer than n/3
colluders anywhere) or ``"neighbourhood"`` (two thirds of each site's closed
neighbourhood: O(k) signature checks, at most floor(k/3) colluders per neighbourhood).
A site decides what it accepts (policy key ``sgs-consistency``): by default only the
global quorum. The mode is bound into the round context every advertisement and
consistency signature covers, so a server cannot run some sites in one mode and the
rest in the other.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from lying_server import aggregate, aggregate_request

from sgs_flower.secagg import bls, keys
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentRequestError,
    PolicyError,
    SignatureError,
    ThresholdError,
)
from sgs_flower.secagg.graph import consistency_quorum, neighbourhood_quorum
from sgs_flower.secagg.policy import NODE_CONFIG_KEYS, ClientPolicy
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import simulate_round
from sgs_flower.secagg.wire import (
    AdvertiseKeys,
    KeyRoster,
    NeighbourKeys,
    Setup,
    Stage,
    UnmaskRequest,
    decode,
    encode,
)
from strategies.config import SecAggConfig

OPTED_IN = ClientPolicy(consistency="neighbourhood")


def _until_consistency(n: int, consistency: str = "global", policy: ClientPolicy | None = None, m: int = 6):
    ids = tuple(range(1, n + 1))
    server = SecAggServer(RoundParams(run_id=4, round_id=2, cohort=ids, vector_length=m, consistency=consistency))
    clients = {u: SecAggClient(u, policy=policy or ClientPolicy()) for u in ids}
    rng = np.random.default_rng(n)
    inputs = {u: rng.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32) for u in ids}
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(r) for u, r in rosters.items()})
    reqs = server.collect_masked({u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()})
    return server, clients, inputs, reqs


# ---------------------------------------------------------------- defaults and the site's policy
def test_global_is_the_default_everywhere():
    assert RoundParams(run_id=1, round_id=1, cohort=(1, 2, 3), vector_length=4).consistency == "global"
    assert SecAggConfig().consistency == "global"
    assert ClientPolicy().consistency == "global"
    assert ClientPolicy.from_node_config({}).consistency == "global"
    assert "sgs-consistency" in NODE_CONFIG_KEYS
    setup = SecAggServer(RoundParams(run_id=1, round_id=1, cohort=(1, 2, 3), vector_length=4)).setup_messages()[1]
    assert setup.consistency == "global"


def test_unknown_modes_are_refused_on_both_sides():
    with pytest.raises(ConfigurationError, match="consistency"):
        RoundParams(run_id=1, round_id=1, cohort=(1, 2, 3), vector_length=4, consistency="local")
    with pytest.raises(ValueError, match=r"SecAggConfig\.consistency"):
        SecAggConfig(consistency="local")
    with pytest.raises(ConfigurationError, match="sgs-consistency"):
        ClientPolicy.from_node_config({"sgs-consistency": "local"})
    setup = Setup(run_id=1, round_id=1, recipient=1, cohort=(1, 2, 3), degree=2, threshold=2, field_bits=32,
                  vector_length=4, consistency="local")
    client = SecAggClient(1, policy=OPTED_IN)
    with pytest.raises(PolicyError, match="sgs-consistency"):
        client.handle(setup)
    assert client.stage is None


def test_default_site_refuses_a_neighbourhood_round_before_allocating_anything():
    """(a) A site without the opt-in refuses a round announcing the neighbourhood quorum,
    at its setup, with a PolicyError naming sgs-consistency: no keys are made."""
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(range(1, 41)), vector_length=4,
                         consistency="neighbourhood")
    setup = SecAggServer(params).setup_messages()[5]
    assert setup.consistency == "neighbourhood"
    for policy in (ClientPolicy(), ClientPolicy.from_node_config({"sgs-consistency": "global"})):
        client = SecAggClient(5, policy=policy)
        with pytest.raises(PolicyError, match="sgs-consistency"):
            client.handle(setup)
        assert client.stage is None
    # also through the wire (the field travels in the setup's header)
    client = SecAggClient(5)
    with pytest.raises(PolicyError, match="sgs-consistency=neighbourhood to opt in"):
        client.handle(decode(encode(setup)))
    assert client.stage is None


def test_opted_in_site_accepts_both_modes():
    opted = ClientPolicy.from_node_config({"sgs-consistency": "Neighbourhood"})
    assert opted.consistency == "neighbourhood"
    for mode in ("global", "neighbourhood"):
        params = RoundParams(run_id=1, round_id=1, cohort=tuple(range(1, 41)), vector_length=4, consistency=mode)
        client = SecAggClient(5, policy=opted)
        reply = client.handle(SecAggServer(params).setup_messages()[5])
        assert isinstance(reply, AdvertiseKeys)
        assert client.stage == Stage.SHARE_KEYS


# ---------------------------------------------------------------- (b) the global quorum still holds
N_SPARSE = 40  # degree 16: the neighbourhood quorum (12) is far below the global one (27)


def test_global_round_forwards_every_signature_and_needs_the_global_quorum():
    server, clients, inputs, reqs = _until_consistency(N_SPARSE)
    assert server.params.degree == 16 and server.params.degree < N_SPARSE - 1
    q, qk = consistency_quorum(N_SPARSE), neighbourhood_quorum(16)
    assert (q, qk) == (27, 12)
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    unmask = server.collect_consistency(replies)
    assert all(len(r.signers) == N_SPARSE for r in unmask.values())  # all of them, as before (one aggregate)
    # the neighbourhood's signatures (enough for the opt-in mode) do not satisfy a global round
    u = 1
    mine = tuple((v, replies[v].signature) for v in unmask[u].signers if v in server.graph[u] | {u})  # type: ignore[attr-defined]
    assert qk <= len(mine) < q
    with pytest.raises(InconsistentRequestError, match=rf"only {len(mine)} survivors signed the survivor set, "
                                                       rf"{q} are needed"):
        clients[u].handle(aggregate_request(4, 2, u, unmask[u].survivors, mine))
    out = server.collect_unmask({v: clients[v].handle(r) for v, r in unmask.items() if v != u})
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


def test_global_round_refuses_a_forged_or_missing_signature():
    server, clients, _inputs, reqs = _until_consistency(N_SPARSE)
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    unmask = server.collect_consistency(replies)
    req = unmask[2]
    q = consistency_quorum(N_SPARSE)
    # a forged signature from outside client 2's neighbourhood is still checked globally:
    # in the aggregate, the outsider's part is another key's signature on the statement
    outsider = next(v for v in req.signers[:q] if v not in server.graph[2] and v != 2)
    statement = keys.consistency_statement(server.share_context, req.survivors)
    fake = bls.sign(bls.run_secret(SecAggClient(99).identity, 4), statement)
    forged = aggregate(fake if v == outsider else replies[v].signature for v in req.signers)  # type: ignore[attr-defined]
    with pytest.raises(SignatureError, match=f"aggregate consistency signature of the {N_SPARSE} listed signers "
                                             "does not verify"):
        clients[2].handle(dataclasses.replace(req, aggregate=forged))
    # one signature short of the quorum (another client: a refusal ends a client's round)
    short = tuple((v, replies[v].signature) for v in unmask[3].signers[: q - 1])  # type: ignore[attr-defined]
    with pytest.raises(InconsistentRequestError, match=f"only {q - 1} survivors signed"):
        clients[3].handle(aggregate_request(4, 2, 3, unmask[3].survivors, short))


def test_global_round_aborts_below_the_global_count_of_signers():
    server, clients, _inputs, reqs = _until_consistency(N_SPARSE)
    q = consistency_quorum(N_SPARSE)
    replies = {u: clients[u].handle(r) for u, r in sorted(reqs.items())[: q - 1]}
    with pytest.raises(ThresholdError, match="signed the survivor set"):
        server.collect_consistency(replies)


def test_split_survivor_sets_are_refused_in_the_global_mode():
    """(b) The split attack of tests/test_active_server.py (which runs it in the default
    global mode at n = 4 to 40) on a sparse graph: half the survivors told the full set,
    half the set without node 2. Neither set has the global quorum, so even a client
    whose whole neighbourhood signed its set reveals nothing."""
    server, clients, _inputs, reqs = _until_consistency(N_SPARSE)
    everyone = tuple(sorted(server.u3))
    without = tuple(v for v in everyone if v != 2)
    full_side = server.graph[1] | {1, 2}  # client 1's whole neighbourhood (and 2) sees the full set
    told = {u: everyone if u in full_side else without for u in everyone}
    assert len([u for u in everyone if told[u] == everyone]) < consistency_quorum(N_SPARSE)
    sigs = {u: clients[u].handle(dataclasses.replace(reqs[u], survivors=told[u])).signature for u in everyone}
    revealed = []
    # client 1 holds its whole closed neighbourhood's signatures on its set: enough for
    # the opt-in neighbourhood quorum, not for the global one
    assert sum(told[v] == everyone for v in server.graph[1] | {1}) >= neighbourhood_quorum(16)
    for u in everyone:
        same = tuple((v, sigs[v]) for v in everyone if told[v] == told[u])
        try:
            revealed.append(clients[u].handle(_unmask_request(u, told[u], same)))
        except InconsistentRequestError as exc:
            assert "survivors signed the survivor set" in str(exc)
    assert revealed == []


def _unmask_request(u: int, survivors: tuple[int, ...], signatures: tuple[tuple[int, bytes], ...]) -> UnmaskRequest:
    return aggregate_request(4, 2, u, survivors, signatures)  # a global round: one aggregate


# ---------------------------------------------------------------- the neighbourhood mode
def test_neighbourhood_round_forwards_only_what_each_neighbourhood_needs():
    server, clients, inputs, reqs = _until_consistency(N_SPARSE, "neighbourhood", OPTED_IN)
    unmask = server.collect_consistency({u: clients[u].handle(r) for u, r in reqs.items()})
    need = neighbourhood_quorum(16) - 1
    assert all(len(r.signatures) == need for r in unmask.values())
    out = server.collect_unmask({v: clients[v].handle(r) for v, r in unmask.items()})
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


@pytest.mark.parametrize("mode", ["global", "neighbourhood"])
def test_simulate_round_in_either_mode(mode):
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-0.5, 0.5, 5) for _ in range(30)]
    res = simulate_round(xs, seed=1, consistency=mode, dropouts={Stage.MASKED_INPUT: [4]})
    assert res.outcome.survivors == tuple(u for u in range(1, 31) if u != 5)
    np.testing.assert_allclose(res.aggregate, np.mean([x for i, x in enumerate(xs) if i != 4], axis=0), atol=1e-3)


# ---------------------------------------------------------------- (c) the mode is bound
def test_mixed_modes_are_refused_at_the_roster():
    """A server that tells sites 1-4 "neighbourhood" and sites 5-8 "global" (all opted
    in, so no site refuses its setup): the mode is in the round context each site's
    advertisement signature covers, so an advertisement from the other group does not
    verify. The honest server drops them at collect_keys (and aborts: too few left); a lying one that forwards them
    anyway gets a SignatureError from every site (complete graph: each has neighbours in
    both groups) before any share is encrypted."""
    ids = tuple(range(1, 9))
    servers = {
        mode: SecAggServer(RoundParams(run_id=6, round_id=1, cohort=ids, vector_length=4, consistency=mode))
        for mode in ("global", "neighbourhood")
    }
    assert servers["global"].share_context != servers["neighbourhood"].share_context
    mode_of = {u: "neighbourhood" if u <= 4 else "global" for u in ids}
    clients = {u: SecAggClient(u, policy=OPTED_IN) for u in ids}
    adverts = {u: clients[u].handle(servers[mode_of[u]].setup_messages()[u]) for u in ids}
    assert all(isinstance(a, AdvertiseKeys) for a in adverts.values())
    # the honest server's own check: the other group's advertisements do not verify
    honest = servers["global"]
    with pytest.raises(ThresholdError, match="4 clients advertised keys"):  # a clean abort: 4 of 8 left
        honest.collect_keys(adverts)
    assert {u for u, e in honest.rejected.items() if isinstance(e, SignatureError)} == {1, 2, 3, 4}
    # a lying server forwards every advertisement to everyone
    identities = tuple((u, a.identity_key) for u, a in sorted(adverts.items()))  # type: ignore[attr-defined]
    refusals = {}
    for u in ids:
        nks = tuple(
            NeighbourKeys(v, a.c_pk, a.s_pk, a.identity_key, a.self_mask_commitment, a.signature)  # type: ignore[attr-defined]
            for v, a in sorted(adverts.items()) if v != u
        )
        roster = KeyRoster(run_id=6, round_id=1, recipient=u, keys=nks, identities=identities)
        with pytest.raises(SignatureError, match="advertised keys do not carry its valid signature") as exc:
            clients[u].handle(roster)
        refusals[u] = exc.value
        assert clients[u].stage != Stage.MASKED_INPUT  # no shares were made
    assert set(refusals) == set(ids)


def test_consistency_signatures_do_not_carry_over_between_modes():
    """The consistency statement is over the share context, which holds the mode: a
    signature made in one mode never counts in the other."""
    ids = tuple(range(1, 6))
    ctx = {
        mode: SecAggServer(RoundParams(run_id=6, round_id=1, cohort=ids, vector_length=4, consistency=mode)).share_context
        for mode in ("global", "neighbourhood")
    }
    assert keys.consistency_statement(ctx["global"], ids) != keys.consistency_statement(ctx["neighbourhood"], ids)
