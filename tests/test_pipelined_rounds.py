"""Key agreement pipelined across rounds (protocol ``sgs-secagg+/3``).

Round r + 1's keys are advertised during round r's consistency exchange and its shares
during round r's unmask exchange, so a steady-state round makes three exchanges
(masked input, consistency, unmask). These tests check that the sum stays exact, that
dropouts between rounds give a correct sum or a clean abort, that a lying server cannot
pass one round's key material off as another's, that the real Flower path (strategy
and mod) counts 5 exchanges for a round set up in full and 3 for a pipelined one, and
that the wrapped strategy's hooks run once per round, pipelined or not.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgs_flower.secagg import wire
from sgs_flower.secagg.client import AwaitingShares, SecAggClient
from sgs_flower.secagg.errors import (
    InconsistentRequestError,
    MalformedMessageError,
    PolicyError,
    ShareDecryptionError,
    SignatureError,
    StaleMessageError,
    ThresholdError,
)
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import PipelinedRunner
from sgs_flower.secagg.wire import (
    ConsistencyRequest,
    KeyRoster,
    Setup,
    ShareBundle,
    Stage,
)

FULL = ["ADVERTISE_KEYS", "SHARE_KEYS", "MASKED_INPUT", "CONSISTENCY", "UNMASK"]
STEADY = ["MASKED_INPUT", "CONSISTENCY", "UNMASK"]
M = 24


def _inputs(ids, seed, m=M):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32) for u in ids}


@contextmanager
def captured_bundles() -> Iterator[dict[int, dict[int, ShareBundle]]]:
    """The share bundles each protocol server hands out, by round then recipient, as a
    lying server would keep them to replay later."""
    captured: dict[int, dict[int, ShareBundle]] = {}
    orig = SecAggServer.collect_shares

    def spy(self, replies):
        out = orig(self, replies)
        captured[self.params.round_id] = out
        return out

    SecAggServer.collect_shares = spy  # type: ignore[method-assign]
    try:
        yield captured
    finally:
        SecAggServer.collect_shares = orig  # type: ignore[method-assign]


def _check_sum(res, vectors):
    """The released total is the field sum of exactly the survivors' inputs."""
    assert res.outcome is not None, res.error
    expect = np.zeros(M, dtype=np.uint64)
    for u in res.outcome.survivors:
        expect += vectors[u]
    np.testing.assert_array_equal(res.outcome.total, expect.astype(np.uint32))


# ---------------------------------------------------------------- 1: honest rounds
@pytest.mark.parametrize("wire_format", [False, True])
def test_honest_pipelined_rounds_are_exact_and_take_three_exchanges(wire_format):
    """Five rounds over changing cohorts (nodes 1..8, 6 a round, so some nodes of round
    r + 1 are not in round r and get a setup-only message): every sum is exact, round 1
    makes the full five exchanges, every later round three."""
    ids = list(range(1, 9))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M, run_id=4, wire=wire_format)
    rng = np.random.default_rng(1)
    cohorts = [sorted(rng.choice(ids, 6, replace=False).tolist()) for _ in range(5)]
    assert any(set(b) - set(a) for a, b in itertools.pairwise(cohorts))
    for r, cohort in enumerate(cohorts, start=1):
        vectors = _inputs(cohort, r)
        res = runner.run_round(r, cohort, vectors, next_cohort=cohorts[r] if r < len(cohorts) else None)
        _check_sum(res, vectors)
        assert res.outcome.survivors == tuple(cohort)
        assert res.exchanges == (FULL if r == 1 else STEADY)
        assert res.pipelined == (r > 1)
        assert res.ahead_ready == (r < len(cohorts))
        assert not res.refused and not res.ahead_refused
    # after the last round nothing is left set up ahead
    assert all(c.pending is None for c in clients.values())


def test_pipelined_rounds_with_a_harary_graph():
    ids = list(range(1, 16))  # beyond 10: a Harary graph, fresh per round (the seed covers the round)
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    for r in (1, 2, 3):
        vectors = _inputs(ids, 10 + r)
        res = runner.run_round(r, ids, vectors, next_cohort=ids if r < 3 else None)
        _check_sum(res, vectors)
        assert len(res.exchanges) == (5 if r == 1 else 3)


def test_fresh_keys_every_round():
    """Pipelining keeps fresh keys per round: no public key advertised twice."""
    ids = list(range(1, 6))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    seen: list[bytes] = []
    for r in (1, 2, 3):
        server = runner.ahead.server if runner.ahead else None
        res = runner.run_round(r, ids, _inputs(ids, r), next_cohort=ids if r < 3 else None)
        assert res.outcome is not None
        if server is not None:
            seen += [a.c_pk for a in server.advertised.values()] + [a.s_pk for a in server.advertised.values()]
    assert len(seen) == 2 * 2 * 5 and len(set(seen)) == len(seen)


def test_client_state_with_a_round_set_up_ahead_survives_a_save_and_load():
    """The mod keeps the client in Context.state between messages: both live instances
    (the round finishing and the round set up ahead) must survive the round trip."""
    ids = list(range(1, 6))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids)
    for u in ids:
        c = clients[u]
        assert isinstance(c.pending, AwaitingShares)
        clients[u] = SecAggClient.from_state_dict(c.state_dict(), c.identity)
        assert clients[u].pending_round == (1, 2)
    runner.clients = clients
    vectors = _inputs(ids, 2)
    res = runner.run_round(2, ids, vectors)
    _check_sum(res, vectors)
    assert res.exchanges == STEADY


# ---------------------------------------------------------------- 2: dropouts
def _two_rounds(n, drops1=None, drops2=None, cohort2=None):
    ids = list(range(1, n + 1))
    cohort2 = cohort2 or ids
    clients = {u: SecAggClient(u) for u in range(1, max(ids + cohort2) + 1)}
    runner = PipelinedRunner(clients, M)
    v1, v2 = _inputs(ids, 1), _inputs(cohort2, 2)
    r1 = runner.run_round(1, ids, v1, next_cohort=cohort2, dropouts=drops1)
    r2 = runner.run_round(2, cohort2, v2, next_cohort=None, dropouts=drops2)
    return (r1, v1), (r2, v2), clients


def test_node_dropping_between_rounds_after_advertising_next_keys():
    """Node 3 answers round 1's consistency check (and advertises its round-2 keys with
    it), then goes offline: it misses round 1's unmask stage and round 2's key sharing.
    Round 1 releases the sum with node 3 in it (it masked), round 2 runs pipelined
    without it; both sums are exact."""
    (r1, v1), (r2, v2), _ = _two_rounds(7, drops1={Stage.UNMASK: {3}})
    _check_sum(r1, v1)
    assert 3 in r1.outcome.survivors and r1.ahead_ready
    _check_sum(r2, v2)
    assert r2.exchanges == STEADY
    assert 3 not in r2.outcome.survivors
    assert r2.outcome.dropped[3] == Stage.SHARE_KEYS


def test_node_dropping_after_sharing_next_keys():
    """Node 4 shares its round-2 keys during round 1's unmask stage, then never sends its
    round-2 masked input: its pairwise masks are rebuilt from its neighbours' shares."""
    (r1, v1), (r2, v2), _ = _two_rounds(7, drops2={Stage.MASKED_INPUT: {4}})
    _check_sum(r1, v1)
    _check_sum(r2, v2)
    assert r2.exchanges == STEADY
    assert 4 not in r2.outcome.survivors and r2.outcome.dropped[4] == Stage.MASKED_INPUT


def test_node_offline_during_the_consistency_exchange_misses_both_rounds_parts():
    """Node 2 goes offline at round 1's consistency exchange: round 1 goes on without its
    signature (it still masked), and round 2 without its keys (it never advertised)."""
    (r1, v1), (r2, v2), _ = _two_rounds(7, drops1={Stage.CONSISTENCY: {2}})
    _check_sum(r1, v1)
    _check_sum(r2, v2)
    assert r2.exchanges == STEADY and r2.outcome.dropped[2] == Stage.ADVERTISE_KEYS


def test_too_many_dropouts_ahead_means_a_full_setup_not_a_wrong_sum():
    """Three of five nodes go offline during round 1's unmask exchange: round 1 cannot
    rebuild the masks (clean abort), and round 2, whose advance setup is discarded with
    it, sets up in full and is exact."""
    ids = [1, 2, 3, 4, 5]
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    r1 = runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids, dropouts={Stage.UNMASK: {1, 2, 3}})
    assert r1.outcome is None and isinstance(r1.error, ThresholdError)
    assert runner.ahead is None
    vectors = _inputs(ids, 2)
    r2 = runner.run_round(2, ids, vectors)
    _check_sum(r2, vectors)
    assert r2.exchanges == FULL


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_dropouts_over_pipelined_rounds_give_the_exact_sum_or_an_abort(data):
    """Random offline nodes at every stage of four rounds over random cohorts: each round
    releases exactly the sum of its survivors' inputs, or aborts with ThresholdError;
    a round after an abort (or a failed advance setup) makes five exchanges."""
    n = data.draw(st.integers(5, 12))
    ids = list(range(1, n + 1))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    rounds = 4
    cohorts = [sorted(data.draw(st.sets(st.sampled_from(ids), min_size=4, max_size=n))) for _ in range(rounds)]
    ready = False
    for r in range(1, rounds + 1):
        cohort = cohorts[r - 1]
        drops = {s: set(data.draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))) for s in Stage}
        vectors = _inputs(cohort, r)
        res = runner.run_round(r, cohort, vectors, next_cohort=cohorts[r] if r < rounds else None, dropouts=drops)
        assert len(res.exchanges) == (3 if ready else 5) or res.error is not None
        if res.outcome is None:
            assert isinstance(res.error, ThresholdError), res.error
        else:
            _check_sum(res, vectors)
            # offline before its masked input, at the exchanges this round made (a pipelined
            # round has no setup exchanges of its own)
            offline = set().union(*(drops[s] for s in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT)
                                    if s.name in res.exchanges))
            assert not offline & set(res.outcome.survivors)
        ready = res.ahead_ready


# ---------------------------------------------------------------- 3: a lying server
@dataclasses.dataclass
class Scene:
    """Round 1 run honestly up to its consistency requests; round 2's server ready."""

    clients: dict[int, SecAggClient]
    s1: SecAggServer
    s2: SecAggServer
    cons: dict[int, ConsistencyRequest]
    v1: dict[int, np.ndarray]


def _scene(n=5, run_id=3) -> Scene:
    ids = tuple(range(1, n + 1))
    clients = {u: SecAggClient(u) for u in ids}
    s1 = SecAggServer(RoundParams(run_id=run_id, round_id=1, cohort=ids, vector_length=M))
    s2 = SecAggServer(RoundParams(run_id=run_id, round_id=2, cohort=ids, vector_length=M), bound_digest=None)
    v1 = _inputs(ids, 1)
    rosters = s1.collect_keys({u: clients[u].handle(m) for u, m in s1.setup_messages().items()})
    bundles = s1.collect_shares({u: clients[u].handle(m) for u, m in rosters.items()})
    cons = s1.collect_masked({u: clients[u].handle(m, vector=v1[u]) for u, m in bundles.items()})
    return Scene(clients, s1, s2, cons, v1)


def _honest_consistency(sc: Scene):
    """Round 1's consistency exchange carrying round 2's setup; returns the unmask
    requests of round 1 and round 2's rosters."""
    sigs, adv = {}, {}
    setups = sc.s2.setup_messages()
    for u, c in sc.clients.items():
        sigs[u] = c.handle(sc.cons[u])
        adv[u] = c.handle_next(setups[u], sc.cons[u])
    return sc.s1.collect_consistency(sigs), sc.s2.collect_keys(adv)


def _refused(client: SecAggClient, part, riding_on, kind, text):
    """``part`` riding on ``riding_on`` (which the client answers honestly) is refused
    with ``kind`` naming ``text``; the client leaves round 2 only."""
    main_reply = client.handle(riding_on)
    assert main_reply.round_id == riding_on.round_id
    main_state = type(client.state)
    with pytest.raises(kind, match=text):
        client.handle_next(part, riding_on)
    assert client.pending is None  # it left the round being set up...
    assert type(client.state) is main_state  # ...and nothing else


def test_round_r_setup_replayed_as_round_r_plus_1_is_refused():
    sc = _scene()
    replay = sc.s1.setup_messages()[1]  # round 1's own setup, riding on round 1's consistency
    _refused(sc.clients[1], replay, sc.cons[1], StaleMessageError,
             r"pipelined Setup is for run 3 round 1, but it rides on run 3 round 1: only round 2")


def test_round_r_plus_1_part_under_round_r_header_is_refused():
    """Round 2's setup (its cohort, degree, ...) sent under round 1's header."""
    sc = _scene()
    under_r = dataclasses.replace(sc.s2.setup_messages()[1], round_id=1)
    _refused(sc.clients[1], under_r, sc.cons[1], StaleMessageError, r"only round 2 of the same run")
    # and round 2's roster sent as the first part of round 1's unmask exchange
    sc = _scene()
    _unmask, rosters2 = _honest_consistency(sc)
    c = sc.clients[2]
    with pytest.raises(StaleMessageError, match=r"KeyRoster \(stage SHARE_KEYS\) is not valid while node 2 is at stage UNMASK"):
        c.handle(dataclasses.replace(rosters2[2], round_id=1))
    assert c.stage is None  # it left round 1
    assert c.pending_round == (3, 2)  # round 2's setup is another round: kept


def test_pipelined_part_for_a_round_other_than_r_plus_1_is_refused():
    sc = _scene()
    p = RoundParams(run_id=3, round_id=3, cohort=tuple(sc.clients), vector_length=M)
    skip = SecAggServer(p).setup_messages()[1]
    _refused(sc.clients[1], skip, sc.cons[1], StaleMessageError, r"is for run 3 round 3.*only round 2")
    sc = _scene()
    other_run = dataclasses.replace(sc.s2.setup_messages()[2], run_id=4)
    _refused(sc.clients[2], other_run, sc.cons[2], StaleMessageError, r"is for run 4 round 2.*only round 2 of the same run")


def test_next_round_setup_sent_twice_is_refused():
    sc = _scene()
    unmask, _rosters2 = _honest_consistency(sc)
    again = sc.s2.setup_messages()[1]
    _refused(sc.clients[1], again, unmask[1], StaleMessageError, r"setup for round 2 of run 3 arrived twice")


def test_unpipelined_stage_riding_on_a_round_is_refused():
    """Only ADVERTISE_KEYS and SHARE_KEYS ride along; round 2's share bundle (the
    masked-input stage, which must carry round 2's model) may not."""
    sc = _scene()
    fake = ShareBundle(run_id=3, round_id=2, recipient=1, ciphertexts=())
    _refused(sc.clients[1], fake, sc.cons[1], StaleMessageError,
             r"cannot ride on another round's message: only ADVERTISE_KEYS and SHARE_KEYS are pipelined")
    # the right stage on the wrong carrier: round 2's roster on round 1's consistency request
    sc = _scene()
    roster = KeyRoster(run_id=3, round_id=2, recipient=1, keys=(), identities=())
    _refused(sc.clients[1], roster, sc.cons[1], StaleMessageError, r"must ride on a UNMASK request, not on CONSISTENCY")


def test_pipelined_part_on_a_message_the_client_did_not_answer_is_refused():
    sc = _scene()
    c = sc.clients[1]
    with pytest.raises(InconsistentRequestError):
        c.handle(dataclasses.replace(sc.cons[1], survivors=(1, 2)))
    with pytest.raises(StaleMessageError, match="did not just answer"):
        c.handle_next(sc.s2.setup_messages()[1], sc.cons[1])
    assert c.pending is None


def test_round_r_advertisements_replayed_in_round_r_plus_1_roster_are_refused():
    """The server forwards round 1's signed keys of node 2 in round 2's roster: the
    signature covers round 1's parameters, not round 2's."""
    sc = _scene()
    unmask, rosters2 = _honest_consistency(sc)
    old = sc.s1.advertised[2]
    r = rosters2[1]
    mixed = tuple(
        dataclasses.replace(nk, c_pk=old.c_pk, s_pk=old.s_pk, self_mask_commitment=old.self_mask_commitment,
                            signature=old.signature) if nk.node == 2 else nk
        for nk in r.keys
    )
    _refused(sc.clients[1], dataclasses.replace(r, keys=mixed), unmask[1], SignatureError,
             r"node 2's advertised keys do not carry its valid signature for this round")


def test_round_r_roster_replayed_as_round_r_plus_1_roster_is_refused():
    sc = _scene()
    unmask, _rosters2 = _honest_consistency(sc)
    # round 1's roster as the server sent it, riding on round 1's unmask request
    r1_roster = KeyRoster(run_id=3, round_id=1, recipient=1,
                          keys=tuple(sc.clients[1].state.roster.values()),  # type: ignore[union-attr]
                          identities=tuple(sorted(sc.clients[1].state.identities.items())))  # type: ignore[union-attr]
    _refused(sc.clients[1], r1_roster, unmask[1], StaleMessageError, r"is for run 3 round 1.*only round 2")
    # and re-headed as round 2's: its keys are round 1's, so their signatures fail
    sc = _scene()
    unmask, _rosters2 = _honest_consistency(sc)
    st1 = sc.clients[1].state
    reheaded = KeyRoster(run_id=3, round_id=2, recipient=1, keys=tuple(st1.roster.values()),  # type: ignore[union-attr]
                         identities=tuple(sorted(st1.identities.items())))  # type: ignore[union-attr]
    _refused(sc.clients[1], reheaded, unmask[1], SignatureError, r"do not carry its valid signature for this round")


def test_pipelined_roster_identity_table_is_checked_like_a_full_one():
    """Round 2's roster, riding along, with an identity table giving node 3 node 4's key."""
    sc = _scene()
    unmask, rosters2 = _honest_consistency(sc)
    r = rosters2[1]
    table = dict(r.identities)
    table[3] = table[4]
    _refused(sc.clients[1], dataclasses.replace(r, identities=tuple(table.items())), unmask[1],
             MalformedMessageError, r"nodes 3 and 4 present the same identity key|nodes 4 and 3 present")


def test_round_r_share_bundles_replayed_as_round_r_plus_1_are_refused():
    """Round 1's share bundle, re-headed as round 2's masked-input request: the shares
    were encrypted under round 1's keys and context, so they fail authentication."""
    ids = tuple(range(1, 6))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M, run_id=3)
    with captured_bundles() as captured:  # round 1's bundles on their way out
        runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids)
    c = clients[1]
    assert c.pending_round == (3, 2)
    vec = np.zeros(M, dtype=np.uint32)
    with pytest.raises(StaleMessageError, match="has no round in progress"):
        c.handle(captured[1][1], vector=vec)  # as sent: round 1, which is over
    assert c.pending_round == (3, 2)  # a stale round-1 message does not touch round 2
    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        c.handle(dataclasses.replace(captured[1][1], round_id=2), vector=vec)
    assert c.stage is None and c.pending is None  # it left round 2
    assert c.last_masked == (3, 1)  # and sent nothing for it


def test_share_bundle_mixing_both_rounds_ciphertexts_is_refused():
    """Round 2's bundle for node 1 with node 2's ciphertext swapped for node 2's round-1
    ciphertext: it fails authentication under round 2's keys and context; node 1 leaves
    round 2 before masking anything."""
    ids = tuple(range(1, 6))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M, run_id=3)
    with captured_bundles() as captured:
        runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids)
    old = dict(captured[1][1].ciphertexts)
    new = captured[2][1]
    mixed = dataclasses.replace(new, ciphertexts=tuple((v, old[v] if v == 2 else ct) for v, ct in new.ciphertexts))
    c = clients[1]
    with pytest.raises(ShareDecryptionError, match="share ciphertext from node 2 to node 1 failed authentication"):
        c.handle(mixed, vector=np.zeros(M, dtype=np.uint32))
    assert c.stage is None and c.pending is None and c.last_masked == (3, 1)


def test_abort_after_the_next_setup_went_out_means_a_full_setup():
    """Round 1 aborts at its consistency check (too few signatures) after round 2's keys
    were advertised with it: the advance setup is discarded, the clients' pending round 2
    is replaced by a full setup with fresh keys, and round 2 is exact."""
    ids = [1, 2, 3, 4, 5]
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    r1 = runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids, dropouts={Stage.CONSISTENCY: {4, 5}})
    assert isinstance(r1.error, ThresholdError) and "consistency quorum" in str(r1.error)
    assert r1.exchanges == FULL[:4] and runner.ahead is None
    held = {u: clients[u].pending_round for u in (1, 2, 3)}
    assert held == {1: (1, 2), 2: (1, 2), 3: (1, 2)}  # they had advertised round 2's keys
    vectors = _inputs(ids, 2)
    r2 = runner.run_round(2, ids, vectors)
    _check_sum(r2, vectors)
    assert r2.exchanges == FULL and not r2.pipelined


def test_round_accepted_once_even_when_set_up_ahead():
    """A round whose input was sent cannot be set up again, pipelined or not."""
    ids = tuple(range(1, 6))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M, run_id=3)
    runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids)
    runner.run_round(2, ids, _inputs(ids, 2), next_cohort=None)
    c = clients[1]
    replay = SecAggServer(RoundParams(run_id=3, round_id=2, cohort=ids, vector_length=M)).setup_messages()[1]
    with pytest.raises(StaleMessageError, match="stale or replayed"):
        c.handle(replay)
    # riding along is no way around it: round 2's setup on a replayed round-1 consistency
    # request is refused before (the client answers no round-1 message any more)
    cons = ConsistencyRequest(run_id=3, round_id=1, recipient=1, survivors=ids)
    with pytest.raises(StaleMessageError):
        c.handle(cons)
    with pytest.raises(StaleMessageError, match="did not just answer"):
        c.handle_next(replay, cons)


def test_pipelined_setup_is_checked_against_the_site_policy():
    """Round 2's setup riding along is checked like any setup: a cohort below the site's
    minimum is refused (PolicyError) before anything is allocated; round 1 goes on."""
    sc = _scene()
    weak = Setup(run_id=3, round_id=2, recipient=1, cohort=(1, 2), degree=1, threshold=1, field_bits=32,
                 vector_length=M)
    _refused(sc.clients[1], weak, sc.cons[1], PolicyError, "cohort of 2 is below this site's minimum cohort")


def test_model_is_bound_at_masked_input_for_a_round_set_up_ahead():
    """The round-2 server is set up before round 2's model exists; it binds the model at
    the masked-input stage. A client given another model masks under another context:
    the count coordinate cannot come out right (here: the sum is not the inputs' sum)."""
    ids = list(range(1, 6))
    clients = {u: SecAggClient(u) for u in ids}
    runner = PipelinedRunner(clients, M)
    runner.run_round(1, ids, _inputs(ids, 1), next_cohort=ids)
    assert runner.ahead is not None and runner.ahead.server.context is None  # nothing bound yet
    with pytest.raises(Exception, match="bind_model"):
        runner.ahead.server.collect_masked({})
    runner.ahead.server.bind_model(b"model A")
    with pytest.raises(Exception, match="already bound to another model"):
        runner.ahead.server.bind_model(b"model B")


# ---------------------------------------------------------------- the mod
def test_mod_answers_two_parts_and_refuses_only_the_bad_one():
    """Through ``secagg_mod``: round 1's consistency request carrying round 2's setup gets
    one reply with both answers; a bad round-2 part gets a ``next-error`` naming the check
    while round 1's answer still goes back."""
    from test_active_server import ModSite, _masked_extra, _reply, _spec

    from sgs_flower.pipeline import binding_digest, decode_update
    from strategies.secagg_strategy import parse_next_reply

    n = 5
    sites = {u: ModSite(u) for u in range(1, n + 1)}
    spec = _spec(n)
    from test_active_server import MODEL

    size = sum(v.size for v in MODEL.values())
    digest = binding_digest(list(MODEL.items()), {"lr": 0.1}, spec.to_config())
    ids = tuple(sites)
    s1 = SecAggServer(RoundParams(run_id=1, round_id=3, cohort=ids, vector_length=spec.vector_length(size)), digest)
    s2 = SecAggServer(RoundParams(run_id=1, round_id=4, cohort=ids, vector_length=spec.vector_length(size)), None)
    rosters = s1.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m)) for u, m in s1.setup_messages().items()})
    bundles = s1.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    extra, fields = _masked_extra(spec)
    reqs = s1.collect_masked({u: _reply(sites[u].send(Stage.MASKED_INPUT, m, extra, fields)) for u, m in bundles.items()})
    setups = s2.setup_messages()
    bad = dataclasses.replace(setups[1], round_id=5)  # a round other than 4
    sigs, adv = {}, {}
    for u in ids:
        nxt = bad if u == 1 else setups[u]
        out = sites[u].send(Stage.CONSISTENCY, reqs[u], fields={wire.FIELD_NEXT_STAGE: int(Stage.ADVERTISE_KEYS),
                                                                 wire.FIELD_NEXT_PAYLOAD: wire.encode(nxt)})
        sigs[u] = _reply(out)
        part = parse_next_reply(out)
        if u == 1:
            assert isinstance(part, str) and part.startswith("StaleMessageError") and "only round 4" in part
        else:
            assert isinstance(part, bytes)
            adv[u] = part
    assert isinstance(sigs[1], wire.ConsistencySignature)  # round 3 went on for site 1
    unmask = s1.collect_consistency(sigs)
    rosters2 = s2.collect_keys(adv)
    assert set(rosters2) == {2, 3, 4, 5} and s2.dropped[1] == Stage.ADVERTISE_KEYS
    shares, unmasked = {}, {}
    for u in ids:
        f = {wire.FIELD_NEXT_STAGE: int(Stage.SHARE_KEYS), wire.FIELD_NEXT_PAYLOAD: wire.encode(rosters2[u])} \
            if u in rosters2 else None
        out = sites[u].send(Stage.UNMASK, unmask[u], fields=f)
        unmasked[u] = _reply(out)
        assert isinstance(unmasked[u], wire.UnmaskResponse)
        if u in rosters2:
            shares[u] = parse_next_reply(out)
    s1.collect_unmask(unmasked)
    # round 4 starts at its masked input (another model: one survivor set per model)
    bundles2 = s2.collect_shares(shares)
    model2 = {k: v + 0.5 for k, v in MODEL.items()}
    s2.bind_model(binding_digest(list(model2.items()), {"lr": 0.1}, spec.to_config()))
    extra2, fields2 = _masked_extra(spec, model2)
    reqs2 = s2.collect_masked({u: _reply(sites[u].send(Stage.MASKED_INPUT, m, extra2, fields2))
                               for u, m in bundles2.items()})
    unmask2 = s2.collect_consistency({u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs2.items()})
    total = s2.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in unmask2.items()})
    dec = decode_update(total.total, spec, len(total.survivors))
    assert total.survivors == (2, 3, 4, 5)
    w = np.array([10 + u for u in total.survivors], dtype=np.float64)
    expect = float(np.sum(w * 0.01 * np.array(total.survivors)) / w.sum())
    np.testing.assert_allclose(dec.mean_delta, expect, atol=spec.quantization.error_bound * 2)
    # site 1 left round 4 only: it trained once (round 3), never for round 4
    assert sites[1].trained == 1 and all(sites[u].trained == 2 for u in (2, 3, 4, 5))


# ---------------------------------------------------------------- 4, 5: a real Flower simulation
def _flower(tmp_path, rounds, fail=None, n=5):
    from flower_harness import initial_arrays, recording_client, run, train_config
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg

    from strategies import SecAggConfig, SecAggStrategy

    out: dict = {"models": {}}

    def main(grid: Grid, context: Context) -> None:
        inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy = SecAggStrategy(inner, SecAggConfig())

        def keep(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            out["models"][rnd] = [a.numpy().copy() for a in arrays.values()]
            return MetricRecord({"round": rnd})

        strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=rounds, train_config=train_config(),
                       evaluate_fn=keep)
        out["strategy"] = strategy

    run(main, recording_client(tmp_path, crash=fail), n)
    return out


def _maxdiff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_flower_simulation_pipelines_rounds_two_and_three(tmp_path):
    """SecAggStrategy(FedAvg) with the real secagg_mod on 5 SuperNodes for 3 rounds:
    each round's aggregate is the plaintext FedAvg of the updates within the
    quantization bound; round 1 makes 5 exchanges, rounds 2 and 3 three each."""
    from flower_harness import load_dump, weighted_mean

    out = _flower(tmp_path, rounds=3)
    reports = out["strategy"].reports
    assert [r.status for r in reports] == ["ok", "ok", "ok"]
    assert [r.exchanges for r in reports] == [5, 3, 3]
    assert [r.pipelined for r in reports] == [False, True, True]
    assert [r.next_round_set_up for r in reports] == [True, True, False]
    assert set(reports[0].stage_seconds) == set(FULL)
    assert set(reports[1].stage_seconds) == set(reports[2].stage_seconds) == set(STEADY)
    for r in reports:
        assert len(r.survivors) == 5 and not r.client_errors and not r.rejected
    for rnd in (1, 2, 3):
        updates = load_dump(tmp_path, rnd)
        assert len(updates) == 5
        assert _maxdiff(out["models"][rnd], weighted_mean(updates)) <= reports[rnd - 1].error_bound + 1e-6


@pytest.mark.slow
def test_flower_simulation_round_after_an_abort_sets_up_in_full(tmp_path):
    """Three of five sites fail their round-2 training: round 2 aborts (model unchanged)
    and round 3, whose advance setup never happened, pays the full five exchanges and
    is exact."""
    from flower_harness import load_dump, weighted_mean

    out = _flower(tmp_path, rounds=3, fail=lambda p, r: p in (0, 1, 2) and r == 2)
    reports = out["strategy"].reports
    assert [r.status for r in reports] == ["ok", "aborted", "ok"]
    assert [r.exchanges for r in reports] == [5, 1, 5]  # round 2 aborted after its masked input
    assert [r.pipelined for r in reports] == [False, True, False]
    assert [r.next_round_set_up for r in reports] == [True, False, False]  # round 3 is the last
    assert _maxdiff(out["models"][2], out["models"][1]) == 0.0
    updates = load_dump(tmp_path, 3)
    assert _maxdiff(out["models"][3], weighted_mean(updates)) <= reports[2].error_bound + 1e-6


@pytest.mark.slow
def test_flower_simulation_dp_budget_is_checked_before_a_pipelined_round_trains(tmp_path):
    """Distributed DP with room for two rounds: round 3 is set up during round 2 (its
    plan fit before round 2's spend was recorded), then its plan is checked again at its
    start and refused: training stops, and no site ever trained for round 3."""
    from flower_harness import (
        dry_run_epsilons,
        initial_arrays,
        load_dump,
        recording_client,
        run,
        train_config,
    )
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg

    from sgs_flower.dp.config import DPConfig
    from strategies import SecAggStrategy

    n = 4

    def dp(max_eps):
        return DPConfig(mode="distributed-dp", clip_norm=1.0, noise_multiplier=2.0, min_survivors=n,
                        max_epsilon=max_eps)

    eps = dry_run_epsilons(dp(None), n, 3)
    budget = (eps[1] + eps[2]) / 2
    out: dict = {"models": {}}

    def main(grid: Grid, context: Context) -> None:
        strategy = SecAggStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n),
                                  dp=dp(budget))

        def keep(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            out["models"][rnd] = True
            return MetricRecord({"round": rnd})

        strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=4, train_config=train_config(),
                       evaluate_fn=keep)
        out["strategy"] = strategy

    run(main, recording_client(tmp_path), n)
    reports = out["strategy"].reports
    assert [r.status for r in reports] == ["ok", "ok", "budget-exhausted"]
    assert [r.exchanges for r in reports[:2]] == [5, 3]
    # the DP rounds run at the plan's narrow width (sum plus noise), the advance setup too
    from sgs_flower.dp.aggregator import DPAggregator
    width = DPAggregator(dp(None)).plan(1, n, n, sum(a.size for a in initial_arrays().to_numpy_ndarrays())).field_bits
    assert width < 32 and [r.field_bits for r in reports[:2]] == [width, width]
    assert reports[1].next_round_set_up  # round 3's keys and shares went out during round 2...
    assert load_dump(tmp_path, 3) == []  # ...but no site trained for it
    assert sorted(out["models"]) == [0, 1, 2]
    assert "privacy budget exhausted" in out["strategy"].stopped


# ---------------------------------------------------------------- 6: the wrapped strategy's hooks
# SecAggStrategy.start() through an in-process Grid: each pushed message is answered at
# once by its node's site (the real secagg_mod in front of a small deterministic train
# function), so the same sites also run plain Flower's own Strategy.start for comparison.
def _hooked(base):
    """``base`` (a FedAvg-family class) counting its hook calls per round, stepping a
    learning-rate schedule in configure_train (lr = 0.1 * 0.5**k, k = earlier calls, as
    Flower's advanced-pytorch example does), and noting, at each aggregate_train, whether
    FedOpt's current_arrays is the model that round's configure_train was given."""

    class Hooked(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kw):
            super().__init__(**kw)
            self.calls: dict[str, list[int]] = {h: [] for h in HOOKS}
            self.given: dict[int, list[np.ndarray]] = {}
            self.steps_from_given: dict[int, bool] = {}

        def configure_train(self, server_round, arrays, config, grid):
            config["lr"] = 0.1 * 0.5 ** len(self.calls["configure_train"])
            self.calls["configure_train"].append(server_round)
            self.given[server_round] = [a.numpy().copy() for a in arrays.values()]
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            self.calls["aggregate_train"].append(server_round)
            current = getattr(self, "current_arrays", None)
            if isinstance(current, dict):  # FedOpt: {key: ndarray}, set by configure_train
                given = self.given[server_round]
                self.steps_from_given[server_round] = all(
                    np.array_equal(c, g) for c, g in zip(current.values(), given, strict=True))
            return super().aggregate_train(server_round, replies)

        def configure_evaluate(self, server_round, arrays, config, grid):
            self.calls["configure_evaluate"].append(server_round)
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):
            self.calls["aggregate_evaluate"].append(server_round)
            return super().aggregate_evaluate(server_round, replies)

    return Hooked


HOOKS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
HOOK_MODEL = {"w": np.linspace(-0.5, 0.5, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, dtype=np.float32)}


class HookSite:
    """One SuperNode in process: trains x -> x + lr * (target - x) with the lr its train
    config carries (a contraction, so a model error of one round does not grow), and
    records the round, lr and model of every train message it gets."""

    def __init__(self, node: int, secure: bool, fail_rounds: tuple[int, ...] = ()) -> None:
        from flwr.app import Context, RecordDict

        self.node, self.secure, self.fail_rounds = node, secure, fail_rounds
        self.context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        self.received: list[tuple[int, float, list[np.ndarray]]] = []
        self.evaluated: list[int] = []

    def train(self, msg, context):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        cfg = msg.content["config"]
        rnd, lr = int(cfg["server-round"]), float(cfg["lr"])
        arrays = msg.content["arrays"]
        self.received.append((rnd, lr, [a.numpy().copy() for a in arrays.values()]))
        if rnd in self.fail_rounds:
            raise RuntimeError(f"site {self.node} fails in round {rnd}")
        target = 0.2 * self.node - 0.6
        new = ArrayRecord({k: Array((a.numpy() + lr * (target - a.numpy())).astype(np.float32))
                           for k, a in arrays.items()})
        metrics = MetricRecord({"num-examples": 10 + self.node, "train_loss": 1.0 / self.node})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    def handle(self, msg):
        from flwr.app import Message, MessageType, MetricRecord, RecordDict

        from clients.secagg_mod import secagg_mod

        if msg.metadata.message_type == MessageType.EVALUATE:
            def evaluate(msg, context):
                self.evaluated.append(int(msg.content["config"]["server-round"]))
                metrics = MetricRecord({"num-examples": 10 + self.node, "eval_loss": 0.5})
                return Message(RecordDict({"metrics": metrics}), reply_to=msg)

            # federated evaluation is a secure round too (tests/test_secure_evaluation.py)
            return secagg_mod(msg, self.context, evaluate) if self.secure else evaluate(msg, self.context)
        cfg = msg.content.config_records.get("config")
        if self.secure and cfg is not None and int(cfg.get("server-round", 0)) in self.fail_rounds:
            # the node crashes at its masked-input stage: an error reply, a dropout (a train
            # function that raises would not do: secagg_mod sends an unusable vector then)
            from flwr.app import Error
            from flwr.common.constant import ErrorCode

            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="simulated crash"), reply_to=msg)
        return secagg_mod(msg, self.context, self.train) if self.secure else self.train(msg, self.context)


def _local_grid(sites):
    from types import SimpleNamespace
    from uuid import uuid4

    from flwr.serverapp import Grid

    class LocalGrid(Grid):
        def __init__(self) -> None:
            self.replies: dict = {}

        @property
        def run(self):
            return SimpleNamespace(run_id=1)

        def set_run(self, run_id):  # pragma: no cover - strategies do not call it
            raise NotImplementedError

        def create_message(self, *a, **k):  # pragma: no cover
            raise NotImplementedError

        def get_node_ids(self):
            return list(sites)

        def get_nodes(self):  # pragma: no cover
            raise NotImplementedError

        def push_messages(self, messages):
            ids = []
            for m in messages:
                m.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
                self.replies[m.metadata.message_id] = sites[m.metadata.dst_node_id].handle(m)
                ids.append(m.metadata.message_id)
            return ids

        def pull_messages(self, message_ids):
            return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

        def send_and_receive(self, messages, *, timeout=None):
            return self.pull_messages(self.push_messages(messages))

    return LocalGrid()


@pytest.fixture
def task_identity(monkeypatch):
    """Flower messages built outside a running app need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _run_hooked(base, secure: bool, rounds: int = 3, n: int = 5, fail=None, **kw):
    """``rounds`` rounds of ``_hooked(base)`` over ``n`` in-process sites, through
    SecAggStrategy (``secure``) or plain Flower's own Strategy.start; returns the
    global model after each round, the strategies and the sites."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    from strategies import SecAggConfig, SecAggStrategy

    sites = {u: HookSite(u, secure, fail(u) if fail else ()) for u in range(1, n + 1)}
    inner = _hooked(base)(min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n, **kw)
    strategy = SecAggStrategy(inner, SecAggConfig()) if secure else inner
    models: dict[int, list[np.ndarray]] = {}

    def keep(rnd, arrays):
        models[rnd] = [a.numpy().copy() for a in arrays.values()]
        return MetricRecord({"round": rnd})

    strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({k: Array(v) for k, v in HOOK_MODEL.items()}),
                   num_rounds=rounds, train_config=ConfigRecord({"lr": 1.0}), evaluate_fn=keep)
    return models, strategy, inner, sites


def _schedule(rounds):
    return [0.1 * 0.5 ** (r - 1) for r in range(1, rounds + 1)]


def test_hooks_run_once_per_round_and_the_lr_schedule_steps_once(task_identity, recwarn):
    """A FedAvg subclass stepping its lr schedule in configure_train, with federated
    evaluation: over four rounds (three pipelined) every hook runs once per round, each
    round's sites get the schedule's lr and the previous round's global model, and the
    secure models equal plain Flower's (the same subclass through Strategy.start) within
    the summed quantization bounds."""
    from flwr.serverapp.strategy import FedAvg

    rounds = 4
    models, secure, inner, sites = _run_hooked(FedAvg, True, rounds, fraction_evaluate=1.0)
    reports = secure.reports
    assert [r.status for r in reports] == ["ok"] * rounds
    assert [r.exchanges for r in reports] == [5, 3, 3, 3]
    assert [r.pipelined for r in reports] == [False, True, True, True]
    want = list(range(1, rounds + 1))
    assert inner.calls == {h: want for h in HOOKS}
    # each evaluation a secure round of its own, beside the pipelined train rounds
    assert [(r.status, r.exchanges) for r in secure.eval_reports] == [("ok", 5)] * rounds
    for site in sites.values():
        assert [(r, lr) for r, lr, _ in site.received] == list(zip(want, _schedule(rounds), strict=True))
        assert site.evaluated == want
        for rnd, _, model in site.received:  # trained from the model the previous round released
            prev = models[rnd - 1]
            assert all(np.array_equal(a, b) for a, b in zip(model, prev, strict=True))

    plain_models, _, plain_inner, plain_sites = _run_hooked(FedAvg, False, rounds, fraction_evaluate=1.0)
    assert plain_inner.calls == {h: want for h in HOOKS}
    assert [(r, lr) for r, lr, _ in plain_sites[1].received] == [(r, lr) for r, lr, _ in sites[1].received]
    bound = 0.0
    for rnd in want:
        bound += reports[rnd - 1].error_bound  # the map is a contraction: errors at most add up
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(models[rnd], plain_models[rnd],
                                                                                    strict=True))
        assert 0 < diff <= bound + 1e-6, (rnd, diff, bound)


def test_fedadam_steps_from_the_model_its_round_sent_and_matches_plain_fedadam(task_identity):
    """FedOpt keeps the arrays configure_train is given and steps from them in
    aggregate_train: with one configure_train call per round, made when the round
    starts, that is the model the round's sites trained from, and the secure FedAdam
    run equals plain Flower's FedAdam round by round."""
    from flwr.serverapp.strategy import FedAdam

    kw = {"fraction_evaluate": 0.0, "eta": 0.01}
    models, secure, inner, sites = _run_hooked(FedAdam, True, **kw)
    assert [r.exchanges for r in secure.reports] == [5, 3, 3]
    assert inner.calls == {h: [1, 2, 3] for h in HOOKS}
    assert inner.steps_from_given == {1: True, 2: True, 3: True}
    plain_models, _, plain_inner, _ = _run_hooked(FedAdam, False, **kw)
    assert plain_inner.steps_from_given == {1: True, 2: True, 3: True}
    init = list(HOOK_MODEL.values())
    bound = 0.0
    for rnd in (1, 2, 3):
        bound += secure.reports[rnd - 1].error_bound
        # FedAdam moved the model (by about eta per coordinate and round, far beyond the bound)...
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(models[rnd], models[rnd - 1], strict=True)) > 5e-3
        # ...as it does on plaintext: within the summed bounds (measured: at most a third of them)
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(models[rnd], plain_models[rnd],
                                                                                    strict=True))
        assert diff <= bound, (rnd, diff, bound)
    assert all(np.array_equal(a, b) for a, b in zip(sites[1].received[0][2], init, strict=True))


def test_aborted_round_still_runs_each_hook_once_and_the_next_sets_up_in_full(task_identity):
    """Three of five sites crash at their round-2 masked input: round 2 aborts (model unchanged),
    aggregate_train is asked with no reply (as Flower's loop asks it with failures
    only), the schedule still steps once per round, and round 3 makes five exchanges."""
    from flwr.serverapp.strategy import FedAvg

    models, secure, inner, sites = _run_hooked(FedAvg, True, fail=lambda u: (2,) if u <= 3 else (),
                                               fraction_evaluate=0.0)
    assert [r.status for r in secure.reports] == ["ok", "aborted", "ok"]
    assert [r.exchanges for r in secure.reports] == [5, 1, 5]
    assert inner.calls == {h: [1, 2, 3] for h in HOOKS}
    assert all(np.array_equal(a, b) for a, b in zip(models[2], models[1], strict=True))
    assert [(r, lr) for r, lr, _ in sites[5].received] == list(zip([1, 2, 3], _schedule(3), strict=True))


def test_confidential_rounds_stay_pipelined_and_the_key_phase_runs_once():
    """Issue 20: the model-confidential mode keeps the pipelined rounds (5 exchanges,
    then 3) and adds the model-key phase's three exchanges once, before round 1; no
    later round asks for keys again, and every site trains on the unmasked model."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg
    from inprocess_grid import DirectGrid, Site

    from sgs_flower.confidential.masked_model import WORDS_KEY
    from strategies import SecAggConfig, SecAggStrategy
    from strategies.model_key_phase import KEY_RECORD

    sites = {u: Site(u) for u in range(1, 6)}
    grid = DirectGrid(sites)
    st = SecAggStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5),
                        SecAggConfig(confidential=True, clip_range=4.0, node_wait_timeout=1))
    init = ArrayRecord({"w": Array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))})
    st.start(grid=grid, initial_arrays=init, num_rounds=4, train_config=ConfigRecord({"lr": 0.1}))
    assert [r.exchanges for r in st.reports] == [5, 3, 3, 3]
    assert [r.pipelined for r in st.reports] == [False, True, True, True]
    key_msgs = [m for m in grid.sent if KEY_RECORD in m.content.config_records]
    assert len(key_msgs) == 5 + 1 + 4  # status to all, wrap to the leader, install to the others
    sent_models = [m.content.array_records["arrays"] for m in grid.sent if "arrays" in m.content.array_records]
    assert sum(WORDS_KEY not in a for a in sent_models) == 5  # only round 1's initial model is plaintext
    assert all(len(s.seen) == 4 for s in sites.values())


def test_groups_learnt_in_round_1_hold_in_the_rounds_set_up_ahead(task_identity):
    """Whole-group participation at its default, nine sites (three learnt groups of 3):
    round 2 is set up during round 1, before the server has learnt the groups; it still
    sums whole groups, pipelined (3 exchanges). Site 4 crashes at round 3's masked input:
    its group is left out whole in a pipelined round, and round 3's model is FedAvg's over
    the six sites left, within the round's bound."""
    from flwr.serverapp.strategy import FedAvg

    models, secure, _inner, _sites = _run_hooked(FedAvg, True, rounds=3, n=9, fail=lambda u: (3,) if u == 4 else ())
    reports = secure.reports
    assert [r.status for r in reports] == ["ok"] * 3
    assert [r.exchanges for r in reports] == [5, 3, 3] and [r.pipelined for r in reports] == [False, True, True]
    assert [r.groups for r in reports[:2]] == [[0, 1, 2]] * 2 and reports[1].group_excluded == 0
    r3 = reports[2]
    assert r3.group_excluded == 2 and len(r3.survivors) == 6 and 4 not in r3.survivors and len(r3.groups) == 2
    w = {u: 10 + u for u in r3.survivors}
    prev = models[2][0].astype(np.float64)
    lr = _schedule(3)[2]  # the hooked strategy's lr schedule
    want = sum(w[u] * lr * (0.2 * u - 0.6 - prev) for u in w) / sum(w.values())  # x + lr (target - x), averaged
    np.testing.assert_allclose(models[3][0] - prev, want, atol=r3.error_bound + 1e-6)
